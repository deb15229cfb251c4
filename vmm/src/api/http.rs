//! A small HTTP/1.1 server on its own thread (hyper on a single-threaded
//! tokio runtime), shared by the per-VM API (Unix socket) and the exporter
//! (TCP).
//!
//! Every connection is its own task, so a client that connects and never
//! sends blocks nobody; handlers run on tokio's blocking pool, so a slow
//! one (sampling smaps, madvise on all guest RAM) cannot stall the others.
//! Bodies above [`MAX_BODY_BYTES`] are refused with 413 from their
//! Content-Length alone, without being read.

use std::convert::Infallible;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use super::handler::{Reply, MAX_BODY_BYTES};
use crate::threads::{self, ThreadKind};

/// Answers one request: (method, request target, body).
pub type Handler = Arc<dyn Fn(&str, &str, &[u8]) -> Reply + Send + Sync>;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
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
            rt.block_on(serve(listener, handler, stop_rx));
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

async fn serve(listener: AsyncListener, handler: Handler, mut stop: oneshot::Receiver<()>) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let handler = handler.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(respond(req, handler).await) }
                    });
                    let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            log::debug!("API connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning.
                    log::warn!("cannot accept an API connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
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
async fn respond(req: Request<Incoming>, handler: Handler) -> Response<Full<Bytes>> {
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
    let body = match Limited::new(req.into_body(), limit).collect().await {
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
