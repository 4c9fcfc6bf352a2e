//! The status page behind `/`: the [`Status`] document as one small HTML
//! page for a person, refreshed by the browser every few seconds.
//!
//! Rendered on the server from the same [`Status`] value as `/status`, with
//! no script, no template file and nothing fetched from elsewhere. Every
//! text that comes from outside the agent's own code (cluster ids,
//! namespaces, error messages, server versions) goes through [`escape`].
//!
//! Must not: compute anything the status document does not hold, beyond
//! presentation (durations, times, whether two counts agree).

use std::fmt::Display;

use crate::telemetry::{
    ConnectionStatus, DestinationStatus, ErrorRecord, RouteStatus, SourceStatus, Status,
};

/// How often the page reloads itself, seconds.
pub const REFRESH_SECONDS: u32 = 5;

/// Plain CSS, inline: the page needs nothing from the network.
const STYLE: &str = "
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 28px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:19px;margin:0 12px 0 0;font-weight:600}
header .meta{color:#b8bfcc}
main{padding:8px 28px 28px}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;margin:16px 0;padding:4px 16px 12px}
h2{font-size:15px;margin:10px 0 8px;color:#3a4356}
#summary p{margin:8px 0 4px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 10px 5px 0;border-bottom:1px solid #eceef2;vertical-align:top}
th{font-weight:600;color:#5b6577;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.msg{word-break:break-word;max-width:520px}
.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.when{color:#6b7384;font-size:12px;white-space:nowrap}
.badge{display:inline-block;white-space:nowrap;padding:1px 9px;border-radius:10px;font-size:12px;font-weight:600}
.ok{background:#ddf4e4;color:#17622f}
.warn{background:#fff1cc;color:#7a5500}
.bad{background:#fde0e0;color:#8f1d1d}
.mute{color:#8a92a3}
";

/// The page for `status` as it stands at `now_ms` (milliseconds since the
/// Unix epoch; a parameter so that a test can fix it).
pub fn render(status: &Status, now_ms: u64) -> String {
    let mut p = Page::new(now_ms);
    p.raw("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    p.raw(&format!(
        "<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">"
    ));
    p.raw("<meta name=\"viewport\" content=\"width=device-width\">");
    p.raw("<title>nacos-replicator status</title><style>");
    p.raw(STYLE);
    p.raw("</style></head><body>");
    header(&mut p, status);
    p.raw("<main>");
    summary(&mut p, status);
    routes(&mut p, &status.routes);
    destinations(&mut p, &status.destinations);
    sources(&mut p, &status.sources);
    connections(&mut p, &status.connections);
    errors(&mut p, &status.recent_errors);
    p.raw("</main></body></html>\n");
    p.out
}

/// HTML-escapes `text` for element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page being written: markup goes in raw, outside text escaped.
struct Page {
    out: String,
    now_ms: u64,
}

impl Page {
    fn new(now_ms: u64) -> Self {
        Self {
            out: String::with_capacity(8192),
            now_ms,
        }
    }

    fn raw(&mut self, markup: &str) {
        self.out.push_str(markup);
    }

    fn text(&mut self, text: &str) {
        self.out.push_str(&escape(text));
    }

    /// Opens a section with a heading and a table with these columns
    /// (a column named with a leading `#` is numeric).
    fn table(&mut self, title: &str, columns: &[&str]) {
        self.raw("<section><h2>");
        self.text(title);
        self.raw("</h2><table><thead><tr>");
        for c in columns {
            match c.strip_prefix('#') {
                Some(name) => self.raw(&format!("<th class=\"num\">{}</th>", escape(name))),
                None => self.raw(&format!("<th>{}</th>", escape(c))),
            }
        }
        self.raw("</tr></thead><tbody>");
    }

    fn end_table(&mut self, rows: usize, columns: usize, empty: &str) {
        if rows == 0 {
            self.raw(&format!("<tr><td colspan=\"{columns}\" class=\"mute\">"));
            self.text(empty);
            self.raw("</td></tr>");
        }
        self.raw("</tbody></table></section>");
    }

    /// A row naming what it shows (`data-kind="name"`), for tools and tests.
    fn row(&mut self, kind: &str, name: &str) {
        self.raw(&format!("<tr data-{kind}=\"{}\">", escape(name)));
    }

    /// A cell of outside text.
    fn cell(&mut self, field: &str, text: &str) {
        self.raw(&format!("<td data-field=\"{field}\">"));
        self.text(text);
        self.raw("</td>");
    }

    /// A numeric cell, with an optional class (`warn` when it disagrees).
    fn num(&mut self, field: &str, value: impl Display, class: Option<&str>) {
        let class = class.map(|c| format!(" {c}")).unwrap_or_default();
        self.raw(&format!(
            "<td class=\"num{class}\" data-field=\"{field}\">{value}</td>"
        ));
    }

    /// A badge cell.
    fn badge(&mut self, field: &str, class: &str, label: &str) {
        self.raw(&format!(
            "<td data-field=\"{field}\"><span class=\"badge {class}\">"
        ));
        self.text(label);
        self.raw("</span></td>");
    }

    /// A cell with an optional text (an error's: `mono`) and, below it,
    /// when it happened.
    fn event(&mut self, field: &str, text: Option<&str>, at_ms: Option<u64>, mono: bool) {
        let class = if mono { "msg mono" } else { "msg" };
        self.raw(&format!("<td class=\"{class}\" data-field=\"{field}\">"));
        match text {
            Some(t) => self.text(t),
            None if at_ms.is_none() => self.raw("<span class=\"mute\">none</span>"),
            None => {}
        }
        if let Some(at) = at_ms {
            self.raw(if text.is_some() { "<br>" } else { "" });
            self.when(at);
        }
        self.raw("</td>");
    }

    /// `2026-12-02 04:12:41 UTC (3m 05s ago)`, in a `<span class="when">`.
    fn when(&mut self, at_ms: u64) {
        let relative = if at_ms > self.now_ms {
            format!("in {}", duration(at_ms - self.now_ms))
        } else {
            format!("{} ago", duration(self.now_ms - at_ms))
        };
        self.raw(&format!(
            "<span class=\"when\" data-ms=\"{at_ms}\">{} ({relative})</span>",
            utc(at_ms)
        ));
    }
}

fn header(p: &mut Page, status: &Status) {
    p.raw("<header><h1>nacos-replicator</h1>");
    if status.ready {
        p.raw("<span id=\"ready\" class=\"badge ok\">ready</span>");
    } else {
        p.raw("<span id=\"ready\" class=\"badge warn\">first full sync not done</span>");
    }
    let uptime = duration(p.now_ms.saturating_sub(status.started_at_ms));
    p.raw(&format!(
        "<span class=\"meta\">up <span id=\"uptime\">{uptime}</span>, since {}</span>",
        utc(status.started_at_ms)
    ));
    p.raw(&format!(
        "<span class=\"meta\">as of {}; refreshes every {REFRESH_SECONDS} s; \
         machine-readable: <a href=\"status\" style=\"color:#9cc3ff\">/status</a></span>",
        utc(p.now_ms)
    ));
    p.raw("</header>");
}

/// One line to read first: replicas desired against actual over every
/// destination, and what needs a look.
fn summary(p: &mut Page, status: &Status) {
    let d = status.destinations.values();
    let wanted: usize = d.clone().map(|d| d.replicas_wanted).sum();
    let acked: usize = d.clone().map(|d| d.replicas_acknowledged).sum();
    let busy: usize = d.map(|d| d.queued + d.in_flight).sum();
    let lost = status.sources.values().filter(|s| s.lost).count();
    let down = status
        .connections
        .values()
        .filter(|c| c.state != "connected")
        .count();
    let class = |bad: bool| if bad { "warn" } else { "ok" };
    p.raw("<section id=\"summary\"><p>");
    p.raw(&format!(
        "<span class=\"badge {}\">{acked} of {wanted} replicas acknowledged</span> ",
        class(acked != wanted)
    ));
    p.raw(&format!(
        "<span class=\"badge {}\">{} queued or in flight</span> ",
        class(busy > 0),
        count(busy, "set")
    ));
    p.raw(&format!(
        "<span class=\"badge {}\">{} lost</span> ",
        class(lost > 0),
        count(lost, "source")
    ));
    p.raw(&format!(
        "<span class=\"badge {}\">{} not connected</span>",
        class(down > 0),
        count(down, "connection")
    ));
    p.raw("</p></section>");
}

fn routes(p: &mut Page, routes: &std::collections::BTreeMap<String, RouteStatus>) {
    p.table(
        "Routes",
        &["route", "#services", "#replicas desired", "#skipped"],
    );
    for (name, r) in routes {
        p.row("route", name);
        p.cell("name", name);
        p.num("services", r.services, None);
        p.num("replicas", r.replicas, None);
        p.num("skipped", r.skipped, (r.skipped > 0).then_some("warn"));
        p.raw("</tr>");
    }
    p.end_table(routes.len(), 4, "no routes");
}

fn destinations(p: &mut Page, all: &std::collections::BTreeMap<String, DestinationStatus>) {
    let columns = [
        "destination",
        "state",
        "#desired",
        "#actual",
        "#queued",
        "#in flight",
        "#limit",
        "#applied / retried / failed",
        "#lag last / p99",
        "drift found / repaired",
        "last error",
    ];
    p.table("Destinations (replicas)", &columns);
    for (name, d) in all {
        p.row("destination", name);
        p.cell("name", name);
        let agree = d.replicas_wanted == d.replicas_acknowledged;
        match (agree, d.queued + d.in_flight) {
            (true, 0) => p.badge("state", "ok", "in sync"),
            (_, busy) if busy > 0 => p.badge("state", "warn", "converging"),
            _ => p.badge("state", "bad", "behind"),
        }
        let differs = (!agree).then_some("warn");
        p.num("replicas_wanted", d.replicas_wanted, differs);
        p.num("replicas_acknowledged", d.replicas_acknowledged, differs);
        p.num("queued", d.queued, None);
        p.num("in_flight", d.in_flight, None);
        // The adaptive limit: low while the destination is slow or failing.
        p.num("publish_limit", d.publish_limit, None);
        let failing = (d.failed > 0).then_some("warn");
        let sent = format!("{} / {} / {}", d.applied, d.retried, d.failed);
        p.num("publishes", sent, failing);
        let lag = format!("{} / {}", millis(d.last_lag_ms), millis(d.lag_p99_ms));
        p.num("lag", lag, None);
        let drift = format!(
            "{} / {} ({} read-backs)",
            d.drift_found, d.drift_repaired, d.read_backs
        );
        p.event("drift", Some(&drift), d.last_drift_at_ms, false);
        p.event(
            "last_error",
            d.last_error.as_deref(),
            d.last_error_at_ms,
            true,
        );
        p.raw("</tr>");
    }
    p.end_table(
        all.len(),
        columns.len(),
        "no destination has been written yet",
    );
}

fn sources(p: &mut Page, all: &std::collections::BTreeMap<String, SourceStatus>) {
    let columns = ["source", "state", "#services", "#listings", "lost since"];
    p.table("Sources", &columns);
    for (name, s) in all {
        p.row("source", name);
        p.cell("name", name);
        if !s.lost {
            p.badge("state", "ok", "listed");
        } else {
            p.raw("<td data-field=\"state\">");
            match s.held_until_ms {
                Some(until) => {
                    p.raw("<span class=\"badge warn\">lost, replicas held</span> until ");
                    p.when(until);
                }
                None => p.raw("<span class=\"badge bad\">lost, replicas withdrawn</span>"),
            }
            p.raw("</td>");
        }
        p.num("services", s.services, None);
        p.num("listings", s.listings, None);
        p.event("lost_at", None, s.lost_at_ms, false);
        p.raw("</tr>");
    }
    p.end_table(all.len(), columns.len(), "no source listed yet");
}

fn connections(p: &mut Page, all: &std::collections::BTreeMap<String, ConnectionStatus>) {
    let columns = [
        "connection",
        "state",
        "server",
        "listing",
        "#connects",
        "last error",
    ];
    p.table("Connections", &columns);
    for (name, c) in all {
        p.row("connection", name);
        p.cell("name", name);
        let class = match c.state.as_str() {
            "connected" => "ok",
            "connecting" => "warn",
            _ => "bad",
        };
        p.badge("state", class, &c.state);
        let server = match (&c.server_line, &c.server_version) {
            (Some(line), Some(v)) => format!("{line} ({v})"),
            (Some(line), None) => line.clone(),
            (None, Some(v)) => v.clone(),
            (None, None) => "unknown".to_owned(),
        };
        p.cell("server", &server);
        p.cell("listing", c.listing.as_deref().unwrap_or("-"));
        p.num("connects", c.connects, None);
        p.event(
            "last_error",
            c.last_error.as_deref(),
            c.last_error_at_ms,
            true,
        );
        p.raw("</tr>");
    }
    p.end_table(all.len(), columns.len(), "no connection yet");
}

fn errors(p: &mut Page, all: &[ErrorRecord]) {
    let columns = ["when", "cluster", "operation", "kind", "retried", "message"];
    p.table("Recent errors (newest first)", &columns);
    for e in all {
        p.raw("<tr data-error=\"\"><td>");
        p.when(e.at_ms);
        p.raw("</td>");
        p.cell("cluster", &e.cluster);
        p.cell("operation", &e.operation);
        p.cell("kind", &e.kind);
        p.cell("retrying", if e.retrying { "yes" } else { "no" });
        p.raw("<td class=\"msg mono\" data-field=\"message\">");
        p.text(&e.message);
        p.raw("</td></tr>");
    }
    p.end_table(all.len(), columns.len(), "no errors");
}

/// `1 source`, `2 sources`.
fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// `850 ms`, `-` when unknown.
fn millis(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"))
}

/// `45s`, `12m 05s`, `3h 04m`, `2d 03h`.
fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `2026-12-02 04:12:41 UTC`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_date(secs / 86_400);
    let t = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        t / 3600,
        t % 3600 / 60,
        t % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01: the year is split
/// into 400-year eras of 146,097 days, each counted from March 1 so that
/// the leap day falls at the end of a year.
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
#[path = "page_tests.rs"]
mod tests;
