//! The per-device counters of `/stats` (`devices`) as Prometheus metrics,
//! labelled `vm` and `device`. Counters not listed here stay in `/stats`
//! only; docs/metrics.md lists these.

use super::metrics::{Exposition, Kind, Value};
use crate::devices::virtio::DeviceCounters;

/// (device kind or "*" for every kind, counter, metric, help, unit scale).
type Row = (&'static str, &'static str, &'static str, &'static str, f64);

const MS: f64 = 1e-3;

const ROWS: &[Row] = &[
    (
        "block",
        "requests",
        "ksmvm_block_requests_total",
        "Requests the guest made of the disk.",
        1.0,
    ),
    (
        "block",
        "read_bytes",
        "ksmvm_block_read_bytes_total",
        "Bytes the guest read from the disk.",
        1.0,
    ),
    (
        "block",
        "write_bytes",
        "ksmvm_block_written_bytes_total",
        "Bytes the guest wrote to the disk.",
        1.0,
    ),
    (
        "block",
        "io_errors",
        "ksmvm_block_io_errors_total",
        "Requests answered with an I/O error.",
        1.0,
    ),
    (
        "block",
        "too_large",
        "ksmvm_block_too_large_requests_total",
        "Requests refused for carrying more than 16 MiB.",
        1.0,
    ),
    (
        "block",
        "throttled_ms",
        "ksmvm_block_throttled_seconds_total",
        "Time the disk's rate limiter held requests back.",
        MS,
    ),
    (
        "net",
        "rx_frames",
        "ksmvm_net_receive_packets_total",
        "Frames delivered to the guest.",
        1.0,
    ),
    (
        "net",
        "rx_bytes",
        "ksmvm_net_receive_bytes_total",
        "Bytes delivered to the guest.",
        1.0,
    ),
    (
        "net",
        "tx_frames",
        "ksmvm_net_transmit_packets_total",
        "Frames the guest sent.",
        1.0,
    ),
    (
        "net",
        "tx_bytes",
        "ksmvm_net_transmit_bytes_total",
        "Bytes the guest sent.",
        1.0,
    ),
    (
        "net",
        "tx_spoofed",
        "ksmvm_net_transmit_spoofed_packets_total",
        "Frames dropped for a source MAC that is not the guest's.",
        1.0,
    ),
    (
        "net",
        "rx_throttled_ms",
        "ksmvm_net_receive_throttled_seconds_total",
        "Time the NIC's receive limiter held frames back.",
        MS,
    ),
    (
        "net",
        "tx_throttled_ms",
        "ksmvm_net_transmit_throttled_seconds_total",
        "Time the NIC's transmit limiter held frames back.",
        MS,
    ),
    (
        "rng",
        "bytes",
        "ksmvm_rng_bytes_total",
        "Entropy bytes given to the guest.",
        1.0,
    ),
    (
        "rng",
        "throttled_ms",
        "ksmvm_rng_throttled_seconds_total",
        "Time the entropy device's limiter held requests back.",
        MS,
    ),
    (
        "*",
        "notify_throttled_ms",
        "ksmvm_device_notify_throttled_seconds_total",
        "Time the device's queue notifications were held back.",
        MS,
    ),
];

impl Exposition {
    /// Adds the metrics of `devices` for VM `vm`.
    pub fn add_devices(&mut self, vm: &str, devices: &[DeviceCounters]) {
        for d in devices {
            let labels = [("vm", vm), ("device", d.id.as_str())];
            for &(kind, counter, name, help, scale) in ROWS {
                if kind != "*" && kind != d.kind {
                    continue;
                }
                let Some(&v) = d.counters.get(counter) else {
                    continue;
                };
                let value = if scale == 1.0 {
                    Value::from(v)
                } else {
                    #[allow(clippy::cast_precision_loss, reason = "counters far below 2^52 ms")]
                    Value::from(v as f64 * scale)
                };
                self.add(Kind::Counter, name, help, &labels, Some(value));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_counters_become_labelled_metrics_in_seconds() {
        let d = |id: &str, kind: &str, c: &[(&str, u64)]| DeviceCounters {
            id: id.into(),
            kind: kind.into(),
            counters: c.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        };
        let mut e = Exposition::new();
        e.add_devices(
            "web1",
            &[
                d(
                    "disk0",
                    "block",
                    &[
                        ("read_bytes", 4096),
                        ("throttled_ms", 1500),
                        ("notify_throttled_ms", 0),
                    ],
                ),
                d("net0", "net", &[("tx_spoofed", 7), ("read_bytes", 1)]),
            ],
        );
        let text = e.render();
        assert!(
            text.contains("ksmvm_block_read_bytes_total{vm=\"web1\",device=\"disk0\"} 4096"),
            "{text}"
        );
        assert!(
            text.contains("ksmvm_block_throttled_seconds_total{vm=\"web1\",device=\"disk0\"} 1.5"),
            "{text}"
        );
        assert!(
            text.contains(
                "ksmvm_device_notify_throttled_seconds_total{vm=\"web1\",device=\"disk0\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "ksmvm_net_transmit_spoofed_packets_total{vm=\"web1\",device=\"net0\"} 7"
            ),
            "{text}"
        );
        assert!(
            !text.contains("device=\"net0\"} 1\n"),
            "a block counter name on a NIC is not a block metric"
        );
        assert!(text.contains("# TYPE ksmvm_block_read_bytes_total counter"));
    }
}
