//! Domain types shared by every layer: services, instances and snapshots.
//!
//! Owns the vocabulary of the project; holds no I/O and knows nothing of JSON
//! or gRPC. Nacos' per-service `clusterName` is called `nacos_cluster` here so
//! it is never confused with a [`ClusterId`] (a whole Nacos deployment).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, LazyLock};

mod addr;
mod intern;
pub use addr::{AddrError, ServerAddr};
pub use intern::Interner;

/// Names one Nacos deployment (a region's cluster) in config, logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(pub String);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// The namespace Nacos calls `public`; gRPC requests must spell it out.
pub const DEFAULT_NAMESPACE: &str = "public";
/// The group Nacos uses when none is given; gRPC requests must spell it out.
pub const DEFAULT_GROUP: &str = "DEFAULT_GROUP";
/// The per-service cluster name Nacos uses when none is given.
pub const DEFAULT_NACOS_CLUSTER: &str = "DEFAULT";

/// A service within one Nacos deployment: namespace, group and bare name.
///
/// The parts are shared strings: a key is copied into every map that
/// follows the service (subscriptions, watcher, engine, publisher queue,
/// redo record), and a copy is three reference counts, not three strings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Namespace id (`public` for the default namespace).
    pub namespace: Arc<str>,
    /// Group name (`DEFAULT_GROUP` by default).
    pub group: Arc<str>,
    /// Bare service name, without the `group@@` prefix.
    pub name: Arc<str>,
}

impl ServiceKey {
    /// A key from its three parts.
    pub fn new(
        namespace: impl Into<Arc<str>>,
        group: impl Into<Arc<str>>,
        name: impl Into<Arc<str>>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            group: group.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@@{}", self.namespace, self.group, self.name)
    }
}

/// One instance of a service, as registered or as reported by a server.
///
/// Its strings are shared (`Arc<str>`): a replica is a copy of a native
/// with one more metadata entry, and copying it copies no string; the
/// instances of one decoded snapshot share their cluster name (see
/// [`Interner`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Address or host name the instance is reached at.
    pub ip: Arc<str>,
    /// Port the instance is reached at.
    pub port: u16,
    /// Load-balancing weight (Nacos default 1.0).
    pub weight: f64,
    /// Health as registered (Nacos stores an ephemeral instance's flag as sent).
    pub healthy: bool,
    /// Disabled instances are kept by the server but left out of replies and pushes.
    pub enabled: bool,
    /// Ephemeral instances live as long as the connection that registered them.
    pub ephemeral: bool,
    /// Nacos' per-service cluster name (`DEFAULT` by default).
    pub nacos_cluster: Arc<str>,
    /// Free-form metadata; keys plus values count against the server's size limit.
    pub metadata: Metadata,
    /// The server-side instance id, when the server reported one that is
    /// not the id Nacos derives by default (`ip#port#cluster#group@@name`):
    /// a decoded snapshot keeps no string it can rebuild (one per instance
    /// was a sixth of a native's memory). [`Instance::id_in`] gives the id
    /// either way. Never sent on register: the server derives it.
    pub instance_id: Option<Arc<str>>,
}

/// [`DEFAULT_NACOS_CLUSTER`], one allocation for every instance that uses it.
static DEFAULT_NACOS_CLUSTER_SHARED: LazyLock<Arc<str>> =
    LazyLock::new(|| DEFAULT_NACOS_CLUSTER.into());

/// The shared [`DEFAULT_NACOS_CLUSTER`] name.
pub fn default_nacos_cluster() -> Arc<str> {
    DEFAULT_NACOS_CLUSTER_SHARED.clone()
}

impl Instance {
    /// An enabled, healthy, ephemeral instance of weight 1 in the `DEFAULT` cluster.
    pub fn new(ip: impl Into<Arc<str>>, port: u16) -> Self {
        Self {
            ip: ip.into(),
            port,
            weight: 1.0,
            healthy: true,
            enabled: true,
            ephemeral: true,
            nacos_cluster: default_nacos_cluster(),
            metadata: Metadata::default(),
            instance_id: None,
        }
    }

