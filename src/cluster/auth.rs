//! Username/password login over Nacos' HTTP API, and the access token it
//! yields, refreshed before it expires.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

/// Username and password of a Nacos user.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password (never logged).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Login failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The server refused the credentials (2.x: HTTP 401/403; 3.x: HTTP 500 from its
    /// login endpoint): retrying will not help until they are fixed.
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
    pub(crate) fn new(
        https: bool,
        context_path: &str,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        // An explicit provider: the library never installs a process-wide one.
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
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

/// Nacos 3.x's login path; 2.x answers it 404.
const LOGIN_V3: &str = "/v3/auth/user/login";
/// Nacos 2.x's login path (3.x forwards it, but answers a wrong password with a bare 500).
const LOGIN_V1: &str = "/v1/auth/users/login";

/// Logs in on demand and hands out the current token as request headers.
pub(crate) struct Auth {
    http: HttpApi,
    credentials: Credentials,
    token: Mutex<Option<Token>>,
    /// Whether 2.x's path answered last (3.x's is tried first until a server says 404 to it).
    v1_login: std::sync::atomic::AtomicBool,
}

impl Auth {
    pub(crate) fn new(credentials: Credentials, http: HttpApi) -> Self {
        Self {
            http,
            credentials,
            token: Mutex::new(None),
            v1_login: std::sync::atomic::AtomicBool::new(false),
        }
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

    /// Logs in through 3.x's path first and, where the server does not know it (2.x answers
    /// 404), through 2.x's; the path that worked is tried first next time.
    async fn login(&self, server: &str) -> Result<Token, AuthError> {
        use std::sync::atomic::Ordering::Relaxed;
        let v1 = self.v1_login.load(Relaxed);
        let first = self
            .login_at(server, if v1 { LOGIN_V1 } else { LOGIN_V3 })
            .await;
        match first {
            Err(AuthError::Status { status: 404, .. }) => {
                let other = self
                    .login_at(server, if v1 { LOGIN_V3 } else { LOGIN_V1 })
                    .await;
                if !matches!(other, Err(AuthError::Status { status: 404, .. })) {
                    self.v1_login.store(!v1, Relaxed);
                }
                other
            }
            other => other,
        }
    }

    async fn login_at(&self, server: &str, path: &str) -> Result<Token, AuthError> {
        let url = self.http.url(server, path);
        let form = [
            ("username", self.credentials.username.as_str()),
            ("password", self.credentials.password.as_str()),
        ];
        let http_err = |source| AuthError::Http {
            server: server.to_owned(),
            source,
        };
        let response = self
            .http
            .client()
            .post(&url)
            .form(&form)
            .send()
            .await
            .map_err(http_err)?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(http_err)?;
        if let Some(reason) = rejection(status, &body) {
            return Err(AuthError::Rejected {
                server: server.to_owned(),
                username: self.credentials.username.clone(),
                reason,
            });
        }
        if status != 200 {
            return Err(AuthError::Status {
                server: server.to_owned(),
                status,
                body: truncate(&body),
            });
        }
        let reply: LoginReply = serde_json::from_str(&body).map_err(|_| AuthError::Status {
            server: server.to_owned(),
            status,
            body: truncate(&body),
        })?;
        let ttl = Duration::from_secs(reply.token_ttl.unwrap_or(18_000).max(10));
        // Refresh with a tenth of the lifetime to spare, as the Java client does.
        Ok(Token {
            value: reply.access_token,
            refresh_at: Instant::now() + ttl - ttl / 10,
        })
    }
}

/// Whether a login answer means "these credentials are not accepted", and why, in words an
/// operator can act on. 2.x says so with 401/403 ("user not found!"). 3.x answers a wrong user
/// or password with HTTP 500 and a body that names no cause (through either path; through
/// v1 "Handle API Compatibility failed"), and every version answers 500 "User ... not found"
/// while its user cache fills after a start: a 500 from a login endpoint is a refusal of the
/// credentials, not a server fault (the client retries a refusal like any failed connect).
fn rejection(status: u16, body: &str) -> Option<String> {
    match status {
        401 | 403 => Some(truncate(body)),
        500 => {
            let detail = truncate(body);
            Some(if detail.to_ascii_lowercase().contains("not found") {
                format!("the server does not know this user ({detail})")
            } else {
                format!(
                    "wrong user name or password (HTTP 500, as Nacos 3.x answers a failed login: {detail})"
                )
            })
        }
        _ => None,
    }
}

fn truncate(body: &str) -> String {
    body.chars().take(200).collect()
}

/// The one rule for a refused token, on every call path (gRPC calls and
/// HTTP listings alike): the server's clock, not ours, decides when a token
/// has expired, so the first refusal forgets the token and the call is made
/// once more with a fresh login; a second refusal is the answer.
#[derive(Debug, Default)]
pub(crate) struct Relogin {
    used: bool,
}

impl Relogin {
    /// Whether to try the call again after a refusal (`refused`): the first
    /// time, with a user to log in as, after forgetting its token.
    pub(crate) async fn retry(&mut self, auth: Option<&Auth>, refused: bool, what: &str) -> bool {
        let Some(auth) = auth else {
            return false;
        };
        if !refused || self.used {
            return false;
        }
        tracing::debug!(what, "token refused; logging in again");
        auth.invalidate().await;
        self.used = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_token_is_retried_once_and_only_with_a_user() {
        let http = HttpApi::new(false, "/nacos", Duration::from_secs(1)).expect("http client");
        let credentials = Credentials {
            username: "u".into(),
            password: "p".into(),
        };
        let auth = Auth::new(credentials, http);
        let mut relogin = Relogin::default();
        assert!(
            !relogin.retry(Some(&auth), false, "call").await,
            "nothing refused"
        );
        assert!(
            relogin.retry(Some(&auth), true, "call").await,
            "first refusal"
        );
        assert!(
            !relogin.retry(Some(&auth), true, "call").await,
            "second refusal"
        );
        let mut anonymous = Relogin::default();
        assert!(
            !anonymous.retry(None, true, "call").await,
            "no user to log in as"
        );
    }

    #[test]
    fn login_refusals_of_both_versions_read_as_rejections() {
        assert!(rejection(403, "user not found!").is_some());
        assert!(rejection(401, "").is_some());
        let v3 = rejection(500, r#"{"status":500,"error":"Internal Server Error"}"#)
            .expect("3.x wrong password");
        assert!(v3.contains("wrong user name or password"), "{v3}");
        let warming = rejection(500, "User nacos not found").expect("user cache not filled yet");
        assert!(warming.contains("does not know this user"), "{warming}");
        assert_eq!(rejection(200, "{}"), None);
        assert_eq!(rejection(404, "not here"), None);
        assert_eq!(rejection(502, "bad gateway"), None);
    }
}
