//! The fake server's registry: connections, per-connection slots, merged hosts,
//! subscriptions, pending pushes, tokens and the test's knobs.
//!
//! Owns every rule of Nacos' naming semantics that the fake reproduces (see the
//! module docs of `testing::fake`), as plain synchronous code under one mutex:
//! no I/O, no await. The gRPC and HTTP front ends decode a request, call one
//! method here while holding the lock, and encode what it returns; the pusher
//! tasks take the payloads this module queues.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::model::{DEFAULT_NACOS_CLUSTER, ServiceKey};
use crate::proto::Payload;
use crate::wire::{self, InstanceDto, NotifySubscriberRequest, ServiceInfoDto};

/// Nacos' limit on an instance's metadata: keys plus values, in characters.
pub(super) const METADATA_MAX_CHARS: usize = 1024;

/// Where a server request goes: the connection's bi-stream.
pub(super) type Outbound = mpsc::UnboundedSender<Result<Payload, tonic::Status>>;

/// A rejection: Nacos error code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rejection {
    pub(super) code: i32,
    pub(super) message: String,
}

impl Rejection {
    pub(super) fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// One instance as the server stores it: every field counts for equality, so
/// fully identical instances from two connections collapse into one host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Host {
    instance_id: String,
    ip: String,
    port: u16,
    /// `f64::to_bits`, so hosts can be ordered and hashed.
    weight_bits: u64,
    healthy: bool,
    enabled: bool,
    cluster: String,
    metadata: BTreeMap<String, String>,
}

impl Host {
    /// Checks a registered instance as Nacos' parameter check and instance
    /// rules do, and derives the instance id as Nacos does when none is sent.
    /// The parameter check allows `_` in a cluster name; a single register
    /// (`single`) also applies the instance rule, which does not.
    pub(super) fn from_request(
        key: &ServiceKey,
        dto: &InstanceDto,
        single: bool,
    ) -> Result<Self, Rejection> {
        let invalid = |what: String| Rejection::new(400, format!("Param check invalid:{what}"));
        let ip = dto.ip.clone().unwrap_or_default();
        if ip.is_empty() || ip.len() > 128 || ip.chars().any(char::is_whitespace) {
            return Err(invalid(format!("Param 'ip' is illegal: {ip:?}")));
        }
        let port = u16::try_from(dto.port)
            .map_err(|_| invalid(format!("Param 'port' is illegal: {}", dto.port)))?;
        let cluster = dto
            .cluster_name
            .clone()
            .unwrap_or_else(|| DEFAULT_NACOS_CLUSTER.to_owned());
        if cluster.is_empty()
            || cluster.len() > 64
            || !cluster
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(invalid(format!("Param 'cluster' is illegal: {cluster:?}")));
        }
        if single && cluster.contains('_') {
            return Err(Rejection::new(
                400,
                format!(
                    "Instance 'clusterName' should be characters with only 0-9a-zA-Z-. ({cluster})"
                ),
            ));
        }
        let metadata = dto.metadata.clone().unwrap_or_default();
        let chars: usize = metadata
            .iter()
            .map(|(k, v)| k.chars().count() + v.chars().count())
            .sum();
        if chars > METADATA_MAX_CHARS {
            return Err(invalid(format!(
                "Param 'Metadata' is illegal, the param length should not exceed {METADATA_MAX_CHARS}."
            )));
        }
        if dto.ephemeral == Some(false) {
            return Err(Rejection::new(
                500,
                "the testkit server holds ephemeral instances only",
            ));
        }
        let weight = dto.weight.unwrap_or(1.0);
        if !weight.is_finite() {
            return Err(invalid("Param 'weight' is illegal".to_owned()));
        }
        let service_name = match dto.service_name.as_deref() {
            Some(s) if !s.trim().is_empty() => s.to_owned(),
            _ => grouped_name(key),
        };
        let instance_id = match dto.instance_id.as_deref() {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => format!("{ip}#{port}#{cluster}#{service_name}"),
        };
        Ok(Self {
            instance_id,
            ip,
            port,
            weight_bits: weight.to_bits(),
            healthy: dto.healthy.unwrap_or(true),
            enabled: dto.enabled.unwrap_or(true),
            cluster,
            metadata,
        })
    }

    fn dto(&self, key: &ServiceKey) -> InstanceDto {
        InstanceDto {
            instance_id: Some(self.instance_id.clone()),
            ip: Some(self.ip.clone()),
            port: i64::from(self.port),
            weight: Some(f64::from_bits(self.weight_bits)),
            healthy: Some(self.healthy),
            enabled: Some(self.enabled),
            ephemeral: Some(true),
            cluster_name: Some(self.cluster.clone()),
            service_name: Some(grouped_name(key)),
            metadata: Some(self.metadata.clone()),
        }
    }
}

