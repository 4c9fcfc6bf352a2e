//! `nacos-replicator drill`: starts a DR drill on a running agent (`POST
//! /drill` on its status server), or ends one (`--end`), then follows it
//! (`GET /drill`) and prints its timeline as it happens, one line per step.
//! Exits 0 once the drill has converged after the restore; 1 when the agent
//! refuses, the drill is cut short by the agent stopping, or it does not
//! converge in time.
//!
//! The status server speaks plain HTTP/1.1 on a loopback (or private)
//! address; a request is a few lines over a TCP stream, so no HTTP client
//! library is pulled in for it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use nacos_replicator::config;
use nacos_replicator::status::drill::{Drill, Phase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::UsageError;

/// The variable the token is read from when the agent is named by `--status`.
const TOKEN_VAR: &str = "NACOS_REPLICATOR_CONTROL_TOKEN";

/// How often a drill is looked at while it is followed.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// Failed looks in a row after which the agent is taken as gone.
const GONE_AFTER: u32 = 6;

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("agent").required(true).args(["status", "config"]))]
pub(crate) struct DrillArgs {
    /// The source cluster to treat as lost (a cluster id of the agent's configuration).
    #[arg(long, requires = "duration", conflicts_with = "end")]
    isolate: Option<String>,
    /// How long, as `90s`, `10m` (at most a day).
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// End the running drill now (the source is relisted), then follow it.
    #[arg(long)]
    end: bool,
    /// The agent's status server, as `http://127.0.0.1:9787` or `127.0.0.1:9787`.
    /// The token, if the agent needs one, is read from NACOS_REPLICATOR_CONTROL_TOKEN.
    #[arg(long)]
    status: Option<String>,
    /// The agent's TOML configuration: its `agent.status_listen` and the
    /// token from the variable its `agent.control_token_env` names.
    #[arg(long)]
    config: Option<PathBuf>,
    /// How long after the isolation ends the drill may take to converge.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    converge_within: Duration,
}

/// Where the agent is and how to speak to it.
struct Agent {
    addr: SocketAddr,
    token: Option<String>,
}

pub(crate) async fn drill(args: DrillArgs) -> anyhow::Result<()> {
    let agent = agent(&args)?;
    let drill = if let Some(source) = &args.isolate {
        let Some(duration) = args.duration else {
            bail!(UsageError("--isolate needs --for".into()));
        };
        let body = serde_json::json!({
            "isolate": source,
            "for": humantime::format_duration(duration).to_string(),
        });
        let (code, doc) = agent.call("POST", Some(&body.to_string())).await?;
        accepted(code, &doc, 201)?
    } else if args.end {
        let (code, doc) = agent.call("DELETE", None).await?;
        accepted(code, &doc, 200)?
    } else {
        let (code, doc) = agent.call("GET", None).await?;
        accepted(code, &doc, 200)?
    };
    println!(
        "drill {} on {}: isolated for {} (source_loss = {}, hold_for {})",
        drill.id,
        drill.source,
        humantime::format_duration(Duration::from_millis(drill.duration_ms)),
        drill.source_loss,
        humantime::format_duration(Duration::from_millis(drill.hold_for_ms)),
    );
    follow(&agent, drill, args.converge_within).await
}

