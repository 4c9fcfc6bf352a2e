//! The supervisor: the one task that keeps a session up for the client's
//! lifetime. It dials a server (jittered backoff across the cluster's
//! servers, at once to the server a ConnectReset names), re-applies
//! everything the client owns under the exclusive apply lock, announces the
//! session, then serves it (fuzzy-watch pushes, telling the server of
//! dropped subscriptions) until it ends, and starts over. Service pushes
//! never pass through it: the session's stream routes them in place.
//!
//! Transitions of [`ConnectionState`]: `Connecting` on each attempt,
//! `Connected` once the redo is done (before the session is announced, so
//! whoever sees the session also sees `Connected`), `Disconnected` when an
//! attempt fails or a session ends, `Stopped` when the client's token is
//! cancelled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::calls::{refused_as_invalid, send};
use super::catalog::probe_version;
use super::fuzzy::{FUZZY_WATCH_ABILITY, Fuzzy, on_fuzzy, recv_fuzzy, start_fuzzy_watch};
use super::subscriptions::{offer, route};
use super::{ClientError, ConnectionState, Live, Shared};
use crate::model::{InstanceSet, ServerAddr, ServiceKey};
use crate::runtime::{Backoff, lock, with_causes};
use crate::transport::{CloseReason, FuzzyPush, PushSink, Session};
use crate::wire::convert;
use crate::wire::push::decode_push;

