//! From a source snapshot to the replicas a destination should hold, and
//! from there to what the publisher must do.

use std::cmp::Ordering;

use super::origin::{OriginTags, metadata_chars};
use super::policy::{Policy, ReplicateAll};
use super::route::Route;
use crate::model::{Drift, Instance, Interner, Metadata, ServiceKey, ServiceSnapshot};

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
    desired_with(route, tags, snapshot, &ReplicateAll)
}

/// As [`desired`], with a [`Policy`] choosing and reshaping the copies. The
/// tag is written after the policy's transform: it cannot be forged or lost.
pub fn desired_with(
    route: &Route,
    tags: &OriginTags,
    snapshot: &ServiceSnapshot,
    policy: &dyn Policy,
) -> Desired {
    let service = route.destination_key(&snapshot.service);
    let mut replicas = Vec::with_capacity(snapshot.instances.len());
    let mut skipped = Vec::new();
    let source = &snapshot.service;
    // Natives that share their metadata give replicas that share theirs: the
    // tagged metadata is made once per distinct native metadata (one
    // allocation for a service whose instances all carry the same), and
    // equal results of a policy's rewrite are shared through the interner.
    let mut tagged: Vec<(Metadata, Option<Metadata>)> = Vec::new();
    let mut interner = Interner::default();
    if route.covers(source) && policy.follows(route, source) {
        for native in snapshot
            .instances
            .iter()
            .filter(|i| tags.is_native(i) && policy.admits(route, source, i))
        {
            let copy = policy.transform(route, source, native.clone());
            let metadata = match tagged
                .iter()
                .find(|(m, _)| m.same_allocation(&copy.metadata))
            {
                Some((_, t)) => t.clone(),
                None => {
                    let t = tags
                        .tagged_metadata(&copy.metadata, route.origin().clone())
                        .map(|t| interner.metadata(t));
                    tagged.push((copy.metadata.clone(), t.clone()));
                    t
                }
            };
            match metadata {
                Some(metadata) => replicas.push(tags.replica_with(&copy, metadata)),
                None => skipped.push(Skipped::MetadataBudget {
                    instance: copy.address(),
                    chars: metadata_chars(&copy),
                }),
            }
        }
    }
    Desired {
        service,
        replicas: canonical(replicas),
        skipped,
    }
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
        Self {
            max_withdraw_share: 0.5,
            min_replicas: 4,
        }
    }
}

impl Guard {
    /// No guard: for applying a change already confirmed by a fresh query.
    pub fn disabled() -> Self {
        Self {
            max_withdraw_share: 1.0,
            min_replicas: usize::MAX,
        }
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
    match decide(&desired.replicas, published, guard) {
        Decision::Unchanged => Plan::Unchanged,
        Decision::Publish => Plan::Publish(desired.replicas.clone()),
        Decision::Withdraw => Plan::Withdraw,
        Decision::Confirm {
            published,
            removing,
        } => Plan::Confirm {
            published,
            removing,
        },
    }
}

/// What [`plan`] decides, without the set: the caller already holds it
/// (the engine publishes the very set it keeps, so nothing is copied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The destination already holds exactly the desired set.
    Unchanged,
    /// Publish the desired set.
    Publish,
    /// Withdraw every replica of the service.
    Withdraw,
    /// The change would remove `removing` of `published` replicas (see
    /// [`Plan::Confirm`]).
    Confirm {
        /// Replicas published now.
        published: usize,
        /// Replicas the change would remove.
        removing: usize,
    },
}

