//! The per-VM control API: HTTP/1.1 + JSON on a Unix socket
//! (`/run/ksmvm/NAME.sock` by default), in the style of Firecracker's API.
//! `docs/api/openapi.yaml` describes every route in [`routes::ROUTES`].
//!
//! The server runs on its own thread and answers from a [`VmBackend`];
//! the CLI views (`list`, `stats`, `top`, `exporter`) talk to it through
//! [`ApiClient`].

mod backend;
mod client;
mod handler;
mod http;
mod live;
pub mod routes;
mod server;
mod socket;
mod types;

pub use backend::{BackendError, VmBackend};
pub use client::{parse_response, ApiClient, ClientError, ClientResponse};
pub use handler::{handle, Reply, MAX_BODY_BYTES};
pub use http::{Handler, HttpServer, Limits, Listener};
pub use live::STATS_DETAIL_MAX_AGE;
pub use server::ApiServer;
pub use socket::{ApiSocket, SocketError, SocketFile};
pub use types::{Action, ActionRequest, ErrorBody, OnOff, VmInfo, VmState};
