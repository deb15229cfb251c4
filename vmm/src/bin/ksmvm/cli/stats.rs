//! `ksmvm stats NAME`: one VM's statistics from its API.

use std::io::Write;
use std::path::Path;

use ksmvm::api::ApiClient;
use ksmvm::stats::VmStats;
use ksmvm::telemetry::page_size;

use super::fleet;
use super::format::{opt_bytes, opt_signed};
use super::CliError;

pub fn run(socket: &Path, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let client = ApiClient::new(socket).with_timeout(fleet::QUERY_TIMEOUT);
    if json {
        // The API's own JSON, unchanged.
        let r = client.stats()?;
        serde_json::to_writer_pretty(&mut *out, &r)?;
        writeln!(out)?;
        return Ok(());
    }
    let info = client.info()?;
    let s = client.stats()?;
    writeln!(
        out,
        "{} (pid {}, {}, {} vCPU, KSM {})",
        info.name, info.pid, info.state, info.vcpus, info.ksm
    )?;
    for (k, v) in lines(&s) {
        writeln!(out, "  {k:<22} {v}")?;
    }
    Ok(())
}

fn lines(s: &VmStats) -> Vec<(&'static str, String)> {
    let g = &s.guest_ram;
    let k = &s.ksm;
    let num = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
    vec![
        ("guest RAM", opt_bytes(Some(s.guest_ram_bytes))),
        ("resident", opt_bytes(Some(g.rss))),
        ("pss", opt_bytes(Some(g.pss))),
        ("merged (smaps KSM)", opt_bytes(g.ksm)),
        (
            "merged fraction",
            s.merged_fraction
                .map_or_else(|| "-".into(), |f| format!("{:.1}%", f * 100.0)),
        ),
        (
            "merged (any source)",
            opt_bytes(fleet::merged_bytes(s, page_size())),
        ),
        ("swap", opt_bytes(Some(g.swap))),
        ("process RSS", opt_bytes(Some(s.process_rss))),
        ("VMM overhead", opt_bytes(Some(s.vmm_overhead_bytes))),
        ("KSM saved (net)", opt_signed(s.ksm_saved_bytes)),
        ("KSM metadata", opt_bytes(s.ksm_metadata_bytes)),
        ("effective cost", opt_bytes(s.effective_bytes)),
        ("ksm_merging_pages", num(k.ksm_merging_pages)),
        ("ksm_zero_pages", num(k.ksm_zero_pages)),
        ("ksm_rmap_items", num(k.ksm_rmap_items)),
        ("ksm_process_profit", opt_signed(k.ksm_process_profit)),
    ]
}
