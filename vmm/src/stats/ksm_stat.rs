//! `/proc/self/ksm_stat` (Linux >= 6.1; fields were added over releases).
//!
//! Numbers are `name value`, flags `name: yes|no`. Unknown lines are
//! ignored so that newer kernels keep working.

use super::{KsmProcessStats, StatsError};

pub fn parse_ksm_stat(text: &str) -> Result<KsmProcessStats, StatsError> {
    let mut s = KsmProcessStats::default();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let value = value.trim();
        let name = name.trim_end_matches(':');
        let bad = || StatsError::Parse {
            file: "ksm_stat",
            line: line.to_owned(),
        };
        let num = || value.parse::<u64>().map_err(|_| bad());
        let flag = || match value {
            "yes" => Ok(true),
            "no" => Ok(false),
            _ => Err(bad()),
        };
        match name {
            "ksm_rmap_items" => s.ksm_rmap_items = Some(num()?),
            "ksm_zero_pages" => s.ksm_zero_pages = Some(num()?),
            "ksm_merging_pages" => s.ksm_merging_pages = Some(num()?),
            "ksm_pages_sharing" => s.ksm_pages_sharing = Some(num()?),
            "ksm_process_profit" => s.ksm_process_profit = Some(value.parse().map_err(|_| bad())?),
            "ksm_merge_any" => s.ksm_merge_any = Some(flag()?),
            "ksm_mergeable" => s.ksm_mergeable = Some(flag()?),
            _ => {}
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_6_18_idle() {
        let s = parse_ksm_stat(include_str!("fixtures/ksm_stat_6_18.txt")).unwrap();
        assert_eq!(
            s,
            KsmProcessStats {
                ksm_rmap_items: Some(0),
                ksm_merging_pages: Some(0),
                ksm_zero_pages: Some(0),
                ksm_pages_sharing: None,
                ksm_process_profit: Some(0),
                ksm_mergeable: Some(false),
                ksm_merge_any: Some(false),
            }
        );
    }

    #[test]
    fn merged() {
        let s = parse_ksm_stat(include_str!("fixtures/ksm_stat_merged.txt")).unwrap();
        assert_eq!(s.ksm_rmap_items, Some(16384));
        assert_eq!(s.ksm_merging_pages, Some(3072));
        assert_eq!(s.ksm_process_profit, Some(11_534_336));
        assert_eq!(s.ksm_mergeable, Some(true));
    }

    #[test]
    fn old_kernel_and_negative_profit() {
        // 6.1 shows only rmap items; profit can be negative.
        let s = parse_ksm_stat("ksm_rmap_items 12\n").unwrap();
        assert_eq!(s.ksm_rmap_items, Some(12));
        assert_eq!(s.ksm_process_profit, None);
        assert_eq!(s.ksm_mergeable, None);
        let s = parse_ksm_stat("ksm_process_profit -65536\nksm_future_field 3\n").unwrap();
        assert_eq!(s.ksm_process_profit, Some(-65536));
        assert!(parse_ksm_stat("ksm_merge_any: maybe\n").is_err());
        assert!(parse_ksm_stat("ksm_rmap_items -1\n").is_err());
    }
}
