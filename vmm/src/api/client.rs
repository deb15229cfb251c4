//! A tiny blocking HTTP/1.1 client for VM API sockets (used by the CLI
//! views and tests): one request per connection, bounded by timeouts.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::stats::VmStats;

use super::types::{Action, ActionRequest, ErrorBody, VmInfo};

/// Responses larger than this are refused (a VM's stats are a few KiB).
const MAX_RESPONSE_BYTES: usize = 16 << 20;
const MAX_HEADERS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens (a stale socket of a VM that died) or no socket.
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: malformed HTTP response: {what}", path.display())]
    Malformed { path: PathBuf, what: String },
    #[error("{}: {method} {target} answered {status}: {message}", path.display())]
    Status {
        path: PathBuf,
        method: String,
        target: String,
        status: u16,
        message: String,
    },
    #[error("{}: cannot decode the response to {target}: {source}", path.display())]
    Decode {
        path: PathBuf,
        target: String,
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ClientResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            timeout: Duration::from_secs(5),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
    ) -> Result<ClientResponse, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let mut head =
            format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).map_err(io)?;
        if let Some(b) = body {
            stream.write_all(b).map_err(io)?;
        }
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE_BYTES as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(io)?;
        if raw.len() > MAX_RESPONSE_BYTES {
            return Err(self.malformed("response too large"));
        }
        parse_response(&raw).map_err(|what| self.malformed(&what))
    }

    fn malformed(&self, what: &str) -> ClientError {
        ClientError::Malformed {
            path: self.path.clone(),
            what: what.to_owned(),
        }
    }

    /// A request that must succeed with `expect`; other statuses become
    /// errors carrying the server's `{"error": ...}` message.
    fn call(
        &self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
        expect: u16,
    ) -> Result<ClientResponse, ClientError> {
        let r = self.request(method, target, body)?;
        if r.status == expect {
            return Ok(r);
        }
        let message = serde_json::from_slice::<ErrorBody>(&r.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&r.body).into_owned());
        Err(ClientError::Status {
            path: self.path.clone(),
            method: method.to_owned(),
            target: target.to_owned(),
            status: r.status,
            message,
        })
    }

    fn get_json<T: DeserializeOwned>(&self, target: &str) -> Result<T, ClientError> {
        let r = self.call("GET", target, None, 200)?;
        serde_json::from_slice(&r.body).map_err(|source| ClientError::Decode {
            path: self.path.clone(),
            target: target.to_owned(),
            source,
        })
    }

    pub fn info(&self) -> Result<VmInfo, ClientError> {
        self.get_json("/")
    }

    pub fn stats(&self) -> Result<VmStats, ClientError> {
        self.get_json("/stats")
    }

    pub fn metrics(&self) -> Result<String, ClientError> {
        let r = self.call("GET", "/metrics", None, 200)?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    pub fn action(&self, action: Action) -> Result<(), ClientError> {
        // Serialising a one-field struct of an enum cannot fail.
        let body = serde_json::to_vec(&ActionRequest { action }).unwrap_or_default();
        self.call("PUT", "/actions", Some(&body), 204).map(|_| ())
    }
}

/// Parses a complete response (the server closed the connection after it).
pub fn parse_response(raw: &[u8]) -> Result<ClientResponse, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("truncated response head".into()),
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.code.ok_or("no status code")?;
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let rest = &raw[head_len..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        match headers.iter().find(|(k, _)| k == "content-length") {
            Some((_, v)) => {
                let n: usize = v.trim().parse().map_err(|_| "bad Content-Length")?;
                rest.get(..n).ok_or("truncated body")?.to_vec()
            }
            None => rest.to_vec(),
        }
    };
    Ok(ClientResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let (size, consumed) = match httparse::parse_chunk_size(data) {
            Ok(httparse::Status::Complete((used, size))) => (size, used),
            _ => return Err("bad chunk".into()),
        };
        data = &data[consumed..];
        if size == 0 {
            return Ok(out);
        }
        let size = usize::try_from(size).map_err(|_| "chunk too large")?;
        let chunk = data.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(
            b"HTTP/1.1 405 Method Not Allowed\r\nAllow: PUT\r\ncontent-length: 2\r\n\r\n{}xx",
        )
        .unwrap();
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("PUT"));
        assert_eq!(r.body, b"{}");
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
    }

    #[test]
    fn missing_socket_is_a_connect_error() {
        let c = ApiClient::new("/nonexistent/ksmvm.sock");
        assert!(matches!(c.info(), Err(ClientError::Connect { .. })));
    }
}
