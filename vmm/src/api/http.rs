//! A small HTTP/1.1 server on its own thread (hyper on a single-threaded
//! tokio runtime), shared by the per-VM API (Unix socket) and the exporter
//! (TCP).
//!
//! Every connection is its own task, so a client that connects and never
//! sends blocks no other (below the connection cap); handlers run on tokio's blocking pool, so a slow
//! one (sampling smaps, madvise on all guest RAM) cannot stall the others.
//! Bodies above [`MAX_BODY_BYTES`] are refused with 413 from their
//! Content-Length alone, without being read.
//!
//! What one client can hold is bounded ([`Limits`]): at most
//! `max_connections` are served at once (the rest wait in the socket's
//! listen backlog, 64 for the API, costing the VMM no file descriptor; a
//! client beyond that waits in connect), so a flood of idle
//! connections cannot use up the fds that sd_notify and the devices need;
//! headers must arrive within `header_read`, and a body within `body_read`
//! (408 otherwise: a body trickled one byte at a time holds its slot no
//! longer). Accept failures (EMFILE while the process is at its fd limit)
//! are logged a few at a time, with a count of the rest ([`AcceptLog`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, Semaphore};

use super::handler::{Reply, MAX_BODY_BYTES};
use crate::logger::{RateLimiter, Verdict};
use crate::threads::{self, ThreadKind};

/// Answers one request: (method, request target, body).
pub type Handler = Arc<dyn Fn(&str, &str, &[u8]) -> Reply + Send + Sync>;

/// What one server lets its clients hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long a client may take to send its request headers.
    pub header_read: Duration,
    /// How long a client may take to send its request body.
    pub body_read: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_read: Duration::from_secs(30),
            body_read: Duration::from_secs(30),
        }
    }
}
/// How long the server waits after a failed accept before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Accept failures logged per window; the rest are counted.
const ACCEPT_LOG_BURST: u32 = 3;
const ACCEPT_LOG_WINDOW: Duration = Duration::from_secs(10);

/// What to log about accept failures. A cause such as EMFILE (a client
/// flood holding the process's fds) makes every accept fail for as long
/// as it lasts: a few warnings per window, each later one with the count
/// of failures it held back, and one line once accepting works again.
#[derive(Debug)]
struct AcceptLog {
    limiter: RateLimiter,
    /// Failures since the last successful accept.
    failures: u64,
}

impl Default for AcceptLog {
    fn default() -> Self {
        Self {
            limiter: RateLimiter::with_budget(ACCEPT_LOG_BURST, ACCEPT_LOG_WINDOW),
            failures: 0,
        }
    }
}

impl AcceptLog {
    /// The warning to log for this failure, if any.
    fn failed(&mut self, e: &std::io::Error, now: Instant) -> Option<String> {
        self.failures += 1;
        match self.limiter.check_at(now) {
            Verdict::Log { suppressed: 0 } => Some(format!("cannot accept a connection: {e}")),
            Verdict::Log { suppressed } => Some(format!(
                "cannot accept a connection: {e} ({suppressed} more failed accepts not logged)"
            )),
            Verdict::Suppress => None,
        }
    }

    /// The line to log for a successful accept that ends a run of failures.
    fn accepted(&mut self) -> Option<String> {
        let failures = std::mem::take(&mut self.failures);
        (failures > 0)
            .then(|| format!("accepting connections again after {failures} failed accepts"))
    }
}

/// How long stopping waits for replies in flight (e.g. the 204 of a
/// shutdown); a client stuck mid-request cannot hold the VM's exit longer.
const STOP_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub enum Listener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

