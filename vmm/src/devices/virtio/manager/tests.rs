use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BALLOON, VIRTIO_ID_NET, VIRTIO_ID_RNG};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::devices::{BalloonConfig, MacAddr};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::mmio::*;
use crate::devices::virtio::net::{Net, NetPolicy};
use crate::devices::virtio::registry::{DeviceLookupError, BALLOON_ID};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::test_util::*;

/// Records what would have gone to KVM, and keeps the irqfds so that the
/// test can see interrupts.
#[derive(Default)]
struct FakeVm {
    irqfds: Mutex<Vec<(EventFd, u32)>>,
    ioevents: Mutex<Vec<(u64, u32)>>,
    fail_ioevent: bool,
}

impl EventRegistrar for FakeVm {
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> io::Result<()> {
        self.irqfds.lock().unwrap().push((evt.try_clone()?, gsi));
        Ok(())
    }
    fn register_ioevent(&self, _evt: &EventFd, addr: u64, datamatch: u32) -> io::Result<()> {
        if self.fail_ioevent {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        self.ioevents.lock().unwrap().push((addr, datamatch));
        Ok(())
    }
}

impl FakeVm {
    fn irq_fd(&self, index: usize) -> i32 {
        self.irqfds.lock().unwrap()[index].0.as_raw_fd()
    }
}

#[test]
fn devices_get_consecutive_windows_irqs_and_cmdline_entries() {
    let mem = guest_mem();
    let mut devices = VirtioDevices::new(mem.clone());
    let mut bus = Bus::new();
    let vm = FakeVm::default();
    let mut cmdline = vec!["console=ttyS0".to_owned()];
    let a = devices
        .add(Rng::new().unwrap(), &mut bus, &vm, &mut cmdline)
        .unwrap();
    let (balloon, _) = Balloon::new(&BalloonConfig::default(), &mem).unwrap();
    let b = devices.add(balloon, &mut bus, &vm, &mut cmdline).unwrap();
    let (ours, _peer) = socketpair();
    let net = Net::with_backend(
        Box::new(SockBackend {
            file: ours,
            offloads: Arc::default(),
        }),
        MacAddr([6, 0, 0, 0, 0, 1]),
        NetPolicy::OPEN,
    )
    .unwrap();
    let c = devices.add(net, &mut bus, &vm, &mut cmdline).unwrap();
    assert_eq!(
        cmdline,
        [
            "console=ttyS0",
            "virtio_mmio.device=4K@0xc0000000:5",
            "virtio_mmio.device=4K@0xc0001000:6",
            "virtio_mmio.device=4K@0xc0002000:7",
        ]
    );
    assert_eq!(
        (a.index, a.device_type, a.mmio_base, a.mmio_size, a.irq),
        (0, VIRTIO_ID_RNG, 0xc000_0000, 0x1000, 5)
    );
    assert_eq!((b.device_type, b.irq), (VIRTIO_ID_BALLOON, 6));
    assert_eq!(
        (c.device_type, c.mmio_base, c.irq),
        (VIRTIO_ID_NET, 0xc000_2000, 7)
    );
    assert_eq!(devices.devices().count(), 3);
    let gsis: Vec<u32> = vm.irqfds.lock().unwrap().iter().map(|(_, g)| *g).collect();
    assert_eq!(gsis, [5, 6, 7]);
    assert_eq!(
        *vm.ioevents.lock().unwrap(),
        [
            (0xc000_0050, 0),
            (0xc000_1050, 0),
            (0xc000_1050, 1),
            (0xc000_2050, 0),
            (0xc000_2050, 1),
        ]
    );
    // The bus reaches each device's registers at its window.
    let mut v = [0u8; 4];
    for (base, id) in [
        (0xc000_0000u64, VIRTIO_ID_RNG),
        (0xc000_2000, VIRTIO_ID_NET),
    ] {
        assert!(bus.read(base, &mut v));
        assert_eq!(u32::from_le_bytes(v), MAGIC_VALUE);
        assert!(bus.read(base + REG_DEVICE_ID, &mut v));
        assert_eq!(u32::from_le_bytes(v), id);
    }
    assert!(!bus.read(0xc000_3000, &mut v));
}

#[test]
fn the_irq_range_limits_the_device_count() {
    let mem = guest_mem();
    let mut devices = VirtioDevices::new(mem);
    let mut bus = Bus::new();
    let vm = FakeVm::default();
    let mut cmdline = Vec::new();
    for _ in 0..MAX_DEVICES {
        devices
            .add(Rng::new().unwrap(), &mut bus, &vm, &mut cmdline)
            .unwrap();
    }
    assert_eq!(MAX_DEVICES, 18);
    assert_eq!(
        cmdline.last().unwrap(),
        "virtio_mmio.device=4K@0xc0011000:23"
    );
    // IRQ 9 is the ACPI SCI: the fifth device gets 10.
    assert_eq!(cmdline[4], "virtio_mmio.device=4K@0xc0004000:10");
    assert!(!cmdline.iter().any(|c| c.ends_with(":9")));
    let e = devices
        .add(Rng::new().unwrap(), &mut bus, &vm, &mut cmdline)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "too many virtio devices: IRQs 5-23 but the SCI (9) allow at most 18"
    );
    assert_eq!(cmdline.len(), MAX_DEVICES);
}

