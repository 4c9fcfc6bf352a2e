//! gRPC over one HTTP/2 connection, for the two methods Nacos serves:
//! `Request/request` (unary) and `BiRequestStream/requestBiStream`.
//!
//! Why not tonic's channel: a call through it crossed four tasks (the
//! caller, the channel's buffer worker, hyper's connection task and a task
//! hyper spawns per request body) and went out in two socket writes, the
//! headers and then the body. Here the caller queues a call's headers and
//! its one message on h2 together, and the connection task, the only task
//! this module starts, writes them in one go. The profile of a replicated
//! change was mostly that machinery, not ours (README, "Performance").
//!
//! What gRPC asks of a client that is used here: `POST` with
//! `content-type: application/grpc` and `te: trailers`; every message
//! framed as a compressed flag (always 0: we never compress and refuse
//! compressed replies) and a big-endian u32 length; the call's outcome in
//! `grpc-status` (and `grpc-message`), in the trailers or, for a reply
//! with no message, in the headers ("trailers-only").

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Uri};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::debug;

use crate::proto::Payload;
use crate::runtime::Tasks;

/// The unary method.
const UNARY: &str = "/Request/request";
/// The bi-directional stream.
const BI_STREAM: &str = "/BiRequestStream/requestBiStream";
/// The gRPC message prefix: the compressed flag and the length.
const PREFIX: usize = 5;
/// HTTP/2 windows as hyper (and so tonic's channel) set them: a stream may
/// have 2 MiB unread, the connection 5 MiB.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// One HTTP/2 connection carrying gRPC calls. Cheap to clone; the
/// connection closes once every clone, stream and call is dropped.
#[derive(Clone, Debug)]
pub(super) struct Connection {
    send: SendRequest<Bytes>,
    scheme: Scheme,
    authority: Authority,
    max_message: usize,
}

impl Connection {
    /// The HTTP/2 handshake over `io`, a connected socket (TLS already
    /// negotiated if `tls`). The connection's task runs on `tasks` and ends
    /// when the connection does, or, at the latest, `linger` after `tasks`
    /// is cancelled (time for a session to end its stream politely).
    pub(super) async fn handshake<T>(
        io: T,
        addr: &str,
        tls: bool,
        max_message: usize,
        linger: Duration,
        tasks: &Tasks,
    ) -> Result<Self, BoxError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let authority: Authority = addr.parse()?;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(io)
            .await?;
        let token = tasks.token().clone();
        let name = format!("session {addr} connection");
        tasks.spawn(name, run_connection(connection, token, linger));
        Ok(Self {
            send,
            scheme: if tls { Scheme::HTTPS } else { Scheme::HTTP },
            authority,
            max_message,
        })
    }

    /// One unary call: `message` out, the one reply in.
    pub(super) async fn unary(&self, message: &Payload) -> Result<Payload, Status> {
        let (response, mut out) = self.start(UNARY).await?;
        out.send_data(frame(message, self.max_message)?, true)
            .map_err(h2_status)?;
        let mut inbound = self.inbound(response).await?;
        let reply = inbound
            .message()
            .await?
            .ok_or_else(|| Status::internal("the reply carried no message"))?;
        // The status comes after the message: a message followed by an error
        // status is an error.
        match inbound.message().await? {
            None => Ok(reply),
            Some(_) => Err(Status::internal("a unary reply carried two messages")),
        }
    }

    /// Opens the bi-directional stream with `first` as its first message.
    pub(super) async fn open_stream(&self, first: &Payload) -> Result<(Outbound, Inbound), Status> {
        let (response, mut out) = self.start(BI_STREAM).await?;
        out.send_data(frame(first, self.max_message)?, false)
            .map_err(h2_status)?;
        let inbound = self.inbound(response).await?;
        Ok((
            Outbound {
                stream: out,
                max_message: self.max_message,
            },
            inbound,
        ))
    }

    /// Sends a call's headers (queued; written with the first message).
    async fn start(
        &self,
        path: &'static str,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), Status> {
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::from_static(path))
            .build()
            .map_err(|e| Status::internal(format!("request URI: {e}")))?;
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        // Readiness is per handle: a fresh clone is ready at once unless the
        // connection has failed (h2 queues streams beyond the server's
        // concurrency limit itself).
        let mut send = self.send.clone().ready().await.map_err(h2_status)?;
        send.send_request(request, false).map_err(h2_status)
    }

    /// Waits for the reply's headers: an HTTP error or a trailers-only
    /// failure ends the call here.
    async fn inbound(&self, response: h2::client::ResponseFuture) -> Result<Inbound, Status> {
        let response = response.await.map_err(h2_status)?;
        let status = response.status();
        if status != http::StatusCode::OK {
            return Err(Status::new(
                http_code(status),
                format!("the server answered HTTP {status}"),
            ));
        }
        let trailers_only = Status::from_header_map(response.headers());
        Ok(Inbound {
            body: response.into_body(),
            frames: Frames::new(self.max_message),
            ended: trailers_only.map(|s| if s.code() == Code::Ok { Ok(()) } else { Err(s) }),
        })
    }
}