/// Keeps one session up for the client's lifetime: connect, redo, serve,
/// and on loss back off and do it again.
pub(super) async fn supervise(
    shared: Arc<Shared>,
    mut backoff: Backoff,
    mut unsubscribed: mpsc::UnboundedReceiver<ServiceKey>,
) {
    let servers = shared.config.servers.clone();
    let mut next = rand::rng().random_range(0..servers.len());
    let mut preferred: Option<String> = None;
    let mut attempt = 0u32;
    loop {
        if shared.token.is_cancelled() {
            break;
        }
        let server = preferred.take().unwrap_or_else(|| {
            next = (next + 1) % servers.len();
            servers[next].clone()
        });
        attempt += 1;
        shared.state.send_replace(ConnectionState::Connecting {
            server: server.clone(),
            attempt,
        });
        let outcome = tokio::select! {
            o = connect_and_serve(&shared, &server, &mut unsubscribed) => o,
            // Shutdown: dropping the session closes the transport.
            () = shared.token.cancelled() => break,
        };
        shared.live.send_replace(None);
        if shared.token.is_cancelled() {
            // Stopped while the session ended with it: nothing was lost.
            break;
        }
        match outcome {
            Served { lived, reason } => {
                if lived >= shared.config.healthy_after {
                    backoff.reset();
                    attempt = 0;
                }
                if let CloseReason::Reset { target } = &reason {
                    // The server asked us to move: go at once, to its pick if it named one.
                    preferred = target.clone();
                    shared.disconnected(server, format!("{reason:?}"));
                    continue;
                }
                warn!(%server, ?reason, "session lost");
                shared.disconnected(server, format!("{reason:?}"));
            }
            Failed(error) => {
                warn!(%server, %error, "connect failed");
                shared.disconnected(server, error);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = shared.token.cancelled() => break,
        }
    }
    shared.live.send_replace(None);
    shared.state.send_replace(ConnectionState::Stopped);
    info!("client stopped");
}

impl Shared {
    /// Records why the session or attempt on `server` ended.
    fn disconnected(&self, server: String, error: String) {
        *lock(&self.last_error) = Some(error.clone());
        self.state
            .send_replace(ConnectionState::Disconnected { server, error });
    }
}

/// How one connection attempt ended.
enum Outcome {
    Served {
        lived: Duration,
        reason: CloseReason,
    },
    Failed(String),
}
use Outcome::{Failed, Served};

/// The pushes a session hands its owner: the fuzzy watch's (3.x), until
/// taken. (Service pushes are routed by the session itself: see `dial`.)
struct Inbound {
    fuzzy: Option<mpsc::Receiver<FuzzyPush>>,
}

/// One session's life: dial, redo and announce, then serve it until it ends.
async fn connect_and_serve(
    shared: &Arc<Shared>,
    server: &str,
    unsubscribed: &mut mpsc::UnboundedReceiver<ServiceKey>,
) -> Outcome {
    let session = match dial(shared, server).await {
        Ok(s) => s,
        Err(error) => return Failed(error),
    };
    let mut inbound = Inbound {
        fuzzy: session.take_fuzzy_pushes(),
    };
    let v3 = session.server_has(FUZZY_WATCH_ABILITY);
    let fuzzy_able = v3 && shared.config.fuzzy_watch;
    let live = Live {
        session: Arc::new(session),
        server: server.to_owned(),
    };
    let started = Instant::now();
    begin_session(shared, v3);
    // Fuzzy-watch pushes are handled meanwhile (service pushes are routed by
    // the session's stream itself): an unread one would hold up the stream.
    let redone = routing_pushes(
        shared,
        &mut inbound,
        redo_then_announce(shared, &live, fuzzy_able),
    );
    if let Err(e) = redone.await {
        return Failed(format!("re-applying owned state: {}", with_causes(&e)));
    }
    let reason = serve(shared, &live, v3, &mut inbound, unsubscribed).await;
    Served {
        lived: started.elapsed(),
        reason,
    }
}

/// Logs in, then opens a session to the server's gRPC port. Login comes
/// first: a bad password should say so, not look like a network fault.
///
/// The session routes each service push itself, in its stream's task,
/// before acknowledging it: handing pushes to this task instead cost a
/// channel send and a wake-up of this task per change.
async fn dial(shared: &Arc<Shared>, server: &str) -> Result<Session, String> {
    if let Some(auth) = &shared.auth
        && let Err(e) = auth.headers(server).await
    {
        return Err(e.to_string());
    }
    let addr = grpc_addr(server, shared.config.grpc_port_offset);
    let mut config = shared.config.session.clone();
    config.namespace = shared.config.namespace.clone();
    // Weak: the stream's task must not keep the client alive.
    let weak = Arc::downgrade(shared);
    let on_push: PushSink = Arc::new(move |payload| match weak.upgrade() {
        Some(shared) => route(&shared, payload),
        // The client is gone, its session about to be: acked as before.
        None => decode_push(payload, "").map(|push| push.request_id),
    });
    Session::connect_with(&addr, &config, &shared.tasks, on_push)
        .await
        .map_err(|e| with_causes(&e))
}

/// The gRPC address of a `host:http_port` server.
fn grpc_addr(server: &str, offset: u16) -> String {
    // Checked when the client started; a server that names another (a
    // ConnectReset target) is dialled as given if it does not parse.
    match ServerAddr::parse(server).and_then(|a| a.grpc(offset)) {
        Ok(grpc) => grpc.to_string(),
        Err(_) => server.to_owned(),
    }
}

/// Forgets what the last session showed: a new connection has no fuzzy
/// watch until this session asks for one, and may be on another line.
fn begin_session(shared: &Shared, v3: bool) {
    *lock(&shared.fuzzy) = Fuzzy::default();
    let line = if v3 { "3.x" } else { "2.x" };
    shared.server_info.send_if_modified(|i| {
        let changed = i.line.as_deref() != Some(line);
        i.line = Some(line.to_owned());
        changed
    });
}

/// Redoes everything owned under the exclusive apply lock (calls wait
/// meanwhile), asks for the fuzzy watch, then announces the session.
async fn redo_then_announce(
    shared: &Shared,
    live: &Live,
    fuzzy_able: bool,
) -> Result<(), ClientError> {
    let _exclusive = shared.apply.write().await;
    redo(shared, live).await?;
    if fuzzy_able {
        start_fuzzy_watch(shared, live).await;
    }
    // State first: whoever sees the session announced also sees Connected.
    shared.state.send_replace(ConnectionState::Connected {
        server: live.server.clone(),
        connection_id: live.session.connection_id().to_owned(),
    });
    shared.live.send_replace(Some(live.clone()));
    Ok(())
}

/// Drives `work` to its end while routing the session's pushes.
async fn routing_pushes<T>(
    shared: &Shared,
    inbound: &mut Inbound,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            Some(push) = recv_fuzzy(&mut inbound.fuzzy) => on_fuzzy(shared, push),
        }
    }
}

