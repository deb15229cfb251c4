//! A VM's API server: the HTTP server on the VM's socket, answering from a
//! [`VmBackend`]; stopping it removes the socket.

use std::path::Path;
use std::sync::Arc;

use super::backend::VmBackend;
use super::handler;
use super::http::{HttpServer, Listener};
use super::socket::{ApiSocket, SocketFile};

pub struct ApiServer {
    // Declaration order is drop order: the server stops (and lets replies in
    // flight finish) before the socket file is removed.
    _http: HttpServer,
    file: SocketFile,
}

impl ApiServer {
    pub fn start(socket: ApiSocket, vm: Arc<dyn VmBackend>) -> std::io::Result<Self> {
        let ApiSocket { listener, file } = socket;
        let http = HttpServer::spawn(
            crate::threads::ThreadKind::Api,
            Listener::Unix(listener),
            Arc::new(move |method: &str, target: &str, body: &[u8]| {
                handler::handle(vm.as_ref(), method, target, body)
            }),
        )?;
        log::info!("API listening on {}", file.path().display());
        Ok(Self { _http: http, file })
    }

    pub fn socket_path(&self) -> &Path {
        self.file.path()
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("socket", &self.file.path())
            .finish()
    }
}
