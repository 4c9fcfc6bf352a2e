//! The demo's terminal view: one text block per round, built from what the
//! regions show, the sync comparison and each agent's telemetry.
//!
//! Pure: a [`Frame`] in, a `String` out; whether it is redrawn in place or
//! appended is the caller's choice. Must not: query anything, or colour
//! anything (the block reads the same in a log file).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use super::schedule::SERVICES;
use super::sync::{RegionSync, RegionView};
use crate::model::{ClusterId, Instance, ServiceKey};
use crate::reconcile::OriginTags;
use crate::telemetry::{Event, Status};

/// How many recent events a region's line keeps.
const RECENT: usize = 3;

/// What an agent's events said since the demo started: counts, and the
/// latest few in words.
#[derive(Debug, Clone, Default)]
pub struct EventTally {
    /// Non-empty sets acknowledged.
    pub replicated: u64,
    /// Withdrawals acknowledged.
    pub withdrawn: u64,
    /// Errors reported.
    pub errors: u64,
    /// Events the reader missed (the channel overflowed).
    pub missed: u64,
    /// The latest, newest last.
    pub recent: VecDeque<String>,
}

impl EventTally {
    /// Counts one event, and keeps it in words when it is worth a line.
    pub fn record(&mut self, event: &Event) {
        let line = match event {
            Event::Replicated {
                service,
                replicas,
                lag,
                ..
            } => {
                self.replicated += 1;
                format!("replicated {} x{replicas}{}", service.name, lag_note(*lag))
            }
            Event::Withdrawn { service, lag, .. } => {
                self.withdrawn += 1;
                format!("withdrawn {}{}", service.name, lag_note(*lag))
            }
            Event::Error {
                cluster,
                operation,
                message,
                ..
            } => {
                self.errors += 1;
                format!("error on {cluster} ({operation}): {message}")
            }
            Event::Ready => "first full sync done".to_owned(),
            Event::SourceLost { cluster, .. } => format!("source {cluster} lost"),
            Event::Drift {
                service,
                missing,
                different,
                ..
            } => {
                format!(
                    "drift in {}: {missing} missing, {different} different",
                    service.name
                )
            }
            _ => return,
        };
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }
}

fn lag_note(lag: Option<Duration>) -> String {
    lag.map_or(String::new(), |l| format!(" ({} ms)", l.as_millis()))
}

/// One region in a frame.
#[derive(Debug, Clone)]
pub struct RegionReport {
    /// Its name.
    pub region: ClusterId,
    /// What it shows, or why it could not be read.
    pub shown: Result<RegionView, String>,
    /// Compared with its peers; `None` when it or a peer could not be read.
    pub sync: Option<RegionSync>,
    /// Its agent's status document.
    pub status: Status,
    /// Its agent's events so far.
    pub events: EventTally,
}

/// Everything one block of the view shows.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The heading (`round 3 of 5`, `final`).
    pub title: String,
    /// What the applications changed last, one line each.
    pub changes: Vec<String>,
    /// The regions, in start order.
    pub regions: Vec<RegionReport>,
}

/// The block for one frame, every line ending in a newline.
pub fn render(frame: &Frame, tags: &OriginTags) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "== {} ==", frame.title);
    if !frame.changes.is_empty() {
        let _ = writeln!(out, "applications: {}", frame.changes.join("; "));
    }
    for r in &frame.regions {
        let verdict = match &r.sync {
            Some(s) if s.total.in_sync() => format!("in sync ✓ ({} replicas expected)", s.expected),
            Some(s) => format!("{} ({} replicas expected)", s.total, s.expected),
            None => "unknown (a region could not be read)".to_owned(),
        };
        let _ = writeln!(out, "{:<6} {verdict}", r.region);
        match &r.shown {
            Ok(view) => render_services(&mut out, view, r.sync.as_ref(), tags),
            Err(e) => {
                let _ = writeln!(out, "  unreadable: {e}");
            }
        }
        let s = &r.status;
        let replicas: usize = s.routes.values().map(|route| route.replicas).sum();
        let applied: u64 = s.destinations.values().map(|d| d.applied).sum();
        let lag = s.destinations.values().filter_map(|d| d.last_lag_ms).max();
        let _ = writeln!(
            out,
            "  agent: ready {} | replicas {replicas} | publishes applied {applied} | last lag {}",
            if s.ready { "yes" } else { "no" },
            lag.map_or("-".to_owned(), |l| format!("{l} ms"))
        );
        let e = &r.events;
        let missed = if e.missed > 0 {
            format!(", {} missed", e.missed)
        } else {
            String::new()
        };
        let recent: Vec<&str> = e.recent.iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "  events: {} replicated, {} withdrawn, {} errors{missed} | {}",
            e.replicated,
            e.withdrawn,
            e.errors,
            if recent.is_empty() {
                "-".to_owned()
            } else {
                recent.join(" · ")
            }
        );
    }
    out
}

