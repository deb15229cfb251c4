//! Network namespaces made by a test (deleted, with their TAP devices, on
//! drop) and raw Ethernet frames through AF_PACKET sockets.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

/// The kernel's constants, typed as the fields that take them.
#[allow(clippy::cast_possible_truncation, reason = "ETH_P_ALL is 3")]
const ETH_P_ALL: u16 = libc::ETH_P_ALL as u16;
#[allow(clippy::cast_possible_truncation, reason = "AF_PACKET is 17")]
const AF_PACKET: libc::sa_family_t = libc::AF_PACKET as libc::sa_family_t;

/// `size_of::<T>()` as the length of an option or address passed to the
/// kernel (in a `const`: checked at compile time).
#[allow(clippy::cast_possible_truncation, reason = "asserted to fit")]
const fn socklen<T>() -> libc::socklen_t {
    assert!(std::mem::size_of::<T>() <= libc::socklen_t::MAX as usize);
    std::mem::size_of::<T>() as libc::socklen_t
}

/// Runs ip(8), failing with its stderr.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        )))
    }
}

/// A network namespace made for one test, deleted (with its TAPs) on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// `ksmvm-TAG-PID`.
    pub fn create(tag: &str) -> io::Result<NetNs> {
        let name = format!("ksmvm-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        Ok(NetNs { name })
    }

    /// Like [`NetNs::create`], for tests.
    ///
    /// # Panics
    /// When ip(8) fails.
    pub fn new(tag: &str) -> NetNs {
        NetNs::create(tag).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `ip -n NAME ARGS...` in the namespace.
    pub fn try_ip(&self, args: &[&str]) -> io::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `ip -n NAME ARGS...` in the namespace, asserting success.
    ///
    /// # Panics
    /// When ip(8) fails.
    pub fn ip(&self, args: &[&str]) {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Creates a TAP device in the namespace and brings it up.
    pub fn try_add_tap(&self, tap: &str) -> io::Result<()> {
        self.try_ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
        self.try_ip(&["link", "set", tap, "up"])
    }

    /// Like [`NetNs::try_add_tap`], asserting success.
    ///
    /// # Panics
    /// When ip(8) fails.
    pub fn add_tap(&self, tap: &str) {
        self.try_add_tap(tap).unwrap_or_else(|e| panic!("{e}"));
    }

    /// A raw AF_PACKET socket bound to `ifname` inside the namespace: it
    /// sees every frame the guest sends and injects frames towards it.
    pub fn try_packet_socket(&self, ifname: &str) -> io::Result<OwnedFd> {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name))?;
        let ifname = CString::new(ifname).map_err(io::Error::other)?;
        // setns(CLONE_NEWNET) changes only the calling thread, so enter the
        // namespace on a thread of its own; the socket stays bound there.
        std::thread::spawn(move || -> io::Result<OwnedFd> {
            // SAFETY: setns on this thread only, with a netns fd we opened;
            // socket/bind get valid arguments and every result is checked;
            // the fd socket() returned is owned by nothing else.
            unsafe {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let proto = ETH_P_ALL.to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let index = libc::if_nametoindex(ifname.as_ptr());
                if index == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no interface {ifname:?}"),
                    ));
                }
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = AF_PACKET;
                sll.sll_protocol = proto;
                sll.sll_ifindex = libc::c_int::try_from(index).map_err(|_| {
                    io::Error::other(format!("interface index {index} out of range"))
                })?;
                if libc::bind(
                    fd.as_raw_fd(),
                    std::ptr::addr_of!(sll).cast(),
                    const { socklen::<libc::sockaddr_ll>() },
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(fd)
            }
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    }

    /// Like [`NetNs::try_packet_socket`], for tests.
    ///
    /// # Panics
    /// When the socket cannot be made.
    pub fn packet_socket(&self, ifname: &str) -> OwnedFd {
        self.try_packet_socket(ifname)
            .unwrap_or_else(|e| panic!("AF_PACKET socket on {ifname} in {}: {e}", self.name))
    }
}

/// A link's packet counters (`ip -s link`): what the kernel saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkPackets {
    /// Received by the interface: for a TAP, frames the VMM wrote to it
    /// (the guest's transmissions).
    pub rx: u64,
    /// Sent by the interface: for a TAP, frames towards the guest.
    pub tx: u64,
    pub rx_dropped: u64,
}

impl NetNs {
    /// Runs `ip -n NAME -j ARGS...` and parses its JSON output.
    fn ip_json(&self, args: &[&str]) -> io::Result<serde_json::Value> {
        let out = Command::new("ip")
            .args(["-n", self.name.as_str(), "-j"])
            .args(args)
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "ip -n {} -j {args:?}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim_end()
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(io::Error::other)
    }

    /// The packet counters of `ifname` in the namespace.
    pub fn link_packets(&self, ifname: &str) -> io::Result<LinkPackets> {
        let v = self.ip_json(&["-s", "link", "show", "dev", ifname])?;
        let s = &v[0]["stats64"];
        let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
        Ok(LinkPackets {
            rx: n(&s["rx"]["packets"]),
            tx: n(&s["tx"]["packets"]),
            rx_dropped: n(&s["rx"]["dropped"]),
        })
    }

    /// The flags of `ifname` as ip(8) shows them (`UP`, `NO-CARRIER`, ...).
    pub fn link_flags(&self, ifname: &str) -> io::Result<Vec<String>> {
        let v = self.ip_json(&["link", "show", "dev", ifname])?;
        Ok(v[0]["flags"]
            .as_array()
            .map(|f| {
                f.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Whether a process holds TAP `ifname` open (a TAP nobody holds has
    /// no carrier).
    pub fn tap_attached(&self, ifname: &str) -> io::Result<bool> {
        Ok(!self.link_flags(ifname)?.iter().any(|f| f == "NO-CARRIER"))
    }

    /// The names of the links in the namespace (`lo` included).
    pub fn links(&self) -> io::Result<Vec<String>> {
        let v = self.ip_json(&["link", "show"])?;
        Ok(v.as_array()
            .map(|links| {
                links
                    .iter()
                    .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Raises a socket's send and receive buffers to `bytes` (SO_*BUFFORCE,
/// root only; best effort: the defaults stay where it fails).
pub fn force_socket_buffers(fd: &OwnedFd, bytes: libc::c_int) {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: a valid socket and a c_int option value of its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                std::ptr::addr_of!(bytes).cast(),
                const { socklen::<libc::c_int>() },
            );
        }
    }
}

/// Receives one frame into `buf` within `timeout` (None on timeout or
/// error); returns its length.
pub fn recv_frame_into(fd: &OwnedFd, buf: &mut [u8], timeout: Duration) -> Option<usize> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Longer waits than i32::MAX ms are not needed: capped.
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        return None;
    }
    // SAFETY: the buffer is valid for its whole length.
    let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    // Negative: an error.
    usize::try_from(got).ok().filter(|n| *n > 0)
}

/// Receives one frame within `timeout` (None on timeout).
pub fn recv_frame(fd: &OwnedFd, timeout: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    let n = recv_frame_into(fd, &mut buf, timeout)?;
    buf.truncate(n);
    Some(buf)
}

/// Sends one frame, whole.
pub fn try_send_frame(fd: &OwnedFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: the frame buffer is valid for its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if usize::try_from(n) == Ok(frame.len()) {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Like [`try_send_frame`], asserting success.
///
/// # Panics
/// When the frame was not sent whole.
pub fn send_frame(fd: &OwnedFd, frame: &[u8]) {
    try_send_frame(fd, frame).unwrap_or_else(|e| panic!("send: {e}"));
}
