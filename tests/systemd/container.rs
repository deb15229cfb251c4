//! A real systemd as PID 1 of its own PID, mount, network and cgroup
//! namespaces (its TAP devices never touch the host's network), on
//! an overlay over the cached Debian rootfs (systemd-nspawn does not work on
//! the development machines). Everything is torn down on drop: the
//! processes (through the cgroup subtree), the namespaces with them, the
//! overlay, the temporary directory.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cgroup::CgroupTree;

/// Output of a command run inside the container.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Files placed into the container before systemd starts.
pub enum Item<'a> {
    /// Written into the overlay's upper layer.
    File { path: &'a str, contents: &'a [u8] },
    /// A host file bind-mounted read-only at `path`.
    Bind { host: &'a Path, path: &'a str },
}

pub struct Container {
    dir: PathBuf,
    child: Option<Child>,
    /// Host pid of the container's systemd (its PID 1).
    pid: u32,
    cgroups: CgroupTree,
    torn_down: bool,
}

/// The cached rootfs; built by tests/systemd/make-rootfs.sh if missing.
pub fn rootfs(repo: &Path) -> Result<PathBuf, String> {
    let out = Command::new("sh")
        .arg(repo.join("tests/systemd/make-rootfs.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run make-rootfs.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!("make-rootfs.sh failed: {:?}", out.status));
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(PathBuf::from(path))
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Container {
    pub fn start(rootfs: &Path, items: &[Item<'_>]) -> Result<Container, String> {
        let tag = format!(
            "ksmvm-systemd-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        );
        let dir = std::env::temp_dir().join(&tag);
        let (upper, work, root) = (dir.join("upper"), dir.join("work"), dir.join("root"));
        for d in [&upper, &work, &root] {
            fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        }
        let mut binds = String::new();
        for item in items {
            match item {
                Item::File { path, contents } => {
                    let p = upper.join(path.trim_start_matches('/'));
                    if let Some(parent) = p.parent() {
                        fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                    }
                    fs::write(&p, contents).map_err(|e| format!("{}: {e}", p.display()))?;
                }
                Item::Bind { host, path } => {
                    let target = format!("{}/{}", root.display(), path.trim_start_matches('/'));
                    let host = host.display().to_string();
                    binds += &format!(
                        "mkdir -p \"$(dirname {t})\"; [ -e {t} ] || touch {t}; mount --bind {h} {t}; mount -o remount,bind,ro {t} 2>/dev/null || true\n",
                        t = sh_quote(&target),
                        h = sh_quote(&host)
                    );
                }
            }
        }

        let cgroups = CgroupTree::create(&tag)?;
        let procs: Vec<String> = cgroups
            .procs_files()
            .iter()
            .map(|p| sh_quote(&p.display().to_string()))
            .collect();
        // Runs as PID 1 of the new namespaces until it execs systemd.
        let inner = format!(
            "set -e\n\
             mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} {root}\n\
             mount -t proc proc {root}/proc\n\
             {binds}\
             exec chroot {root} /usr/bin/env container=other /lib/systemd/systemd --system\n",
            lower = sh_quote(&rootfs.display().to_string()),
            upper = sh_quote(&upper.display().to_string()),
            work = sh_quote(&work.display().to_string()),
            root = sh_quote(&root.display().to_string()),
        );
        // Moves itself into the private cgroups, then makes the namespaces:
        // the cgroup namespace is rooted where the shell stands at unshare.
        let outer = format!(
            "for f in {procs}; do echo $$ > \"$f\"; done\n\
             exec unshare --cgroup --fork --pid --mount --net --propagation private -- sh -c {inner}\n",
            procs = procs.join(" "),
            inner = sh_quote(&inner),
        );
        let console = fs::File::create(dir.join("console.log")).map_err(|e| e.to_string())?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(outer)
            .stdin(Stdio::null())
            .stdout(console.try_clone().map_err(|e| e.to_string())?)
            .stderr(console)
            .spawn()
            .map_err(|e| format!("cannot start unshare: {e}"))?;
        let mut c = Container {
            dir,
            child: Some(child),
            pid: 0,
            cgroups,
            torn_down: false,
        };
        c.pid = c.find_systemd(Duration::from_secs(20))?;
        c.wait_booted(Duration::from_secs(60))?;
        Ok(c)
    }

    /// The host pid of the systemd the unshare child became.
    fn find_systemd(&mut self, timeout: Duration) -> Result<u32, String> {
        let deadline = Instant::now() + timeout;
        let unshare = self.child.as_ref().map_or(0, Child::id);
        loop {
            let children = fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
                .unwrap_or_default();
            for pid in children.split_whitespace() {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return pid.parse().map_err(|_| "bad pid".to_string());
                }
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!("unshare exited ({st}): {}", self.console()));
            }
            if Instant::now() > deadline {
                return Err(format!("systemd did not start: {}", self.console()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_booted(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.sh("systemctl is-system-running", Duration::from_secs(10));
            let state = out.stdout.trim();
            if state == "running" || state == "degraded" {
                if state == "degraded" {
                    eprintln!(
                        "container systemd is degraded: {}",
                        self.sh("systemctl --failed --no-legend", Duration::from_secs(10))
                            .stdout
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "systemd did not finish booting (state {state:?}): {}",
                    self.console()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What systemd wrote to its console.
    pub fn console(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join("console.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Runs `cmd` with /bin/sh inside the container's namespaces and root.
    pub fn sh(&self, cmd: &str, timeout: Duration) -> Out {
        let pid = self.pid.to_string();
        let mut child = match Command::new("nsenter")
            .args([
                "-t", &pid, "-m", "-p", "-r", "-w", "--", "/bin/sh", "-c", cmd,
            ])
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                return Out {
                    code: None,
                    stdout: String::new(),
                    stderr: format!("cannot run nsenter: {e}"),
                }
            }
        };
        let read = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_string(&mut s);
                }
                s
            })
        };
        let out = read(child.stdout.take().map(|r| Box::new(r) as _));
        let err = read(child.stderr.take().map(|r| Box::new(r) as _));
        let deadline = Instant::now() + timeout;
        let code = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        Out {
            code,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        }
    }

    /// Runs a host program (`ip`: the rootfs has no iproute2) inside the
    /// container's network namespace only.
    pub fn host_in_netns(&self, args: &[&str]) -> Out {
        let pid = self.pid.to_string();
        match Command::new("nsenter")
            .args(["-t", &pid, "-n", "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) => Out {
                code: o.status.code(),
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            },
            Err(e) => Out {
                code: None,
                stdout: String::new(),
                stderr: format!("cannot run nsenter: {e}"),
            },
        }
    }

    /// Kills everything, removes the cgroups and the temporary directory.
    pub fn teardown(&mut self) -> Result<(), String> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        // The namespace's PID 1 first: the kernel then kills the namespace.
        // A pid is at most PID_MAX_LIMIT (2^22): it fits a pid_t.
        match libc::pid_t::try_from(self.pid) {
            Ok(0) | Err(_) => {}
            // SAFETY: kill(2) on the systemd this container started.
            Ok(pid) => unsafe {
                libc::kill(pid, libc::SIGKILL);
            },
        }
        let killed = self.cgroups.kill_all(Duration::from_secs(10));
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let removed = self.cgroups.remove();
        // The overlay lived in the dead mount namespace; only plain files are left.
        let _ = fs::remove_dir_all(&self.dir);
        match (killed, removed) {
            (true, Ok(())) => Ok(()),
            (false, _) => Err(format!("processes survived: {:?}", self.cgroups.pids())),
            (_, Err(e)) => Err(e),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("systemd test teardown: {e}");
        }
    }
}