/// The address and token, from `--status` or `--config`.
fn agent(args: &DrillArgs) -> anyhow::Result<Agent> {
    if let Some(status) = &args.status {
        let bare = status.trim_start_matches("http://").trim_end_matches('/');
        if bare.contains("://") {
            bail!(UsageError(format!(
                "--status {status}: only plain http:// is spoken"
            )));
        }
        let addr = bare
            .parse()
            .map_err(|e| UsageError(format!("--status {status}: not host:port: {e}")))?;
        let token = std::env::var(TOKEN_VAR)
            .ok()
            .filter(|t| !t.trim().is_empty());
        return Ok(Agent { addr, token });
    }
    let Some(path) = &args.config else {
        bail!(UsageError("give --status or --config".into()));
    };
    // Offline: the cluster passwords are not needed here, the token is.
    let env = |key: &str| std::env::var(key).ok();
    let (config, unset) =
        config::load_offline(path, &env).map_err(|e| UsageError(e.to_string()))?;
    if let Some(u) = unset.iter().find(|u| u.key == "agent.control_token_env") {
        bail!(UsageError(format!("{u}: the agent requires its token")));
    }
    let mut addr = config.status_listen;
    // An agent listening on every address is reached on loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(Agent {
        addr,
        token: config.control_token.map(|t| t.0),
    })
}

/// The drill document of a `want` answer, or the agent's reason.
fn accepted(code: u16, body: &str, want: u16) -> anyhow::Result<Drill> {
    if code == want {
        return serde_json::from_str(body).with_context(|| format!("reading the drill: {body}"));
    }
    let reason = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned());
    bail!("the agent refused ({code}): {reason}")
}

/// Prints each step as it comes; returns once the drill converged.
async fn follow(agent: &Agent, mut drill: Drill, converge_within: Duration) -> anyhow::Result<()> {
    let mut shown = 0;
    let mut failures = 0;
    let mut every = tokio::time::interval(FOLLOW_EVERY);
    loop {
        for step in &drill.timeline[shown.min(drill.timeline.len())..] {
            println!(
                "{:>9}  {:<18} {}",
                format!("+{:.1}s", step.elapsed_ms as f64 / 1000.0),
                step.step.name(),
                step.detail
            );
        }
        shown = drill.timeline.len();
        match drill.phase {
            Phase::Converged => {
                let took = drill.timeline.last().map_or(0, |s| s.elapsed_ms);
                println!(
                    "drill {} converged {:.1}s after it started",
                    drill.id,
                    took as f64 / 1000.0
                );
                return Ok(());
            }
            Phase::Stopped => bail!("the agent stopped during drill {}", drill.id),
            Phase::Isolated | Phase::Restoring => {}
        }
        // The isolation's end as the agent set it, plus the grace to converge.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        if now_ms > u128::from(drill.ends_at_ms) + converge_within.as_millis() {
            bail!(
                "drill {} has not converged {} after its isolation ended",
                drill.id,
                humantime::format_duration(converge_within)
            );
        }
        every.tick().await;
        match agent.call("GET", None).await {
            Ok((200, body)) => {
                failures = 0;
                let next: Drill = serde_json::from_str(&body)
                    .with_context(|| format!("reading the drill: {body}"))?;
                if next.id != drill.id {
                    bail!("drill {} was replaced by drill {}", drill.id, next.id);
                }
                drill = next;
            }
            Ok((code, body)) => bail!("GET /drill answered {code}: {}", body.trim()),
            Err(e) => {
                failures += 1;
                if failures >= GONE_AFTER {
                    return Err(e.context(format!("the agent at {} stopped answering", agent.addr)));
                }
            }
        }
    }
}

impl Agent {
    /// One request to `/drill`: status code and body.
    async fn call(&self, method: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(self.addr).await?;
            let mut request = format!(
                "{method} /drill HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
                self.addr
            );
            if let Some(token) = &self.token {
                request += &format!("Authorization: Bearer {token}\r\n");
            }
            let body = body.unwrap_or("");
            if !body.is_empty() {
                request += "Content-Type: application/json\r\n";
            }
            request += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
            stream.write_all(request.as_bytes()).await?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await?;
            Ok::<_, std::io::Error>(raw)
        };
        let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| anyhow::anyhow!("no answer from {} within 10s", self.addr))?
            .with_context(|| format!("{method} http://{}/drill", self.addr))?;
        let raw = String::from_utf8_lossy(&raw);
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP answer from {}: {head:?}", self.addr))?;
        Ok((code, body.to_owned()))
    }
}
