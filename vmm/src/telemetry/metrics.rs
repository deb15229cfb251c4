//! Prometheus text exposition (format 0.0.4) of per-VM and host metrics.
//!
//! Families are grouped so that one scrape of many VMs (the exporter) has
//! one HELP/TYPE pair per metric. Values the kernel does not provide are
//! left out, never reported as 0.

use std::fmt::Write;

use crate::stats::VmStats;

use super::host::HostSample;
use crate::config::OnOff;
use crate::vm::{VmInfo, VmState};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self::Int(v.into())
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(v.into())
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Self::Int(v.into())
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Int(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Labels, Value)>,
}

/// A set of metric families in first-added order.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample; `None` values are skipped (unavailable, not zero).
    pub fn add(
        &mut self,
        kind: Kind,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        value: Option<impl Into<Value>>,
    ) {
        let Some(value) = value else { return };
        let labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        let family = match self.families.iter_mut().position(|f| f.name == name) {
            Some(i) => &mut self.families[i],
            None => {
                self.families.push(Family {
                    name,
                    help,
                    kind,
                    samples: Vec::new(),
                });
                let last = self.families.len() - 1;
                &mut self.families[last]
            }
        };
        family.samples.push((labels, value.into()));
    }

    fn gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
        l: &[(&'static str, &str)],
        v: Option<impl Into<Value>>,
    ) {
        self.add(Kind::Gauge, name, help, l, v);
    }

    fn counter(
        &mut self,
        name: &'static str,
        help: &'static str,
        l: &[(&'static str, &str)],
        v: Option<impl Into<Value>>,
    ) {
        self.add(Kind::Counter, name, help, l, v);
    }

    /// The metrics of one VM, labelled `vm="NAME"`. Without statistics
    /// (sampling failed) only the VM's own facts are added.
    pub fn add_vm(&mut self, info: &VmInfo, stats: Option<&VmStats>) {
        let l = [("vm", info.name.as_str())];
        self.gauge("ksmvm_up", "1 while the VM's API answers.", &l, Some(1u64));
        self.gauge(
            "ksmvm_paused",
            "1 while the VM's vCPUs are paused.",
            &l,
            Some(info.state == VmState::Paused),
        );
        self.gauge(
            "ksmvm_uptime_seconds",
            "Seconds since the VM's vCPUs started.",
            &l,
            Some(info.uptime_s),
        );
        self.gauge("ksmvm_vcpus", "Number of vCPUs.", &l, Some(info.vcpus));
        self.gauge(
            "ksmvm_ksm_enabled",
            "1 while guest RAM is MADV_MERGEABLE (a KSM candidate).",
            &l,
            Some(info.ksm == OnOff::On),
        );
        let Some(s) = stats else { return };
        let g = &s.guest_ram;
        self.gauge(
            "ksmvm_guest_ram_size_bytes",
            "Guest RAM configured.",
            &l,
            Some(s.guest_ram_bytes),
        );
        self.gauge(
            "ksmvm_guest_ram_rss_bytes",
            "Resident guest RAM (smaps Rss of the guest RAM mappings).",
            &l,
            Some(g.rss),
        );
        self.gauge(
            "ksmvm_guest_ram_pss_bytes",
            "Proportional set size of guest RAM (merged pages shared out).",
            &l,
            Some(g.pss),
        );
        self.gauge(
            "ksmvm_guest_ram_anonymous_bytes",
            "Anonymous guest RAM.",
            &l,
            Some(g.anonymous),
        );
        self.gauge(
            "ksmvm_guest_ram_ksm_bytes",
            "Guest RAM backed by KSM pages (smaps KSM line).",
            &l,
            g.ksm,
        );
        self.gauge(
            "ksmvm_guest_ram_anon_huge_pages_bytes",
            "Guest RAM in transparent huge pages.",
            &l,
            Some(g.anon_huge_pages),
        );
        self.gauge(
            "ksmvm_guest_ram_swap_bytes",
            "Guest RAM swapped out.",
            &l,
            Some(g.swap),
        );
        self.gauge(
            "ksmvm_process_rss_bytes",
            "Resident memory of the whole VMM process.",
            &l,
            Some(s.process_rss),
        );
        self.gauge(
            "ksmvm_vmm_overhead_bytes",
            "VMM overhead: process RSS minus resident guest RAM.",
            &l,
            Some(s.vmm_overhead_bytes),
        );
        let k = &s.ksm;
        self.gauge(
            "ksmvm_ksm_rmap_items",
            "KSM rmap items of the process (ksm_stat).",
            &l,
            k.ksm_rmap_items,
        );
        self.gauge(
            "ksmvm_ksm_merging_pages",
            "Pages of the process merged by KSM (ksm_stat).",
            &l,
            k.ksm_merging_pages,
        );
        self.gauge(
            "ksmvm_ksm_zero_pages",
            "Pages of the process merged with the zero page (ksm_stat).",
            &l,
            k.ksm_zero_pages,
        );
        self.gauge(
            "ksmvm_ksm_process_profit_bytes",
            "What KSM saves for the process minus its rmap cost (ksm_stat); may be negative.",
            &l,
            k.ksm_process_profit,
        );
        self.gauge(
            "ksmvm_ksm_mergeable",
            "1 if the process has mergeable memory (ksm_stat).",
            &l,
            k.ksm_mergeable,
        );
        self.gauge(
            "ksmvm_ksm_merge_any",
            "1 if the process is PR_SET_MEMORY_MERGE (ksm_stat).",
            &l,
            k.ksm_merge_any,
        );
        self.gauge(
            "ksmvm_merged_ratio",
            "Merged fraction of resident guest RAM (0..1).",
            &l,
            s.merged_fraction,
        );
        self.gauge(
            "ksmvm_effective_bytes",
            "Effective memory cost: resident minus what KSM saves for the VM.",
            &l,
            s.effective_bytes,
        );
        self.gauge(
            "ksmvm_ksm_saved_bytes",
            "What KSM saves for the VM net of its metadata; may be negative.",
            &l,
            s.ksm_saved_bytes,
        );
        self.add_devices(&info.name, &s.devices);
        if let Some(serial) = &s.serial {
            self.counter(
                "ksmvm_serial_written_bytes_total",
                "Guest serial output passed on to its sink.",
                &l,
                Some(serial.written_bytes),
            );
            self.counter(
                "ksmvm_serial_dropped_bytes_total",
                "Guest serial output dropped by its rate limit.",
                &l,
                Some(serial.dropped_bytes),
            );
            self.counter(
                "ksmvm_serial_rotations_total",
                "Rotations of the guest's serial log file at its size cap.",
                &l,
                Some(serial.rotations),
            );
        }
        let Some(b) = &s.balloon else { return };
        self.gauge(
            "ksmvm_guest_free_bytes",
            "Free memory the guest reports (balloon stats queue).",
            &l,
            b.free_memory,
        );
        self.gauge(
            "ksmvm_guest_available_bytes",
            "Available memory the guest reports (balloon stats queue).",
            &l,
            b.available_memory,
        );
        self.gauge(
            "ksmvm_guest_total_bytes",
            "Total memory the guest reports (balloon stats queue).",
            &l,
            b.total_memory,
        );
        self.gauge(
            "ksmvm_guest_disk_caches_bytes",
            "Page cache the guest reports (balloon stats queue).",
            &l,
            b.disk_caches,
        );
    }

    /// Host-wide KSM metrics (exporter only: a VM does not own them).
    pub fn add_host(&mut self, h: &HostSample) {
        let l: [(&'static str, &str); 0] = [];
        self.gauge(
            "ksmvm_host_ksm_available",
            "1 if the kernel has KSM (/sys/kernel/mm/ksm).",
            &l,
            Some(h.counters.is_some()),
        );
        self.gauge(
            "ksmvm_host_ksm_run",
            "KSM run mode (0 stopped, 1 running, 2 unmerged).",
            &l,
            h.run.map(|r| match r {
                crate::ksm::RunMode::Stop => 0u64,
                crate::ksm::RunMode::Run => 1,
                crate::ksm::RunMode::Unmerge => 2,
            }),
        );
        self.gauge(
            "ksmvm_host_page_size_bytes",
            "Host page size.",
            &l,
            Some(h.page_size),
        );
        self.gauge(
            "ksmvm_host_ksm_saved_bytes",
            "Memory KSM saves host-wide (pages_sharing times page size).",
            &l,
            h.saved_bytes(),
        );
        self.counter(
            "ksmvm_host_ksmd_cpu_seconds_total",
            "CPU time ksmd used since boot.",
            &l,
            h.ksmd_cpu_seconds,
        );
        let Some(c) = &h.counters else { return };
        self.gauge(
            "ksmvm_host_ksm_pages_shared",
            "KSM pages in use (pages_shared).",
            &l,
            c.pages_shared,
        );
        self.gauge(
            "ksmvm_host_ksm_pages_sharing",
            "Mappings sharing KSM pages beyond the first: pages saved (pages_sharing).",
            &l,
            c.pages_sharing,
        );
        self.gauge(
            "ksmvm_host_ksm_pages_unshared",
            "Pages scanned as unique (pages_unshared).",
            &l,
            c.pages_unshared,
        );
        self.gauge(
            "ksmvm_host_ksm_pages_volatile",
            "Pages changing too fast to merge (pages_volatile).",
            &l,
            c.pages_volatile,
        );
        self.gauge(
            "ksmvm_host_ksm_zero_pages",
            "Pages merged with the zero page (ksm_zero_pages).",
            &l,
            c.ksm_zero_pages,
        );
        self.gauge(
            "ksmvm_host_ksm_general_profit_bytes",
            "Bytes KSM saves host-wide minus its metadata (general_profit).",
            &l,
            c.general_profit,
        );
        self.counter(
            "ksmvm_host_ksm_full_scans_total",
            "Full scans of all mergeable memory (full_scans).",
            &l,
            c.full_scans,
        );
        self.counter(
            "ksmvm_host_ksm_pages_scanned_total",
            "Pages ksmd scanned (pages_scanned).",
            &l,
            c.pages_scanned,
        );
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let kind = match f.kind {
                Kind::Gauge => "gauge",
                Kind::Counter => "counter",
            };
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            for (labels, value) in &f.samples {
                out.push_str(f.name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                    }
                    out.push('}');
                }
                let _ = match value {
                    Value::Int(v) => writeln!(out, " {v}"),
                    Value::Float(v) => writeln!(out, " {}", fmt_float(*v)),
                };
            }
        }
        out
    }
}

fn fmt_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition of one VM (its `GET /metrics`).
pub fn render_vm(info: &VmInfo, stats: Option<&VmStats>) -> String {
    let mut e = Exposition::new();
    e.add_vm(info, stats);
    e.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{GuestRamStats, KsmProcessStats};

    fn info(name: &str) -> VmInfo {
        VmInfo {
            name: name.into(),
            state: VmState::Running,
            pid: 7,
            vcpus: 2,
            mem_mib: 64,
            kernel: "/k".into(),
            uptime_s: 1.25,
            ksm: OnOff::On,
        }
    }

    fn stats() -> VmStats {
        VmStats {
            guest_ram_bytes: 64 << 20,
            guest_ram: GuestRamStats {
                rss: 4096,
                ksm: None,
                ..Default::default()
            },
            ksm: KsmProcessStats {
                ksm_merging_pages: Some(3),
                ksm_process_profit: Some(-5),
                ..Default::default()
            },
            merged_fraction: Some(0.5),
            ..Default::default()
        }
    }

    #[test]
    fn groups_families_and_omits_unavailable_values() {
        let mut e = Exposition::new();
        e.add_vm(&info("a"), Some(&stats()));
        let off = VmInfo {
            ksm: OnOff::Off,
            ..info("b\"x")
        };
        e.add_vm(&off, None);
        let text = e.render();
        assert_eq!(text.matches("# TYPE ksmvm_up gauge").count(), 1);
        assert!(text.contains("ksmvm_up{vm=\"a\"} 1\n"));
        assert!(text.contains("ksmvm_up{vm=\"b\\\"x\"} 1\n"));
        assert!(text.contains("ksmvm_guest_ram_rss_bytes{vm=\"a\"} 4096\n"));
        assert!(text.contains("ksmvm_ksm_merging_pages{vm=\"a\"} 3\n"));
        assert!(text.contains("ksmvm_ksm_process_profit_bytes{vm=\"a\"} -5\n"));
        assert!(text.contains("ksmvm_merged_ratio{vm=\"a\"} 0.5\n"));
        assert!(text.contains("ksmvm_uptime_seconds{vm=\"a\"} 1.25\n"));
        // The merge setting is the VM's own fact: there without statistics too.
        assert!(text.contains("ksmvm_ksm_enabled{vm=\"a\"} 1\n"));
        assert!(text.contains("ksmvm_ksm_enabled{vm=\"b\\\"x\"} 0\n"));
        // Unavailable: no line at all, and no HELP/TYPE for an empty family.
        assert!(!text.contains("ksmvm_guest_ram_ksm_bytes"));
        assert!(!text.contains("ksmvm_ksm_rmap_items"));
        assert!(!text.contains("ksmvm_guest_ram_rss_bytes{vm=\"b"));
    }

    #[test]
    fn parses_as_prometheus_text() {
        let mut e = Exposition::new();
        e.add_vm(&info("a"), Some(&stats()));
        e.add_host(&HostSample {
            counters: Some(crate::ksm::KsmCounters {
                pages_sharing: Some(2),
                full_scans: Some(9),
                general_profit: Some(-1),
                ..Default::default()
            }),
            run: Some(crate::ksm::RunMode::Run),
            page_size: 4096,
            ksmd_cpu_seconds: Some(0.5),
        });
        let text = e.render();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let find = |name: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name)
                .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
        };
        assert_eq!(
            find("ksmvm_guest_ram_rss_bytes").labels.get("vm"),
            Some("a")
        );
        assert!(
            matches!(find("ksmvm_host_ksm_full_scans_total").value, prometheus_parse::Value::Counter(v) if v == 9.0)
        );
        assert!(
            matches!(find("ksmvm_host_ksm_saved_bytes").value, prometheus_parse::Value::Gauge(v) if v == 8192.0)
        );
        assert!(scrape.docs.contains_key("ksmvm_guest_ram_rss_bytes"));
    }
}
