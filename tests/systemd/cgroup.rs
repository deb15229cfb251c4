//! A private cgroup subtree for the test's systemd, in every hierarchy the
//! host has mounted (cgroup v1, v2 or both). The systemd runs in a cgroup
//! namespace rooted there, so it never touches the host's own cgroups, and
//! teardown kills everything in the subtree and removes it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One directory per hierarchy, all named the same.
pub struct CgroupTree {
    pub dirs: Vec<PathBuf>,
}

/// The cgroup mounts of this process: (mount point, mount root, fstype, super options).
fn cgroup_mounts() -> Vec<(PathBuf, String, String, String)> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<(PathBuf, String, String, String)> = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split_whitespace().collect();
        let r: Vec<&str> = right.split_whitespace().collect();
        if l.len() < 5 || r.len() < 3 || !(r[0] == "cgroup" || r[0] == "cgroup2") {
            continue;
        }
        let mount = PathBuf::from(l[4]);
        if out.iter().any(|(m, ..)| *m == mount) {
            continue;
        }
        out.push((mount, l[3].to_owned(), r[0].to_owned(), r[2].to_owned()));
    }
    out
}

/// This process's path in the hierarchy with `fstype` and `opts`.
fn own_path(proc_cgroup: &str, fstype: &str, opts: &str) -> Option<String> {
    let opts: Vec<&str> = opts.split(',').collect();
    proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let matches = if fstype == "cgroup2" {
            ctrls.is_empty()
        } else {
            !ctrls.is_empty() && ctrls.split(',').all(|c| opts.contains(&c))
        };
        matches.then(|| path.to_owned())
    })
}

impl CgroupTree {
    /// Creates `name` under this process's cgroup in every hierarchy.
    pub fn create(name: &str) -> Result<CgroupTree, String> {
        let proc_cgroup = fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let mut tree = CgroupTree { dirs: Vec::new() };
        for (mount, root, fstype, opts) in cgroup_mounts() {
            let Some(path) = own_path(&proc_cgroup, &fstype, &opts) else {
                continue;
            };
            // Inside a cgroup namespace or a bind mount the mount's root is
            // a prefix of our path.
            let rel = path.strip_prefix(root.as_str()).unwrap_or(&path);
            let dir = mount.join(rel.trim_start_matches('/')).join(name);
            fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            tree.dirs.push(dir.clone());
            // A v1 cpuset cgroup takes no tasks until it has CPUs and memory nodes.
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if dir.join(f).exists() {
                    let v = fs::read_to_string(dir.join("..").join(f)).unwrap_or_default();
                    fs::write(dir.join(f), v.trim()).map_err(|e| format!("{f}: {e}"))?;
                }
            }
        }
        if tree.dirs.is_empty() {
            return Err("no cgroup hierarchy is mounted".into());
        }
        Ok(tree)
    }

    /// The files a process writes its pid to, to move into the tree.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Every pid in the tree (any hierarchy; all hold the same processes).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for d in &self.dirs {
            walk(d, &mut |dir| {
                let text = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            });
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills every process in the tree and waits until none is left.
    pub fn kill_all(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            for d in &self.dirs {
                // cgroup v2 (Linux >= 5.14) kills the whole subtree at once.
                let _ = fs::write(d.join("cgroup.kill"), "1");
            }
            let pids = self.pids();
            if pids.is_empty() {
                return true;
            }
            for pid in pids {
                // SAFETY: kill(2) with a pid read from our own cgroup subtree.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes the (empty) tree, deepest directories first.
    pub fn remove(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        for d in &self.dirs {
            let mut dirs = Vec::new();
            walk(d, &mut |dir| dirs.push(dir.to_path_buf()));
            // walk is pre-order: reversed, children come before parents.
            for dir in dirs.iter().rev() {
                if let Err(e) = fs::remove_dir(dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        errors.push(format!("rmdir {}: {e}", dir.display()));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    f(dir);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&e.path(), f);
        }
    }
}
