use super::*;
use crate::telemetry::{ConnectionStatus, DestinationStatus, ErrorRecord, SourceStatus};

/// 2026-12-02 04:00:00 UTC.
const NOW: u64 = 1_796_184_000_000;

fn row<'a>(page: &'a str, kind: &str, name: &str) -> &'a str {
    let start = format!("<tr data-{kind}=\"{}\">", escape(name));
    let at = page
        .find(&start)
        .unwrap_or_else(|| panic!("no row {start} in\n{page}"));
    let rest = &page[at..];
    &rest[..rest.find("</tr>").unwrap_or(rest.len())]
}

fn field(row: &str, name: &str, value: &str) -> bool {
    row.contains(&format!("data-field=\"{name}\">{value}<"))
}

fn sample() -> Status {
    let mut s = Status {
        ready: true,
        started_at_ms: NOW - 3_725_000,
        ..Status::default()
    };
    s.routes.insert(
        "sh -> hz".into(),
        RouteStatus {
            services: 4,
            replicas: 12,
            skipped: 1,
        },
    );
    s.destinations.insert(
        "hz/public".into(),
        DestinationStatus {
            replicas_wanted: 12,
            replicas_acknowledged: 9,
            queued: 2,
            in_flight: 1,
            publish_limit: 24,
            last_lag_ms: Some(40),
            lag_p99_ms: Some(870),
            last_error: Some("orders: <b>refused</b>".into()),
            last_error_at_ms: Some(NOW - 5_000),
            ..DestinationStatus::default()
        },
    );
    s.sources.insert(
        "sh/public".into(),
        SourceStatus {
            services: 4,
            listings: 2,
            lost: true,
            lost_at_ms: Some(NOW - 20_000),
            held_until_ms: Some(NOW + 40_000),
        },
    );
    s.sources.insert(
        "sg/public".into(),
        SourceStatus {
            lost: true,
            lost_at_ms: Some(NOW - 1_000),
            ..SourceStatus::default()
        },
    );
    s.connections.insert(
        "hz/public".into(),
        ConnectionStatus {
            state: "connected".into(),
            server_line: Some("2.x".into()),
            server_version: Some("2.3.2".into()),
            connects: 1,
            ..ConnectionStatus::default()
        },
    );
    s.recent_errors.push(ErrorRecord {
        at_ms: NOW - 5_000,
        cluster: "hz".into(),
        operation: "publish".into(),
        kind: "server".into(),
        message: "<script>alert('x')</script> & more".into(),
        retrying: true,
    });
    s
}

#[test]
fn outside_text_is_escaped() {
    let page = render(&sample(), NOW);
    assert!(
        !page.contains("<script>"),
        "markup from an error ran:\n{page}"
    );
    assert!(!page.contains("<b>refused"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more"),
        "{page}"
    );
    assert!(
        page.contains("orders: &lt;b&gt;refused&lt;/b&gt;"),
        "{page}"
    );
    // Names in attributes too: `->` must not end up as a raw `>`.
    assert!(page.contains("<tr data-route=\"sh -&gt; hz\">"), "{page}");
    assert_eq!(escape("a\"b'c"), "a&quot;b&#39;c");
}

#[test]
fn counts_times_and_holds_appear() {
    let page = render(&sample(), NOW);
    assert!(page.contains("http-equiv=\"refresh\""), "no refresh");
    assert!(page.contains("<span id=\"uptime\">1h 02m</span>"), "{page}");
    assert!(page.contains("badge ok\">ready"), "{page}");

    assert!(
        page.contains("badge warn\">9 of 12 replicas acknowledged")
            && page.contains(">2 sources lost<"),
        "{page}"
    );

    let route = row(&page, "route", "sh -> hz");
    assert!(
        field(route, "services", "4") && field(route, "replicas", "12"),
        "{route}"
    );

    let dest = row(&page, "destination", "hz/public");
    for (name, value) in [
        ("replicas_wanted", "12"),
        ("replicas_acknowledged", "9"),
        ("queued", "2"),
        ("in_flight", "1"),
        ("publish_limit", "24"),
        ("lag", "40 ms / 870 ms"),
    ] {
        assert!(
            dest.contains(&format!("data-field=\"{name}\">{value}<")),
            "{name}={value} missing in {dest}"
        );
    }
    assert!(dest.contains("converging"), "{dest}");
    assert!(dest.contains("2026-12-02 03:59:55 UTC (5s ago)"), "{dest}");

    let held = row(&page, "source", "sh/public");
    assert!(held.contains("replicas held"), "{held}");
    assert!(held.contains("until <span class=\"when\""), "{held}");
    assert!(held.contains("2026-12-02 04:00:40 UTC (in 40s)"), "{held}");
    let withdrawn = row(&page, "source", "sg/public");
    assert!(withdrawn.contains("replicas withdrawn"), "{withdrawn}");

    let conn = row(&page, "connection", "hz/public");
    assert!(field(conn, "server", "2.x (2.3.2)"), "{conn}");
}

#[test]
fn an_empty_status_still_renders_every_section() {
    let page = render(&Status::default(), 0);
    assert!(page.contains("first full sync not done"), "{page}");
    for empty in ["no routes", "no source listed yet", "no errors"] {
        assert!(page.contains(empty), "{empty} missing");
    }
}

#[test]
fn dates_and_durations() {
    assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    assert_eq!(utc(NOW + 3_661_000), "2026-12-02 05:01:01 UTC");
    assert_eq!(utc(4_107_456_000_000), "2100-02-28 00:00:00 UTC");
    assert_eq!(utc(4_107_542_400_000), "2100-03-01 00:00:00 UTC");
    assert_eq!(duration(59_999), "59s");
    assert_eq!(duration(61_000), "1m 01s");
    assert_eq!(duration(90_061_000), "1d 01h");
}
