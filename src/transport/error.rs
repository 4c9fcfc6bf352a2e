//! Errors of one session, classified for retry and labelled for metrics.

use std::time::Duration;

use crate::wire::WireError;

/// Nacos error code: the connection id is not registered (no setup yet,
/// another transport, or the server dropped it).
pub const UNREGISTERED: i32 = 301;
/// Nacos error code: the server is still starting.
pub const SERVER_STARTING: i32 = 300;
/// Nacos error code: the request's parameters are invalid (parameter check,
/// instance rules); the same request will never succeed.
pub const INVALID_PARAMS: i32 = 400;
/// Nacos error code: authentication or authorization failed.
pub const AUTH_FAILED: i32 = 403;

/// A session could not be opened, or a call on it failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TCP connect failed.
    #[error("connecting to {addr}")]
    Connect {
        /// Address dialled.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// TCP connect or the handshake took too long.
    #[error("{stage} with {addr} timed out after {after:?}")]
    HandshakeTimeout {
        /// Address dialled.
        addr: String,
        /// Which step: `connect`, `server check`, `setup`.
        stage: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// HTTP/2 or TLS setup failed.
    #[error("opening a gRPC channel to {addr}")]
    Channel {
        /// Address dialled.
        addr: String,
        /// The TLS or HTTP/2 error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A call failed at the gRPC level.
    #[error("{call} failed at the gRPC level")]
    Rpc {
        /// Message class of the call.
        call: &'static str,
        /// The gRPC status.
        #[source]
        source: tonic::Status,
    },
    /// A call got no reply within its deadline.
    #[error("{call} got no reply within {after:?}")]
    Timeout {
        /// Message class of the call.
        call: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The reply could not be decoded.
    #[error("reading the reply to {call}")]
    Wire {
        /// Message class of the call.
        call: &'static str,
        /// What was wrong with it.
        #[source]
        source: WireError,
    },
    /// The server answered with a failure.
    #[error("{call} rejected by the server: code {code}: {message}")]
    Rejected {
        /// Message class of the call.
        call: &'static str,
        /// Nacos error code (301, 400, 403, 500, -401, ...).
        code: i32,
        /// The server's reason.
        message: String,
    },
    /// The session is closed; open a new one.
    #[error("session closed: {0}")]
    Closed(String),
}

impl TransportError {
    /// Whether retrying (on this or a new session) can succeed. Rejections
    /// for bad parameters, auth or a missing naming module are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Rejected { code, .. } => {
                matches!(*code, UNREGISTERED | SERVER_STARTING | 500 | 503)
            }
            Self::Wire { .. } => false,
            _ => true,
        }
    }

    /// Whether the session this error came from is unusable from now on.
    pub fn breaks_session(&self) -> bool {
        match self {
            Self::Rejected { code, .. } => *code == UNREGISTERED,
            Self::Rpc { .. } | Self::Closed(_) | Self::Connect { .. } | Self::Channel { .. } => {
                true
            }
            Self::HandshakeTimeout { .. } => true,
            Self::Timeout { .. } | Self::Wire { .. } => false,
        }
    }

    /// The server's error code, for rejections.
    pub fn code(&self) -> Option<i32> {
        match self {
            Self::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::HandshakeTimeout { .. } => "handshake_timeout",
            Self::Channel { .. } => "channel",
            Self::Rpc { .. } => "rpc",
            Self::Timeout { .. } => "timeout",
            Self::Wire { .. } => "wire",
            Self::Rejected {
                code: AUTH_FAILED, ..
            } => "auth",
            Self::Rejected {
                code: UNREGISTERED, ..
            } => "unregistered",
            Self::Rejected { .. } => "rejected",
            Self::Closed(_) => "closed",
        }
    }
}
