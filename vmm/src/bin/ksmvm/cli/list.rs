//! `ksmvm list`: every VM of the runtime directory.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use ksmvm::config::OnOff;
use ksmvm::telemetry::page_size;

use super::fleet::{self, VmStatus};
use super::format;
use super::CliError;

#[derive(Debug, Serialize)]
pub struct ListRow {
    pub name: String,
    pub socket: String,
    /// running, paused, or dead (stale socket / no answer).
    pub state: String,
    pub pid: Option<u32>,
    pub mem_mib: Option<u64>,
    /// Whether guest RAM is marked mergeable now ("on"/"off"): KSM may
    /// merge it with other VMs' pages.
    pub ksm: Option<OnOff>,
    /// Resident guest RAM, bytes.
    pub resident_bytes: Option<u64>,
    /// Guest RAM backed by KSM pages, bytes.
    pub merged_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn rows(dir: &Path) -> Result<Vec<ListRow>, CliError> {
    let ps = page_size();
    let entries = fleet::discover(dir, true).map_err(|source| CliError::RuntimeDir {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(entries
        .into_iter()
        .map(|e| {
            let socket = e.socket.display().to_string();
            match e.status {
                VmStatus::Live { info, stats } => {
                    let s = stats.as_deref().ok();
                    ListRow {
                        name: e.name,
                        socket,
                        state: info.state.to_string(),
                        pid: Some(info.pid),
                        mem_mib: Some(info.mem_mib),
                        ksm: Some(info.ksm),
                        resident_bytes: s.map(|s| s.guest_ram.rss),
                        merged_bytes: s.and_then(|s| fleet::merged_bytes(s, ps)),
                        error: stats.err(),
                    }
                }
                VmStatus::Dead { error } => ListRow {
                    name: e.name,
                    socket,
                    state: "dead".into(),
                    pid: None,
                    mem_mib: None,
                    ksm: None,
                    resident_bytes: None,
                    merged_bytes: None,
                    error: Some(error),
                },
            }
        })
        .collect())
}

pub fn run(dir: &Path, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let rows = rows(dir)?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                r.state.clone(),
                r.mem_mib
                    .map_or_else(|| "-".into(), |m| format::bytes(m << 20)),
                r.ksm.map_or_else(|| "-".into(), |k| k.to_string()),
                format::opt_bytes(r.resident_bytes),
                format::opt_bytes(r.merged_bytes),
            ]
        })
        .collect();
    out.write_all(
        format::table(
            &[
                "NAME", "PID", "STATE", "MEMORY", "KSM", "RESIDENT", "MERGED",
            ],
            &cells,
        )
        .as_bytes(),
    )?;
    Ok(())
}