    /// Adds one metadata entry (builder style).
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the weight (builder style).
    #[must_use]
    pub fn with_weight(mut self, weight: f64) -> Self {
        self.weight = weight;
        self
    }

    /// `ip:port`, for logs at debug level (never a metric label).
    pub fn address(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// The server-side id of this instance of `service`: the one the server
    /// reported if it was not the default, else the default Nacos derives.
    pub fn id_in(&self, service: &ServiceKey) -> std::borrow::Cow<'_, str> {
        match &self.instance_id {
            Some(id) => std::borrow::Cow::Borrowed(id),
            None => std::borrow::Cow::Owned(format!(
                "{}#{}#{}#{}@@{}",
                self.ip, self.port, self.nacos_cluster, service.group, service.name
            )),
        }
    }

    /// Whether `id` is exactly the id Nacos derives for this instance of
    /// `group`/`name`, which [`Instance::id_in`] rebuilds. Compared piece
    /// by piece, without building the string.
    pub fn is_default_id(&self, id: &str, group: &str, name: &str) -> bool {
        let mut parts = id.splitn(4, '#');
        let (Some(ip), Some(port), Some(cluster), Some(service)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        // The port as it prints: no sign, no leading zero.
        let port_matches = port.parse::<u16>() == Ok(self.port)
            && port.bytes().all(|b| b.is_ascii_digit())
            && (port == "0" || !port.starts_with('0'));
        ip == &*self.ip
            && port_matches
            && cluster == &*self.nacos_cluster
            && service.split_once("@@") == Some((group, name))
    }
}

/// The full state of one service at one moment, as a server reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSnapshot {
    /// Which service this is.
    pub service: ServiceKey,
    /// Every enabled instance the server reported, in one shared
    /// allocation: the client's latest snapshot, every reader's copy and the
    /// watcher's events are reference counts, not copies.
    pub instances: InstanceSet,
    /// Server time of this view, in milliseconds since the epoch.
    pub last_ref_time_ms: i64,
    /// The server's protect threshold was reached: it reported every host as
    /// healthy whatever their real state.
    pub protect_threshold_reached: bool,
}

impl ServiceSnapshot {
    /// A service with no instances: what a withdrawn or vanished service looks like.
    pub fn empty(service: ServiceKey) -> Self {
        Self {
            service,
            instances: InstanceSet::default(),
            last_ref_time_ms: 0,
            protect_threshold_reached: false,
        }
    }
}

/// How a destination's view of a service differs from the replica set the
/// agent publishes there (see `reconcile::plan::drift`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drift {
    /// Replicas the destination does not show at all.
    pub missing: usize,
    /// Replicas it shows on the same endpoint with other content.
    pub different: usize,
    /// Tagged instances it shows that the agent does not publish.
    pub extra: usize,
}

impl Drift {
    /// Nothing differs.
    pub fn is_none(&self) -> bool {
        *self == Drift::default()
    }

    /// Republishing the set fixes it: something of ours is absent or wrong.
    /// (Extras belong to other connections, which a batch cannot touch.)
    pub fn repairable(&self) -> bool {
        self.missing + self.different > 0
    }
}

/// A full set of instances, shared rather than copied between the engine's
/// desired state, the publisher's queue and the client's redo record.
pub type InstanceSet = std::sync::Arc<[Instance]>;

/// Instance metadata: a few entries, read far more often than written, and
/// copied with every copy of an instance (snapshot, desired set, published
/// set, redo). Kept sorted by key in one shared allocation, so a copy is a
/// reference count; a `BTreeMap` costs a ~550-byte node per copy even for
/// one entry, which made metadata most of the agent's memory. Keys and
/// values are shared strings too: a replica's metadata (the native's plus
/// the origin tag) reuses the native's strings.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Metadata(std::sync::Arc<[(std::sync::Arc<str>, std::sync::Arc<str>)]>);

