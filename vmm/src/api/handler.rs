//! Turns a routed request into a reply, independent of the HTTP library:
//! the server layer reads the (size-checked) body and writes the reply.

use serde::Serialize;

use super::backend::{BackendError, VmBackend};
use super::routes::{self, Endpoint, RouteError};
use super::types::{ActionRequest, BalloonRequest, ErrorBody};
use crate::telemetry as metrics;

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: u64 = 64 * 1024;

pub const JSON: &str = "application/json";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: Option<&'static str>,
    pub body: Vec<u8>,
    /// The Allow header of a 405.
    pub allow: Option<String>,
    /// Close the connection after this reply (413: the body was not read).
    pub close: bool,
}

impl Reply {
    pub fn json<T: Serialize>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status,
                content_type: Some(JSON),
                body,
                allow: None,
                close: false,
            },
            Err(e) => Self::error(500, format!("cannot encode the response: {e}")),
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let body = ErrorBody {
            error: message.into(),
        };
        Self {
            status,
            content_type: Some(JSON),
            // Serialising a struct of one String cannot fail.
            body: serde_json::to_vec(&body).unwrap_or_default(),
            allow: None,
            close: false,
        }
    }

    pub fn no_content() -> Self {
        Self {
            status: 204,
            content_type: None,
            body: Vec::new(),
            allow: None,
            close: false,
        }
    }

    pub fn text(content_type: &'static str, body: String) -> Self {
        Self {
            status: 200,
            content_type: Some(content_type),
            body: body.into_bytes(),
            allow: None,
            close: false,
        }
    }

    pub fn too_large(limit: u64) -> Self {
        Self {
            close: true,
            ..Self::error(413, format!("request body larger than {limit} bytes"))
        }
    }

    /// 404 or 405 (with Allow) for a request that matched no route.
    pub fn route_error(e: RouteError, method: &str, path: &str) -> Self {
        match e {
            RouteError::NotFound => Self::error(404, format!("no such resource: {path}")),
            RouteError::MethodNotAllowed { allow } => Self {
                allow: Some(allow.clone()),
                ..Self::error(
                    405,
                    format!("method {method} not allowed on {path} (allowed: {allow})"),
                )
            },
        }
    }
}

fn backend_error(e: BackendError) -> Reply {
    let status = match e {
        BackendError::Stopping => 409,
        BackendError::NoBalloon => 404,
        BackendError::BalloonTarget(_) => 400,
        BackendError::Stats(_) | BackendError::Memory(_) | BackendError::Vm(_) => 500,
    };
    Reply::error(status, e.to_string())
}

