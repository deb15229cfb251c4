//! The memory half of the STATUS= line: how much of this VM's guest RAM is
//! resident and how much of it KSM has merged, from the running VM's own
//! sampler (mincore and ksm_stat: cheap enough for every few seconds) and
//! its live merge setting, so the line follows `PUT /actions ksm_merge`.

use std::time::Duration;

use crate::stats::ApproxF64;
use crate::vm::VmHandle;

/// Pss and the other smaps-only figures are not on the line; a full smaps
/// pass (which walks every page table entry) is needed only this rarely.
const DETAIL_AGE: Duration = Duration::from_secs(300);

/// E.g. `guest RAM 256 MiB: resident 80.2 MiB, KSM-merged 41.0 MiB`; None
/// while an API request holds the sampler (the caller keeps its last line).
pub fn line(vm: &VmHandle) -> Option<String> {
    Some(match vm.try_sample(DETAIL_AGE)? {
        Ok(st) => status_text(
            vm.mem_bytes(),
            vm.mergeable(),
            st.guest_ram.rss,
            st.guest_ram.ksm,
        ),
        Err(e) => {
            log::debug!("memory status: {e}");
            "memory unknown".into()
        }
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes.approx_f64() / f64::from(1u32 << 20))
}

pub fn status_text(guest_bytes: u64, ksm: bool, resident: u64, merged: Option<u64>) -> String {
    let merged = match (ksm, merged) {
        (false, _) => "KSM off".to_owned(),
        (true, Some(m)) => format!("KSM-merged {}", mib(m)),
        (true, None) => "KSM-merged unknown".to_owned(),
    };
    format!(
        "guest RAM {} MiB: resident {}, {merged}",
        guest_bytes >> 20,
        mib(resident)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_a_short_line() {
        assert_eq!(
            status_text(64 << 20, true, 3 << 20, Some(1 << 19)),
            "guest RAM 64 MiB: resident 3.0 MiB, KSM-merged 0.5 MiB"
        );
        assert_eq!(
            status_text(64 << 20, false, 3 << 20, Some(0)),
            "guest RAM 64 MiB: resident 3.0 MiB, KSM off"
        );
        assert_eq!(
            status_text(64 << 20, true, 0, None),
            "guest RAM 64 MiB: resident 0.0 MiB, KSM-merged unknown"
        );
    }

    #[test]
    fn follows_the_live_merge_setting() {
        use vm_memory::Bytes;
        let vm = crate::vm::VmHandle::for_tests("memstatus", 8, true);
        vm.mem()
            .write_slice(&vec![1u8; 1 << 20], vm_memory::GuestAddress(0))
            .unwrap();
        let line = |vm: &crate::vm::VmHandle| line(vm).expect("nobody else samples");
        let on = line(&vm);
        assert!(on.starts_with("guest RAM 8 MiB: resident "), "{on}");
        assert!(!on.contains("resident 0.0 MiB"), "{on}");
        assert!(on.contains("KSM-merged"), "{on}");
        // As after PUT /actions ksm_unmerge: the next line says so.
        vm.set_mergeable(false).unwrap();
        assert!(line(&vm).ends_with("KSM off"), "{}", line(&vm));
        vm.set_mergeable(true).unwrap();
        assert!(line(&vm).contains("KSM-merged"), "{}", line(&vm));
    }
}