/// As [`plan`], for a `desired` set already in canonical order (as
/// [`Desired::replicas`] is). `published` is read in place when it is
/// canonical and carries no server-side ids (the set the engine itself
/// queued always is); only another set is copied to be put in that form.
pub fn decide(desired: &[Instance], published: &[Instance], guard: &Guard) -> Decision {
    let have: std::borrow::Cow<'_, [Instance]> = if is_canonical(published) {
        published.into()
    } else {
        canonical(published.iter().cloned().map(without_id).collect()).into()
    };
    if desired == &*have {
        return Decision::Unchanged;
    }
    let removing = have
        .iter()
        .filter(|h| !desired.iter().any(|d| same_endpoint(d, h)))
        .count();
    let share = if have.is_empty() {
        0.0
    } else {
        removing as f64 / have.len() as f64
    };
    if have.len() >= guard.min_replicas && share > guard.max_withdraw_share {
        return Decision::Confirm {
            published: have.len(),
            removing,
        };
    }
    if desired.is_empty() {
        Decision::Withdraw
    } else {
        Decision::Publish
    }
}

/// Whether `instances` is what [`canonical`] would make of it, ids already
/// dropped: strictly ascending (so no duplicates) and no instance id.
fn is_canonical(instances: &[Instance]) -> bool {
    instances.iter().all(|i| i.instance_id.is_none())
        && instances
            .windows(2)
            .all(|w| compare(&w[0], &w[1]) == Ordering::Less)
}

/// What differs, instance by instance (see [`drift`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriftDetail {
    /// Replicas the destination does not show.
    pub missing: Vec<Instance>,
    /// Replicas shown on their endpoint with other content: (wanted, shown).
    pub different: Vec<(Instance, Instance)>,
    /// Instances tagged as ours that the agent does not publish.
    pub extra: Vec<Instance>,
}

impl DriftDetail {
    /// The counts.
    pub fn counts(&self) -> Drift {
        Drift {
            missing: self.missing.len(),
            different: self.different.len(),
            extra: self.extra.len(),
        }
    }
}

/// Compares what the agent publishes for a service (`expected`) with what
/// the destination shows (`shown`: natives, our replicas, anyone else's).
/// `owned` says which shown instances carry a tag this agent could have
/// written; only those can count as extra. A native on the same endpoint as
/// a replica is neither missing nor different: only exact copies count.
pub fn drift(
    expected: &[Instance],
    shown: &[Instance],
    owned: impl Fn(&Instance) -> bool,
) -> Drift {
    drift_detail(expected, shown, owned).counts()
}