/// Answers one request of the per-VM API.
pub fn handle(vm: &dyn VmBackend, method: &str, path: &str, body: &[u8]) -> Reply {
    let endpoint = match routes::resolve(method, path) {
        Ok(e) => e,
        Err(e) => return Reply::route_error(e, method, path),
    };
    match endpoint {
        Endpoint::Info => Reply::json(200, &vm.info()),
        Endpoint::Stats => match vm.stats() {
            Ok(s) => Reply::json(200, &s),
            Err(e) => backend_error(e),
        },
        Endpoint::Metrics => {
            // Sampling failed: still expose what the VM is (ksmvm_up etc.).
            let stats = vm
                .stats()
                .map_err(|e| log::warn!("metrics without statistics: {e}"))
                .ok();
            Reply::text(
                metrics::CONTENT_TYPE,
                metrics::render_vm(&vm.info(), stats.as_ref()),
            )
        }
        Endpoint::Actions => {
            let req: ActionRequest = match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => return Reply::error(400, format!("bad action request: {e}")),
            };
            match vm.act(req.action) {
                Ok(()) => Reply::no_content(),
                Err(e) => backend_error(e),
            }
        }
        Endpoint::Balloon => match vm.balloon() {
            Ok(b) => Reply::json(200, &b),
            Err(e) => backend_error(e),
        },
        Endpoint::SetBalloon => {
            let req: BalloonRequest = match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => return Reply::error(400, format!("bad balloon request: {e}")),
            };
            match vm.set_balloon(req.target_mib) {
                Ok(()) => Reply::no_content(),
                Err(e) => backend_error(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{Action, OnOff, VmInfo, VmState};
    use crate::stats::VmStats;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        acts: Mutex<Vec<Action>>,
        stats_fail: bool,
    }

    impl VmBackend for Fake {
        fn info(&self) -> VmInfo {
            VmInfo {
                name: "f".into(),
                state: VmState::Running,
                pid: 1,
                vcpus: 1,
                mem_mib: 64,
                kernel: "/k".into(),
                uptime_s: 0.0,
                ksm: OnOff::On,
            }
        }
        fn stats(&self) -> Result<VmStats, BackendError> {
            if self.stats_fail {
                Err(BackendError::Stats("no smaps".into()))
            } else {
                Ok(VmStats::default())
            }
        }
        fn act(&self, a: Action) -> Result<(), BackendError> {
            self.acts.lock().unwrap().push(a);
            Ok(())
        }
    }

    fn error_of(r: &Reply) -> String {
        let b: ErrorBody = serde_json::from_slice(&r.body).unwrap();
        b.error
    }

    #[test]
    fn routes_and_errors() {
        let vm = Fake::default();
        let r = handle(&vm, "GET", "/", b"");
        assert_eq!(r.status, 200);
        let info: VmInfo = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(info.name, "f");
        assert_eq!(handle(&vm, "GET", "/stats", b"").status, 200);
        let m = handle(&vm, "GET", "/metrics", b"");
        assert_eq!(m.content_type, Some(metrics::CONTENT_TYPE));

        let r = handle(&vm, "PUT", "/actions", br#"{"action":"ksm_unmerge"}"#);
        assert_eq!((r.status, r.body.len()), (204, 0));
        assert_eq!(*vm.acts.lock().unwrap(), [Action::KsmUnmerge]);

        let r = handle(&vm, "GET", "/nowhere", b"");
        assert_eq!(r.status, 404);
        assert!(error_of(&r).contains("/nowhere"));
        let r = handle(&vm, "POST", "/actions", b"");
        assert_eq!((r.status, r.allow.as_deref()), (405, Some("PUT")));
        for bad in [
            &b"{"[..],
            br#"{"action":"explode"}"#,
            b"",
            br#"{"act":"pause"}"#,
        ] {
            let r = handle(&vm, "PUT", "/actions", bad);
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(bad));
            assert!(!error_of(&r).is_empty());
        }
        assert_eq!(vm.acts.lock().unwrap().len(), 1);
    }

    #[test]
    fn balloon_routes() {
        // A VM without a balloon says so with 404 on both methods.
        let vm = Fake::default();
        let r = handle(&vm, "GET", "/balloon", b"");
        assert_eq!(r.status, 404);
        assert!(error_of(&r).contains("--balloon"), "{}", error_of(&r));
        let r = handle(&vm, "PUT", "/balloon", br#"{"target_mib": 8}"#);
        assert_eq!(r.status, 404);
        for bad in [
            &b"{"[..],
            br#"{"target_mib": -1}"#,
            br#"{"target":1}"#,
            br#"{"target_mib": 1, "x": 2}"#,
        ] {
            let r = handle(&vm, "PUT", "/balloon", bad);
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(bad));
        }
        let r = handle(&vm, "DELETE", "/balloon", b"");
        assert_eq!((r.status, r.allow.as_deref()), (405, Some("GET, PUT")));
    }

    #[test]
    fn metrics_survive_a_failed_sample() {
        let vm = Fake {
            stats_fail: true,
            ..Default::default()
        };
        assert_eq!(handle(&vm, "GET", "/stats", b"").status, 500);
        let m = handle(&vm, "GET", "/metrics", b"");
        assert_eq!(m.status, 200);
        let text = String::from_utf8(m.body).unwrap();
        assert!(text.contains("ksmvm_up{vm=\"f\"} 1"));
        assert!(!text.contains("ksmvm_guest_ram_rss_bytes"));
    }
}
