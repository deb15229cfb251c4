//! What the VMM hands over: Linux's `struct boot_params` (e820 map, command
//! line) and the MP table.

/// Most e820 entries boot_params can hold.
pub const E820_MAX: usize = 128;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

const BP_EXT_RAMDISK_IMAGE: u64 = 0x0c0;
const BP_EXT_RAMDISK_SIZE: u64 = 0x0c4;
const BP_EXT_CMD_LINE_PTR: u64 = 0x0c8;
const BP_RAMDISK_IMAGE: u64 = 0x218;
const BP_RAMDISK_SIZE: u64 = 0x21c;
const BP_E820_ENTRIES: u64 = 0x1e8;
const BP_CMD_LINE_PTR: u64 = 0x228;
const BP_E820_TABLE: u64 = 0x2d0;
/// Longest command line we read (the VMM limits it to 2048 bytes).
const CMDLINE_MAX: usize = 4096;

/// One e820 entry.
#[derive(Clone, Copy, Default)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map, in table order.
pub struct E820 {
    pub entries: [E820Entry; E820_MAX],
    pub count: usize,
}

impl E820 {
    /// The entries.
    pub fn iter(&self) -> impl Iterator<Item = &E820Entry> {
        self.entries[..self.count].iter()
    }
}

/// Reads a `T` from a guest-physical (identity-mapped) address.
///
/// # Safety
/// `addr..addr + size_of::<T>()` must be mapped and readable at CPL3, and
/// every bit pattern must be a valid `T`.
unsafe fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: guaranteed by the caller; boot structures are packed, so read
    // unaligned.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// Copies the e820 map out of boot_params at `bp`.
///
/// # Safety
/// `bp` must point at a mapped boot_params (4 KiB).
pub unsafe fn read_e820(bp: u64) -> E820 {
    let mut map = E820 {
        entries: [E820Entry::default(); E820_MAX],
        count: 0,
    };
    // SAFETY: boot_params is mapped (caller); the count is clamped to the
    // table's capacity, which lies within the 4 KiB page.
    unsafe {
        map.count = usize::from(read::<u8>(bp + BP_E820_ENTRIES)).min(E820_MAX);
        for (i, e) in map.entries[..map.count].iter_mut().enumerate() {
            let at = bp + BP_E820_TABLE + 20 * i as u64;
            e.addr = read(at);
            e.size = read(at + 8);
            e.kind = read(at + 16);
        }
    }
    map
}

/// The command line, without its terminating NUL (empty if there is none).
///
/// # Safety
/// `bp` must point at a mapped boot_params whose command line pointer, if
/// not zero, points at mapped memory holding a NUL-terminated string (or at
/// least `CMDLINE_MAX` mapped bytes).
pub unsafe fn cmdline(bp: u64) -> &'static [u8] {
    // SAFETY: per the caller's guarantee.
    unsafe {
        let lo = u64::from(read::<u32>(bp + BP_CMD_LINE_PTR));
        let hi = u64::from(read::<u32>(bp + BP_EXT_CMD_LINE_PTR));
        let ptr = lo | (hi << 32);
        if ptr == 0 {
            return &[];
        }
        let mut len = 0;
        while len < CMDLINE_MAX && read::<u8>(ptr + len as u64) != 0 {
            len += 1;
        }
        core::slice::from_raw_parts(ptr as *const u8, len)
    }
}

/// The initrd the VMM loaded: (address, bytes); size 0 if there is none.
///
/// # Safety
/// `bp` must point at a mapped boot_params.
pub unsafe fn ramdisk(bp: u64) -> (u64, u64) {
    // SAFETY: boot_params is mapped (caller); all four fields lie in it.
    unsafe {
        let lo = |at| u64::from(read::<u32>(bp + at));
        let addr = lo(BP_RAMDISK_IMAGE) | lo(BP_EXT_RAMDISK_IMAGE) << 32;
        let size = lo(BP_RAMDISK_SIZE) | lo(BP_EXT_RAMDISK_SIZE) << 32;
        (addr, size)
    }
}

/// Number of processor entries in the MP table (0 if there is none).
///
/// Looks for the MP floating pointer ("_MP_") on 16-byte boundaries in the
/// last KiB of base memory (the EBDA, 0x9fc00) and in the BIOS ROM area
/// (0xf0000..0x100000), like Linux.
///
/// # Safety
/// The first 1 MiB must be mapped.
pub unsafe fn mp_cpu_count() -> u32 {
    for (start, end) in [(0x9_fc00u64, 0xa_0000u64), (0xf_0000, 0x10_0000)] {
        let mut at = start;
        while at + 16 <= end {
            // SAFETY: within the first 1 MiB (caller).
            if unsafe { read::<[u8; 4]>(at) } == *b"_MP_" {
                // SAFETY: as above.
                let table = u64::from(unsafe { read::<u32>(at + 4) });
                // SAFETY: the table pointer is checked to lie in the first
                // 1 MiB before it is followed.
                return unsafe { count_processors(table) };
            }
            at += 16;
        }
    }
    0
}

/// Counts type-0 entries of the MP configuration table at `table`.
///
/// # Safety
/// The first 1 MiB must be mapped.
unsafe fn count_processors(table: u64) -> u32 {
    const LIMIT: u64 = 0x10_0000;
    if table == 0 || table + 0x2c > LIMIT {
        return 0;
    }
    // SAFETY: the header lies below 1 MiB (checked above).
    let (sig, base_len, entries) = unsafe {
        (
            read::<[u8; 4]>(table),
            u64::from(read::<u16>(table + 4)),
            read::<u16>(table + 0x22),
        )
    };
    if sig != *b"PCMP" {
        return 0;
    }
    let end = (table + base_len).min(LIMIT);
    let mut at = table + 0x2c;
    let mut cpus = 0;
    for _ in 0..entries {
        if at >= end {
            break;
        }
        // SAFETY: `at < end <= 1 MiB`.
        let len = match unsafe { read::<u8>(at) } {
            0 => {
                cpus += 1;
                20
            }
            1..=4 => 8,
            _ => break,
        };
        at += len;
    }
    cpus
}
