//! [`Launch`]: what VMM process to start, and how.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ksmvm::instance::RUNTIME_DIR_ENV;

use crate::dirs::RuntimeDir;
use crate::net::NetNs;

use super::Vmm;

/// Where a VMM's `KSMVM_RUNTIME_DIR` points.
#[derive(Debug, Clone)]
pub(super) enum Runtime {
    /// A private directory, created at spawn, removed with the [`Vmm`].
    Private,
    /// A directory the caller owns (shared by several VMMs).
    In(PathBuf),
    /// Whatever this process's environment says.
    Inherit,
}

/// A VMM process to start: ksmvm by default, with arguments, environment,
/// runtime directory and network namespace. See the module documentation
/// for what every [`Vmm`] gets.
#[derive(Debug, Clone)]
pub struct Launch {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    netns: Option<String>,
    runtime: Runtime,
    current_dir: Option<PathBuf>,
    stdin: bool,
    echo_stderr: bool,
}

impl Launch {
    /// ksmvm ([`crate::ksmvm`]) with `args`.
    pub fn new<I, S>(args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Launch::program(crate::ksmvm()).args(args)
    }

    /// Any program (another ksmvm binary, another VMM, `sh -c`).
    pub fn program(program: impl AsRef<OsStr>) -> Launch {
        Launch {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            netns: None,
            runtime: Runtime::Private,
            current_dir: None,
            stdin: true,
            echo_stderr: false,
        }
    }

    #[must_use]
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Launch {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    #[must_use]
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Launch {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs the program inside `ns` (`ip netns exec NAME PROGRAM ARGS`;
    /// ip(8) execs it, so the [`Vmm::pid`] is the program's).
    #[must_use]
    pub fn netns(mut self, ns: &NetNs) -> Launch {
        self.netns = Some(ns.name.clone());
        self
    }

    /// `KSMVM_RUNTIME_DIR=dir`, a directory the caller keeps.
    #[must_use]
    pub fn runtime_dir(mut self, dir: &Path) -> Launch {
        self.runtime = Runtime::In(dir.to_path_buf());
        self
    }

    /// No `KSMVM_RUNTIME_DIR` of the kit's: the program sees this process's
    /// environment (another VMM, or a binary without the control API).
    #[must_use]
    pub fn inherit_runtime_dir(mut self) -> Launch {
        self.runtime = Runtime::Inherit;
        self
    }

    /// Runs the program in `dir`.
    #[must_use]
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Launch {
        self.current_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// stdin is /dev/null instead of a pipe ([`Vmm::send`] then fails).
    #[must_use]
    pub fn stdin_closed(mut self) -> Launch {
        self.stdin = false;
        self
    }

    /// Copies the VMM's stderr to this process's stderr (still captured).
    #[must_use]
    pub fn echo_stderr(mut self) -> Launch {
        self.echo_stderr = true;
        self
    }

    /// The command that [`Launch::spawn`] runs, for display (without the
    /// private runtime directory, which only exists once it runs).
    pub fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Runtime::In(dir) = &self.runtime {
            cmd.env(RUNTIME_DIR_ENV, dir);
        }
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        cmd
    }

    /// Starts the process.
    pub fn spawn(self) -> io::Result<Vmm> {
        let mut cmd = self.command();
        let (private, dir) = match &self.runtime {
            Runtime::Private => {
                let d = RuntimeDir::create("run")?;
                cmd.env(RUNTIME_DIR_ENV, d.path());
                let p = d.path().to_path_buf();
                (Some(d), Some(p))
            }
            Runtime::In(d) => (None, Some(d.clone())),
            Runtime::Inherit => (None, None),
        };
        let mut vmm = Vmm::spawn_with(&mut cmd, self.stdin, self.echo_stderr)?;
        vmm.own_runtime = private;
        vmm.runtime = dir;
        Ok(vmm)
    }

    /// Like [`Launch::spawn`], for tests.
    ///
    /// # Panics
    /// When the process cannot be started.
    pub fn start(self) -> Vmm {
        let program = self.program.clone();
        self.spawn()
            .unwrap_or_else(|e| panic!("cannot start {program:?}: {e}"))
    }
}

/// Makes `cmd` a child that cannot outlive the thread that starts it (nor
/// the harness) and that does not receive the terminal's Ctrl-C itself.
pub fn contain(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe; the closure touches
    // no memory shared with the parent (it owns a copy of `parent`).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
    cmd.process_group(0);
}