/// As [`drift`], naming the instances.
pub fn drift_detail(
    expected: &[Instance],
    shown: &[Instance],
    owned: impl Fn(&Instance) -> bool,
) -> DriftDetail {
    let shown: Vec<Instance> = shown.iter().cloned().map(without_id).collect();
    let expected: Vec<Instance> = expected.iter().cloned().map(without_id).collect();
    let mut d = DriftDetail::default();
    for e in &expected {
        if shown.iter().any(|s| s == e) {
            continue;
        }
        match shown.iter().find(|s| owned(s) && same_endpoint(s, e)) {
            Some(s) => d.different.push((e.clone(), s.clone())),
            None => d.missing.push(e.clone()),
        }
    }
    d.extra = shown
        .iter()
        .filter(|s| owned(s) && !expected.iter().any(|e| e == *s || same_endpoint(e, s)))
        .cloned()
        .collect();
    d
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
    (
        &a.ip,
        a.port,
        &a.nacos_cluster,
        &a.metadata,
        a.healthy,
        a.enabled,
        a.ephemeral,
    )
        .cmp(&(
            &b.ip,
            b.port,
            &b.nacos_cluster,
            &b.metadata,
            b.healthy,
            b.enabled,
            b.ephemeral,
        ))
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
            instances: instances.into(),
            last_ref_time_ms: 1,
            protect_threshold_reached: false,
        }
    }

    #[test]
    fn a_policy_filters_and_transforms_but_cannot_touch_the_tag() {
        struct OnlyV2;
        impl Policy for OnlyV2 {
            fn admits(&self, _: &Route, _: &ServiceKey, native: &Instance) -> bool {
                native.metadata.get("version") == Some("2")
            }
            fn transform(&self, _: &Route, _: &ServiceKey, copy: Instance) -> Instance {
                // Tries to forge the origin and to add a label.
                copy.with_metadata("rpl.origin", DESTINATION)
                    .with_metadata("imported", "yes")
            }
        }
        let tags = OriginTags::default();
        let v1 = Instance::new("10.0.0.1", 80).with_metadata("version", "1");
        let v2 = Instance::new("10.0.0.2", 80).with_metadata("version", "2");
        let d = desired_with(&route(), &tags, &snapshot(vec![v1, v2]), &OnlyV2);
        assert_eq!(d.replicas.len(), 1);
        let r = &d.replicas[0];
        assert_eq!(&*r.ip, "10.0.0.2");
        assert_eq!(r.metadata.get("imported"), Some("yes"));
        assert_eq!(
            tags.origin_of(r),
            Some(SOURCE),
            "the policy forged the origin"
        );
    }

    #[test]
    fn replicas_of_natives_with_equal_metadata_share_theirs() {
        let tags = OriginTags::default();
        let natives = vec![
            Instance::new("10.0.0.1", 80).with_metadata("app", "orders"),
            Instance::new("10.0.0.2", 80).with_metadata("app", "orders"),
            Instance::new("10.0.0.3", 80).with_metadata("app", "other"),
        ];
        let d = desired(&route(), &tags, &snapshot(natives));
        let key_at = |i: usize| {
            let (key, _) = d.replicas[i].metadata.iter().next().expect("an entry");
            key.as_ptr()
        };
        assert_eq!(key_at(0), key_at(1), "equal metadata copied per replica");
        assert_eq!(d.replicas[0].metadata, d.replicas[1].metadata);
        assert_eq!(d.replicas[2].metadata.get("app"), Some("other"));
        assert_eq!(tags.origin_of(&d.replicas[2]), Some(SOURCE));
    }

    #[test]
    fn natives_sharing_one_metadata_are_tagged_once() {
        let tags = OriginTags::default();
        let shared = Instance::new("10.0.0.1", 80)
            .with_metadata("app", "orders")
            .metadata;
        let natives: Vec<Instance> = (1..=4)
            .map(|n| Instance {
                metadata: shared.clone(),
                ..Instance::new(format!("10.0.0.{n}"), 80)
            })
            .chain([Instance::new("10.0.0.9", 80).with_metadata("app", "other")])
            .collect();
        let d = desired(&route(), &tags, &snapshot(natives));
        assert_eq!(d.replicas.len(), 5);
        let first = &d.replicas[0].metadata;
        for r in &d.replicas[1..4] {
            assert!(r.metadata.same_allocation(first), "tagged once per replica");
        }
        assert_eq!(first.get("app"), Some("orders"));
        assert_eq!(tags.origin_of(&d.replicas[0]), Some(SOURCE));
        assert!(!d.replicas[4].metadata.same_allocation(first));
        assert_eq!(d.replicas[4].metadata.get("app"), Some("other"));
        assert_eq!(tags.origin_of(&d.replicas[4]), Some(SOURCE));
    }

    #[test]
    fn drift_tells_missing_different_and_extra_apart_and_ignores_natives() {
        let tags = OriginTags::default();
        let tag = |i: Instance| tags.tag(&i, route().source()).unwrap();
        let owned = |i: &Instance| tags.origin_of(i).is_some();
        let (r1, r2, r3) = (
            tag(Instance::new("10.0.0.1", 80)),
            tag(Instance::new("10.0.0.2", 80)),
            tag(Instance::new("10.0.0.3", 80)),
        );
        let mut shown_id = r1.clone();
        shown_id.instance_id = Some("10.0.0.1#80#DEFAULT#orders".into());
        // A native on r2's endpoint, r3 changed, and a stray tagged one.
        let native_on_r2 = Instance::new("10.0.0.2", 80);
        let r3_changed = r3.clone().with_weight(5.0);
        let stray = tag(Instance::new("10.0.0.9", 80));
        let shown = vec![shown_id, native_on_r2.clone(), r3_changed, stray];
        let d = drift(&[r1.clone(), r2.clone(), r3.clone()], &shown, owned);
        assert_eq!(
            d,
            Drift {
                missing: 1,
                different: 1,
                extra: 1
            }
        );
        assert!(d.repairable());
        let clean = drift(
            std::slice::from_ref(&r1),
            &[r1.clone(), native_on_r2],
            owned,
        );
        assert!(clean.is_none(), "{clean:?}");
    }

    /// What the publisher holds from an earlier round: replicas it wrote
    /// (tagged with the source) of the natives in `before`.
    fn written_earlier(tags: &OriginTags, before: &[Instance]) -> Vec<Instance> {
        before
            .iter()
            .filter(|i| tags.is_native(i))
            .filter_map(|i| tags.tag(i, route().source()))
            .collect()
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
        (
            0u8..6,
            1u16..4,
            prop_oneof![Just(1.0), Just(2.0), Just(0.5)],
            any::<bool>(),
            origin,
            0usize..3,
        )
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
        assert_eq!(d.replicas[0].metadata.get("zone"), Some("hz"));
    }

    #[test]
    fn a_service_out_of_scope_is_withdrawn() {
        let mut r = route();
        r.scope
            .exclude
            .push(super::super::Pattern::new("orders").unwrap());
        let tags = OriginTags::default();
        let d = desired(&r, &tags, &snapshot(vec![Instance::new("10.0.0.1", 80)]));
        assert!(d.replicas.is_empty());
        let published = vec![
            tags.tag(&Instance::new("10.0.0.1", 80), r.source())
                .unwrap(),
        ];
        assert_eq!(plan(&d, &published, &Guard::default()), Plan::Withdraw);
    }

    #[test]
    fn natives_without_room_for_the_tag_are_skipped_not_fatal() {
        let tags = OriginTags::default();
        let big = Instance::new("10.0.0.1", 80).with_metadata("blob", "x".repeat(1020));
        let small = Instance::new("10.0.0.2", 80);
        let d = desired(&route(), &tags, &snapshot(vec![big, small]));
        assert_eq!(d.replicas.len(), 1);
        assert!(
            matches!(&d.skipped[..], [Skipped::MetadataBudget { instance, .. }] if instance == "10.0.0.1:80")
        );
    }

    #[test]
    fn the_guard_holds_back_a_mass_withdrawal() {
        let tags = OriginTags::default();
        let natives: Vec<Instance> = (1..=10)
            .map(|n| Instance::new(format!("10.0.0.{n}"), 80))
            .collect();
        let full = desired(&route(), &tags, &snapshot(natives.clone()));
        let published = full.replicas.clone();
        let shrunk = desired(&route(), &tags, &snapshot(natives[..3].to_vec()));
        assert_eq!(
            plan(&shrunk, &published, &Guard::default()),
            Plan::Confirm {
                published: 10,
                removing: 7
            }
        );
        assert!(
            matches!(plan(&shrunk, &published, &Guard::disabled()), Plan::Publish(set) if set.len() == 3)
        );
        // Losing a few is an ordinary change.
        let minus_two = desired(&route(), &tags, &snapshot(natives[..8].to_vec()));
        assert!(
            matches!(plan(&minus_two, &published, &Guard::default()), Plan::Publish(set) if set.len() == 8)
        );
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
        fn a_canonical_published_set_is_read_in_place_with_the_same_decision(
            source in prop::collection::vec(instance(), 0..12),
            before in prop::collection::vec(instance(), 0..12),
        ) {
            let tags = OriginTags::default();
            let d = desired(&route(), &tags, &snapshot(source));
            // As a server lists it: any order, ids set, duplicates possible.
            let mut listed = written_earlier(&tags, &before);
            listed.reverse();
            listed.extend(listed.first().cloned());
            for (n, i) in listed.iter_mut().enumerate() {
                i.instance_id = Some(format!("id-{n}").into());
            }
            let held = canonical(listed.iter().cloned().map(without_id).collect());
            prop_assert!(is_canonical(&held));
            prop_assert!(listed.is_empty() || !is_canonical(&listed));
            for guard in [Guard::default(), Guard::disabled()] {
                prop_assert_eq!(decide(&d.replicas, &held, &guard), decide(&d.replicas, &listed, &guard));
            }
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