fn grouped_name(key: &ServiceKey) -> String {
    format!("{}@@{}", key.group, key.name)
}

/// Checks a request's namespace, group and service name as Nacos' parameter
/// check does (2.3+, on by default).
pub(super) fn check_target(
    namespace: &str,
    group: &str,
    name: Option<&str>,
) -> Result<(), Rejection> {
    let invalid = |what: &str| {
        Err(Rejection::new(
            400,
            format!("Param check invalid:Param '{what}' is illegal"),
        ))
    };
    if namespace.is_empty()
        || namespace.len() > 64
        || !namespace
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
    {
        return invalid("namespaceId");
    }
    if group.is_empty() {
        // Nacos fails a null group inside the handler, not in the param check.
        return Err(Rejection::new(500, "group name is empty"));
    }
    if group.len() > 128
        || !group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_:.".contains(c))
    {
        return invalid("groupName");
    }
    if let Some(name) = name
        && (name.is_empty()
            || name.len() > 512
            || name.starts_with('@')
            || name.contains("@@")
            || name.chars().any(|c| c.is_whitespace() || !c.is_ascii()))
    {
        return invalid("serviceName");
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Service {
    /// Each publishing connection's set (one slot per connection and service).
    slots: BTreeMap<String, BTreeSet<Host>>,
    /// When the last host went, for the empty-service expiry.
    emptied_at: Option<Instant>,
}

impl Service {
    /// The union of every connection's set: identical hosts collapse.
    fn hosts(&self) -> BTreeSet<&Host> {
        self.slots.values().flatten().collect()
    }
}

#[derive(Debug)]
struct Inflight {
    service: ServiceKey,
    resend_at: Instant,
}

/// One registered connection (its bi-stream sent ConnectionSetup).
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) remote: SocketAddr,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) client_version: String,
    out: Outbound,
    kill: CancellationToken,
    wake: Arc<Notify>,
    subscriptions: BTreeSet<ServiceKey>,
    /// Services whose current view this connection is owed.
    dirty: BTreeSet<ServiceKey>,
    /// Pushes sent and not yet acknowledged, by request id.
    inflight: HashMap<String, Inflight>,
    inflight_by_service: HashMap<ServiceKey, String>,
    pushes_sent: u64,
    pushes_acked: u64,
}

impl Conn {
    fn has_naming(&self) -> bool {
        self.labels.get("module").map(String::as_str) == Some("naming")
    }
}

/// What a unary call is allowed to do, decided before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Silence {
    /// Every call is answered.
    #[default]
    Off,
    /// `ServerCheck` is answered and the stream accepted, but the connection
    /// is never registered (no SetupAck) and every other call hangs until
    /// the connection closes.
    AfterServerCheck,
    /// Every call hangs, `ServerCheck` included, and nothing is sent on streams.
    All,
}

/// Knobs a test turns at run time.
#[derive(Debug, Default)]
pub(super) struct Knobs {
    pub(super) push_delay: Duration,
    pub(super) call_delay: Duration,
    pub(super) read_delay: Duration,
    pub(super) withhold_pushes: bool,
    pub(super) ignore_acks: bool,
    pub(super) fail_next: Option<(u32, i32)>,
    pub(super) silence: Silence,
}

