//! `ksmvm exporter [--listen ADDR]`: one Prometheus endpoint for the host,
//! with every VM's metrics (from their API sockets) and the host's KSM.
//! It listens on loopback unless told otherwise: the endpoint has no
//! authentication and names every VM on the host.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};

use ksmvm::api::{HttpServer, Listener, Reply};
use ksmvm::ksm::Ksm;
use ksmvm::telemetry::{Exposition, HostSample, MetricKind, CONTENT_TYPE as METRICS_CONTENT_TYPE};

use super::fleet;
use super::CliError;

/// Where the exporter listens without --listen: loopback only (a local
/// Prometheus, or an SSH tunnel or TLS proxy in front of it).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// The whole host's exposition: every live VM, then the host's KSM.
pub fn scrape(dir: &Path, ksm: &Ksm) -> String {
    let mut e = Exposition::new();
    match fleet::discover(dir, true) {
        Ok(entries) => {
            let live: Vec<_> = entries.iter().filter_map(|v| v.live()).collect();
            e.add(
                MetricKind::Gauge,
                "ksmvm_vms",
                "VMs whose API answered in this scrape.",
                &[],
                Some(live.len() as u64),
            );
            for (info, stats) in live {
                e.add_vm(info, stats);
            }
        }
        Err(err) => log::warn!("cannot list VMs in {}: {err}", dir.display()),
    }
    e.add_host(&HostSample::read(ksm, Path::new("/proc")));
    e.render()
}

fn handle(dir: &Path, ksm: &Ksm, method: &str, target: &str) -> Reply {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    match (path, method) {
        ("/metrics", "GET") => Reply::text(METRICS_CONTENT_TYPE, scrape(dir, ksm)),
        ("/", "GET") => Reply::text(
            "text/plain; charset=utf-8",
            "ksmvm exporter: metrics at /metrics\n".into(),
        ),
        ("/metrics" | "/", _) => Reply {
            allow: Some("GET".into()),
            ..Reply::error(
                405,
                format!("method {method} not allowed on {path} (allowed: GET)"),
            )
        },
        _ => Reply::error(404, format!("no such resource: {path}")),
    }
}

/// Serves until SIGINT or SIGTERM.
pub fn run(listen: SocketAddr, dir: PathBuf, out: &mut dyn Write) -> Result<(), CliError> {
    // Block the stop signals first so the server threads inherit the mask
    // and this thread can wait for them.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block().map_err(|e| CliError::Io(e.into()))?;
    let listener = TcpListener::bind(listen).map_err(|source| CliError::Listen {
        addr: listen.to_string(),
        source,
    })?;
    let addr = listener.local_addr()?;
    let ksm = Ksm::new();
    let server = HttpServer::spawn(
        ksmvm::threads::ThreadKind::Exporter,
        Listener::Tcp(listener),
        Arc::new(move |method: &str, target: &str, _body: &[u8]| {
            handle(&dir, &ksm, method, target)
        }),
    )?;
    // Tests and scripts read the bound address (port 0 picks one).
    writeln!(out, "ksmvm exporter listening on http://{addr}/metrics")?;
    out.flush()?;
    let sig = sigs.wait().map_err(|e| CliError::Io(e.into()))?;
    log::info!("received {}, stopping the exporter", sig.as_str());
    server.stop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};

    fn listen(args: &[&str]) -> std::net::SocketAddr {
        match Cli::try_parse_from(args).unwrap().command {
            Command::Exporter { listen } => listen,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn listens_on_loopback_unless_told_otherwise() {
        let addr = listen(&["ksmvm", "exporter"]);
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.to_string(), super::DEFAULT_LISTEN);
        assert_eq!(
            listen(&["ksmvm", "exporter", "--listen", "0.0.0.0:9100"]).to_string(),
            "0.0.0.0:9100"
        );
    }
}
