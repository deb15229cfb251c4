//! Loading the kernel and initrd and writing the zero page (struct
//! boot_params) for the Linux x86-64 boot protocol.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use super::E820Entry;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// The bzImage's 64-bit entry point is 0x200 past its protected-mode start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const XLF_KERNEL_64: u16 = 1 << 0;
const PAGE_SIZE: u64 = 4096;
/// boot_params holds at most this many e820 entries.
const E820_MAX_ENTRIES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat(PathBuf),
    #[error("kernel {path} could not be loaded: {source}")]
    KernelLoad {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel {path} has no 64-bit entry point (bzImage without XLF_KERNEL_64)")]
    Not64Bit { path: PathBuf },
    #[error("kernel {path} needs {need_mib} MiB from {load:#x} to decompress, more than guest memory below the MMIO gap")]
    KernelTooLarge {
        path: PathBuf,
        load: u64,
        need_mib: u64,
    },
    #[error("cannot open initrd {path}: {source}")]
    InitrdOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit: {available} bytes free between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        available: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot read initrd {path} into guest memory: {source}")]
    InitrdRead {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error(
        "kernel command line is {len} bytes, the limit is {max} (including the terminating NUL)"
    )]
    CmdlineTooLong { len: usize, max: usize },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error(
        "invalid kernel command line: byte {byte:#04x} at offset {offset} is not printable ASCII"
    )]
    CmdlineNotAscii { byte: u8, offset: usize },
    #[error("cannot write the command line to guest memory: {0}")]
    CmdlineLoad(linux_loader::loader::Error),
    #[error("the e820 map has {0} entries, boot_params holds at most {E820_MAX_ENTRIES}")]
    TooManyE820Entries(usize),
    #[error("{field} {value:#x} does not fit the zero page's 32-bit field")]
    ZeroPageField { field: &'static str, value: u64 },
    #[error("cannot write the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
}

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel (including room to decompress a bzImage).
    pub end: u64,
    /// The bzImage's setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
}

enum KernelFormat {
    Elf,
    BzImage,
}

fn sniff_format(file: &mut File) -> std::io::Result<Option<KernelFormat>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = read_up_to(file, &mut head)?;
    file.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    if n >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]])
            == KERNEL_HDR_MAGIC
    {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads an ELF vmlinux or a bzImage into guest memory.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    low_mem_end: u64,
) -> Result<LoadedKernel, BootError> {
    let open_err = |source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    if file.metadata().map_err(open_err)?.is_dir() {
        return Err(open_err(std::io::Error::from_raw_os_error(libc::EISDIR)));
    }
    let format = sniff_format(&mut file)
        .map_err(open_err)?
        .ok_or_else(|| BootError::KernelFormat(path.to_owned()))?;
    let load_err = |source| BootError::KernelLoad {
        path: path.to_owned(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            let hdr = r.setup_header.unwrap_or_default();
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::Not64Bit {
                    path: path.to_owned(),
                });
            }
            // The decompressor needs init_size bytes from the load address.
            let end =
                r.kernel_load.0 + u64::from(hdr.init_size).max(r.kernel_end - r.kernel_load.0);
            if end > low_mem_end {
                return Err(BootError::KernelTooLarge {
                    path: path.to_owned(),
                    load: r.kernel_load.0,
                    need_mib: (end - r.kernel_load.0).div_ceil(1 << 20),
                });
            }
            Ok(LoadedKernel {
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end,
                setup_header: Some(hdr),
            })
        }
    }
}

/// Places the initrd as high as allowed in low memory, page aligned, above
/// the kernel. Returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    low_mem_end: u64,
) -> Result<(u64, u64), BootError> {
    let open_err = |source| BootError::InitrdOpen {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let limit = low_mem_end.min(addr_max + 1);
    let kernel_end = kernel.end.next_multiple_of(PAGE_SIZE);
    let available = limit.saturating_sub(kernel_end);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        available,
        kernel_end,
        limit,
    };
    if size > available {
        return Err(too_large());
    }
    let addr = (limit - size) & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    // size <= limit <= 4 GiB: the initrd is in low memory.
    let len = usize::try_from(size).unwrap_or(usize::MAX);
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| BootError::InitrdRead {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size))
}

