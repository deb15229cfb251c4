//! sd_notify(3) through one datagram socket, opened when the VMM starts.
//!
//! The sd-notify crate opens a new socket for every notification. A VMM at
//! its fd limit (a flood of API connections) then cannot notify at all:
//! each WATCHDOG=1 failed with EMFILE, and systemd would have killed a
//! healthy VMM. With the socket opened up front, sending needs no fd: every
//! notification is a `sendto` to $NOTIFY_SOCKET's address, which also
//! survives systemd re-creating its socket (daemon-reexec).

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use sd_notify::NotifyState;

/// The environment variable systemd passes to a Type=notify service.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// A notification that cannot be queued within this long is given up (and
/// reported): the main loop that sends it must not hang on a stuck systemd.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("unsupported {NOTIFY_SOCKET_ENV}={0:?}: expected an absolute path or @abstract-name")]
    Unsupported(String),
    #[error("{NOTIFY_SOCKET_ENV}={target}: {source}")]
    Socket { target: String, source: io::Error },
}

/// The service manager's notification socket, ready to send to.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The socket named by $NOTIFY_SOCKET; None outside systemd.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        match std::env::var_os(NOTIFY_SOCKET_ENV) {
            Some(target) if !target.is_empty() => Self::new(&target).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for `target`: `/path` (a socket file) or `@name` (Linux's
    /// abstract namespace), as sd_notify(3) defines $NOTIFY_SOCKET.
    pub fn new(target: &OsStr) -> Result<Self, NotifyError> {
        let shown = target.to_string_lossy().into_owned();
        let bytes = target.as_bytes();
        let sock_err = |source| NotifyError::Socket {
            target: shown.clone(),
            source,
        };
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(target).map_err(sock_err)?,
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]).map_err(sock_err)?,
            _ => return Err(NotifyError::Unsupported(shown)),
        };
        let sock = UnixDatagram::unbound().map_err(sock_err)?;
        sock.set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(sock_err)?;
        Ok(Self { sock, addr })
    }

    /// Sends `states` as one datagram (`KEY=VALUE` lines), opening nothing.
    pub fn send(&self, states: &[NotifyState]) -> io::Result<()> {
        let msg = message(states);
        let sent = self.sock.send_to_addr(msg.as_bytes(), &self.addr)?;
        if sent == msg.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", msg.len()),
            ))
        }
    }
}

/// The datagram for `states`: one `KEY=VALUE` line each.
pub fn message(states: &[NotifyState]) -> String {
    states.iter().map(|s| format!("{s}\n")).collect()
}

#[cfg(test)]
mod tests;
