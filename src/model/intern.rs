//! Interning: one allocation for equal strings and equal metadata decoded
//! within one batch (a service's snapshot, a replica set).
//!
//! The instances of a service mostly repeat themselves: the same Nacos
//! cluster name, the same metadata keys, often the same whole metadata.
//! Decoded one by one, each instance got its own copies (four strings and a
//! metadata slice per instance, the largest share of a native's memory).
//! An [`Interner`] hands out one shared copy instead.
//!
//! It keeps everything it handed out for as long as it lives, so it is made
//! for one batch and dropped with it: never kept across pushes, so nothing a
//! server sends can make it grow without end.

use std::collections::HashSet;
use std::sync::Arc;

use super::Metadata;

/// Shared copies of the strings and metadata seen so far in one batch.
#[derive(Debug, Default)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
    metadata: HashSet<Metadata>,
}

impl Interner {
    /// The shared copy of `s`: the same allocation for every equal string.
    pub fn str(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return shared.clone();
        }
        let shared: Arc<str> = s.into();
        self.strings.insert(shared.clone());
        shared
    }

    /// The shared copy of `metadata`: an equal one seen before, else this one.
    pub fn metadata(&mut self, metadata: Metadata) -> Metadata {
        if let Some(shared) = self.metadata.get(&metadata) {
            return shared.clone();
        }
        self.metadata.insert(metadata.clone());
        metadata
    }

    /// Metadata from `(key, value)` pairs, its strings and the whole shared
    /// with what this interner has seen (of duplicate keys the last wins).
    pub fn metadata_of<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Metadata {
        let entries = entries.into_iter();
        let mut pairs: Vec<(Arc<str>, Arc<str>)> = Vec::with_capacity(entries.size_hint().0);
        for (k, v) in entries {
            let entry = (self.str(k), self.str(v));
            match pairs.binary_search_by(|(have, _)| (**have).cmp(k)) {
                Ok(i) => pairs[i] = entry,
                Err(i) => pairs.insert(i, entry),
            }
        }
        self.metadata(Metadata(pairs.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_and_metadata_get_one_allocation() {
        let mut interner = Interner::default();
        let a = interner.str(&String::from("DEFAULT"));
        let b = interner.str("DEFAULT");
        assert!(Arc::ptr_eq(&a, &b), "two allocations for one string");
        assert!(!Arc::ptr_eq(&a, &interner.str("OTHER")));

        let one = interner.metadata_of([("zone", "hz"), ("v", "1")]);
        let two = interner.metadata_of([("v", "1"), ("zone", "hz")]);
        assert!(
            Arc::ptr_eq(&one.0, &two.0),
            "two allocations for one metadata"
        );
        assert_eq!(one.iter().collect::<Vec<_>>(), [("v", "1"), ("zone", "hz")]);
        let other = interner.metadata_of([("v", "2"), ("zone", "hz")]);
        assert!(!Arc::ptr_eq(&one.0, &other.0));
        // The key strings are shared between the two metadata anyway.
        assert!(Arc::ptr_eq(&one.0[1].0, &other.0[1].0));

        let last_wins = interner.metadata_of([("k", "1"), ("k", "2")]);
        assert_eq!(last_wins.get("k"), Some("2"));
        assert_eq!(last_wins.len(), 1);
    }
}
