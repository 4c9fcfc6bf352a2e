//! Origin tags: the metadata that marks an instance as a replica and names
//! the cluster it came from.
//!
//! Tags are compact and deterministic: one key, `<prefix>origin`, whose value
//! is the origin cluster id. No agent id and no timestamp, so two agents
//! replicating the same source write byte-identical replicas (which Nacos
//! merges into one host). They count against Nacos' metadata budget of
//! 1024 characters of keys plus values.

use crate::model::{ClusterId, Instance, Metadata};

/// The prefix used when the configuration names none.
pub const DEFAULT_PREFIX: &str = "rpl.";
/// Nacos' default limit on an instance's metadata: characters of all keys
/// plus all values (`nacos.naming.service.metadata.length`, 2.3+).
pub const METADATA_BUDGET: usize = 1024;
const MAX_PREFIX_CHARS: usize = 16;

/// An unusable tag prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// The prefix must be 1 to 16 characters of `[A-Za-z0-9._-]`.
    #[error(
        "origin tag prefix {0:?} must be 1 to 16 characters of letters, digits, '.', '_' or '-'"
    )]
    Prefix(String),
}

/// Reads and writes origin tags under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginTags {
    /// Shared by every replica's metadata (no string per replica).
    key: std::sync::Arc<str>,
}

impl Default for OriginTags {
    fn default() -> Self {
        Self {
            key: format!("{DEFAULT_PREFIX}origin").into(),
        }
    }
}

impl OriginTags {
    /// Tags under `prefix` (for example `rpl.`, giving the key `rpl.origin`).
    pub fn new(prefix: &str) -> Result<Self, TagError> {
        let valid = !prefix.is_empty()
            && prefix.chars().count() <= MAX_PREFIX_CHARS
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid {
            return Err(TagError::Prefix(prefix.to_owned()));
        }
        Ok(Self {
            key: format!("{prefix}origin").into(),
        })
    }

    /// The metadata key that holds the origin.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The cluster an instance was replicated from, if it is a replica.
    pub fn origin_of<'a>(&self, instance: &'a Instance) -> Option<&'a str> {
        instance.metadata.get(&self.key)
    }

    /// Whether the instance was registered by an application (not by us or
    /// another agent using the same prefix).
    pub fn is_native(&self, instance: &Instance) -> bool {
        !instance.metadata.contains_key(&self.key)
    }

    /// A replica of `native` tagged with `origin`, or `None` when the tag
    /// would push its metadata past the server's budget.
    pub fn tag(&self, native: &Instance, origin: &ClusterId) -> Option<Instance> {
        let metadata = self.tagged_metadata(&native.metadata, origin.0.as_str().into())?;
        Some(self.replica_with(native, metadata))
    }

    /// `metadata` with the origin tag set, or `None` when the tag would push
    /// it past the server's budget. The origin is a shared string (a route
    /// keeps one, so its replicas share it), and the instances of a service
    /// mostly share one metadata: tagging it once serves them all (see
    /// [`OriginTags::replica_with`]).
    pub fn tagged_metadata(
        &self,
        metadata: &Metadata,
        origin: std::sync::Arc<str>,
    ) -> Option<Metadata> {
        let mut tagged = metadata.clone();
        tagged.insert(self.key.clone(), origin);
        (chars_of(&tagged) <= METADATA_BUDGET).then_some(tagged)
    }

    /// The replica of `native` whose metadata is `tagged` (from
    /// [`OriginTags::tagged_metadata`] of the native's own metadata).
    pub fn replica_with(&self, native: &Instance, tagged: Metadata) -> Instance {
        Instance {
            ip: native.ip.clone(),
            port: native.port,
            weight: native.weight,
            healthy: native.healthy,
            enabled: native.enabled,
            ephemeral: native.ephemeral,
            nacos_cluster: native.nacos_cluster.clone(),
            metadata: tagged,
            // The server derives ids; a copied id would name the source's service.
            instance_id: None,
        }
    }
}

/// Characters of keys plus values, as Nacos counts them.
pub fn metadata_chars(instance: &Instance) -> usize {
    chars_of(&instance.metadata)
}

fn chars_of(metadata: &Metadata) -> usize {
    metadata
        .iter()
        .map(|(k, v)| k.chars().count() + v.chars().count())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        assert!(OriginTags::new("rpl.").is_ok());
        assert!(OriginTags::new("").is_err());
        assert!(OriginTags::new("has space").is_err());
        assert!(OriginTags::new("a-very-long-prefix.").is_err());
    }

    #[test]
    fn tag_marks_a_replica_and_is_deterministic() {
        let tags = OriginTags::default();
        let mut native = Instance::new("10.0.0.1", 80).with_metadata("zone", "hz");
        native.instance_id = Some("10.0.0.1#80#DEFAULT#DEFAULT_GROUP@@orders".into());
        assert!(tags.is_native(&native));
        let a = tags.tag(&native, &ClusterId("hz".into())).unwrap();
        let b = tags.tag(&native, &ClusterId("hz".into())).unwrap();
        assert_eq!(a, b);
        assert_eq!(tags.origin_of(&a), Some("hz"));
        assert!(!tags.is_native(&a));
        assert_eq!(a.instance_id, None);
        assert_eq!(a.metadata.get("zone"), Some("hz"));
    }

    #[test]
    fn a_replica_shares_the_natives_strings() {
        let tags = OriginTags::default();
        let native = Instance::new("10.0.0.1", 80).with_metadata("zone", "hz");
        let replica = tags.tag(&native, &ClusterId("hz".into())).unwrap();
        assert!(std::sync::Arc::ptr_eq(&replica.ip, &native.ip), "ip copied");
        assert!(
            std::sync::Arc::ptr_eq(&replica.nacos_cluster, &native.nacos_cluster),
            "cluster name copied"
        );
    }

    #[test]
    fn no_room_for_the_tag_means_no_replica() {
        let tags = OriginTags::default();
        let origin = ClusterId("hz".into());
        let room = METADATA_BUDGET - tags.key().len() - origin.0.len();
        let fits = Instance::new("10.0.0.1", 80).with_metadata("k", "v".repeat(room - 1));
        assert!(tags.tag(&fits, &origin).is_some());
        let full = Instance::new("10.0.0.1", 80).with_metadata("k", "v".repeat(room));
        assert!(tags.tag(&full, &origin).is_none());
    }
}