/// Counters for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FakeStats {
    /// TCP connections accepted on the gRPC port.
    pub transports_accepted: u64,
    /// Connections registered by a ConnectionSetup.
    pub connections_registered: u64,
    /// Registered connections open right now.
    pub connections_open: usize,
    /// Unary calls received (ServerCheck and health checks included).
    pub calls: u64,
    /// Pages of the HTTP catalog served.
    pub catalog_pages: u64,
    /// Catalog entries served over all those pages: a probe (one entry)
    /// adds 1, a full listing of N services adds N.
    pub catalog_entries: u64,
    /// Calls failed on purpose by [`super::FakeNacos::fail_next`].
    pub calls_failed_on_purpose: u64,
    /// Instance register and batch calls being served right now (received,
    /// not answered yet; see [`super::FakeNacos::set_call_delay`]).
    pub publishes_in_progress: usize,
    /// The most instance register and batch calls ever served at once.
    pub publishes_in_progress_peak: usize,
    /// Subscribe and query calls being served right now (see
    /// [`super::FakeNacos::set_read_delay`]).
    pub reads_in_progress: usize,
    /// The most subscribe and query calls ever served at once.
    pub reads_in_progress_peak: usize,
    /// Calls refused for a missing, invalid or expired token.
    pub auth_rejections: u64,
    /// Successful logins.
    pub logins: u64,
    /// Refused logins.
    pub logins_rejected: u64,
    /// `NotifySubscriberRequest`s sent (re-sends included).
    pub pushes_sent: u64,
    /// Pushes acknowledged with success.
    pub pushes_acked: u64,
    /// Pushes sent again because no ack came in time (or the ack said failure).
    pub push_resends: u64,
    /// Acks received and ignored because of [`super::FakeNacos::ignore_acks`].
    pub acks_ignored: u64,
    /// `ConnectResetRequest`s sent.
    pub resets_sent: u64,
}

/// A registered connection, for inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Connection id, as ServerCheck reported it.
    pub id: String,
    /// The client's address.
    pub remote: SocketAddr,
    /// Labels of its ConnectionSetup (`module`, `source`, `AppName`).
    pub labels: BTreeMap<String, String>,
    /// `clientVersion` of its ConnectionSetup.
    pub client_version: String,
    /// Services it subscribes to.
    pub subscriptions: Vec<ServiceKey>,
    /// Services it publishes a (non-empty) set for.
    pub publishes: Vec<ServiceKey>,
    /// Pushes sent to it.
    pub pushes_sent: u64,
    /// Pushes it acknowledged.
    pub pushes_acked: u64,
    /// Pushes awaiting its ack.
    pub pushes_pending: usize,
}

/// Timings the registry applies.
#[derive(Debug, Clone)]
pub(super) struct Timings {
    pub(super) push_resend_after: Duration,
    pub(super) empty_service_ttl: Duration,
    pub(super) token_ttl: Duration,
}

/// The whole server state, behind one mutex.
#[derive(Debug)]
pub(super) struct Registry {
    timings: Timings,
    conns: HashMap<String, Conn>,
    services: BTreeMap<ServiceKey, Service>,
    tokens: HashMap<String, Instant>,
    next_request_id: u64,
    last_ref_time: i64,
    pub(super) knobs: Knobs,
    pub(super) stats: FakeStats,
    /// Request ids acked with success that no push was waiting for (see
    /// [`super::FakeNacos::other_acks`]).
    pub(super) other_acks: Vec<String>,
}

impl Registry {
    pub(super) fn new(timings: Timings) -> Self {
        Self {
            timings,
            conns: HashMap::new(),
            services: BTreeMap::new(),
            tokens: HashMap::new(),
            next_request_id: 0,
            last_ref_time: 0,
            knobs: Knobs::default(),
            stats: FakeStats::default(),
            other_acks: Vec::new(),
        }
    }

    // --- connections ---

    pub(super) fn is_registered(&self, id: &str) -> bool {
        self.conns.contains_key(id)
    }

    /// Registers a connection whose stream sent ConnectionSetup; returns the
    /// handle its pusher task waits on.
    pub(super) fn register_connection(
        &mut self,
        id: &str,
        remote: SocketAddr,
        labels: BTreeMap<String, String>,
        client_version: String,
        out: Outbound,
        kill: CancellationToken,
    ) -> Arc<Notify> {
        let wake = Arc::new(Notify::new());
        let conn = Conn {
            remote,
            labels,
            client_version,
            out,
            kill,
            wake: wake.clone(),
            subscriptions: BTreeSet::new(),
            dirty: BTreeSet::new(),
            inflight: HashMap::new(),
            inflight_by_service: HashMap::new(),
            pushes_sent: 0,
            pushes_acked: 0,
        };
        self.conns.insert(id.to_owned(), conn);
        self.stats.connections_registered += 1;
        self.stats.connections_open = self.conns.len();
        wake
    }