/// Drives the connection: reads frames, writes what calls queued.
async fn run_connection<T>(
    connection: h2::client::Connection<T, Bytes>,
    token: CancellationToken,
    linger: Duration,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let backstop = async {
        token.cancelled().await;
        tokio::time::sleep(linger).await;
    };
    tokio::select! {
        ended = connection => if let Err(e) = ended {
            debug!(error = %e, "HTTP/2 connection ended with an error");
        },
        () = backstop => debug!("HTTP/2 connection dropped at shutdown"),
    }
}

/// Our side of the stream.
#[derive(Debug)]
pub(super) struct Outbound {
    stream: h2::SendStream<Bytes>,
    max_message: usize,
}

impl Outbound {
    /// Queues one message (written by the connection task).
    pub(super) fn send(&mut self, message: &Payload) -> Result<(), Status> {
        let frame = frame(message, self.max_message)?;
        self.stream.send_data(frame, false).map_err(h2_status)
    }

    /// Ends our side of the stream.
    pub(super) fn finish(&mut self) {
        // Already reset by the server, the stream needs no end.
        let _ = self.stream.send_data(Bytes::new(), true);
    }
}

/// The server's side of a call: its messages, then its status.
#[derive(Debug)]
pub(super) struct Inbound {
    body: h2::RecvStream,
    frames: Frames,
    /// The call's outcome, once known (from the headers or the trailers).
    ended: Option<Result<(), Status>>,
}

impl Inbound {
    /// The next message; `None` once the server ended the call with
    /// `grpc-status` 0; an error for any other status or a broken frame.
    pub(super) async fn message(&mut self) -> Result<Option<Payload>, Status> {
        loop {
            if let Some(message) = self.frames.next()? {
                return Ok(Some(message));
            }
            if let Some(ended) = &self.ended {
                return ended.clone().map(|()| None);
            }
            match self.body.data().await {
                Some(Ok(chunk)) => {
                    // Hand the window back at once: what we read is ours.
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    self.frames.push(&chunk);
                }
                Some(Err(e)) => return Err(h2_status(e)),
                None => self.ended = Some(self.read_trailers().await),
            }
        }
    }

    async fn read_trailers(&mut self) -> Result<(), Status> {
        self.frames.finish()?;
        let trailers = self.body.trailers().await.map_err(h2_status)?;
        match trailers.as_ref().and_then(Status::from_header_map) {
            Some(s) if s.code() == Code::Ok => Ok(()),
            Some(s) => Err(s),
            None => Err(Status::unknown(
                "the server ended the call without a grpc-status",
            )),
        }
    }
}

/// Reassembles gRPC messages from DATA frames, which may split a message
/// or carry several.
#[derive(Debug)]
struct Frames {
    buf: BytesMut,
    max_message: usize,
}