enum AsyncListener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl AsyncListener {
    fn new(l: Listener) -> std::io::Result<Self> {
        Ok(match l {
            Listener::Unix(l) => {
                l.set_nonblocking(true)?;
                Self::Unix(tokio::net::UnixListener::from_std(l)?)
            }
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                Self::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
        })
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Self::Unix(l) => Box::new(l.accept().await?.0),
            Self::Tcp(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// A running server; stopped (gracefully, bounded) on drop.
pub struct HttpServer {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl HttpServer {
    /// Serves on a thread of `kind`; its request handlers run on threads
    /// of `kind.worker()`.
    pub fn spawn(kind: ThreadKind, listener: Listener, handler: Handler) -> std::io::Result<Self> {
        Self::spawn_with(kind, listener, handler, Limits::default())
    }

    /// [`spawn`](Self::spawn) with other [`Limits`].
    pub fn spawn_with(
        kind: ThreadKind,
        listener: Listener,
        handler: Handler,
        limits: Limits,
    ) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name(kind.worker().name())
            .build()?;
        let listener = {
            // from_std registers with the runtime's reactor.
            let _guard = rt.enter();
            AsyncListener::new(listener)?
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = threads::spawn(kind, move || {
            rt.block_on(serve(listener, handler, limits, stop_rx));
            rt.shutdown_timeout(STOP_GRACE);
        })?;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Stops accepting, lets replies in flight finish, and joins the thread.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the HTTP server thread panicked");
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

async fn serve(
    listener: AsyncListener,
    handler: Handler,
    limits: Limits,
    mut stop: oneshot::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut accept_log = AcceptLog::default();
    loop {
        // A free slot first: until one is, connections wait in the backlog.
        let slot = tokio::select! {
            _ = &mut stop => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    if let Some(msg) = accept_log.accepted() {
                        log::info!("{msg}");
                    }
                    let handler = handler.clone();
                    let body_read = limits.body_read;
                    let svc = hyper::service::service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(respond(req, handler, body_read).await) }
                    });
                    let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            log::debug!("API connection ended: {e}");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    if let Some(msg) = accept_log.failed(&e, Instant::now()) {
                        log::warn!("{msg}");
                    }
                    // E.g. EMFILE: back off instead of spinning.
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    if tokio::time::timeout(STOP_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        log::debug!("API connections still open at shutdown; closing them");
    }
}

/// Checks the body size, reads the body, and runs the handler off the
/// runtime thread.
async fn respond(
    req: Request<Incoming>,
    handler: Handler,
    body_read: Duration,
) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let declared = match req.headers().get(CONTENT_LENGTH).map(parse_length) {
        Some(Ok(n)) => Some(n),
        Some(Err(())) => return to_response(Reply::error(400, "invalid Content-Length")),
        None => None,
    };
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return to_response(Reply::too_large(MAX_BODY_BYTES));
    }
    let limit = usize::try_from(MAX_BODY_BYTES).unwrap_or(usize::MAX);
    let read = tokio::time::timeout(body_read, Limited::new(req.into_body(), limit).collect());
    let Ok(body) = read.await else {
        return to_response(Reply {
            close: true,
            ..Reply::error(
                408,
                format!(
                    "the body did not arrive within {:.1} s",
                    body_read.as_secs_f64()
                ),
            )
        });
    };
    let body = match body {
        Ok(b) => b.to_bytes(),
        // Chunked bodies have no Content-Length: caught while reading.
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return to_response(Reply::too_large(MAX_BODY_BYTES))
        }
        Err(e) => return to_response(Reply::error(400, format!("cannot read the body: {e}"))),
    };
    let reply = tokio::task::spawn_blocking(move || handler(&method, &target, &body))
        .await
        .unwrap_or_else(|e| Reply::error(500, format!("request handler failed: {e}")));
    to_response(reply)
}

fn parse_length(v: &HeaderValue) -> Result<u64, ()> {
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or(())
}

fn to_response(r: Reply) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(r.status);
    if let Some(ct) = r.content_type {
        b = b.header(CONTENT_TYPE, ct);
    }
    if let Some(allow) = &r.allow {
        b = b.header(ALLOW, allow.as_str());
    }
    if r.close {
        b = b.header(CONNECTION, "close");
    }
    b.body(Full::new(Bytes::from(r.body))).unwrap_or_else(|e| {
        log::error!("cannot build an API response: {e}");
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        resp
    })
}

#[cfg(test)]
mod tests;
