//! A real Linux kernel (Debian's cloud kernel, fetched and cached by
//! guest-image/linux/fetch-debian-kernel.sh) booted by ksmvm through the
//! 64-bit boot protocol must see exactly the command line and e820 map we
//! built. On hosts with hardware virtualisation it boots on to user space.

use ksmvm_testkit::*;
use std::process::Command;
use std::time::Duration;

/// Runs one of the guest-image/linux scripts and returns the path it prints last.
fn script_output(script: &str) -> Option<String> {
    let out = Command::new("bash")
        .arg(repo_root().join("guest-image/linux").join(script))
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("{script} failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(str::to_owned)
}

#[test]
fn debian_kernel_sees_our_cmdline_and_e820_map() {
    if !have_kvm() {
        return;
    }
    let vmlinux = script_output("fetch-debian-kernel.sh");
    if !require(
        vmlinux.is_some(),
        "the Debian cloud kernel (guest-image/linux/fetch-debian-kernel.sh)",
    ) {
        return;
    }
    let vmlinux = vmlinux.unwrap();
    let full_boot = hardware_virt();
    let initrd = if full_boot {
        script_output("make-initramfs.sh")
    } else {
        None
    };
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 ksmvm.test=e820";
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        vmlinux,
        "--cmdline".into(),
        cmdline.into(),
        "--mem-mib".into(),
        "3584".into(),
        "--log-level".into(),
        "info".into(),
        // Without an init to shut down (early log only), SIGTERM stops the
        // VM at once; a full boot powers off by itself.
        "--shutdown-timeout-s".into(),
        "0".into(),
    ];
    if let Some(i) = &initrd {
        args.extend(["--initrd".to_string(), i.clone()]);
    }
    let mut vm = Vmm::spawn(args);
    // Emulated kernel mode is slow: the early log takes ~10-20 s here.
    let limit = Duration::from_secs(120);
    let line = vm.expect_line("[", limit);
    assert!(line.contains("Linux version"), "{line}");
    let got = vm.expect_line_containing("Command line: ", limit);
    // The VMM appends the default entropy device's parameter.
    assert_eq!(
        got.split_once("Command line: ").unwrap().1,
        format!("{cmdline} virtio_mmio.device=4K@0xc0000000:5")
    );
    // 3.5 GiB crosses the MMIO gap: three RAM ranges, one above 4 GiB.
    let mut kernel_map = Vec::new();
    while kernel_map.len() < 3 {
        let l = vm.expect_line_containing("BIOS-e820: ", limit);
        kernel_map.push(l.split_once("] ").map_or(l.clone(), |(_, r)| r.to_owned()));
    }
    if full_boot {
        vm.expect_line_containing("KSMVM-INITRAMFS-OK", Duration::from_secs(60));
        let (status, stderr) = vm.wait(Duration::from_secs(60));
        assert!(status.success(), "{stderr}");
        check_map(&kernel_map, &stderr);
    } else {
        vm.terminate();
        let (status, stderr) = vm.wait(Duration::from_secs(30));
        assert!(status.success(), "{stderr}");
        check_map(&kernel_map, &stderr);
    }
}

fn check_map(kernel_map: &[String], stderr: &str) {
    let built: Vec<String> = stderr
        .lines()
        .filter_map(|l| {
            l.split_once(" e820 addr=")
                .map(|(_, r)| kernel_e820_line(&format!("addr={r}")))
        })
        .collect();
    assert_eq!(built.len(), 3, "{stderr}");
    assert_eq!(kernel_map, built.as_slice());
}

/// The Debian bzImage (the same kernel, compressed) loads through the bzImage
/// path: setup header copied, 64-bit entry 0x200 past the load address, room
/// for decompression reserved. Its decompressor runs in emulated kernel mode
/// here (minutes), so it is booted only on hosts with vmx/svm.
#[test]
fn debian_bzimage_loads_through_the_bzimage_path() {
    use ksmvm::arch::x86_64::boot::{load_kernel, setup_zero_page};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    let vmlinux = script_output("fetch-debian-kernel.sh");
    if !require(
        vmlinux.is_some(),
        "the Debian cloud kernel (guest-image/linux/fetch-debian-kernel.sh)",
    ) {
        return;
    }
    let bzimage = std::path::Path::new(&vmlinux.unwrap()).with_file_name("vmlinuz");
    let mem_bytes = 512u64 << 20;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(
        GuestAddress(0),
        usize::try_from(mem_bytes).expect("512 MiB fits in usize"),
    )])
    .unwrap();
    let k = load_kernel(&mem, &bzimage, mem_bytes).expect("load the bzImage");
    let hdr = k.setup_header.expect("a bzImage has a setup header");
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_ne!({ hdr.xloadflags } & 1, 0, "64-bit entry point");
    // Copies: the header is packed, so its fields cannot be borrowed.
    let load = u64::from(hdr.code32_start);
    let init_size = u64::from(hdr.init_size);
    assert_eq!(k.entry, load + 0x200);
    assert!(k.end >= load + init_size);
    // The payload was copied verbatim after the setup sectors.
    let image = std::fs::read(&bzimage).unwrap();
    let setup = (usize::from(hdr.setup_sects.max(4)) + 1) * 512;
    let mut head = vec![0u8; 4096];
    mem.read_slice(&mut head, GuestAddress(load)).unwrap();
    assert_eq!(head, image[setup..setup + 4096]);
    // The zero page keeps the kernel's own header fields.
    setup_zero_page(
        &mem,
        &k,
        10,
        None,
        &ksmvm::arch::x86_64::e820_map(mem_bytes),
        None,
    )
    .unwrap();
    let version: u16 = mem.read_obj(GuestAddress(0x7000 + 0x206)).unwrap();
    assert_eq!(version, { hdr.version });

    if hardware_virt() {
        let initrd = script_output("make-initramfs.sh").expect("initramfs");
        let mut vm = Vmm::spawn([
            "run",
            "--kernel",
            bzimage.to_str().unwrap(),
            "--initrd",
            &initrd,
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1",
            "--mem-mib",
            "512",
        ]);
        vm.expect_line_containing("KSMVM-INITRAMFS-OK", Duration::from_secs(120));
        let (status, stderr) = vm.wait(Duration::from_secs(60));
        assert!(status.success(), "{stderr}");
    }
}