impl Frames {
    fn new(max_message: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_message,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole message, if one is buffered.
    fn next(&mut self) -> Result<Option<Payload>, Status> {
        let Some(prefix) = self.buf.get(..PREFIX) else {
            return Ok(None);
        };
        if prefix[0] != 0 {
            return Err(Status::internal(
                "the server sent a compressed message (none was offered)",
            ));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max_message {
            return Err(Status::resource_exhausted(format!(
                "a {len}-byte message exceeds the {}-byte limit",
                self.max_message
            )));
        }
        if self.buf.len() - PREFIX < len {
            self.buf.reserve(PREFIX + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(PREFIX);
        let body = self.buf.split_to(len).freeze();
        Payload::decode(body)
            .map(Some)
            .map_err(|e| Status::internal(format!("undecodable message: {e}")))
    }

    /// The stream ended: nothing may be left half-read.
    fn finish(&self) -> Result<(), Status> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Status::internal(format!(
                "the stream ended inside a message ({} bytes left)",
                self.buf.len()
            )))
        }
    }
}

/// `message` with its gRPC prefix.
fn frame(message: &Payload, max_message: usize) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    if len > max_message {
        return Err(Status::out_of_range(format!(
            "a {len}-byte message exceeds the {max_message}-byte limit"
        )));
    }
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    buf.put_u8(0);
    // len <= max_message, which is far below u32::MAX.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    message
        .encode(&mut buf)
        .map_err(|e| Status::internal(format!("encoding: {e}")))?;
    Ok(buf.freeze())
}

/// An HTTP/2 error as the gRPC status a client library reports for it
/// (tonic's mapping: a refused stream is `Unavailable`, and so on).
fn h2_status(e: h2::Error) -> Status {
    Status::from_error(Box::new(e))
}

/// The gRPC code for a reply that is not HTTP 200 (gRPC's HTTP mapping).
fn http_code(status: http::StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// An error from the HTTP/2 handshake or the address.
pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Metadata;

    fn payload(body: &[u8]) -> Payload {
        Payload {
            metadata: Some(Metadata {
                r#type: "HealthCheckRequest".into(),
                client_ip: "10.0.0.1".into(),
                headers: Default::default(),
            }),
            body: Some(prost_types::Any {
                type_url: String::new(),
                value: body.to_vec(),
            }),
        }
    }

    #[test]
    fn a_frame_is_the_flag_the_length_and_the_message() {
        let message = payload(b"{\"a\":1}");
        let frame = frame(&message, 1024).expect("fits");
        assert_eq!(frame[0], 0, "never compressed");
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(len, frame.len() - PREFIX);
        assert_eq!(Payload::decode(&frame[PREFIX..]).expect("decodes"), message);
    }

    #[test]
    fn a_message_over_the_limit_is_refused_before_it_is_sent() {
        let err = frame(&payload(&[b'x'; 100]), 50).expect_err("too large");
        assert_eq!(err.code(), Code::OutOfRange);
    }

    #[test]
    fn messages_are_reassembled_across_and_within_data_frames() {
        let (one, two) = (payload(b"{\"n\":1}"), payload(b"{\"n\":2}"));
        let mut wire = frame(&one, 1024).expect("fits").to_vec();
        wire.extend_from_slice(&frame(&two, 1024).expect("fits"));
        for split in [1, 3, PREFIX, PREFIX + 2, wire.len() - 1] {
            let mut frames = Frames::new(1024);
            frames.push(&wire[..split]);
            let mut got = Vec::new();
            while let Some(m) = frames.next().expect("well formed") {
                got.push(m);
            }
            assert!(
                frames.finish().is_err(),
                "split at {split}: a message is pending"
            );
            frames.push(&wire[split..]);
            while let Some(m) = frames.next().expect("well formed") {
                got.push(m);
            }
            assert_eq!(got, vec![one.clone(), two.clone()], "split at {split}");
            frames.finish().expect("nothing left");
        }
    }

    #[test]
    fn compressed_oversized_and_truncated_messages_are_errors() {
        let mut compressed = frame(&payload(b"{}"), 1024).expect("fits").to_vec();
        compressed[0] = 1;
        let mut frames = Frames::new(1024);
        frames.push(&compressed);
        assert_eq!(
            frames.next().expect_err("compressed").code(),
            Code::Internal
        );

        let big = frame(&payload(&[b'x'; 100]), 1024).expect("fits");
        let mut frames = Frames::new(50);
        frames.push(&big);
        let err = frames.next().expect_err("over the limit");
        assert_eq!(err.code(), Code::ResourceExhausted);

        let mut frames = Frames::new(1024);
        frames.push(&big[..big.len() - 1]);
        assert!(frames.next().expect("incomplete, not wrong").is_none());
        assert!(
            frames.finish().is_err(),
            "a half message at the end is an error"
        );
    }
}
