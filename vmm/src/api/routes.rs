//! The route table: every path and method the API answers. The OpenAPI
//! document is checked against this table by a test.

/// What a request is for, once its path and method matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Info,
    Stats,
    Metrics,
    Actions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub path: &'static str,
    pub method: &'static str,
    pub endpoint: Endpoint,
}

pub const ROUTES: &[Route] = &[
    Route {
        path: "/",
        method: "GET",
        endpoint: Endpoint::Info,
    },
    Route {
        path: "/stats",
        method: "GET",
        endpoint: Endpoint::Stats,
    },
    Route {
        path: "/metrics",
        method: "GET",
        endpoint: Endpoint::Metrics,
    },
    Route {
        path: "/actions",
        method: "PUT",
        endpoint: Endpoint::Actions,
    },
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    /// The path exists; `allow` lists its methods for the Allow header.
    MethodNotAllowed {
        allow: String,
    },
}

/// Matches a request target (query string ignored) against [`ROUTES`].
pub fn resolve(method: &str, target: &str) -> Result<Endpoint, RouteError> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let mut allowed = ROUTES.iter().filter(|r| r.path == path).peekable();
    if allowed.peek().is_none() {
        return Err(RouteError::NotFound);
    }
    let mut methods = Vec::new();
    for r in allowed {
        if r.method == method {
            return Ok(r.endpoint);
        }
        methods.push(r.method);
    }
    Err(RouteError::MethodNotAllowed {
        allow: methods.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_paths_and_methods() {
        assert_eq!(resolve("GET", "/"), Ok(Endpoint::Info));
        assert_eq!(resolve("GET", "/stats?x=1"), Ok(Endpoint::Stats));
        assert_eq!(resolve("PUT", "/actions"), Ok(Endpoint::Actions));
        assert_eq!(resolve("GET", "/nope"), Err(RouteError::NotFound));
        assert_eq!(resolve("GET", "/stats/"), Err(RouteError::NotFound));
        assert_eq!(
            resolve("GET", "/actions"),
            Err(RouteError::MethodNotAllowed {
                allow: "PUT".into()
            })
        );
        assert_eq!(
            resolve("DELETE", "/"),
            Err(RouteError::MethodNotAllowed {
                allow: "GET".into()
            })
        );
    }
}
