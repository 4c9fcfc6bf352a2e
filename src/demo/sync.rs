//! How far behind a region is: what it shows compared with what its peers'
//! natives say it should hold.
//!
//! Pure, and written apart from the engine on purpose: the expected replicas
//! are derived here from what the peers *show* (queried through clients),
//! with the routes, the policy and the origin tags, and compared with what
//! the region shows. A bug in the engine's diff cannot hide itself here.
//! Must not: do I/O, or look at anything but the views it is given.

use std::collections::BTreeMap;

use crate::model::{ClusterId, Instance, ServiceKey};
use crate::reconcile::{OriginTags, Policy, Route};

/// What one region shows: per service, every instance (natives and replicas).
pub type RegionView = BTreeMap<ServiceKey, Vec<Instance>>;

/// How a region's replicas differ from what its peers' natives say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Behind {
    /// Expected replicas the region does not show.
    pub missing: usize,
    /// Replicas shown on the right endpoint with old content (weight, metadata, health).
    pub stale: usize,
    /// Replicas shown that no peer native accounts for any more.
    pub extra: usize,
}

impl Behind {
    /// Holds exactly what its peers' natives say.
    pub fn in_sync(&self) -> bool {
        *self == Behind::default()
    }

    fn add(&mut self, other: Behind) {
        self.missing += other.missing;
        self.stale += other.stale;
        self.extra += other.extra;
    }
}

impl std::fmt::Display for Behind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.in_sync() {
            return f.write_str("in sync");
        }
        let parts: Vec<String> = [
            (self.missing, "missing"),
            (self.stale, "stale"),
            (self.extra, "extra"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        write!(f, "behind: {}", parts.join(", "))
    }
}

/// One region compared with its peers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegionSync {
    /// The whole region.
    pub total: Behind,
    /// Per service that differs.
    pub services: BTreeMap<ServiceKey, Behind>,
    /// Replicas expected in the region, all services.
    pub expected: usize,
}

/// The replicas `home` should show, per destination service: every native
/// its peers show, along each of `routes` into `home`, as `policy` admits
/// and reshapes it, tagged with its origin. Natives whose tag would not fit
/// the metadata budget are not expected (the engine skips them too).
pub fn expected(
    home: &ClusterId,
    views: &BTreeMap<ClusterId, RegionView>,
    routes: &[Route],
    tags: &OriginTags,
    policy: &dyn Policy,
) -> BTreeMap<ServiceKey, Vec<Instance>> {
    let mut out: BTreeMap<ServiceKey, Vec<Instance>> = BTreeMap::new();
    for route in routes.iter().filter(|r| r.destination() == home) {
        let Some(peer) = views.get(route.source()) else {
            continue;
        };
        for (service, shown) in peer {
            if !route.covers(service) || !policy.follows(route, service) {
                continue;
            }
            let copies = shown
                .iter()
                .filter(|i| tags.is_native(i) && policy.admits(route, service, i))
                .filter_map(|native| {
                    tags.tag(
                        &policy.transform(route, service, native.clone()),
                        route.source(),
                    )
                });
            out.entry(route.destination_key(service))
                .or_default()
                .extend(copies);
        }
    }
    out
}

/// Compares what `home` shows with [`expected`]. Only replicas tagged with
/// the origin of a route into `home` count: natives, and copies from
/// elsewhere, are not this comparison's business.
pub fn compare(
    home: &ClusterId,
    views: &BTreeMap<ClusterId, RegionView>,
    routes: &[Route],
    tags: &OriginTags,
    policy: &dyn Policy,
) -> RegionSync {
    let want = expected(home, views, routes, tags, policy);
    let origins: Vec<&str> = routes
        .iter()
        .filter(|r| r.destination() == home)
        .map(|r| r.source().0.as_str())
        .collect();
    let empty = RegionView::new();
    let shown_view = views.get(home).unwrap_or(&empty);
    let mut sync = RegionSync {
        expected: want.values().map(Vec::len).sum(),
        ..RegionSync::default()
    };
    let services: std::collections::BTreeSet<&ServiceKey> =
        want.keys().chain(shown_view.keys()).collect();
    for service in services {
        let expected_here = want.get(service).map(Vec::as_slice).unwrap_or_default();
        let shown: Vec<&Instance> = shown_view
            .get(service)
            .into_iter()
            .flatten()
            .filter(|i| tags.origin_of(i).is_some_and(|o| origins.contains(&o)))
            .collect();
        let behind = compare_service(expected_here, &shown, tags);
        if !behind.in_sync() {
            sync.services.insert(service.clone(), behind);
            sync.total.add(behind);
        }
    }
    sync
}

