//! Finds the VMs of a runtime directory and asks each one's API for its
//! facts and statistics: what `list`, `top` and the exporter show.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ksmvm::api::{ApiClient, ClientError, VmInfo};
use ksmvm::instance::list_sockets;
use ksmvm::stats::VmStats;

/// How long one VM may take to answer before it is shown as unreachable.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub enum VmStatus {
    Live {
        info: VmInfo,
        /// The reason when sampling failed or was not asked for.
        stats: Result<Box<VmStats>, String>,
    },
    /// A stale socket (nobody listening) or a VM that did not answer.
    Dead { error: String },
}

#[derive(Debug, Clone)]
pub struct VmEntry {
    pub name: String,
    pub socket: PathBuf,
    pub status: VmStatus,
}

impl VmEntry {
    pub fn live(&self) -> Option<(&VmInfo, Option<&VmStats>)> {
        match &self.status {
            VmStatus::Live { info, stats } => Some((info, stats.as_deref().ok())),
            VmStatus::Dead { .. } => None,
        }
    }
}

/// Queries one VM's socket.
pub fn query(name: &str, socket: &Path, with_stats: bool) -> VmEntry {
    let client = ApiClient::new(socket).with_timeout(QUERY_TIMEOUT);
    let status = match client.info() {
        Ok(info) => {
            let stats = if with_stats {
                client.stats().map(Box::new).map_err(|e| e.to_string())
            } else {
                Err("not requested".into())
            };
            VmStatus::Live { info, stats }
        }
        Err(ClientError::Connect { source, .. }) => VmStatus::Dead {
            error: format!("not running ({source})"),
        },
        Err(e) => VmStatus::Dead {
            error: e.to_string(),
        },
    };
    VmEntry {
        name: name.to_owned(),
        socket: socket.to_path_buf(),
        status,
    }
}

/// Every VM whose socket is in `dir`, queried in parallel, sorted by name.
pub fn discover(dir: &Path, with_stats: bool) -> std::io::Result<Vec<VmEntry>> {
    let sockets = list_sockets(dir)?;
    Ok(std::thread::scope(|s| {
        let handles: Vec<_> = sockets
            .iter()
            .map(|(name, path)| s.spawn(move || query(name, path, with_stats)))
            .collect();
        handles
            .into_iter()
            .zip(&sockets)
            .map(|(h, (name, path))| {
                h.join().unwrap_or_else(|_| VmEntry {
                    name: name.clone(),
                    socket: path.clone(),
                    status: VmStatus::Dead {
                        error: "query failed".into(),
                    },
                })
            })
            .collect()
    }))
}

/// Bytes of guest RAM backed by KSM pages: the smaps KSM line, else the
/// process's ksm_merging_pages (all of a VMM's mergeable memory is guest RAM).
pub fn merged_bytes(stats: &VmStats, page_size: u64) -> Option<u64> {
    stats.guest_ram.ksm.or_else(|| {
        stats
            .ksm
            .ksm_merging_pages
            .map(|p| p.saturating_mul(page_size))
    })
}
