//! An existing TAP interface, opened through /dev/net/tun with a
//! virtio-net header on every frame.
//!
//! The interface must exist already (`ip tuntap add NAME mode tap user U`),
//! so that the VMM needs no CAP_NET_ADMIN: we only attach to it. Frames
//! carry a 12-byte `virtio_net_hdr_v1`, the same header the guest uses, so
//! checksum and segmentation offload pass through without translation.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::backend::NetBackend;
use super::VNET_HDR_LEN;
use crate::config::devices::TapName;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP device {0} does not exist (create it first, e.g. `ip tuntap add {0} mode tap user $USER`)")]
    NotFound(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("{0} is not a TAP device (a TUN device or another kind of interface)")]
    NotTap(String),
    #[error("TAP device {0} is already attached to another process")]
    Busy(String),
    #[error("cannot attach to TAP device {name}: {source}")]
    Attach { name: String, source: io::Error },
    #[error("cannot set the virtio-net header size on TAP device {name}: {source}")]
    VnetHdr { name: String, source: io::Error },
    #[error("cannot reset offloads on TAP device {name}: {source}")]
    Offload { name: String, source: io::Error },
    #[error("cannot create the NIC's rate limiter timer: {0}")]
    Timer(#[source] io::Error),
}

/// TUNSETIFF's flags: a TAP device, frames with a virtio-net header.
#[allow(
    clippy::cast_possible_truncation,
    reason = "the flags are 0x5002; ifreq holds them in a c_short"
)]
const TAP_FLAGS: libc::c_short =
    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
/// TUNSETVNETHDRSZ's argument.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "the header is 12 bytes"
)]
const VNET_HDR_SIZE: libc::c_int = VNET_HDR_LEN as libc::c_int;

#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    pub fn open(name: &TapName) -> Result<Tap, TapError> {
        let name = name.as_str().to_owned();
        // TapName guarantees no NUL byte.
        let cname = CString::new(name.clone()).map_err(|_| TapError::NotFound(name.clone()))?;
        // SAFETY: `cname` is a valid NUL-terminated string for the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NotFound(name));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;

        // SAFETY: ifreq is a plain C struct for which all-zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(cname.as_bytes()) {
            *dst = libc::c_char::from_ne_bytes([*src]);
        }
        ifr.ifr_ifru.ifru_flags = TAP_FLAGS;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which outlives the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EINVAL) => TapError::NotTap(name),
                Some(libc::EBUSY) => TapError::Busy(name),
                _ => TapError::Attach { name, source: e },
            });
        }
        let hdr_len = VNET_HDR_SIZE;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int, which outlives the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(TapError::VnetHdr {
                name,
                source: io::Error::last_os_error(),
            });
        }
        let mut tap = Tap { file, name };
        // Until the guest negotiates offloads, the kernel must hand us only
        // complete, checksummed frames.
        tap.set_offload(0).map_err(|source| TapError::Offload {
            name: tap.name.clone(),
            source,
        })?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }

    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is shared.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(tun_flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