/// One service: an expected replica is found exactly (server-assigned ids
/// aside), found on its endpoint and origin with other content (stale), or
/// missing; a shown replica no expected one matches by endpoint and origin
/// is extra.
fn compare_service(expected: &[Instance], shown: &[&Instance], tags: &OriginTags) -> Behind {
    let slot = |i: &Instance| {
        (
            i.ip.clone(),
            i.port,
            i.nacos_cluster.clone(),
            tags.origin_of(i).map(str::to_owned),
        )
    };
    let same = |a: &Instance, b: &Instance| {
        Instance {
            instance_id: None,
            ..a.clone()
        } == Instance {
            instance_id: None,
            ..b.clone()
        }
    };
    let mut behind = Behind::default();
    for e in expected {
        if shown.iter().any(|s| same(s, e)) {
            continue;
        }
        if shown.iter().any(|s| slot(s) == slot(e)) {
            behind.stale += 1;
        } else {
            behind.missing += 1;
        }
    }
    behind.extra = shown
        .iter()
        .filter(|s| !expected.iter().any(|e| slot(e) == slot(s)))
        .count();
    behind
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::schedule::{DemoPolicy, IMPORTED_BY, LOCAL_ONLY};
    use crate::reconcile::ReplicateAll;

    fn id(s: &str) -> ClusterId {
        ClusterId(s.to_owned())
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("public", "DEFAULT_GROUP", name)
    }

    /// Routes of the import model over `regions`: every peer into every region.
    fn mesh(regions: &[&str]) -> Vec<Route> {
        let mut routes = Vec::new();
        for to in regions {
            for from in regions.iter().filter(|f| *f != to) {
                routes.push(Route::new(id(from), id(to)).expect("distinct ends"));
            }
        }
        routes
    }

    fn replica(native: &Instance, origin: &str, home: &str) -> Instance {
        native
            .clone()
            .with_metadata(IMPORTED_BY, home)
            .with_metadata("rpl.origin", origin)
    }

    /// A region's name and, per service name, what it shows.
    type Seed<'a> = (&'a str, Vec<(&'a str, Vec<Instance>)>);

    fn views(regions: &[Seed<'_>]) -> BTreeMap<ClusterId, RegionView> {
        regions
            .iter()
            .map(|(r, services)| {
                (
                    id(r),
                    services.iter().map(|(s, i)| (key(s), i.clone())).collect(),
                )
            })
            .collect()
    }

    fn check(home: &str, v: &BTreeMap<ClusterId, RegionView>, routes: &[Route]) -> RegionSync {
        compare(
            &id(home),
            v,
            routes,
            &OriginTags::default(),
            &DemoPolicy {
                region: home.to_owned(),
            },
        )
    }

    #[test]
    fn a_region_holding_every_peer_native_once_is_in_sync() {
        let (a, b) = (Instance::new("10.1.0.1", 80), Instance::new("10.2.0.1", 80));
        let mut served = replica(&b, "west", "east");
        served.instance_id = Some("10.2.0.1#80#DEFAULT#DEFAULT_GROUP@@gateway".into());
        let v = views(&[
            ("east", vec![("gateway", vec![a.clone(), served])]),
            (
                "west",
                vec![("gateway", vec![b.clone(), replica(&a, "east", "west")])],
            ),
        ]);
        let routes = mesh(&["east", "west"]);
        for home in ["east", "west"] {
            let s = check(home, &v, &routes);
            assert!(s.total.in_sync(), "{home}: {s:?}");
            assert_eq!(s.expected, 1);
        }
    }

    #[test]
    fn missing_stale_and_extra_replicas_are_told_apart() {
        let natives = vec![
            Instance::new("10.2.1.1", 8080).with_weight(2.0),
            Instance::new("10.2.1.2", 8080),
        ];
        let old_weight = replica(&Instance::new("10.2.1.1", 8080), "west", "east");
        let gone = replica(&Instance::new("10.2.1.3", 8080), "west", "east");
        let v = views(&[
            ("east", vec![("orders", vec![old_weight, gone])]),
            ("west", vec![("orders", natives)]),
        ]);
        let s = check("east", &v, &mesh(&["east", "west"]));
        assert_eq!(
            s.total,
            Behind {
                missing: 1,
                stale: 1,
                extra: 1
            }
        );
        assert_eq!(s.services.keys().collect::<Vec<_>>(), vec![&key("orders")]);
        assert_eq!(s.total.to_string(), "behind: 1 missing, 1 stale, 1 extra");
    }

    #[test]
    fn a_withdrawn_service_leaves_its_replicas_extra_until_they_go() {
        let copy = replica(&Instance::new("10.2.2.1", 7070), "west", "east");
        let v = views(&[
            ("east", vec![("inventory", vec![copy])]),
            ("west", vec![("inventory", vec![])]),
        ]);
        assert_eq!(
            check("east", &v, &mesh(&["east", "west"])).total,
            Behind {
                extra: 1,
                ..Behind::default()
            }
        );
    }

    #[test]
    fn local_only_natives_are_not_expected_and_own_natives_do_not_count() {
        let admin = Instance::new("10.2.1.9", 9090).with_metadata(LOCAL_ONLY, "true");
        let v = views(&[
            (
                "east",
                vec![("payments", vec![Instance::new("10.1.1.1", 9090)])],
            ),
            ("west", vec![("payments", vec![admin])]),
        ]);
        let s = check("east", &v, &mesh(&["east", "west"]));
        assert!(s.total.in_sync(), "{s:?}");
        assert_eq!(s.expected, 0);
    }

    #[test]
    fn three_regions_expect_one_copy_per_peer_and_ignore_unrouted_origins() {
        fn natives(r: &str, net: u8) -> Seed<'_> {
            (
                r,
                vec![("gateway", vec![Instance::new(format!("10.{net}.0.1"), 80)])],
            )
        }
        let mut v = views(&[natives("east", 1), natives("west", 2), natives("south", 3)]);
        let routes = mesh(&["east", "west", "south"]);
        // east holds west's copy only: south's is missing.
        let east = v
            .get_mut(&id("east"))
            .and_then(|r| r.get_mut(&key("gateway")))
            .expect("seeded");
        east.push(replica(&Instance::new("10.2.0.1", 80), "west", "east"));
        // A copy tagged with an origin no route brings here is not ours to judge.
        east.push(replica(&Instance::new("10.9.0.1", 80), "elsewhere", "east"));
        let s = check("east", &v, &routes);
        assert_eq!(
            s.total,
            Behind {
                missing: 1,
                ..Behind::default()
            }
        );
        assert_eq!(s.expected, 2);
    }

    #[test]
    fn without_a_policy_every_native_is_expected_unchanged_but_tagged() {
        let v = views(&[(
            "west",
            vec![(
                "orders",
                vec![Instance::new("10.2.1.1", 8080).with_metadata(LOCAL_ONLY, "true")],
            )],
        )]);
        let want = expected(
            &id("east"),
            &v,
            &mesh(&["east", "west"]),
            &OriginTags::default(),
            &ReplicateAll,
        );
        let copies = &want[&key("orders")];
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].metadata.get("rpl.origin"), Some("west"));
        assert!(!copies[0].metadata.contains_key(IMPORTED_BY));
    }
}