/// One line per service: natives, replicas by origin, and what lags.
fn render_services(
    out: &mut String,
    view: &RegionView,
    sync: Option<&RegionSync>,
    tags: &OriginTags,
) {
    // The demo's services first, in their order; anything else after.
    let rank = |name: &str| {
        SERVICES
            .iter()
            .position(|s| *s == name)
            .unwrap_or(SERVICES.len())
    };
    // Services the region lacks but should hold replicas of are listed too.
    let lacking = sync
        .into_iter()
        .flat_map(|s| s.services.keys())
        .filter(|k| !view.contains_key(*k));
    let mut services: Vec<(&ServiceKey, &[Instance])> = view
        .iter()
        .map(|(k, v)| (k, v.as_slice()))
        .chain(lacking.map(|k| (k, &[][..])))
        .collect();
    services.sort_by(|(a, _), (b, _)| (rank(&a.name), &a.name).cmp(&(rank(&b.name), &b.name)));
    for (service, instances) in services {
        let natives = instances.iter().filter(|i| tags.is_native(i)).count();
        let mut origins: BTreeMap<&str, usize> = BTreeMap::new();
        for origin in instances.iter().filter_map(|i| tags.origin_of(i)) {
            *origins.entry(origin).or_default() += 1;
        }
        let mut line = if natives == 0 && origins.is_empty() {
            "(empty)".to_owned()
        } else if natives == 0 {
            "no native".to_owned()
        } else {
            format!("{natives} native")
        };
        if !origins.is_empty() {
            let copies: Vec<String> = origins
                .iter()
                .map(|(o, n)| format!("{n} from {o}"))
                .collect();
            let _ = write!(line, " | {}", copies.join(", "));
        }
        if let Some(behind) = sync.and_then(|s| s.services.get(service)) {
            let _ = write!(line, "   <- {behind}");
        }
        let _ = writeln!(out, "  {:<10} {line}", service.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::sync::Behind;

    #[test]
    fn a_region_line_shows_natives_copies_by_origin_and_what_lags() {
        let key = |n: &str| ServiceKey::new("public", "DEFAULT_GROUP", n);
        let copy =
            |ip: &str, origin: &str| Instance::new(ip, 80).with_metadata("rpl.origin", origin);
        let view: RegionView = [
            (
                key("orders"),
                vec![
                    Instance::new("10.1.0.1", 80),
                    Instance::new("10.1.0.2", 80),
                    copy("10.2.0.1", "west"),
                ],
            ),
            (
                key("gateway"),
                vec![copy("10.2.0.2", "west"), copy("10.3.0.2", "south")],
            ),
            (key("inventory"), vec![]),
        ]
        .into_iter()
        .collect();
        let mut sync = RegionSync {
            expected: 3,
            ..RegionSync::default()
        };
        let behind = Behind {
            missing: 1,
            ..Behind::default()
        };
        sync.services.insert(key("orders"), behind);
        sync.services.insert(key("payments"), behind);
        sync.total = Behind {
            missing: 2,
            ..Behind::default()
        };
        let frame = Frame {
            title: "round 1 of 3".into(),
            changes: vec!["east registers orders (2)".into()],
            regions: vec![RegionReport {
                region: ClusterId("east".into()),
                shown: Ok(view),
                sync: Some(sync),
                status: Status::default(),
                events: EventTally::default(),
            }],
        };
        let text = render(&frame, &OriginTags::default());
        assert!(
            text.contains("east   behind: 2 missing (3 replicas expected)"),
            "{text}"
        );
        assert!(
            text.contains("  payments   (empty)   <- behind: 1 missing\n"),
            "{text}"
        );
        assert!(
            text.contains("  gateway    no native | 1 from south, 1 from west\n"),
            "{text}"
        );
        assert!(
            text.contains("  orders     2 native | 1 from west   <- behind: 1 missing\n"),
            "{text}"
        );
        assert!(text.contains("  inventory  (empty)\n"), "{text}");
        assert!(
            text.contains("agent: ready no | replicas 0 | publishes applied 0 | last lag -"),
            "{text}"
        );
        // gateway comes before orders, as the demo lists them.
        assert!(
            text.find("gateway").unwrap_or(usize::MAX) < text.find("orders   ").unwrap_or(0),
            "{text}"
        );
    }
}
