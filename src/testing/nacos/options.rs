//! How to run one server: [`ServerOptions`] and Nacos' own auth, [`AuthOptions`].
//!
//! Must not: read environment variables; callers set every option.

use std::path::PathBuf;
use std::time::Duration;

use super::error::HarnessError;
use super::util::{base64, random_u64};

/// How to run one server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Turns Nacos' own auth on when set; see [`AuthOptions`].
    pub auth: Option<AuthOptions>,
    /// The JVM's maximum heap (`-Xmx`), in MiB. 256 is plenty for tests.
    pub heap_max_mib: u32,
    /// How long a start or restart may take before it fails.
    pub ready_timeout: Duration,
    /// How long [`NacosServer::stop`](super::NacosServer::stop) lets java shut down after
    /// SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// The `java` to run (resolved through PATH if it has no `/`).
    pub java: PathBuf,
    /// More server properties, passed as `-Dkey=value` after ours (so they win).
    pub properties: Vec<(String, String)>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            auth: None,
            heap_max_mib: 256,
            ready_timeout: Duration::from_secs(120),
            stop_timeout: Duration::from_secs(20),
            java: PathBuf::from("java"),
            properties: Vec::new(),
        }
    }
}

impl ServerOptions {
    /// The default options with auth on, using freshly generated secrets.
    pub fn with_auth() -> Self {
        Self {
            auth: Some(AuthOptions::generate()),
            ..Self::default()
        }
    }

    pub(super) fn validate(&self) -> Result<(), HarnessError> {
        let invalid = |reason: String| Err(HarnessError::InvalidOptions { reason });
        if self.heap_max_mib < 128 {
            return invalid(format!(
                "heap_max_mib is {}; Nacos needs at least 128",
                self.heap_max_mib
            ));
        }
        if let Some(auth) = &self.auth {
            let secret = &auth.token_secret_base64;
            let valid_chars = secret
                .trim_end_matches('=')
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
            let decoded_len = secret.trim_end_matches('=').len() * 6 / 8;
            if !valid_chars || decoded_len < 32 {
                return invalid(
                    "auth.token_secret_base64 must be standard Base64 of at least 32 bytes \
                     (Nacos refuses to start otherwise)"
                        .to_owned(),
                );
            }
            if auth.identity_key.is_empty() || auth.identity_value.is_empty() {
                return invalid(
                    "auth.identity_key and auth.identity_value must not be empty".to_owned(),
                );
            }
        }
        Ok(())
    }
}

/// Nacos' own auth (`nacos.core.auth.system.type=nacos`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOptions {
    /// `nacos.core.auth.plugin.nacos.token.secret.key`: standard Base64 of at least 32 bytes.
    pub token_secret_base64: String,
    /// `nacos.core.auth.server.identity.key`: a request with this header skips auth.
    pub identity_key: String,
    /// `nacos.core.auth.server.identity.value`: the value that header must have.
    pub identity_value: String,
}

impl AuthOptions {
    /// A random token secret and identity value.
    pub fn generate() -> Self {
        let mut secret = Vec::with_capacity(32);
        for _ in 0..4 {
            secret.extend_from_slice(&random_u64().to_le_bytes());
        }
        Self {
            token_secret_base64: base64(&secret),
            identity_key: "harness-identity".to_owned(),
            identity_value: format!("{:016x}", random_u64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_auth_options_are_valid() {
        let opts = ServerOptions::with_auth();
        assert!(opts.validate().is_ok());
        let short = ServerOptions {
            auth: Some(AuthOptions {
                token_secret_base64: base64(&[7; 31]),
                ..AuthOptions::generate()
            }),
            ..ServerOptions::default()
        };
        assert!(matches!(
            short.validate(),
            Err(HarnessError::InvalidOptions { .. })
        ));
    }
}
