//! Username/password login over Nacos' HTTP API, and the access token it
//! yields, refreshed before it expires.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

/// Username and password of a Nacos user.
#[derive(Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password (never logged).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// Login failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The server refused the credentials (HTTP 403): retrying will not help
    /// until they are fixed.
    #[error("login as {username:?} rejected by {server}: {reason}")]
    Rejected {
        /// Server asked.
        server: String,
        /// User name tried.
        username: String,
        /// The server's answer.
        reason: String,
    },
    /// The login request failed in transit, or the answer was unreadable.
    #[error("login request to {server} failed")]
    Http {
        /// Server asked.
        server: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an unexpected status.
    #[error("login at {server} answered HTTP {status}: {body}")]
    Status {
        /// Server asked.
        server: String,
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
    },
}

impl AuthError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Rejected { .. } => "auth_rejected",
            Self::Http { .. } => "auth_http",
            Self::Status { .. } => "auth_status",
        }
    }
}

/// Header (gRPC) and query parameter (HTTP) that carry the token.
pub(crate) const TOKEN_KEY: &str = "accessToken";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoginReply {
    access_token: String,
    /// Seconds.
    token_ttl: Option<u64>,
}

#[derive(Clone)]
struct Token {
    value: String,
    refresh_at: Instant,
}

/// Nacos' HTTP API on one cluster: scheme, context path and a client.
#[derive(Clone)]
pub(crate) struct HttpApi {
    client: reqwest::Client,
    scheme: &'static str,
    context_path: String,
}

impl HttpApi {
    pub(crate) fn new(https: bool, context_path: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        // An explicit provider: the library never installs a process-wide one.
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let builder = reqwest::Client::builder().timeout(timeout);
        let builder = match tls {
            Ok(tls) => builder.tls_backend_preconfigured(tls),
            Err(_) => builder,
        };
        Ok(Self {
            client: builder.build()?,
            scheme: if https { "https" } else { "http" },
            context_path: context_path.trim_end_matches('/').to_owned(),
        })
    }

    /// `scheme://server/context/path`, for `path` starting with `/`.
    pub(crate) fn url(&self, server: &str, path: &str) -> String {
        format!("{}://{}{}{}", self.scheme, server, self.context_path, path)
    }

    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// Logs in on demand and hands out the current token as request headers.
pub(crate) struct Auth {
    http: HttpApi,
    credentials: Credentials,
    token: Mutex<Option<Token>>,
}

impl Auth {
    pub(crate) fn new(credentials: Credentials, http: HttpApi) -> Self {
        Self { http, credentials, token: Mutex::new(None) }
    }

    /// Headers carrying a valid token, logging in at `server` (`host:http_port`)
    /// when there is none or it is due for refresh.
    pub(crate) async fn headers(&self, server: &str) -> Result<HashMap<String, String>, AuthError> {
        let mut slot = self.token.lock().await;
        let token = match &*slot {
            Some(t) if Instant::now() < t.refresh_at => t.clone(),
            _ => {
                let fresh = self.login(server).await?;
                *slot = Some(fresh.clone());
                fresh
            }
        };
        Ok(HashMap::from([(TOKEN_KEY.to_owned(), token.value)]))
    }

    /// Forgets the token (the server called it expired or invalid).
    pub(crate) async fn invalidate(&self) {
        *self.token.lock().await = None;
    }

    async fn login(&self, server: &str) -> Result<Token, AuthError> {
        let url = self.http.url(server, "/v1/auth/users/login");
        let form = [("username", self.credentials.username.as_str()), ("password", self.credentials.password.as_str())];
        let http_err = |source| AuthError::Http { server: server.to_owned(), source };
        let response = self.http.client().post(&url).form(&form).send().await.map_err(http_err)?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(http_err)?;
        match status {
            200 => {}
            401 | 403 => {
                return Err(AuthError::Rejected {
                    server: server.to_owned(),
                    username: self.credentials.username.clone(),
                    reason: truncate(&body),
                });
            }
            _ => return Err(AuthError::Status { server: server.to_owned(), status, body: truncate(&body) }),
        }
        let reply: LoginReply = serde_json::from_str(&body)
            .map_err(|_| AuthError::Status { server: server.to_owned(), status, body: truncate(&body) })?;
        let ttl = Duration::from_secs(reply.token_ttl.unwrap_or(18_000).max(10));
        // Refresh with a tenth of the lifetime to spare, as the Java client does.
        Ok(Token { value: reply.access_token, refresh_at: Instant::now() + ttl - ttl / 10 })
    }
}

fn truncate(body: &str) -> String {
    body.chars().take(200).collect()
}