/// Serves an announced session until it ends: handles its fuzzy-watch
/// pushes, tells the server of subscriptions dropped meanwhile, and reads
/// the server's version.
async fn serve(
    shared: &Shared,
    live: &Live,
    v3: bool,
    inbound: &mut Inbound,
    unsubscribed: &mut mpsc::UnboundedReceiver<ServiceKey>,
) -> CloseReason {
    // The version is read over HTTP beside the session (no task of its own):
    // once per session, since a reconnect may land on an upgraded server.
    let probe = probe_version(shared, &live.server, v3);
    tokio::pin!(probe);
    let mut probed = false;
    loop {
        tokio::select! {
            version = &mut probe, if !probed => {
                probed = true;
                record_version(shared, version);
            }
            Some(push) = recv_fuzzy(&mut inbound.fuzzy) => on_fuzzy(shared, push),
            Some(key) = unsubscribed.recv() => unsubscribe_if_unwatched(shared, live, key).await,
            reason = live.session.closed() => return reason,
        }
    }
}

fn record_version(shared: &Shared, version: Option<String>) {
    shared.server_info.send_if_modified(|i| {
        let changed = i.version != version;
        i.version = version;
        changed
    });
}

/// Tells the server a service's last subscriber is gone, unless a new one
/// came meanwhile.
async fn unsubscribe_if_unwatched(shared: &Shared, live: &Live, key: ServiceKey) {
    if !lock(&shared.owned).subscriptions.contains_key(&key)
        && let Err(e) = send(
            shared,
            live,
            "unsubscribe",
            &convert::subscribe_request(&key, false),
        )
        .await
    {
        debug!(error = %e, service = %key, "unsubscribe failed");
    }
}

/// Re-applies, on a new session, everything the client owns: the server
/// forgot it all with the old connection.
async fn redo(shared: &Shared, live: &Live) -> Result<(), ClientError> {
    let (subscriptions, published): (Vec<ServiceKey>, Vec<(ServiceKey, InstanceSet)>) = {
        let owned = lock(&shared.owned);
        (
            owned.subscriptions.keys().cloned().collect(),
            owned
                .published
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    };
    for (key, instances) in &published {
        match send(
            shared,
            live,
            "re-publish",
            &convert::BatchRegister {
                service: key,
                instances,
            },
        )
        .await
        {
            Ok(_) => {}
            // Refused as invalid now (say, a server with stricter checks):
            // it never will be accepted, and must not block the others.
            Err(e) if refused_as_invalid(&e) => {
                warn!(service = %key, error = %e, "re-publish refused as invalid; dropped from the redo");
                lock(&shared.owned).published.remove(key);
            }
            Err(e) => return Err(e),
        }
    }
    for key in &subscriptions {
        let reply = send(
            shared,
            live,
            "re-subscribe",
            &convert::subscribe_request(key, true),
        )
        .await?;
        if let Some(info) = reply.service_info.as_ref() {
            match convert::snapshot(&shared.config.namespace, info) {
                Ok(snapshot) => offer(shared, snapshot),
                Err(e) => {
                    warn!(error = %e, service = %key, "unreadable snapshot in subscribe reply")
                }
            }
        }
    }
    if !published.is_empty() || !subscriptions.is_empty() {
        info!(
            published = published.len(),
            subscriptions = subscriptions.len(),
            "redo complete"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_address_is_http_port_plus_offset() {
        assert_eq!(grpc_addr("10.0.0.1:8848", 1000), "10.0.0.1:9848");
        assert_eq!(grpc_addr("[::1]:8848", 1000), "[::1]:9848");
        assert_eq!(grpc_addr("nacos.example:80", 1000), "nacos.example:1080");
    }
}
