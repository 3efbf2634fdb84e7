//! `ganomalyd watch`: subscribe to a daemon's topics and print what it says,
//! readably or as JSON lines (`--json`), for commissioning and debugging.
//!
//! [`run`] blocks on a current-thread runtime of its own; [`run_to`] is the
//! async body (tests drive it on theirs).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

use crate::events::{AlarmEvent, ScoreEvent, StatsReport};
use crate::publish::MqttConfig;

/// `ganomalyd watch [--config FILE] [--host H] [--port P] [--prefix P] [--node N] [--camera C] [--json] [--no-scores] [--count N]`
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Daemon config whose `[mqtt]` section gives broker, TLS, credentials,
    /// topic prefix and node (flags below override it).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Broker host [default: 127.0.0.1, or the config's].
    #[arg(long)]
    pub host: Option<String>,
    /// Broker port [default: 1883, or the config's].
    #[arg(long)]
    pub port: Option<u16>,
    /// Topic prefix [default: ganomalyd, or the config's].
    #[arg(long)]
    pub prefix: Option<String>,
    /// Node id to watch; `+` watches every daemon under the prefix [default: +, or the config's].
    #[arg(long)]
    pub node: Option<String>,
    /// Only this camera.
    #[arg(long)]
    pub camera: Option<String>,
    /// One JSON object per line: {topic, node, camera, kind, retained, payload}.
    #[arg(long)]
    pub json: bool,
    /// Hide the per-frame scores (alarms, state and status only).
    #[arg(long)]
    pub no_scores: bool,
    /// Exit after printing this many messages.
    #[arg(long)]
    pub count: Option<u64>,
}

/// Runs until Ctrl-C (or `--count` messages), printing to stdout.
pub fn run(args: WatchArgs) -> anyhow::Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run_to(args, &mut std::io::stdout()))?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// [`run`] writing to `out` (tests capture it).
pub async fn run_to<W: Write + Send>(args: WatchArgs, out: &mut W) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(path) => mqtt_section(path)?,
        None => MqttConfig { node_id: "+".into(), ..MqttConfig::default() },
    };
    if let Some(h) = &args.host {
        cfg.host = h.clone();
        cfg.embedded = false;
    }
    if let Some(p) = args.port {
        cfg.port = p;
        cfg.embedded = false;
    }
    if let Some(p) = &args.prefix {
        cfg.topic_prefix = p.clone();
    }
    let node = args.node.clone().unwrap_or_else(|| {
        if cfg.node_id.is_empty() {
            cfg.resolved_node_id()
        } else {
            cfg.node_id.clone()
        }
    });
    let (host, port) = if cfg.embedded {
        (cfg.embedded_listen.ip().to_string(), cfg.embedded_listen.port())
    } else {
        (cfg.host.clone(), cfg.port)
    };
    let filter = format!("{}/{}/#", cfg.topic_prefix.trim_end_matches('/'), node);

    let client_id = format!("ganomalyd-watch-{}-{}", std::process::id(), rand::random::<u32>());
    let mut opts = MqttOptions::new(client_id, host.clone(), port);
    opts.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(16 << 20, 1 << 20);
    crate::publish::mqtt::secure(&mut opts, &cfg)?;
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut printed = 0u64;
    let mut failures = 0u32;
    loop {
        let polled = tokio::select! {
            r = eventloop.poll() => r,
            _ = tokio::signal::ctrl_c() => break,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                eprintln!("watching {filter} on {host}:{port}");
                client.subscribe(filter.clone(), QoS::AtLeastOnce).await.context("subscribe")?;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some(line) = format_message(&p.topic, &p.payload, p.retain, &args) else { continue };
                writeln!(out, "{line}")?;
                out.flush()?;
                printed += 1;
                if args.count.is_some_and(|n| printed >= n) {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                eprintln!("mqtt {host}:{port}: {e}");
                if failures >= 3 && printed == 0 && args.count.is_some() {
                    anyhow::bail!("cannot reach the broker at {host}:{port}: {e}");
                }
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
        }
    }
    let _ = client.try_disconnect();
    Ok(())
}

/// The `[mqtt]` section of a daemon config, relative paths resolved as the
/// daemon resolves them (against the config file's directory).
/// Only parsed, not compiled: the watching machine need not have the models
/// or cameras the config names.
fn mqtt_section(path: &std::path::Path) -> anyhow::Result<MqttConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file = crate::config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(file.mqtt.map(|m| m.resolved(&crate::base::paths::config_dir(path))).unwrap_or_default())
}