    /// Forgets a closed connection: its ephemeral instances go, and the
    /// services they were in are pushed to their subscribers.
    pub(super) fn connection_closed(&mut self, id: &str) {
        let Some(conn) = self.conns.remove(id) else {
            return;
        };
        conn.kill.cancel();
        self.stats.connections_open = self.conns.len();
        let owned: Vec<ServiceKey> = self
            .services
            .iter()
            .filter(|(_, s)| s.slots.contains_key(id))
            .map(|(k, _)| k.clone())
            .collect();
        for key in owned {
            if let Some(service) = self.services.get_mut(&key) {
                service.slots.remove(id);
            }
            self.changed(&key);
        }
    }

    /// Closes the transport of `id` (the accept loop then forgets it).
    pub(super) fn kill(&self, id: &str) -> bool {
        self.conns.get(id).map(|c| c.kill.cancel()).is_some()
    }

    pub(super) fn connection_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.conns.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Sends a server request on a connection's stream.
    pub(super) fn send(&mut self, id: &str, payload: Payload) -> bool {
        self.conns
            .get(id)
            .is_some_and(|c| c.out.send(Ok(payload)).is_ok())
    }

    pub(super) fn next_request_id(&mut self) -> String {
        self.next_request_id += 1;
        self.next_request_id.to_string()
    }

