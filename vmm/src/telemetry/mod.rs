//! What the hoster's monitoring reads: the Prometheus exposition of VMs
//! and of the host, and one reading of the host's KSM state (counters,
//! ksmd's CPU time) for the host-wide views (`top`, the exporter).

mod device_metrics;
mod host;
mod metrics;

pub use crate::stats::page_size;
pub use host::HostSample;
pub use metrics::{render_vm, Exposition, Kind as MetricKind, Value, CONTENT_TYPE};