/// Validates the command line against the boot protocol limit and writes it
/// at CMDLINE_START.
pub fn load_command_line(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    kernel: &LoadedKernel,
) -> Result<(), BootError> {
    // A bzImage states its own limit (excluding the NUL); ELF kernels get the x86 default.
    let max = kernel
        .setup_header
        .map(|h| h.cmdline_size as usize + 1)
        .filter(|m| *m > 1)
        .unwrap_or(CMDLINE_MAX_SIZE)
        .min(CMDLINE_MAX_SIZE);
    if cmdline.len() + 1 > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len() + 1,
            max,
        });
    }
    // The kernel parses the command line as ASCII; anything else is a typo
    // or an encoding accident that would silently change parameters.
    if let Some((offset, &byte)) = cmdline
        .as_bytes()
        .iter()
        .enumerate()
        .find(|(_, b)| !(0x20..0x7f).contains(*b))
    {
        return Err(BootError::CmdlineNotAscii { byte, offset });
    }
    let cl = Cmdline::try_from(cmdline, max).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(BootError::CmdlineLoad)
}

/// Writes boot_params: setup header, command line pointer, initrd, e820 map
/// and the ACPI RSDP's address (which saves Linux its scan of the BIOS area).
pub fn setup_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    acpi_rsdp: Option<u64>,
) -> Result<(), BootError> {
    let e820_entries = u8::try_from(e820.len())
        .ok()
        .filter(|n| usize::from(*n) <= E820_MAX_ENTRIES)
        .ok_or(BootError::TooManyE820Entries(e820.len()))?;
    let field = |field, value: u64| {
        u32::try_from(value).map_err(|_| BootError::ZeroPageField { field, value })
    };
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = const { fit_u32(CMDLINE_START) };
    params.hdr.cmdline_size = field("command line length", cmdline_len as u64)?;
    if kernel.setup_header.is_none() {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = field("initrd address", addr)?;
        params.hdr.ramdisk_size = field("initrd size", size)?;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = e820_entries;
    params.acpi_rsdp_addr = acpi_rsdp.unwrap_or(0);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(mib: u64) -> GuestMemoryMmap {
        let len = usize::try_from(mib << 20).unwrap();
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).unwrap()
    }

    fn kernel_at(end: u64) -> LoadedKernel {
        LoadedKernel {
            entry: HIMEM_START,
            end,
            setup_header: None,
        }
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ksmvm-boot-test-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let m = mem(32);
        let p = temp_file("garbage", b"this is not a kernel at all");
        let e = load_kernel(&m, &p, 32 << 20).unwrap_err();
        assert!(matches!(e, BootError::KernelFormat(_)), "{e}");
        assert!(e
            .to_string()
            .contains("neither an ELF vmlinux nor a bzImage"));
        std::fs::remove_file(p).unwrap();
        let e = load_kernel(&m, Path::new("/nonexistent/vmlinux"), 32 << 20).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot open kernel /nonexistent/vmlinux"),
            "{e}"
        );
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let m = mem(64);
        let p = temp_file("initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&m, &p, &kernel_at(0x20_0000), 64 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= 64 << 20 && addr + size > (64 << 20) - 2 * PAGE_SIZE);
        let b: u8 = m.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 7);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn oversized_initrd_is_refused_with_sizes() {
        let m = mem(16);
        let p = temp_file("bigrd", &vec![0u8; 15 << 20]);
        let e = load_initrd(&m, &p, &kernel_at(0x20_0000), 16 << 20).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooLarge { .. }));
        assert!(e.to_string().contains("does not fit"), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn command_line_limit_and_zero_page() {
        let m = mem(32);
        let k = kernel_at(0x20_0000);
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            load_command_line(&m, &long, &k),
            Err(BootError::CmdlineTooLong { .. })
        ));
        load_command_line(&m, "console=ttyS0 probe.shared=4", &k).unwrap();
        let map = super::super::e820_map(32 << 20);
        setup_zero_page(&m, &k, 28, Some((0x100_0000, 42)), &map, Some(0xe_0000)).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(u64::from(p.hdr.cmd_line_ptr), CMDLINE_START);
        assert_eq!({ p.hdr.ramdisk_size }, 42);
        assert_eq!(p.e820_entries as usize, map.len());
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!({ p.e820_table[1].addr }, HIMEM_START);
        let mut cl = [0u8; 28];
        m.read_slice(&mut cl, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cl, b"console=ttyS0 probe.shared=4");
    }
}
