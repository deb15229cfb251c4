//! virtio-net on a real TAP device, inside a network namespace the test
//! creates (and removes, also when it fails). Needs root, /dev/net/tun and
//! ip(8); elsewhere it is skipped with a message, except under CI=true,
//! where a skipped test would hide a broken machine, so it fails.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::devices::TapName;
use crate::devices::virtio::test_util::*;

/// Why the real-TAP tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun does not exist".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("ip(8) is not installed".into());
    }
    None
}

fn skip(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("real TAP test cannot run under CI=true: {why}");
    }
    eprintln!("skipping real TAP test: {why}");
}

/// A network namespace, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn create() -> Result<NetNs, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ksmvm-t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(NetNs(name))
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `f` on a thread that has entered the namespace (setns affects
    /// only the calling thread; fds opened there stay bound to it).
    fn run_inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap();
            // SAFETY: setns on this short-lived thread with an fd we own.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

const GUEST_MAC: [u8; 6] = [0x06, 0, 0, 0, 0, 2];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];

fn arp_request() -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&HOST_IP);
    f
}

fn is_arp_reply_from_host(f: &[u8]) -> bool {
    let eth = &f[VNET_HDR_LEN.min(f.len())..];
    eth.len() >= 42
        && eth[12..14] == [0x08, 0x06]
        && eth[20..22] == [0, 2]
        && eth[28..32] == HOST_IP
}

#[test]
fn tap_open_errors_are_clear() {
    let name = TapName::try_from("ksmvm-none0".to_owned()).unwrap();
    let e = Tap::open(&name).unwrap_err().to_string();
    assert!(
        e.starts_with("TAP device ksmvm-none0 does not exist"),
        "{e}"
    );
}

#[test]
fn real_tap_round_trip_in_a_network_namespace() {
    if let Some(why) = missing_prerequisite() {
        return skip(&why);
    }
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(why) => return skip(&why),
    };
    ns.ip(&["tuntap", "add", "dev", "ktap0", "mode", "tap"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "ktap0"]);
    ns.ip(&["link", "set", "ktap0", "up"]);

    let name = TapName::try_from("ktap0".to_owned()).unwrap();
    let n = name.clone();
    let tap = ns.run_inside(move || Tap::open(&n)).unwrap();
    let n = name.clone();
    let busy = ns.run_inside(move || Tap::open(&n).unwrap_err().to_string());
    assert_eq!(
        busy,
        "TAP device ktap0 is already attached to another process"
    );
    let lo = ns.run_inside(|| {
        Tap::open(&TapName::try_from("lo".to_owned()).unwrap())
            .unwrap_err()
            .to_string()
    });
    assert!(lo.contains("is not a TAP device"), "{lo}");

    let tap_fd = tap.raw_fd();
    let net = Net::with_backend(Box::new(tap), MacAddr(GUEST_MAC), NetPolicy::OPEN).unwrap();
    let counters = net.counters();
    let mem = guest_mem();
    let mut h = Harness::with_mem(net, mem.clone());
    let mut rx = GuestQueue::new(&mem, 0x1_0000, 16);
    let mut tx = GuestQueue::new(&mem, 0x3_0000, 16);
    // Offloads on: TUNSETOFFLOAD must accept what the guest acked.
    use virtio_bindings::virtio_net::*;
    let offloads = 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_GUEST_TSO4
        | 1 << VIRTIO_NET_F_GUEST_TSO6
        | 1 << VIRTIO_NET_F_GUEST_UFO
        | 1 << VIRTIO_NET_F_CSUM;
    h.activate(offloads, &[&rx, &tx]);

    // Which guest buffer each RX chain head stands for.
    let mut bufs = std::collections::HashMap::new();
    for i in 0..8 {
        let b = DATA + i * 0x1_0000;
        bufs.insert(rx.add(&[w(b, 0x1_0000)]), b);
    }
    let arp = arp_request();
    mem.write_slice(&arp, GuestAddress(DATA + 0x10_0000))
        .unwrap();

    // The kernel answers the ARP request through the TAP device. Its qdisc
    // only starts once the link watcher has seen the carrier come up (up
    // to a second after attaching), so a reply can be lost: resend.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = 0u16;
    let mut got_reply = false;
    let mut last_send: Option<Instant> = None;
    while !got_reply && Instant::now() < deadline {
        if last_send.is_none_or(|t| t.elapsed() > Duration::from_millis(300)) {
            tx.add(&[r(DATA + 0x10_0000, u32_of(arp.len()))]);
            h.kick(1);
            last_send = Some(Instant::now());
        }
        let mut pfd = libc::pollfd {
            fd: tap_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        h.transport.handle_event(0);
        while seen != rx.used_idx() {
            let (id, len) = rx.used(seen);
            seen = seen.wrapping_add(1);
            let buf = bufs[&u16_of(id)];
            let mut f = vec![0u8; len as usize];
            mem.read_slice(&mut f, GuestAddress(buf)).unwrap();
            got_reply |= is_arp_reply_from_host(&f);
            // Give the buffer back, as a driver would.
            bufs.insert(rx.add(&[w(buf, 0x1_0000)]), buf);
        }
    }
    assert!(
        counters
            .tx_frames
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert!(
        got_reply,
        "no ARP reply from the host side of the TAP device"
    );
    drop(h);
    drop(ns);
}
