//! From a source snapshot to the replicas a destination should hold, and
//! from there to what the publisher must do.

use std::cmp::Ordering;

use super::origin::{metadata_chars, OriginTags};
use super::route::Route;
use crate::model::{Instance, ServiceKey, ServiceSnapshot};

/// A native that was not replicated, and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Skipped {
    /// Its metadata leaves no room for the origin tag within Nacos' budget.
    MetadataBudget {
        /// `ip:port` of the native (for logs, never a metric label).
        instance: String,
        /// Characters its metadata already uses.
        chars: usize,
    },
}

/// The replicas one destination service should hold for one route.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The service on the destination (after mapping).
    pub service: ServiceKey,
    /// Tagged copies of the source's natives, in canonical order.
    pub replicas: Vec<Instance>,
    /// Natives left out, with the reason.
    pub skipped: Vec<Skipped>,
}

/// The replicas `route` should publish for the source `snapshot`.
///
/// Only natives are exported (rule 1): an instance carrying an origin tag is
/// a replica, whoever wrote it, and is never copied again. The copy is
/// faithful (ip, port, weight, health, enabled, ephemeral, Nacos cluster
/// name, metadata) plus the origin tag naming the route's source, which
/// differs from the destination by construction (rule 2). A service the
/// route does not cover yields an empty set: whatever we published for it
/// is withdrawn.
pub fn desired(route: &Route, tags: &OriginTags, snapshot: &ServiceSnapshot) -> Desired {
    let service = route.destination_key(&snapshot.service);
    let mut replicas = Vec::new();
    let mut skipped = Vec::new();
    if route.covers(&snapshot.service) {
        for native in snapshot.instances.iter().filter(|i| tags.is_native(i)) {
            match tags.tag(native, route.source()) {
                Some(replica) => replicas.push(replica),
                None => skipped.push(Skipped::MetadataBudget { instance: native.address(), chars: metadata_chars(native) }),
            }
        }
    }
    Desired { service, replicas: canonical(replicas), skipped }
}

/// When a change would withdraw many replicas at once, ask for a fresh look
/// at the source first.
#[derive(Debug, Clone, PartialEq)]
pub struct Guard {
    /// Share of the published replicas (0.0..=1.0) a single change may remove
    /// without confirmation.
    pub max_withdraw_share: f64,
    /// Services publishing fewer replicas than this are never held back.
    pub min_replicas: usize,
}

impl Default for Guard {
    fn default() -> Self {
        Self { max_withdraw_share: 0.5, min_replicas: 4 }
    }
}

impl Guard {
    /// No guard: for applying a change already confirmed by a fresh query.
    pub fn disabled() -> Self {
        Self { max_withdraw_share: 1.0, min_replicas: usize::MAX }
    }
}

/// What the publisher must do for one destination service.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// The destination already holds exactly the desired set.
    Unchanged,
    /// Publish this full set (one batch, replacing the previous one).
    Publish(Vec<Instance>),
    /// Withdraw every replica of the service.
    Withdraw,
    /// The change would remove `removing` of `published` replicas: confirm
    /// it with a fresh query of the source, then plan with [`Guard::disabled`].
    Confirm {
        /// Replicas published now.
        published: usize,
        /// Replicas the change would remove.
        removing: usize,
    },
}

/// Compares the desired set with what the publisher holds for the service.
pub fn plan(desired: &Desired, published: &[Instance], guard: &Guard) -> Plan {
    let have = canonical(published.iter().cloned().map(without_id).collect());
    if desired.replicas == have {
        return Plan::Unchanged;
    }
    let removing = have.iter().filter(|h| !desired.replicas.iter().any(|d| same_endpoint(d, h))).count();
    let share = if have.is_empty() { 0.0 } else { removing as f64 / have.len() as f64 };
    if have.len() >= guard.min_replicas && share > guard.max_withdraw_share {
        return Plan::Confirm { published: have.len(), removing };
    }
    if desired.replicas.is_empty() { Plan::Withdraw } else { Plan::Publish(desired.replicas.clone()) }
}

