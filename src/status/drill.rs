//! The DR drill's HTTP side: `POST /drill` starts one, `GET /drill` shows
//! the current (or last) one with its timeline, `DELETE /drill` ends it
//! early. The document types ([`Drill`], [`Step`]) are the API: the agent
//! fills them in, the `drill` command reads them.
//!
//! Must not: run a drill. The mechanism sits behind [`DrillControl`]
//! (the agent implements it); this module parses requests, checks the
//! token and turns refusals into status codes with a reason.
//!
//! Who may change something: on a loopback address anyone who can reach
//! it (as for every other endpoint here); elsewhere only a request with
//! `Authorization: Bearer <token>`, and with no token configured the
//! mutating requests are refused (403) rather than open to the network.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

/// The longest drill accepted: a day. Longer is a migration, not a drill.
pub const MAX_DRILL: Duration = Duration::from_secs(24 * 3600);

/// One drill: what is isolated, for how long, and what happened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Drill {
    /// Counts from 1 within the agent's life.
    pub id: u64,
    /// The source cluster treated as lost.
    pub source: String,
    /// Its namespaces the agent reads (each is lost and relisted).
    pub namespaces: Vec<String>,
    /// How long it is isolated, milliseconds.
    pub duration_ms: u64,
    /// The agent's policy: `hold` or `withdraw`.
    pub source_loss: String,
    /// With `hold`: how long replicas stay published, milliseconds.
    pub hold_for_ms: u64,
    /// Replicas of this source the routes wanted when it started.
    pub replicas: usize,
    /// Destination services those replicas are in.
    pub services: usize,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// When the isolation ends (or ended, if earlier), milliseconds since the epoch.
    pub ends_at_ms: u64,
    /// Where it stands.
    pub phase: Phase,
    /// Ended by `DELETE /drill` before its time.
    pub ended_early: bool,
    /// What happened, in order.
    pub timeline: Vec<Step>,
}

impl Drill {
    /// Whether it still runs (isolated, or restored and not converged yet).
    pub fn running(&self) -> bool {
        matches!(self.phase, Phase::Isolated | Phase::Restoring)
    }
}

/// Where a drill stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The source is treated as lost.
    Isolated,
    /// The source is back; its relist is under way, destinations settling.
    Restoring,
    /// Every destination it feeds holds what the routes want again.
    Converged,
    /// The agent stopped before the drill ended.
    Stopped,
}

/// One entry of the timeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Step {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Milliseconds since the drill started.
    pub elapsed_ms: u64,
    /// What happened.
    pub step: StepKind,
    /// The same, for a person.
    pub detail: String,
}

/// What a timeline step records.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// The drill began: the source's events are withheld from now on.
    Started,
    /// The engine took the source as lost and holds its replicas.
    HoldStarted,
    /// The engine took the source as lost and withdrew its replicas at once.
    WithdrawnAtOnce,
    /// The hold time ran out: the replicas are being withdrawn.
    HoldExpired,
    /// The destinations acknowledged the withdrawal.
    Withdrawn,
    /// The drill ended within the hold: no replica left any destination.
    HeldThroughout,
    /// The isolation ended; a fresh full listing was asked for.
    Restored,
    /// A namespace of the source finished that listing.
    Relisted,
    /// Every destination the source feeds settled after the relist.
    Converged,
    /// The agent stopped during the drill.
    Stopped,
}

impl StepKind {
    /// Its name in the JSON document (`hold_started`).
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Started => "started",
            StepKind::HoldStarted => "hold_started",
            StepKind::WithdrawnAtOnce => "withdrawn_at_once",
            StepKind::HoldExpired => "hold_expired",
            StepKind::Withdrawn => "withdrawn",
            StepKind::HeldThroughout => "held_throughout",
            StepKind::Restored => "restored",
            StepKind::Relisted => "relisted",
            StepKind::Converged => "converged",
            StepKind::Stopped => "stopped",
        }
    }
}

/// Why a drill request was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// One drill at a time: this one runs.
    #[error("drill {} on {} is running ({:?}); end it with DELETE /drill first", .0.id, .0.source, .0.phase)]
    Busy(Box<Drill>),
    /// The configuration reads no such source.
    #[error("no source cluster {cluster:?}; the sources are: {}", known.join(", "))]
    UnknownSource {
        /// The id asked for.
        cluster: String,
        /// The source clusters the agent reads.
        known: Vec<String>,
    },
    /// Not now, and why (not ready yet, the source is lost already).
    #[error("{0}")]
    NotNow(String),
    /// No drill runs (nothing to end).
    #[error("no drill is running")]
    NoDrill,
}

/// What runs drills; the agent's implementation is `agent::Drills`.
pub trait DrillControl: Send + Sync + 'static {
    /// Isolates `source` for `duration`.
    fn start(&self, source: &str, duration: Duration) -> Result<Drill, Refusal>;
    /// Ends the running drill now (restores the source).
    fn end(&self) -> Result<Drill, Refusal>;
    /// The running drill, or else the last one.
    fn current(&self) -> Option<Drill>;
}