#[test]
fn kvm_errors_are_reported_and_leave_no_cmdline_entry() {
    let mem = guest_mem();
    let mut devices = VirtioDevices::new(mem);
    let mut bus = Bus::new();
    let vm = FakeVm {
        fail_ioevent: true,
        ..Default::default()
    };
    let mut cmdline = Vec::new();
    let e = devices
        .add(Rng::new().unwrap(), &mut bus, &vm, &mut cmdline)
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot connect queue 0 notifications of virtio device 0 to KVM"),
        "{e}"
    );
    assert!(cmdline.is_empty());
    assert!(!bus.read(0xc000_0000, &mut [0u8; 4]));
}

/// Drives device `base` through the bus like a guest driver: bring-up with
/// one queue per `queues` entry.
fn bring_up(bus: &Bus, base: u64, features: u64, queues: &[&GuestQueue<'_>]) {
    let w = |off: u64, v: u32| assert!(bus.write(base + off, &v.to_le_bytes()));
    let s1 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    let s2 = s1 | VIRTIO_CONFIG_S_DRIVER;
    let s3 = s2 | VIRTIO_CONFIG_S_FEATURES_OK;
    w(REG_STATUS, 0);
    w(REG_STATUS, s1);
    w(REG_STATUS, s2);
    w(REG_DRIVER_FEATURES_SEL, 0);
    w(REG_DRIVER_FEATURES, u32_of(features & 0xffff_ffff));
    w(REG_DRIVER_FEATURES_SEL, 1);
    w(REG_DRIVER_FEATURES, u32_of(features >> 32));
    w(REG_STATUS, s3);
    for (i, q) in queues.iter().enumerate() {
        w(REG_QUEUE_SEL, u32_of(i));
        w(REG_QUEUE_NUM, u32::from(q.size));
        w(REG_QUEUE_DESC_LOW, u32_of(q.mock.desc_table_addr().0));
        w(REG_QUEUE_DRIVER_LOW, u32_of(q.mock.avail_addr().0));
        w(REG_QUEUE_DEVICE_LOW, u32_of(q.used_addr.0));
        w(REG_QUEUE_READY, 1);
    }
    w(REG_STATUS, s3 | VIRTIO_CONFIG_S_DRIVER_OK);
    let mut v = [0u8; 4];
    bus.read(base + REG_STATUS, &mut v);
    assert_eq!(u32::from_le_bytes(v), s3 | VIRTIO_CONFIG_S_DRIVER_OK);
}

fn wait_used(q: &GuestQueue<'_>, n: u16) {
    for _ in 0..400 {
        if q.used_idx() == n {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("used index stuck at {} (want {n})", q.used_idx());
}

#[test]
fn the_event_loop_serves_queues_sources_and_config_changes() {
    let mem = guest_mem();
    let mut devices = VirtioDevices::new(mem.clone());
    let mut bus = Bus::new();
    let vm = FakeVm::default();
    let mut cmdline = Vec::new();
    devices
        .add(Rng::new().unwrap(), &mut bus, &vm, &mut cmdline)
        .unwrap();
    let (ours, mut peer) = socketpair();
    let net = Net::with_backend(
        Box::new(SockBackend {
            file: ours,
            offloads: Arc::default(),
        }),
        MacAddr([6, 0, 0, 0, 0, 1]),
        NetPolicy::OPEN,
    )
    .unwrap();
    devices.add(net, &mut bus, &vm, &mut cmdline).unwrap();
    let (balloon, _) = Balloon::new(&BalloonConfig::default(), &mem).unwrap();
    devices.add(balloon, &mut bus, &vm, &mut cmdline).unwrap();
    let (running, registry) = devices.start().unwrap();
    let ids: Vec<&str> = registry.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["rng0", "net0", "balloon0"]);
    assert_eq!(
        registry.with_device::<Rng, _>("balloon0", |_| ()),
        Err(DeviceLookupError::WrongType {
            id: "balloon0".into(),
            want: "Rng"
        })
    );
    assert_eq!(
        registry.with_device::<Rng, _>("disk0", |_| ()),
        Err(DeviceLookupError::NotFound("disk0".into()))
    );

    let v1 = 1u64 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    // rng: a request, notified through the register (no ioeventfd here).
    let mut rq = GuestQueue::new(&mem, 0x1_0000, 16);
    bring_up(&bus, 0xc000_0000, v1, &[&rq]);
    rq.add(&[w(DATA, 64)]);
    assert!(bus.write(0xc000_0000 + REG_QUEUE_NOTIFY, &0u32.to_le_bytes()));
    wait_used(&rq, 1);
    assert!(wait_readable(vm.irq_fd(0), 2000), "rng interrupt");
    let mut st = [0u8; 4];
    bus.read(0xc000_0000 + REG_INTERRUPT_STATUS, &mut st);
    assert_eq!(u32::from_le_bytes(st), 1);

    // net: a frame arriving on the backend reaches a guest buffer without
    // any notification from the guest (edge-triggered source).
    let mut netrx = GuestQueue::new(&mem, 0x3_0000, 16);
    let nettx = GuestQueue::new(&mem, 0x5_0000, 16);
    netrx.add(&[w(DATA + 0x1000, 2048)]);
    bring_up(&bus, 0xc000_1000, v1, &[&netrx, &nettx]);
    let frame = [0u8; 12]
        .iter()
        .chain(b"payload!")
        .copied()
        .collect::<Vec<u8>>();
    peer.write_all(&frame).unwrap();
    wait_used(&netrx, 1);
    peer.write_all(&frame).unwrap();
    peer.write_all(&frame).unwrap();
    netrx.add(&[w(DATA + 0x2000, 2048)]);
    netrx.add(&[w(DATA + 0x3000, 2048)]);
    assert!(bus.write(0xc000_1000 + REG_QUEUE_NOTIFY, &0u32.to_le_bytes()));
    wait_used(&netrx, 3);
    let mut got = vec![0u8; frame.len()];
    mem.read_slice(&mut got, GuestAddress(DATA + 0x3000))
        .unwrap();
    assert_eq!(&got[12..], b"payload!");

    // balloon: a new target from the API thread becomes a config interrupt.
    let bq0 = GuestQueue::new(&mem, 0x7_0000, 16);
    let bq1 = GuestQueue::new(&mem, 0x9_0000, 16);
    bring_up(&bus, 0xc000_2000, v1, &[&bq0, &bq1]);
    let _ = vm.irqfds.lock().unwrap()[2].0.read();
    // Reached by id, as the API reaches it.
    registry
        .with_device::<Balloon, _>(BALLOON_ID, |b| b.handle().set_target_mib(2))
        .unwrap()
        .unwrap();
    assert!(
        wait_readable(vm.irq_fd(2), 2000),
        "balloon config interrupt"
    );
    bus.read(0xc000_2000 + REG_INTERRUPT_STATUS, &mut st);
    assert_eq!(u32::from_le_bytes(st) & 2, 2);
    bus.read(0xc000_2000 + REG_CONFIG, &mut st);
    assert_eq!(u32::from_le_bytes(st), 512);

    running.stop().unwrap();
    running.join().unwrap();
}

#[test]
fn registers_with_a_real_kvm_vm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("/dev/kvm is missing under CI=true");
        }
        eprintln!("skipping: /dev/kvm is missing");
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    // irqfds need the in-kernel irqchip.
    vm.create_irq_chip().unwrap();
    let mem = guest_mem();
    let mut devices = VirtioDevices::new(mem.clone());
    let mut bus = Bus::new();
    let mut cmdline = Vec::new();
    devices
        .add(Rng::new().unwrap(), &mut bus, &vm, &mut cmdline)
        .unwrap();
    let (balloon, _) = Balloon::new(&BalloonConfig::default(), &mem).unwrap();
    devices.add(balloon, &mut bus, &vm, &mut cmdline).unwrap();
    assert_eq!(cmdline.len(), 2);
    let (running, registry) = devices.start().unwrap();
    assert_eq!(registry.iter().count(), 2);
    drop(running);
}