fn without_id(mut i: Instance) -> Instance {
    i.instance_id = None;
    i
}

fn same_endpoint(a: &Instance, b: &Instance) -> bool {
    a.ip == b.ip && a.port == b.port && a.nacos_cluster == b.nacos_cluster
}

/// Sorted, exact duplicates removed: two sets compare equal whatever order
/// the server listed them in.
pub fn canonical(mut instances: Vec<Instance>) -> Vec<Instance> {
    instances.sort_by(compare);
    instances.dedup();
    instances
}

fn compare(a: &Instance, b: &Instance) -> Ordering {
    (&a.ip, a.port, &a.nacos_cluster, &a.metadata, a.healthy, a.enabled, a.ephemeral)
        .cmp(&(&b.ip, b.port, &b.nacos_cluster, &b.metadata, b.healthy, b.enabled, b.ephemeral))
        .then_with(|| a.weight.total_cmp(&b.weight))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::ClusterId;

    const SOURCE: &str = "hz";
    const DESTINATION: &str = "sh";

    fn route() -> Route {
        Route::new(ClusterId(SOURCE.into()), ClusterId(DESTINATION.into())).unwrap()
    }

    fn snapshot(instances: Vec<Instance>) -> ServiceSnapshot {
        ServiceSnapshot {
            service: ServiceKey::new("public", "DEFAULT_GROUP", "orders"),
            instances,
            last_ref_time_ms: 1,
            protect_threshold_reached: false,
        }
    }

    /// What the publisher holds from an earlier round: replicas it wrote
    /// (tagged with the source) of the natives in `before`.
    fn written_earlier(tags: &OriginTags, before: &[Instance]) -> Vec<Instance> {
        before.iter().filter(|i| tags.is_native(i)).filter_map(|i| tags.tag(i, route().source())).collect()
    }

    /// What the publisher holds after carrying out `plan`.
    fn apply(plan: &Plan, published: &[Instance]) -> Vec<Instance> {
        match plan {
            Plan::Unchanged | Plan::Confirm { .. } => published.to_vec(),
            Plan::Publish(set) => set.clone(),
            Plan::Withdraw => Vec::new(),
        }
    }

    fn instance() -> impl Strategy<Value = Instance> {
        let origin = prop_oneof![
            Just(None),
            Just(Some(SOURCE.to_owned())),
            Just(Some(DESTINATION.to_owned())),
            Just(Some("sg".to_owned())),
        ];
        (0u8..6, 1u16..4, prop_oneof![Just(1.0), Just(2.0), Just(0.5)], any::<bool>(), origin, 0usize..3)
            .prop_map(|(host, port, weight, healthy, origin, extra)| {
                let mut i = Instance::new(format!("10.0.0.{host}"), port).with_weight(weight);
                i.healthy = healthy;
                for n in 0..extra {
                    i.metadata.insert(format!("k{n}"), format!("v{n}"));
                }
                if let Some(o) = origin {
                    i.metadata.insert(OriginTags::default().key().to_owned(), o);
                }
                i
            })
    }

    #[test]
    fn only_natives_are_copied_and_tagged_with_the_source() {
        let tags = OriginTags::default();
        let native = Instance::new("10.0.0.1", 80).with_metadata("zone", "hz");
        let foreign = Instance::new("10.0.0.2", 80).with_metadata(tags.key(), "sg");
        let d = desired(&route(), &tags, &snapshot(vec![native.clone(), foreign]));
        assert_eq!(d.replicas.len(), 1);
        assert_eq!(tags.origin_of(&d.replicas[0]), Some(SOURCE));
        assert_eq!(d.replicas[0].metadata.get("zone").map(String::as_str), Some("hz"));
    }

    #[test]
    fn a_service_out_of_scope_is_withdrawn() {
        let mut r = route();
        r.scope.exclude.push(super::super::Pattern::new("orders").unwrap());
        let tags = OriginTags::default();
        let d = desired(&r, &tags, &snapshot(vec![Instance::new("10.0.0.1", 80)]));
        assert!(d.replicas.is_empty());
        let published = vec![tags.tag(&Instance::new("10.0.0.1", 80), r.source()).unwrap()];
        assert_eq!(plan(&d, &published, &Guard::default()), Plan::Withdraw);
    }

    #[test]
    fn natives_without_room_for_the_tag_are_skipped_not_fatal() {
        let tags = OriginTags::default();
        let big = Instance::new("10.0.0.1", 80).with_metadata("blob", "x".repeat(1020));
        let small = Instance::new("10.0.0.2", 80);
        let d = desired(&route(), &tags, &snapshot(vec![big, small]));
        assert_eq!(d.replicas.len(), 1);
        assert!(matches!(&d.skipped[..], [Skipped::MetadataBudget { instance, .. }] if instance == "10.0.0.1:80"));
    }

    #[test]
    fn the_guard_holds_back_a_mass_withdrawal() {
        let tags = OriginTags::default();
        let natives: Vec<Instance> = (1..=10).map(|n| Instance::new(format!("10.0.0.{n}"), 80)).collect();
        let full = desired(&route(), &tags, &snapshot(natives.clone()));
        let published = full.replicas.clone();
        let shrunk = desired(&route(), &tags, &snapshot(natives[..3].to_vec()));
        assert_eq!(plan(&shrunk, &published, &Guard::default()), Plan::Confirm { published: 10, removing: 7 });
        assert!(matches!(plan(&shrunk, &published, &Guard::disabled()), Plan::Publish(set) if set.len() == 3));
        // Losing a few is an ordinary change.
        let minus_two = desired(&route(), &tags, &snapshot(natives[..8].to_vec()));
        assert!(matches!(plan(&minus_two, &published, &Guard::default()), Plan::Publish(set) if set.len() == 8));
    }

    proptest! {
        #[test]
        fn replicas_are_faithful_tagged_copies_of_natives_only(source in prop::collection::vec(instance(), 0..12)) {
            let tags = OriginTags::default();
            let d = desired(&route(), &tags, &snapshot(source.clone()));
            for replica in &d.replicas {
                // Tagged with the source, so never written back to where it came from.
                prop_assert_eq!(tags.origin_of(replica), Some(SOURCE));
                prop_assert_ne!(tags.origin_of(replica), Some(DESTINATION));
                // Untagged, it is exactly one of the source's natives.
                let mut untagged = replica.clone();
                untagged.metadata.remove(tags.key());
                prop_assert!(source.iter().any(|n| tags.is_native(n) && without_id(n.clone()) == untagged));
            }
            let natives = canonical(source.iter().filter(|i| tags.is_native(i)).cloned().collect()).len();
            prop_assert_eq!(d.replicas.len() + d.skipped.len(), natives);
        }

        #[test]
        fn applying_a_plan_leaves_nothing_to_do(
            source in prop::collection::vec(instance(), 0..12),
            before in prop::collection::vec(instance(), 0..12),
        ) {
            let tags = OriginTags::default();
            let published = written_earlier(&tags, &before);
            let d = desired(&route(), &tags, &snapshot(source));
            let plan1 = plan(&d, &published, &Guard::disabled());
            let after = apply(&plan1, &published);
            prop_assert_eq!(plan(&d, &after, &Guard::disabled()), Plan::Unchanged);
            // Whatever the plan writes carries our tag: natives are never in it.
            prop_assert!(after.iter().all(|i| tags.origin_of(i) == Some(SOURCE)));
        }

        #[test]
        fn the_guard_never_loses_the_published_set(
            source in prop::collection::vec(instance(), 0..12),
            before in prop::collection::vec(instance(), 0..12),
        ) {
            let tags = OriginTags::default();
            let published = written_earlier(&tags, &before);
            let d = desired(&route(), &tags, &snapshot(source));
            if let Plan::Confirm { published: n, removing } = plan(&d, &published, &Guard::default()) {
                prop_assert_eq!(n, canonical(published.clone()).len());
                prop_assert!(removing * 2 > n);
            }
        }
    }
}