impl Metadata {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.position(key).ok().map(|i| &*self.0[i].1)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// Sets `key` (copy on write: the other entries' strings are shared,
    /// not copied); returns the previous value.
    pub fn insert(
        &mut self,
        key: impl Into<std::sync::Arc<str>>,
        value: impl Into<std::sync::Arc<str>>,
    ) -> Option<String> {
        let (key, value) = (key.into(), value.into());
        // Built straight into the new shared slice: one allocation.
        let (entries, previous): (std::sync::Arc<[_]>, _) = match self.position(&key) {
            Ok(i) => (
                self.0
                    .iter()
                    .enumerate()
                    .map(|(j, e)| {
                        if j == i {
                            (e.0.clone(), value.clone())
                        } else {
                            e.clone()
                        }
                    })
                    .collect(),
                Some(self.0[i].1.to_string()),
            ),
            Err(i) => (
                self.0[..i]
                    .iter()
                    .cloned()
                    .chain(std::iter::once((key, value)))
                    .chain(self.0[i..].iter().cloned())
                    .collect(),
                None,
            ),
        };
        self.0 = entries;
        previous
    }

    /// Removes `key` (copy on write); returns its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.position(key).ok()?;
        let mut entries = self.0.to_vec();
        let (_, value) = entries.remove(i);
        self.0 = entries.into();
        Some(value.to_string())
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// As a map (for the wire).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// Whether both are the one shared allocation (so equal without a look
    /// at their entries).
    pub fn same_allocation(&self, other: &Metadata) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key))
    }
}

impl FromIterator<(String, String)> for Metadata {
    /// Sorted by key; of duplicate keys the last wins (as in a map).
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let map: BTreeMap<String, String> = iter.into_iter().collect();
        Metadata::from(map)
    }
}

impl From<BTreeMap<String, String>> for Metadata {
    fn from(map: BTreeMap<String, String>) -> Self {
        Metadata(
            map.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect::<Vec<_>>()
                .into(),
        )
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_of_a_snapshot_share_their_instances() {
        let snapshot = ServiceSnapshot {
            instances: [Instance::new("10.0.0.1", 80), Instance::new("10.0.0.2", 80)].into(),
            ..ServiceSnapshot::empty(ServiceKey::new("public", "G", "orders"))
        };
        let copy = snapshot.clone();
        assert!(
            std::sync::Arc::ptr_eq(&copy.instances, &snapshot.instances),
            "a copy of the snapshot copied its instances"
        );
        assert_eq!(copy, snapshot);
    }

    #[test]
    fn metadata_behaves_as_a_sorted_map_and_copies_share() {
        let mut m = Metadata::default();
        assert_eq!(m.insert("b", "2"), None);
        assert_eq!(m.insert("a", "1"), None);
        assert_eq!(m.insert("b", "3").as_deref(), Some("2"));
        assert_eq!(
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            ["a=1", "b=3"]
        );
        assert_eq!(m.get("b"), Some("3"));
        assert!(m.contains_key("a") && !m.contains_key("c"));
        let copy = m.clone();
        assert!(std::sync::Arc::ptr_eq(&copy.0, &m.0), "a copy allocated");
        assert_eq!(m.remove("a").as_deref(), Some("1"));
        assert_eq!((m.len(), copy.len()), (1, 2), "copy on write");
        let from: Metadata = [
            ("x".to_owned(), "1".to_owned()),
            ("x".to_owned(), "2".to_owned()),
        ]
        .into_iter()
        .collect();
        assert_eq!(from.get("x"), Some("2"));
        assert_eq!(format!("{from:?}"), r#"{"x": "2"}"#);
        assert_eq!(
            from.to_map(),
            BTreeMap::from([("x".to_owned(), "2".to_owned())])
        );
    }
}
