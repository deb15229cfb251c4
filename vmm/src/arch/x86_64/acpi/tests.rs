use super::*;
use crate::arch::x86_64::layout::EBDA_START;
use crate::devices::acpi::{
    OFS_PM1_CNT, OFS_PM1_STS, OFS_RESET, PM1_CNT_LEN, PM1_EVT_LEN, RESET_VALUE,
};

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn virtio(n: u32) -> Vec<MmioDevice> {
    (0..n)
        .map(|i| MmioDevice {
            base: 0xc000_0000 + u64::from(i) * 0x1000,
            size: 0x1000,
            irq: 5 + i,
        })
        .collect()
}

/// Guest memory holding the tables, and a reader that follows pointers.
struct Guest {
    mem: GuestMemoryMmap,
}

impl Guest {
    fn new(cpus: u32, devices: &[MmioDevice]) -> (Guest, u64) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = setup(&mem, cpus, devices).unwrap();
        (Guest { mem }, rsdp)
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    /// The table at `addr`, checked: signature, length, checksum, and inside
    /// the BIOS area that the e820 map leaves out of RAM.
    fn table(&self, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let head = self.bytes(addr, 36);
        assert_eq!(&head[0..4], sig, "signature at {addr:#x}");
        let len = u32_at(&head, 4) as usize;
        assert!(len >= 36);
        assert!(addr >= ACPI_START && addr + len as u64 <= ACPI_END);
        let t = self.bytes(addr, len);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        assert_eq!(&t[10..16], &OEM_ID);
        t
    }