    pub(super) fn connections(&self) -> Vec<ConnectionInfo> {
        let mut out: Vec<ConnectionInfo> = self
            .conns
            .iter()
            .map(|(id, c)| ConnectionInfo {
                id: id.clone(),
                remote: c.remote,
                labels: c.labels.clone(),
                client_version: c.client_version.clone(),
                subscriptions: c.subscriptions.iter().cloned().collect(),
                publishes: self
                    .services
                    .iter()
                    .filter(|(_, s)| s.slots.get(id).is_some_and(|set| !set.is_empty()))
                    .map(|(k, _)| k.clone())
                    .collect(),
                pushes_sent: c.pushes_sent,
                pushes_acked: c.pushes_acked,
                pushes_pending: c.inflight.len() + c.dirty.len(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// -401 when the connection did not declare the naming module (2.3.2+).
    pub(super) fn check_naming(&self, id: &str) -> Result<(), Rejection> {
        match self.conns.get(id) {
            Some(c) if c.has_naming() => Ok(()),
            Some(_) => Err(Rejection::new(
                -401,
                "Client not connected with naming module",
            )),
            None => Err(Rejection::new(301, "Connection is unregistered.")),
        }
    }

    // --- instances ---

    /// Replaces the connection's set for the service (single register and
    /// batch alike); an empty set removes the slot.
    pub(super) fn publish(&mut self, id: &str, key: &ServiceKey, hosts: Vec<Host>) {
        let service = self.services.entry(key.clone()).or_default();
        if hosts.is_empty() {
            service.slots.remove(id);
        } else {
            service
                .slots
                .insert(id.to_owned(), hosts.into_iter().collect());
        }
        self.changed(key);
    }

    /// Removes the connection's slot, whatever instance the request named.
    pub(super) fn deregister(&mut self, id: &str, key: &ServiceKey) {
        let removed = self
            .services
            .get_mut(key)
            .and_then(|s| s.slots.remove(id))
            .is_some();
        if removed {
            self.changed(key);
        }
    }

    fn changed(&mut self, key: &ServiceKey) {
        if let Some(service) = self.services.get_mut(key) {
            let empty = service.slots.values().all(BTreeSet::is_empty);
            service.emptied_at = match (empty, service.emptied_at) {
                (false, _) => None,
                (true, Some(t)) => Some(t),
                (true, None) => Some(Instant::now()),
            };
        }
        for conn in self.conns.values_mut() {
            if conn.subscriptions.contains(key) {
                conn.dirty.insert(key.clone());
                conn.wake.notify_one();
            }
        }
    }

    /// The current view of a service, as pushed and returned by subscribe and
    /// query: disabled hosts left out; an unknown service has no hosts.
    pub(super) fn service_info(&mut self, key: &ServiceKey) -> ServiceInfoDto {
        let now = now_millis().max(self.last_ref_time + 1);
        self.last_ref_time = now;
        service_info(key, self.services.get(key), now)
    }

    /// Services of a namespace and exact group, sorted: those with hosts and
    /// those emptied less than the expiry ago.
    pub(super) fn list(&mut self, namespace: &str, group: &str) -> Vec<String> {
        self.expire_empty();
        self.services
            .keys()
            .filter(|k| *k.namespace == *namespace && *k.group == *group)
            .map(|k| k.name.to_string())
            .collect()
    }

    /// How many services a namespace holds (all groups), and `take` of
    /// them from `skip` on with their host and healthy counts: the counts
    /// are worked out for the page only, so a probe of one entry stays
    /// cheap at 100,000 services.
    pub(super) fn catalog(
        &mut self,
        namespace: &str,
        skip: usize,
        take: usize,
    ) -> (usize, Vec<(ServiceKey, usize, usize)>) {
        self.expire_empty();
        let in_namespace = || {
            self.services
                .range(ServiceKey::new(namespace, "", "")..)
                .take_while(|(k, _)| *k.namespace == *namespace)
        };
        let page = in_namespace()
            .skip(skip)
            .take(take)
            .map(|(k, s)| {
                let hosts = s.hosts();
                let healthy = hosts.iter().filter(|h| h.healthy).count();
                (k.clone(), hosts.len(), healthy)
            })
            .collect();
        (in_namespace().count(), page)
    }

    fn expire_empty(&mut self) {
        let ttl = self.timings.empty_service_ttl;
        self.services
            .retain(|_, s| s.emptied_at.is_none_or(|t| t.elapsed() < ttl));
    }

    /// Every service the registry holds (any namespace), for inspection.
    pub(super) fn service_keys(&mut self) -> Vec<ServiceKey> {
        self.expire_empty();
        self.services.keys().cloned().collect()
    }

    /// The merged, enabled hosts of a service.
    pub(super) fn hosts(&self, key: &ServiceKey) -> Vec<InstanceDto> {
        service_info(key, self.services.get(key), 0)
            .hosts
            .unwrap_or_default()
    }

    // --- subscriptions and pushes ---

    /// Subscribes; the first subscription of a connection to a service is
    /// owed one push, even when the service does not exist.
    pub(super) fn subscribe(&mut self, id: &str, key: &ServiceKey) {
        if let Some(conn) = self.conns.get_mut(id)
            && conn.subscriptions.insert(key.clone())
        {
            conn.dirty.insert(key.clone());
            conn.wake.notify_one();
        }
    }

    pub(super) fn unsubscribe(&mut self, id: &str, key: &ServiceKey) {
        if let Some(conn) = self.conns.get_mut(id) {
            conn.subscriptions.remove(key);
            conn.dirty.remove(key);
            if let Some(rid) = conn.inflight_by_service.remove(key) {
                conn.inflight.remove(&rid);
            }
        }
    }

    pub(super) fn subscribers(&self, key: &ServiceKey) -> usize {
        self.conns
            .values()
            .filter(|c| c.subscriptions.contains(key))
            .count()
    }

    /// Sends what a connection is owed: its dirty services, and the pushes
    /// whose ack is overdue. Returns when to look again (the earliest resend),
    /// or `None` when the connection is gone.
    pub(super) fn flush_pushes(&mut self, id: &str, now: Instant) -> Option<Option<Instant>> {
        let withhold = self.knobs.withhold_pushes || self.knobs.silence != Silence::Off;
        let resend_after = self.timings.push_resend_after;
        let conn = self.conns.get_mut(id)?;
        let overdue: Vec<String> = conn
            .inflight
            .iter()
            .filter(|(_, f)| f.resend_at <= now)
            .map(|(rid, _)| rid.clone())
            .collect();
        for rid in overdue {
            if let Some(f) = conn.inflight.remove(&rid) {
                conn.inflight_by_service.remove(&f.service);
                conn.dirty.insert(f.service);
                self.stats.push_resends += 1;
            }
        }
        if !withhold {
            let owed = std::mem::take(&mut conn.dirty);
            for key in owed {
                if !conn.subscriptions.contains(&key) {
                    continue;
                }
                self.next_request_id += 1;
                let rid = self.next_request_id.to_string();
                let stamp = now_millis().max(self.last_ref_time + 1);
                self.last_ref_time = stamp;
                let push = NotifySubscriberRequest {
                    request_id: Some(rid.clone()),
                    module: Some("naming".to_owned()),
                    service_info: Some(service_info(&key, self.services.get(&key), stamp)),
                };
                if conn
                    .out
                    .send(Ok(wire::encode(&push, &HashMap::new(), "")))
                    .is_err()
                {
                    // The stream is gone; the accept loop forgets the connection.
                    return None;
                }
                conn.pushes_sent += 1;
                self.stats.pushes_sent += 1;
                // One push in flight per service: a newer one supersedes the older.
                if let Some(old) = conn.inflight_by_service.insert(key.clone(), rid.clone()) {
                    conn.inflight.remove(&old);
                }
                conn.inflight.insert(
                    rid,
                    Inflight {
                        service: key,
                        resend_at: now + resend_after,
                    },
                );
            }
        }
        Some(conn.inflight.values().map(|f| f.resend_at).min())
    }

    /// A push was answered. A failed answer is re-sent at the next resend.
    pub(super) fn ack(&mut self, id: &str, request_id: &str, success: bool) {
        if self.knobs.ignore_acks {
            self.stats.acks_ignored += 1;
            return;
        }
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if success {
            if let Some(f) = conn.inflight.remove(request_id) {
                conn.inflight_by_service.remove(&f.service);
                conn.pushes_acked += 1;
                self.stats.pushes_acked += 1;
            } else {
                self.other_acks.push(request_id.to_owned());
            }
        } else if let Some(f) = conn.inflight.get_mut(request_id) {
            f.resend_at = Instant::now();
            conn.wake.notify_one();
        }
    }

    /// Wakes every pusher (a knob changed).
    pub(super) fn wake_all(&self) {
        for conn in self.conns.values() {
            conn.wake.notify_one();
        }
    }

    // --- auth ---

    pub(super) fn issue_token(&mut self) -> (String, Duration) {
        use rand::Rng;
        let token: String = (0..4)
            .map(|_| format!("{:016x}", rand::rng().random::<u64>()))
            .collect();
        let ttl = self.timings.token_ttl;
        self.tokens.insert(token.clone(), Instant::now() + ttl);
        self.tokens
            .retain(|_, expiry| expiry.elapsed() < Duration::from_secs(3600));
        self.stats.logins += 1;
        (token, ttl)
    }

    /// Checks an access token as Nacos' auth plugin does (messages included).
    pub(super) fn check_token(&mut self, token: Option<&str>) -> Result<(), Rejection> {
        let result = match token.filter(|t| !t.is_empty()) {
            None => Err(Rejection::new(403, "user not found!")),
            Some(t) => match self.tokens.get(t) {
                None => Err(Rejection::new(403, "token invalid!")),
                Some(expiry) if Instant::now() >= *expiry => {
                    Err(Rejection::new(403, "token expired!"))
                }
                Some(_) => Ok(()),
            },
        };
        if result.is_err() {
            self.stats.auth_rejections += 1;
        }
        result
    }
}

fn service_info(key: &ServiceKey, service: Option<&Service>, last_ref_time: i64) -> ServiceInfoDto {
    let hosts: Vec<InstanceDto> = service
        .map(|s| {
            s.hosts()
                .into_iter()
                .filter(|h| h.enabled)
                .map(|h| h.dto(key))
                .collect()
        })
        .unwrap_or_default();
    ServiceInfoDto {
        name: Some(key.name.to_string()),
        group_name: Some(key.group.to_string()),
        clusters: Some(String::new()),
        cache_millis: Some(10_000),
        hosts: Some(hosts),
        last_ref_time: Some(last_ref_time),
        checksum: Some(String::new()),
        all_ips: Some(false),
        reach_protection_threshold: Some(false),
        valid: Some(true),
    }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
