//! Binding a VM's API socket: mode 0600 from the start, a stale socket
//! (nobody listening) replaced, a live one refused, and the file removed
//! when the VM ends.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("VM {name} already running (socket {})", path.display())]
    AlreadyRunning { name: String, path: PathBuf },
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error("API socket {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SocketError {
    let path = path.to_path_buf();
    move |source| SocketError::Io { path, what, source }
}

/// The socket file we created; removed on drop unless someone replaced it.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Identity of the file: inode numbers are reused at once on some file
    /// systems, so the change time (set by our chmod) is compared too.
    id: (u64, u64, i64, i64),
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Only our own inode: a successor may already have bound a new socket.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if file_id(&m) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// A bound, listening API socket and the file that goes with it.
#[derive(Debug)]
pub struct ApiSocket {
    pub listener: UnixListener,
    pub file: SocketFile,
}

impl ApiSocket {
    /// Binds `path` for VM `name`.
    pub fn bind(path: &Path, name: &str) -> Result<Self, SocketError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // A new runtime directory is private; an existing one is left as is.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir, "cannot create the directory"))?;
        // Serialise check-remove-bind with other ksmvm processes starting in
        // the same directory, so two of them cannot both "replace" a socket.
        let dir_file = File::open(&dir).map_err(io_err(&dir, "cannot open the directory"))?;
        let _dir_lock = Flock::lock(dir_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err(&dir, "cannot lock the directory")(e.into()))?;

        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(SocketError::AlreadyRunning {
                        name: name.to_owned(),
                        path: path.to_path_buf(),
                    });
                }
                log::info!("replacing stale API socket {}", path.display());
                std::fs::remove_file(path)
                    .map_err(io_err(path, "cannot remove the stale socket"))?;
            }
            Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path, "cannot inspect")(e)),
        }

        let listener = bind_private(path)?;
        let m = std::fs::symlink_metadata(path).map_err(io_err(path, "cannot inspect"))?;
        Ok(Self {
            listener,
            file: SocketFile {
                path: path.to_path_buf(),
                id: file_id(&m),
            },
        })
    }
}

/// socket + fchmod(0600) + bind + listen: Linux creates the socket file
/// with the socket inode's mode, so the file is never more open than 0600.
fn bind_private(path: &Path) -> Result<UnixListener, SocketError> {
    let errno = |what| move |e: nix::Error| io_err(path, what)(e.into());
    let fd: OwnedFd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(errno("socket"))?;
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(errno("fchmod"))?;
    let addr = UnixAddr::new(path).map_err(errno("bad socket path"))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(errno("bind"))?;
    // Whatever the umask did, the file ends up 0600.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(path, "chmod"))?;
    socket::listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN)).map_err(errno("listen"))?;
    // SAFETY: `fd` is a bound, listening AF_UNIX stream socket that we own;
    // ownership moves into the listener.
    Ok(unsafe { UnixListener::from_raw_fd(fd.into_raw_fd()) })
}

impl crate::outcome::HasExitStatus for SocketError {
    /// A socket path that is in use or cannot be made is the host's state.
    fn exit_status(&self) -> crate::outcome::ExitStatus {
        crate::outcome::ExitStatus::Failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ksmvm-sock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn binds_private_refuses_live_replaces_stale_and_cleans_up() {
        let dir = tmp("life");
        let path = dir.join("vm.sock");
        let s = ApiSocket::bind(&path, "vm").unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let err = ApiSocket::bind(&path, "vm").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("VM vm already running (socket {})", path.display())
        );

        // Nobody listening any more, but the file stays: stale.
        let ApiSocket { listener, file } = s;
        drop(listener);
        std::mem::forget(file);
        assert!(path.exists());
        let s2 = ApiSocket::bind(&path, "vm").unwrap();
        drop(s2);
        assert!(!path.exists(), "socket must be removed on drop");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_to_replace_other_files_and_keeps_a_successors_socket() {
        let dir = tmp("other");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.sock");
        std::fs::write(&path, "data").unwrap();
        assert!(matches!(
            ApiSocket::bind(&path, "x"),
            Err(SocketError::NotASocket(_))
        ));
        std::fs::remove_file(&path).unwrap();

        let first = ApiSocket::bind(&path, "x").unwrap();
        drop(first.listener);
        let second = ApiSocket::bind(&path, "x").unwrap();
        drop(first.file); // must not remove the second VM's socket
        assert!(path.exists());
        drop(second);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