    /// RSDP → XSDT → FADT, MADT → DSDT.
    fn walk(&self, rsdp: u64) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let r = self.bytes(rsdp, 36);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(sum(&r[0..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(&r), 0, "extended checksum");
        assert_eq!(r[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(u32_at(&r, 20), 36);
        let xsdt = self.table(u64_at(&r, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = self.table(u64_at(&xsdt, 36), b"FACP");
        let madt = self.table(u64_at(&xsdt, 44), b"APIC");
        let dsdt = self.table(u64_at(&fadt, 140), b"DSDT");
        assert_eq!(u32_at(&fadt, 40), 0, "only the 64-bit DSDT pointer is set");
        (fadt, madt, dsdt)
    }
}

#[test]
fn rsdp_is_where_linux_scans_and_tables_do_not_overlap() {
    let t = build(4, &virtio(3)).unwrap();
    assert_eq!(t.rsdp, ACPI_START);
    assert_eq!(t.rsdp % 16, 0);
    let mut ranges: Vec<(u64, u64)> = t
        .tables
        .iter()
        .map(|(a, b)| (*a, *a + b.len() as u64))
        .collect();
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "{ranges:x?}");
    }
    // The MP table at the EBDA ends before the BIOS area starts.
    let mp = crate::arch::x86_64::mptable::build(MAX_CPUS).unwrap();
    assert!(EBDA_START + mp.len() as u64 <= ACPI_START);
    // Nothing here is RAM in the e820 map.
    for e in crate::arch::x86_64::e820_map(64 << 20) {
        assert!(e.addr + e.size <= ACPI_START || e.addr >= ACPI_END, "{e:?}");
    }
}

#[test]
fn pointers_resolve_and_checksums_hold() {
    for cpus in [1, 2, 7, MAX_CPUS] {
        let (g, rsdp) = Guest::new(cpus, &virtio(19));
        g.walk(rsdp);
    }
}

#[test]
fn fadt_has_pm1_blocks_an_sci_a_facs_and_a_reset_register() {
    let (g, rsdp) = Guest::new(2, &[]);
    let (fadt, _, _) = g.walk(rsdp);
    assert_eq!(fadt.len(), 276);
    assert_eq!(fadt[8], 6, "FADT major version");
    let flags = u32_at(&fadt, 112);
    assert_eq!(
        flags & (1 << 20),
        0,
        "not HW_REDUCED_ACPI: Linux keeps the 8259 and ISA IRQs"
    );
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
    assert_ne!(boot_arch & (1 << 1), 0, "8042 present");
    assert_eq!(
        u16::from_le_bytes([fadt[46], fadt[47]]),
        u16::from(SCI_IRQ),
        "SCI_INT"
    );
    assert_eq!(u32_at(&fadt, 48), 0, "no SMI_CMD: always in ACPI mode");
    assert_eq!(
        u64::from(u32_at(&fadt, 56)),
        ACPI_PM_PORT + OFS_PM1_STS,
        "PM1a_EVT_BLK"
    );
    assert_eq!(
        u64::from(u32_at(&fadt, 64)),
        ACPI_PM_PORT + OFS_PM1_CNT,
        "PM1a_CNT_BLK"
    );
    assert_eq!((fadt[88], fadt[89]), (PM1_EVT_LEN, PM1_CNT_LEN));
    // Generic address structures: (SystemIO, bits, access size, address).
    let gas = |at: usize| (fadt[at], fadt[at + 1], fadt[at + 3], u64_at(&fadt, at + 4));
    assert_eq!(gas(116), (1, 8, 1, ACPI_PM_PORT + OFS_RESET), "RESET_REG");
    assert_eq!(fadt[128], RESET_VALUE);
    assert_eq!(
        gas(148),
        (1, 32, 3, ACPI_PM_PORT + OFS_PM1_STS),
        "X_PM1a_EVT_BLK"
    );
    assert_eq!(
        gas(172),
        (1, 16, 2, ACPI_PM_PORT + OFS_PM1_CNT),
        "X_PM1a_CNT_BLK"
    );
    assert_eq!(
        gas(244),
        (0, 0, 0, 0),
        "no hardware-reduced sleep control register"
    );
    // The FACS, 64-byte aligned, inside the BIOS area.
    let facs = u64_at(&fadt, 132);
    assert_eq!(facs % 64, 0);
    assert!((ACPI_START..ACPI_END).contains(&facs));
    let mut head = [0u8; 8];
    g.mem.read_slice(&mut head, GuestAddress(facs)).unwrap();
    assert_eq!(&head[..4], b"FACS");
    assert_eq!(u32::from_le_bytes(head[4..8].try_into().unwrap()), 64);
}

#[test]
fn madt_matches_the_mp_table() {
    for cpus in [1, 3, MAX_CPUS] {
        let (g, rsdp) = Guest::new(cpus, &[]);
        let (_, madt, _) = g.walk(rsdp);
        assert_eq!(u64::from(u32_at(&madt, 36)), APIC_ADDR);
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut overrides = Vec::new();
        let mut nmis = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            let e = &madt[at..at + len];
            match kind {
                0 => lapics.push((e[2], e[3], u32_at(e, 4))),
                1 => ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8))),
                2 => overrides.push((e[2], e[3], u32_at(e, 4), u16::from_le_bytes([e[8], e[9]]))),
                4 => nmis.push((e[2], e[5])),
                other => panic!("unexpected MADT entry type {other}"),
            }
            at += len;
        }
        assert_eq!(at, madt.len());
        let cpus = u8::try_from(cpus).unwrap();
        let want: Vec<_> = (0..cpus).map(|i| (i, i, 1)).collect();
        assert_eq!(lapics, want, "one enabled LAPIC per vCPU, APIC ID = index");
        assert_eq!(ioapics, vec![(cpus, fit_u32(IOAPIC_ADDR), 0)]);
        // Identity routing of the timer, as the MP table and KVM have it,
        // and the SCI level triggered, active high.
        assert_eq!(overrides, vec![(0, 0, 0, 0), (0, 9, 9, 0b1101)]);
        assert_eq!(nmis, vec![(0xff, 1)], "NMI on LINT1 of every CPU");
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The EISA ID encoding of `PNPxxxx` as AML emits it (DWordPrefix, LE).
fn eisa(id: &str) -> [u8; 5] {
    let b = id.as_bytes();
    let c = |i: usize| u32::from(b[i] - 0x40);
    let h = |i: usize| (b[i] as char).to_digit(16).unwrap();
    let v = (c(0) << 26 | c(1) << 21 | c(2) << 16 | h(3) << 12 | h(4) << 8 | h(5) << 4 | h(6))
        .swap_bytes();
    let mut out = [0x0c, 0, 0, 0, 0];
    out[1..].copy_from_slice(&v.to_le_bytes());
    out
}

#[test]
fn dsdt_names_only_virtio_devices_beyond_the_isa_irqs() {
    // IRQs 5..=15 are on the command line only; 16 and 17 also in the DSDT.
    let (g, rsdp) = Guest::new(1, &virtio(13));
    let (_, _, dsdt) = g.walk(rsdp);
    let aml = &dsdt[36..];
    for name in [&b"V011"[..], b"V012"] {
        assert!(contains(aml, name), "{}", String::from_utf8_lossy(name));
    }
    for name in [&b"V000"[..], b"V010"] {
        assert!(!contains(aml, name), "{}", String::from_utf8_lossy(name));
    }
    let (g, rsdp) = Guest::new(1, &virtio(2));
    let (_, _, dsdt) = g.walk(rsdp);
    assert!(!contains(&dsdt[36..], b"LNRO0005\0"));
}

#[test]
fn dsdt_has_s5_and_the_devices() {
    let (g, rsdp) = Guest::new(1, &virtio(13));
    let (_, _, dsdt) = g.walk(rsdp);
    let aml = &dsdt[36..];
    // Name(_S5_, Package(4) { 5, 0, 0, 0 })
    assert!(contains(
        aml,
        &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 5, 0, 0, 0]
    ));
    assert!(contains(aml, b"_SB_"));
    for name in [&b"COM1"[..], b"PS2K", b"PEVT", b"V011"] {
        assert!(contains(aml, name), "{}", String::from_utf8_lossy(name));
    }
    assert!(contains(aml, &eisa("PNP0501")));
    assert!(contains(aml, &eisa("PNP0303")));
    assert!(contains(aml, b"QEMU0001\0"));
    assert!(contains(aml, b"LNRO0005\0"));
    // IO descriptors: COM1 0x3f8 x8, the i8042's 0x60 and 0x64, pvpanic 0x505.
    for (p, len) in [(0x3f8u16, 8u8), (0x60, 1), (0x64, 1), (0x505, 1)] {
        let mut d = vec![0x47, 1];
        d.extend_from_slice(&p.to_le_bytes());
        d.extend_from_slice(&p.to_le_bytes());
        d.extend_from_slice(&[1, len]);
        assert!(contains(aml, &d), "IO {p:#x}");
    }
    // Extended interrupts 4 (COM1), 1 (i8042), 16 and 17 (virtio): edge, high.
    for irq in [4u32, 1, 16, 17] {
        let mut d = vec![0x89, 6, 0, 0x03, 1];
        d.extend_from_slice(&irq.to_le_bytes());
        assert!(contains(aml, &d), "interrupt {irq}");
    }
}

