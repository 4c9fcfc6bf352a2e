//! Nacos messages on the wire: the `Payload` envelope, the JSON bodies and
//! their conversion to and from the domain model.
//!
//! Owns every use of `serde_json` and of the generated protobuf types'
//! contents. It never awaits and never touches the network: `transport`
//! moves the payloads this module builds and reads.

pub mod convert;
pub mod messages;
pub mod push;

use std::collections::HashMap;

use crate::proto::{Metadata, Payload};
pub use messages::*;

/// A payload could not be read as the message it claims to be.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The payload had no metadata or no body.
    #[error("payload has no {0}")]
    Incomplete(&'static str),
    /// A reply of another class than the one the request expects.
    #[error("expected a {expected} reply, got {actual}")]
    UnexpectedType {
        /// Class the request expects.
        expected: &'static str,
        /// Class that arrived.
        actual: String,
    },
    /// The JSON body did not match the class named in the metadata.
    #[error("malformed {class} body")]
    Json {
        /// Class named in the metadata.
        class: String,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
    /// A server-side value that the model cannot hold (a port out of range, ...).
    #[error("invalid {field} in {class}: {reason}")]
    Invalid {
        /// Class the value came in.
        class: &'static str,
        /// Field path.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl WireError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Incomplete(_) => "incomplete",
            Self::UnexpectedType { .. } => "unexpected_type",
            Self::Json { .. } => "json",
            Self::Invalid { .. } => "invalid",
        }
    }
}

/// Wraps a message in a `Payload`: class name and headers in the metadata,
/// JSON in the body.
pub fn encode<M: Message + serde::Serialize>(
    message: &M,
    headers: &HashMap<String, String>,
    client_ip: &str,
) -> Payload {
    // Serialising our own structs cannot fail: every map key is a string and
    // no field holds a non-finite float we produced... except a caller's NaN
    // weight, which serde_json writes as `null`; Nacos then rejects it clearly.
    let value = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    Payload {
        metadata: Some(Metadata {
            r#type: M::TYPE.to_owned(),
            client_ip: client_ip.to_owned(),
            headers: headers.clone(),
        }),
        body: Some(prost_types::Any {
            type_url: String::new(),
            value,
        }),
    }
}

/// The class name a payload claims to carry.
pub fn payload_type(payload: &Payload) -> Result<&str, WireError> {
    payload
        .metadata
        .as_ref()
        .map(|m| m.r#type.as_str())
        .ok_or(WireError::Incomplete("metadata"))
}

fn body(payload: &Payload) -> Result<&[u8], WireError> {
    payload
        .body
        .as_ref()
        .map(|b| b.value.as_slice())
        .ok_or(WireError::Incomplete("body"))
}

/// The body as text, for trace logs.
pub fn body_text(payload: &Payload) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(body(payload).unwrap_or_default())
}

/// Reads a payload's body as `M`, whatever class the metadata names.
pub fn decode_body<M: Message + serde::de::DeserializeOwned>(
    payload: &Payload,
) -> Result<M, WireError> {
    let class = payload_type(payload)?.to_owned();
    serde_json::from_slice(body(payload)?).map_err(|source| WireError::Json { class, source })
}

/// A reply to a unary call: either the expected response or Nacos' error reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply<R> {
    /// The response class the request expects (which may still say failure).
    Response(R),
    /// An `ErrorResponse`.
    Error(ErrorResponse),
}

/// Decodes the reply to a request of type `Q`.
pub fn decode_reply<Q: Request>(payload: &Payload) -> Result<Reply<Q::Response>, WireError> {
    match payload_type(payload)? {
        t if t == <Q::Response as Message>::TYPE => decode_body(payload).map(Reply::Response),
        t if t == ErrorResponse::TYPE => decode_body(payload).map(Reply::Error),
        other => Err(WireError::UnexpectedType {
            expected: <Q::Response as Message>::TYPE,
            actual: other.to_owned(),
        }),
    }
}

/// A request the server sends on the bi-stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerRequest {
    /// A subscribed service changed.
    Notify(NotifySubscriberRequest),
    /// The server checks the connection is alive.
    Detection(ClientDetectionRequest),
    /// The server asks for a reconnect.
    Reset(ConnectResetRequest),
    /// The connection is registered (2.3+); needs no reply.
    SetupAck(SetupAckRequest),
    /// A batch of the services a fuzzy watch matches (3.x).
    FuzzySync(NamingFuzzyWatchSyncRequest),
    /// A service matching a fuzzy watch was created or removed (3.x).
    FuzzyChange(NamingFuzzyWatchChangeNotifyRequest),
    /// A class this client does not handle; answered with an error.
    Unknown {
        /// The class name.
        class: String,
        /// Its request id, if the body had one.
        request_id: Option<String>,
    },
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RequestIdOnly {
    request_id: Option<String>,
}

/// Decodes a payload the server sent on the stream.
pub fn decode_server_request(payload: &Payload) -> Result<ServerRequest, WireError> {
    Ok(match payload_type(payload)? {
        NotifySubscriberRequest::TYPE => ServerRequest::Notify(decode_body(payload)?),
        ClientDetectionRequest::TYPE => ServerRequest::Detection(decode_body(payload)?),
        ConnectResetRequest::TYPE => ServerRequest::Reset(decode_body(payload)?),
        SetupAckRequest::TYPE => ServerRequest::SetupAck(decode_body(payload)?),
        NamingFuzzyWatchSyncRequest::TYPE => ServerRequest::FuzzySync(decode_body(payload)?),
        NamingFuzzyWatchChangeNotifyRequest::TYPE => {
            ServerRequest::FuzzyChange(decode_body(payload)?)
        }
        other => ServerRequest::Unknown {
            class: other.to_owned(),
            request_id: serde_json::from_slice::<RequestIdOnly>(body(payload)?)
                .ok()
                .and_then(|r| r.request_id),
        },
    })
}

/// The reply the client owes the server for a stream request, if any.
pub fn reply_to(
    request: &ServerRequest,
    headers: &HashMap<String, String>,
    client_ip: &str,
) -> Option<Payload> {
    let ok = |id: &Option<String>| ResponseStatus::ok(id.clone());
    Some(match request {
        ServerRequest::Notify(r) => push::ack(r.request_id.clone(), headers, client_ip),
        ServerRequest::Detection(r) => encode(
            &ClientDetectionResponse {
                status: ok(&r.request_id),
            },
            headers,
            client_ip,
        ),
        ServerRequest::Reset(r) => encode(
            &ConnectResetResponse {
                status: ok(&r.request_id),
            },
            headers,
            client_ip,
        ),
        ServerRequest::SetupAck(_) => return None,
        ServerRequest::FuzzySync(r) => encode(
            &NamingFuzzyWatchSyncResponse {
                status: ok(&r.request_id),
            },
            headers,
            client_ip,
        ),
        ServerRequest::FuzzyChange(r) => encode(
            &NamingFuzzyWatchChangeNotifyResponse {
                status: ok(&r.request_id),
            },
            headers,
            client_ip,
        ),
        ServerRequest::Unknown { class, request_id } => encode(
            &ErrorResponse {
                status: ResponseStatus {
                    result_code: 500,
                    error_code: -500,
                    message: Some(format!("client does not handle {class}")),
                    request_id: request_id.clone(),
                },
            },
            headers,
            client_ip,
        ),
    })
}

#[cfg(test)]
mod golden_tests;
