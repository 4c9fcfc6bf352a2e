//! One gRPC session with one Nacos server.
//!
//! Owns the HTTP/2 connection and its gRPC framing (`grpc`), the handshake
//! (ServerCheck, bi-stream, ConnectionSetup, SetupAck), the stream pump that
//! answers every server request, idle health checks and per-call deadlines. It never reconnects:
//! a session that breaks stays broken, and `cluster` opens a new one. This
//! is deliberate: Nacos keys a connection by its HTTP/2 transport, so a
//! connection that silently re-dialled would carry an unregistered id.

mod error;
mod grpc;
mod session;

pub use error::{AUTH_FAILED, INVALID_PARAMS, SERVER_STARTING, TransportError, UNREGISTERED};
pub use session::{
    CloseReason, FuzzyPush, PushSink, Session, SessionConfig, SessionStats, TlsOptions,
};