#[test]
fn rejects_zero_and_too_many_cpus() {
    assert!(matches!(build(0, &[]), Err(AcpiError::TooManyCpus(0))));
    assert!(build(MAX_CPUS + 1, &[]).is_err());
}

#[test]
fn rejects_a_virtio_window_past_32_bits() {
    // The last one is on GSI 18, so the DSDT names it.
    let mut devices = virtio(14);
    devices[13].base = 1 << 32;
    assert!(matches!(
        build(1, &devices),
        Err(AcpiError::MmioAbove4G { base, size: 0x1000 }) if base == 1 << 32
    ));
}

/// Each table disassembles with ACPICA's iasl without errors.
#[test]
fn iasl_disassembles_every_table() {
    let have = std::process::Command::new("iasl")
        .arg("-v")
        .output()
        .is_ok();
    if !have {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true and this test needs iasl (Debian package acpica-tools)");
        }
        eprintln!("SKIPPED: this test needs iasl (Debian package acpica-tools)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ksmvm-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = build(2, &virtio(13)).unwrap();
    // The RSDP has no table header, so iasl cannot read it from a file;
    // `pointers_resolve_and_checksums_hold` checks it.
    let names = ["facs", "xsdt", "facp", "apic", "dsdt"];
    for ((_, bytes), name) in t.tables.iter().skip(1).zip(names) {
        let file = dir.join(format!("{name}.dat"));
        std::fs::write(&file, bytes).unwrap();
        let out = std::process::Command::new("iasl")
            .current_dir(&dir)
            .arg("-d")
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl -d {name}: {text}");
        assert!(!text.contains("Error"), "iasl -d {name}: {text}");
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
        if name == "dsdt" {
            for want in ["_S5_", "PNP0501", "PNP0303", "QEMU0001", "LNRO0005"] {
                assert!(dsl.contains(want), "{want} missing from\n{dsl}");
            }
        }
    }
    if std::env::var_os("KSMVM_KEEP_ACPI_DUMP").is_none() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
