//! Guest memory statistics from the balloon's stats queue (virtio 1.2,
//! 5.5.6.3): an array of `{ le16 tag; le64 val; }` entries, packed.

use std::io::Read;

use serde::{Deserialize, Serialize};
use virtio_queue::Reader;

/// Size of one packed entry.
pub const ENTRY_LEN: usize = 10;
/// Entries read from one buffer; Linux sends about a dozen.
pub const MAX_ENTRIES: usize = 64;

/// The latest statistics the guest reported. Memory figures are bytes;
/// None means the guest did not report that figure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub free_memory: Option<u64>,
    pub total_memory: Option<u64>,
    pub available_memory: Option<u64>,
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
    pub oom_kills: Option<u64>,
    pub alloc_stalls: Option<u64>,
    pub async_scans: Option<u64>,
    pub direct_scans: Option<u64>,
    pub async_reclaims: Option<u64>,
    pub direct_reclaims: Option<u64>,
    /// When the host received them (seconds since the Unix epoch).
    pub updated_unix_s: u64,
}

impl BalloonStats {
    fn set(&mut self, tag: u16, val: u64) {
        let field = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kills,
            11 => &mut self.alloc_stalls,
            12 => &mut self.async_scans,
            13 => &mut self.direct_scans,
            14 => &mut self.async_reclaims,
            15 => &mut self.direct_reclaims,
            // Tags from newer guests are ignored.
            _ => return,
        };
        *field = Some(val);
    }

    /// Parses whole entries from `reader` (at most [`MAX_ENTRIES`]).
    pub fn parse(reader: &mut Reader<'_>) -> BalloonStats {
        let mut stats = BalloonStats {
            updated_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ..Default::default()
        };
        let n = (reader.available_bytes() / ENTRY_LEN).min(MAX_ENTRIES);
        for _ in 0..n {
            let mut e = [0u8; ENTRY_LEN];
            if reader.read_exact(&mut e).is_err() {
                break;
            }
            let [t0, t1, v @ ..] = e;
            stats.set(u16::from_le_bytes([t0, t1]), u64::from_le_bytes(v));
        }
        stats
    }
}