/// `HH:MM:SS.mmm` (UTC) of a ms timestamp.
fn clock(ts_ms: u64) -> String {
    let s = ts_ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}.{:03}Z", s / 3600, s / 60 % 60, s % 60, ts_ms % 1000)
}

/// One printed line for a message, or None when filtered out. Topic shape:
/// `<prefix…>/<node>/status|stats` or `<prefix…>/<node>/<camera>/<leaf>`
/// (the prefix may itself have several levels, so parse from the end).
pub fn format_message(topic: &str, payload: &[u8], retained: bool, args: &WatchArgs) -> Option<String> {
    let levels: Vec<&str> = topic.split('/').collect();
    let last = *levels.last()?;
    let n = levels.len();
    // A shadow model's topics are `<camera>/shadow/<leaf>` (see `shadow.rs`).
    let shadow = n >= 4 && levels[n - 2] == "shadow" && matches!(last, "score" | "alarm" | "state");
    let (node, camera, kind) = match last {
        "status" | "stats" if n >= 2 => (levels[n - 2], None, last),
        _ if shadow => (levels[n - 4], Some(crate::shadow::publish_name(levels[n - 3])), last),
        _ if n >= 3 => (levels[n - 3], Some(levels[n - 2].to_string()), last),
        _ => return None,
    };
    let camera = camera.as_deref();
    if let (Some(want), Some(cam)) = (&args.camera, camera) {
        // `--camera line3` shows its shadow too.
        if want != cam && crate::shadow::publish_name(want) != cam {
            return None;
        }
    }
    if args.no_scores && kind == "score" {
        return None;
    }
    let text = || String::from_utf8_lossy(payload).into_owned();
    if args.json {
        let body = match kind {
            "snapshot" => json!({ "bytes": payload.len() }),
            _ => serde_json::from_slice::<Value>(payload).unwrap_or_else(|_| Value::String(text())),
        };
        let v = json!({ "topic": topic, "node": node, "camera": camera, "kind": kind, "retained": retained, "payload": body });
        return Some(v.to_string());
    }
    let who = match camera {
        Some(c) => format!("{node}/{c}"),
        None => node.to_string(),
    };
    let now = clock(crate::events::now_ms());
    let r = if retained { " (retained)" } else { "" };
    let line = match kind {
        "score" => match serde_json::from_slice::<ScoreEvent>(payload) {
            Ok(s) => format!(
                "{} {who:<20} score {:.3}{} raw {:.5} thr {:.5} {} seq {} {:.1} ms",
                clock(s.ts),
                s.score,
                if s.score >= 0.5 { " !" } else { "  " },
                s.raw_score,
                s.threshold,
                s.kind,
                s.seq,
                s.latency_ms
            ),
            Err(_) => format!("{now} {who:<20} score ? {}", text()),
        },
        "alarm" => match serde_json::from_slice::<AlarmEvent>(payload) {
            Ok(a) => {
                let what = match a.kind {
                    crate::events::AlarmKind::Start => "ALARM START".to_string(),
                    crate::events::AlarmKind::End => {
                        let why = match a.reason {
                            Some(crate::events::EndReason::Shutdown) => " (daemon stopped)",
                            Some(crate::events::EndReason::Restart) => " (daemon restarted after dying)",
                            Some(crate::events::EndReason::Reload) => " (camera removed or restarted by a reload)",
                            Some(crate::events::EndReason::Cleared) | None => "",
                        };
                        format!(
                            "alarm end   after {:.1} s{why}",
                            a.end_ts.unwrap_or(a.ts).saturating_sub(a.start_ts) as f64 / 1000.0
                        )
                    }
                };
                format!(
                    "{} {who:<20} {what} id {} peak {:.3} (raw {:.5}) frames {}{}",
                    clock(a.ts),
                    a.id,
                    a.peak,
                    a.peak_raw,
                    a.frames,
                    a.snapshot.map(|s| format!(" snapshot {s}")).unwrap_or_default()
                )
            }
            Err(_) => format!("{now} {who:<20} alarm ? {}", text()),
        },
        "stats" => match serde_json::from_slice::<StatsReport>(payload) {
            Ok(st) => {
                let cams: Vec<String> = st
                    .cameras
                    .iter()
                    .map(|c| {
                        format!(
                            "{} {:.1} fps drop {} p99 {:.1} ms{}",
                            c.camera,
                            c.fps,
                            c.dropped,
                            c.latency_p99_ms,
                            if c.online { "" } else { " OFFLINE" }
                        )
                    })
                    .collect();
                format!("{} {who:<20} stats [{}] {}", clock(st.ts), st.provider, cams.join(", "))
            }
            Err(_) => format!("{now} {who:<20} stats ? {}", text()),
        },
        "snapshot" => format!("{now} {who:<20} snapshot {} bytes{r}", payload.len()),
        "state" => format!("{now} {who:<20} alarm state {}{r}", text()),
        "camera" => format!("{now} {who:<20} camera {}{r}", text()),
        "status" => format!("{now} {who:<20} daemon {}{r}", text()),
        _ => format!("{now} {who:<20} {kind} {}{r}", text()),
    };
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(json: bool) -> WatchArgs {
        WatchArgs {
            config: None,
            host: None,
            port: None,
            prefix: None,
            node: None,
            camera: None,
            json,
            no_scores: false,
            count: None,
        }
    }

    #[test]
    fn lines_for_each_topic_kind_and_multi_level_prefixes() {
        let a = args(false);
        let score = ScoreEvent {
            schema: 1,
            camera: "line3".into(),
            seq: 7,
            ts: 3_723_004,
            score: 0.75,
            raw_score: 0.0123,
            threshold: 0.01,
            kind: "latent".into(),
            latency_ms: 4.2,
        };
        let line = format_message("plant/a/box1/line3/score", &serde_json::to_vec(&score).unwrap(), false, &a).unwrap();
        assert!(line.starts_with("01:02:03.004Z box1/line3"), "{line}");
        assert!(line.contains("score 0.750 !") && line.contains("seq 7"), "{line}");
        let line = format_message("plant/a/box1/status", b"offline", true, &a).unwrap();
        assert!(line.contains("box1") && line.ends_with("daemon offline (retained)"), "{line}");
        let line = format_message("ganomalyd/box1/line3/state", b"ON", false, &a).unwrap();
        assert!(line.ends_with("box1/line3           alarm state ON"), "{line}");
        assert!(format_message("x", b"", false, &a).is_none());
        let mut quiet = args(false);
        quiet.no_scores = true;
        quiet.camera = Some("other".into());
        assert!(format_message("g/box1/line3/score", b"{}", false, &quiet).is_none());
        assert!(format_message("g/box1/line3/state", b"ON", false, &quiet).is_none());
        let line = format_message("g/box1/line3/shadow/state", b"ON", false, &a).unwrap();
        assert!(line.ends_with("box1/line3/shadow    alarm state ON"), "{line}");
        let mut only = args(false);
        only.camera = Some("line3".into());
        assert!(
            format_message("g/box1/line3/shadow/score", &serde_json::to_vec(&score).unwrap(), false, &only).is_some()
        );
    }

    #[test]
    fn config_file_gives_the_mqtt_section_with_paths_resolved_like_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ganomalyd.toml");
        std::fs::write(
            &path,
            "[mqtt]\nhost = '10.1.2.3'\nport = 8883\nnode_id = 'box9'\n[mqtt.tls]\nca_file = 'certs/ca.pem'\n",
        )
        .unwrap();
        let m = mqtt_section(&path).unwrap();
        assert_eq!((m.host.as_str(), m.port, m.node_id.as_str()), ("10.1.2.3", 8883, "box9"));
        assert_eq!(m.tls.unwrap().ca_file, dir.path().join("certs/ca.pem"));
        std::fs::write(&path, "[mqtt]\nhots = 'x'\n").unwrap();
        assert!(mqtt_section(&path).unwrap_err().to_string().contains("hots"));
    }

    #[test]
    fn json_lines_carry_parsed_payloads() {
        let line = format_message("g/box1/cam/alarm", br#"{"id":"a1","type":"start"}"#, false, &args(true)).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["kind"], "alarm");
        assert_eq!(v["node"], "box1");
        assert_eq!(v["camera"], "cam");
        assert_eq!(v["payload"]["type"], "start");
        let v: Value =
            serde_json::from_str(&format_message("g/box1/cam/snapshot", &[0xff, 0xd8, 0], true, &args(true)).unwrap())
                .unwrap();
        assert_eq!(v["payload"]["bytes"], 3);
        assert_eq!(v["retained"], true);
        let v: Value =
            serde_json::from_str(&format_message("g/box1/status", b"online", true, &args(true)).unwrap()).unwrap();
        assert_eq!(v["payload"], "online");
        assert!(v["camera"].is_null());
    }
}