/// The control endpoints' settings, handed to the status server.
#[derive(Clone)]
pub struct Control {
    /// What runs the drills.
    pub drills: Arc<dyn DrillControl>,
    /// The bearer token mutating requests must carry; required (when set)
    /// whatever the address.
    pub token: Option<String>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// Who may start or end a drill on a server bound to `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Anyone who reaches the port (a loopback address, no token set).
    Open,
    /// Requests carrying this bearer token.
    Token(String),
    /// Nobody: the server listens beyond loopback and no token is set.
    Closed {
        /// Where it listens.
        addr: SocketAddr,
    },
}

impl Access {
    /// The rule for a server on `addr` with `token`.
    pub fn of(addr: SocketAddr, token: Option<&str>) -> Access {
        match token {
            Some(t) => Access::Token(t.to_owned()),
            None if addr.ip().is_loopback() => Access::Open,
            None => Access::Closed { addr },
        }
    }

    /// `None` if the request may go on, else the refusal to send.
    fn refuses(&self, headers: &HeaderMap) -> Option<Response> {
        match self {
            Access::Open => None,
            Access::Closed { addr } => Some(error(
                StatusCode::FORBIDDEN,
                format!(
                    "drill control is off: the status server listens on {addr}, beyond loopback, \
                     and no control token is set (agent.control_token_env)"
                ),
            )),
            Access::Token(want) => {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                match given {
                    Some(t) if same(t.trim().as_bytes(), want.as_bytes()) => None,
                    Some(_) => Some(unauthorized("wrong control token")),
                    None => Some(unauthorized(
                        "this request needs Authorization: Bearer <control token>",
                    )),
                }
            }
        }
    }
}

/// Compares in time that depends on the length only, not on where the
/// first difference is (the length of a token is no secret worth keeping).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    diff == 0
}

/// The body of `POST /drill`: `{"isolate": "sh", "for": "10m"}`; `for` is
/// a duration as the config file writes them (`90s`, `10m`, `1h 30m`) or
/// a number of seconds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    isolate: String,
    #[serde(rename = "for")]
    duration: serde_json::Value,
}

/// The duration of a request, or why it is not one.
fn duration_of(value: &serde_json::Value) -> Result<Duration, String> {
    let d = match value {
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(Duration::from_secs)
            .ok_or_else(|| format!("\"for\": {n} is not a whole number of seconds"))?,
        serde_json::Value::String(s) => {
            humantime_serde::re::humantime::parse_duration(s).map_err(|e| {
                format!("\"for\": {s:?} is not a duration like \"90s\" or \"10m\": {e}")
            })?
        }
        other => return Err(format!("\"for\": {other} is neither \"10m\" nor seconds")),
    };
    if d < Duration::from_secs(1) {
        return Err("\"for\": a drill lasts at least 1s".into());
    }
    if d > MAX_DRILL {
        return Err(format!(
            "\"for\": {} is longer than the longest drill, {}",
            humantime_serde::re::humantime::format_duration(d),
            humantime_serde::re::humantime::format_duration(MAX_DRILL)
        ));
    }
    Ok(d)
}

#[derive(Clone)]
struct DrillState {
    drills: Arc<dyn DrillControl>,
    access: Arc<Access>,
}

/// `/drill`'s routes for a server bound to `addr`.
pub(super) fn routes(control: Control, addr: SocketAddr) -> Router {
    let access = Arc::new(Access::of(addr, control.token.as_deref()));
    Router::new()
        .route("/drill", get(show).post(start).delete(end))
        .with_state(DrillState {
            drills: control.drills,
            access,
        })
}

async fn show(State(s): State<DrillState>) -> Response {
    match s.drills.current() {
        Some(d) => Json(d).into_response(),
        None => error(StatusCode::NOT_FOUND, "no drill has run yet".into()),
    }
}

async fn start(State(s): State<DrillState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = s.access.refuses(&headers) {
        return refused;
    }
    let request: StartRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body must be like {{\"isolate\": \"sh\", \"for\": \"10m\"}}: {e}"),
            );
        }
    };
    let duration = match duration_of(&request.duration) {
        Ok(d) => d,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    match s.drills.start(&request.isolate, duration) {
        Ok(d) => (StatusCode::CREATED, Json(d)).into_response(),
        Err(r) => refusal(r),
    }
}

async fn end(State(s): State<DrillState>, headers: HeaderMap) -> Response {
    if let Some(refused) = s.access.refuses(&headers) {
        return refused;
    }
    match s.drills.end() {
        Ok(d) => Json(d).into_response(),
        Err(r) => refusal(r),
    }
}

fn refusal(r: Refusal) -> Response {
    let code = match &r {
        Refusal::Busy(_) | Refusal::NotNow(_) => StatusCode::CONFLICT,
        Refusal::UnknownSource { .. } | Refusal::NoDrill => StatusCode::NOT_FOUND,
    };
    let message = r.to_string();
    match r {
        Refusal::Busy(running) => (
            code,
            Json(serde_json::json!({ "error": message, "drill": running })),
        )
            .into_response(),
        _ => error(code, message),
    }
}

fn error(code: StatusCode, message: String) -> Response {
    (code, Json(serde_json::json!({ "error": message }))).into_response()
}

fn unauthorized(message: &str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, message.to_owned());
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

#[cfg(test)]
mod tests;
