//! The sample applications: what each region registers in each round, and
//! the demo's custom [`Policy`].
//!
//! Pure: the natives of a round are a function of the round number and the
//! number of regions, so a round can be described (what changed) and
//! tested without a server. Within three rounds the schedule scales a
//! service up and down, changes a weight and a metadata value, and removes
//! and re-adds a service; one instance is marked to stay home.

use std::collections::BTreeMap;

use crate::model::{Instance, ServiceKey};
use crate::reconcile::{Policy, Route};

/// Region names, in start order (`--regions 2` runs the first two).
pub const REGIONS: [&str; 3] = ["east", "west", "south"];

/// The sample services, in display order.
pub const SERVICES: [&str; 4] = ["gateway", "orders", "payments", "inventory"];

/// Metadata that keeps a native in its own region (see [`DemoPolicy`]).
pub const LOCAL_ONLY: &str = "local-only";

/// Metadata the policy writes on every copy: the region that imported it.
pub const IMPORTED_BY: &str = "imported-by";

/// The demo's policy, one per agent: natives marked [`LOCAL_ONLY`] are not
/// copied, and every copy names the region that imported it. It shows the
/// `Policy` surface; the origin tag is still written by the engine.
#[derive(Debug, Clone)]
pub struct DemoPolicy {
    /// The agent's home region.
    pub region: String,
}

impl Policy for DemoPolicy {
    fn admits(&self, _route: &Route, _service: &ServiceKey, native: &Instance) -> bool {
        native.metadata.get(LOCAL_ONLY) != Some("true")
    }

    fn transform(&self, _route: &Route, _service: &ServiceKey, copy: Instance) -> Instance {
        copy.with_metadata(IMPORTED_BY, self.region.clone())
    }
}

/// What region number `region` (0-based) of `regions` registers in `round`
/// (1-based; round 0 registers nothing), per service. A service of the
/// demo that is absent or empty is withdrawn by its application.
pub fn natives(region: usize, regions: usize, round: u64) -> BTreeMap<&'static str, Vec<Instance>> {
    let mut out: BTreeMap<&'static str, Vec<Instance>> =
        SERVICES.iter().map(|s| (*s, Vec::new())).collect();
    if round == 0 || region >= regions {
        return out;
    }
    let net = region + 1;
    // Every region runs a gateway (each region shows one native and one copy
    // per peer), whose version goes up every other round.
    let version = format!("v{}", 1 + round / 2);
    out.insert(
        "gateway",
        vec![Instance::new(format!("10.{net}.0.1"), 80).with_metadata("version", version)],
    );
    if region == 0 {
        // orders scales 2, 3, 1, 2, 3, 1, ...
        out.insert(
            "orders",
            (1..=1 + round % 3)
                .map(|k| Instance::new(format!("10.{net}.1.{k}"), 8080))
                .collect(),
        );
    }
    if region == 1 {
        // payments changes its weight every round; its admin instance stays home.
        out.insert(
            "payments",
            vec![
                Instance::new(format!("10.{net}.1.1"), 9090).with_weight(1.0 + (round % 2) as f64),
                Instance::new(format!("10.{net}.1.9"), 9090).with_metadata(LOCAL_ONLY, "true"),
            ],
        );
    }
    if region + 1 == regions && round % 3 != 2 {
        // inventory, in the last region, is removed every third round and re-added the next.
        out.insert(
            "inventory",
            (1..=2)
                .map(|k| Instance::new(format!("10.{net}.2.{k}"), 7070))
                .collect(),
        );
    }
    out
}

/// One line per change a region's applications make from `round - 1` to
/// `round`, for the view (`east scales orders 3 -> 1`).
pub fn describe(region: usize, regions: usize, round: u64) -> Vec<String> {
    let name = REGIONS.get(region).copied().unwrap_or("?");
    let before = natives(region, regions, round.saturating_sub(1));
    let after = natives(region, regions, round);
    let mut lines = Vec::new();
    for service in SERVICES {
        let (old, new) = (&before[service], &after[service]);
        if old == new {
            continue;
        }
        let line = match (old.len(), new.len()) {
            (0, n) => format!("{name} registers {service} ({n})"),
            (_, 0) => format!("{name} removes {service}"),
            (a, b) if a != b => format!("{name} scales {service} {a} -> {b}"),
            _ => format!(
                "{name} changes {service}: {}",
                what_changed(old, new).join(", ")
            ),
        };
        lines.push(line);
    }
    lines
}

/// Weight and metadata changes between two sets of the same size.
fn what_changed(old: &[Instance], new: &[Instance]) -> Vec<String> {
    let shown = |i: &Instance| {
        i.metadata
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut changes = Vec::new();
    for (a, b) in old.iter().zip(new) {
        if a.weight != b.weight {
            changes.push(format!(
                "{} weight {} -> {}",
                a.address(),
                a.weight,
                b.weight
            ));
        }
        if a.metadata != b.metadata {
            changes.push(format!(
                "{} metadata {} -> {}",
                a.address(),
                shown(a),
                shown(b)
            ));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_the_demo_promises_happens_within_three_rounds() {
        let lines: Vec<String> = (1..=4)
            .flat_map(|r| (0..2).flat_map(move |g| describe(g, 2, r)))
            .collect();
        let has = |s: &str| lines.iter().any(|l| l.contains(s));
        assert!(has("east registers orders (2)"), "{lines:#?}");
        assert!(has("east scales orders 2 -> 3"), "{lines:#?}");
        assert!(has("east scales orders 3 -> 1"), "{lines:#?}");
        assert!(
            has("east changes gateway: 10.1.0.1:80 metadata version=v1 -> version=v2"),
            "{lines:#?}"
        );
        assert!(
            has("west changes payments: 10.2.1.1:9090 weight 2 -> 1"),
            "{lines:#?}"
        );
        assert!(has("west removes inventory"), "{lines:#?}");
        assert!(has("west registers inventory (2)"), "{lines:#?}");
    }

    #[test]
    fn the_last_region_owns_inventory_and_every_region_a_gateway() {
        for regions in [2, 3] {
            for region in 0..regions {
                let n = natives(region, regions, 1);
                assert_eq!(n["gateway"].len(), 1);
                assert_eq!(
                    n["inventory"].is_empty(),
                    region + 1 != regions,
                    "region {region} of {regions}"
                );
            }
        }
        assert!(natives(0, 2, 0).values().all(Vec::is_empty));
    }

    #[test]
    fn the_policy_keeps_local_only_natives_home_and_labels_copies() {
        let policy = DemoPolicy {
            region: "east".into(),
        };
        let route = Route::new(
            crate::model::ClusterId("west".into()),
            crate::model::ClusterId("east".into()),
        );
        let route = route.expect("distinct ends");
        let key = ServiceKey::new("public", "DEFAULT_GROUP", "payments");
        let payments = &natives(1, 2, 1)["payments"];
        let admitted: Vec<&Instance> = payments
            .iter()
            .filter(|i| policy.admits(&route, &key, i))
            .collect();
        assert_eq!(admitted.len(), 1);
        let copy = policy.transform(&route, &key, admitted[0].clone());
        assert_eq!(copy.metadata.get(IMPORTED_BY), Some("east"));
    }
}
