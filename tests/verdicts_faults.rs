//! Triggered inspection when things go wrong, the daemon in-process against
//! a real broker (Mosquitto under `make test`, else the embedded rumqttd),
//! triggers over MQTT:
//! - a trigger for a camera that is offline (its HTTP source refuses
//!   connections) is answered `error` ("camera offline") within its deadline;
//! - a storm of triggers beyond a camera's capacity (`max_pending = 4`, each
//!   part waiting for two frames at 5 fps) is answered in full: the triggers
//!   beyond capacity `timeout` at once, counted in `/metrics`, the others
//!   `ok`/`ng` within the deadline, and another camera keeps answering;
//! - bad input (no part id, malformed JSON, an unknown camera, a trigger for
//!   a continuous camera, a bad `ts`) is refused on the events topic with its
//!   reason and counted; no verdict is published for it, and the camera
//!   goes on judging.

mod mqtt_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use ganomalyd::cmds::run::{daemon, Signal};
use ganomalyd::commands::{CommandEvent, Status};
use ganomalyd::events::{Verdict, VerdictEvent};
use ganomalyd::publish::EmbeddedBroker;
use mqtt_support::*;
use rumqttc::QoS;

const STORM: usize = 60;
/// Slack over a deadline for a loaded test box (the daemon's timer fires at
/// the deadline; its thread may be scheduled late).
const SLACK_MS: f64 = 1000.0;

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).expect("send");
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    got
}

fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

fn verdicts(msgs: &[Msg], base: &str, camera: &str) -> Vec<VerdictEvent> {
    let topic = format!("{base}/{camera}/verdict");
    msgs.iter().filter(|m| m.topic == topic).map(|m| serde_json::from_slice(&m.payload).expect("verdict")).collect()
}

fn events(msgs: &[Msg], base: &str, camera: &str) -> Vec<CommandEvent> {
    let topic = format!("{base}/{camera}/events");
    msgs.iter().filter(|m| m.topic == topic).filter_map(|m| serde_json::from_slice(&m.payload).ok()).collect()
}

#[test]
fn offline_storm_and_bad_input_are_all_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (_embedded, host, port) = match external_broker() {
        Some((h, p)) => (None, h, p),
        None => {
            let b = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).expect("embedded broker");
            let a = b.addr();
            (Some(b), a.ip().to_string(), a.port())
        }
    };
    let prefix = unique("vfault");
    let metrics_port = free_port();
    let closed = free_port();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    let body = format!(
        r#"[inference]
providers = ["cpu"]
[snapshots]
enabled = false
[defaults]
model = "{model}"
fps = 30
source = {{ kind = "synthetic", size = 64, variations = 2 }}
[cameras.good]
mode = "triggered"
trigger = {{ deadline_s = 2.0 }}
[cameras.off]
mode = "triggered"
source = {{ kind = "http-mjpeg", url = "http://127.0.0.1:{closed}/stream" }}
trigger = {{ deadline_s = 2.0 }}
[cameras.storm]
mode = "triggered"
fps = 5
trigger = {{ from = "after", frames = 2, max_pending = 4, deadline_s = 2.0 }}
[cameras.cont]
[mqtt]
host = "{host}"
port = {port}
topic_prefix = "{prefix}"
node_id = "box"
client_id = "{prefix}"
outbox_path = "outbox.sqlite"
reconnect_min_s = 0.05
reconnect_max_s = 0.5
[metrics]
enabled = true
listen = "127.0.0.1:{metrics_port}"
[commands]
enabled = true
"#,
        model = model.display(),
    );
    let cfg = dir.path().join("ganomalyd.toml");
    std::fs::write(&cfg, body).expect("write config");
    let sub = rt.block_on(Sub::start(&host, port, &format!("{prefix}/#"), false));
    let settings = ganomalyd::config::load(&cfg).expect("the config compiles");
    let (tx, rx) = crossbeam_channel::unbounded();
    let run = std::thread::spawn(move || daemon(settings, cfg, rx));
    let base = format!("{prefix}/box");
    let camera_is = |m: &[Msg], cam: &str, state: &[u8]| {
        m.iter().any(|m| m.topic == format!("{base}/{cam}/camera") && m.payload == state)
    };
    rt.block_on(sub.wait(Duration::from_secs(60), "cameras up and `off` offline", |m| {
        camera_is(m, "good", b"online") && camera_is(m, "storm", b"online") && camera_is(m, "off", b"offline")
    }));
    let publish = |topic: String, payload: String| {
        rt.block_on(sub.client.publish(topic, QoS::AtLeastOnce, false, payload)).expect("publish");
    };
    // The command subscription is made once the pipeline runs: a first trigger until answered.
    let first = rt.block_on(async {
        for i in 0..100 {
            sub.client
                .publish(
                    format!("{base}/good/cmd/trigger"),
                    QoS::AtLeastOnce,
                    false,
                    format!(r#"{{"part_id":"hello-{i}"}}"#),
                )
                .await
                .expect("publish");
            tokio::time::sleep(Duration::from_millis(300)).await;
            if !verdicts(&sub.all(), &base, "good").is_empty() {
                return true;
            }
        }
        false
    });
    assert!(first, "no verdict for `good`");

    // Offline: an `error` verdict at once, well within the deadline.
    publish(format!("{base}/off/cmd/trigger"), r#"{"part_id":"o1"}"#.into());
    let msgs = rt
        .block_on(sub.wait(Duration::from_secs(20), "the offline verdict", |m| !verdicts(m, &base, "off").is_empty()));
    let v = &verdicts(&msgs, &base, "off")[0];
    assert_eq!((v.verdict, v.part_id.as_str(), v.reason.as_deref()), (Verdict::Error, "o1", Some("camera offline")));
    assert!(v.latency_ms <= 2000.0 + SLACK_MS, "{}", v.latency_ms);
    assert_eq!(v.seq, 1);

    // Bad input, each refused with its reason on the events topic of its address.
    let bad = [
        ("good", r#"{"ts": 5}"#, "part_id is missing"),
        ("good", "{not json", "not a JSON object"),
        ("good", r#"{"part_id":"p","ts":"soon"}"#, "ts must be an integer"),
        ("nope", r#"{"part_id":"n1"}"#, "unknown camera `nope`"),
        ("cont", r#"{"part_id":"c1"}"#, "is continuous"),
    ];
    for (cam, payload, _) in bad {
        publish(format!("{base}/{cam}/cmd/trigger"), payload.into());
    }
    let msgs = rt.block_on(sub.wait(Duration::from_secs(20), "five refusals", |m| {
        ["good", "nope", "cont"]
            .iter()
            .map(|c| events(m, &base, c).iter().filter(|e| e.status == Status::Refused).count())
            .sum::<usize>()
            >= 5
    }));
    for (cam, payload, want) in bad {
        let evs = events(&msgs, &base, cam);
        assert!(
            evs.iter().any(|e| e.status == Status::Refused && e.reason.as_deref().unwrap_or("").contains(want)),
            "{cam} {payload}: no refusal saying `{want}` in {evs:?}"
        );
    }
    assert!(verdicts(&msgs, &base, "cont").is_empty() && verdicts(&msgs, &base, "nope").is_empty());

    // The storm: far more triggers than `storm` can hold, and one for `good` in the middle.
    for k in 0..STORM {
        publish(format!("{base}/storm/cmd/trigger"), format!(r#"{{"part_id":"s{k}"}}"#));
        if k == STORM / 2 {
            publish(format!("{base}/good/cmd/trigger"), r#"{"part_id":"during-storm"}"#.into());
        }
    }
    let msgs = rt.block_on(sub.wait(Duration::from_secs(30), "every storm verdict", |m| {
        verdicts(m, &base, "storm").len() >= STORM
            && verdicts(m, &base, "good").iter().any(|v| v.part_id == "during-storm")
    }));
    let storm = verdicts(&msgs, &base, "storm");
    let mut ids: Vec<&str> = storm.iter().map(|v| v.part_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), STORM, "one verdict per part");
    let timeouts = storm.iter().filter(|v| v.verdict == Verdict::Timeout).count();
    let judged = storm.iter().filter(|v| matches!(v.verdict, Verdict::Ok | Verdict::Ng)).count();
    assert_eq!(
        timeouts + judged,
        STORM,
        "{:?}",
        storm.iter().map(|v| (v.verdict, v.reason.clone())).collect::<Vec<_>>()
    );
    assert!(timeouts >= STORM / 2, "beyond capacity: {timeouts} timeouts");
    assert!(judged >= 4, "the triggers that fit are judged: {judged}");
    for v in &storm {
        assert!(v.latency_ms <= 2000.0 + SLACK_MS, "{} answered after {} ms", v.part_id, v.latency_ms);
        if v.verdict == Verdict::Timeout {
            assert!(v.reason.as_deref().unwrap_or("").starts_with("queue full"), "{:?}", v.reason);
        } else {
            assert_eq!(v.frame_ts.len(), 2, "judged on two frames");
        }
    }
    let during = verdicts(&msgs, &base, "good").into_iter().find(|v| v.part_id == "during-storm").unwrap();
    assert!(matches!(during.verdict, Verdict::Ok | Verdict::Ng), "{during:?}");

    // Counted: /metrics agrees with what was published.
    let text = get(format!("127.0.0.1:{metrics_port}").parse().unwrap(), "/metrics");
    assert_eq!(
        metric(&text, r#"ganomalyd_verdicts_total{camera="storm",verdict="timeout"} "#),
        Some(timeouts as f64),
        "{text}"
    );
    assert_eq!(metric(&text, r#"ganomalyd_verdicts_total{camera="off",verdict="error"} "#), Some(1.0));
    assert_eq!(metric(&text, r#"ganomalyd_triggers_refused_total{camera="good"} "#), Some(2.0), "no part id, bad ts");
    let refused = metric(&text, r#"ganomalyd_commands_refused_total{command="trigger"} "#).unwrap_or(0.0);
    assert!(refused >= 2.0, "malformed JSON and the unknown camera, refused by the intake: {refused}");
    let good = verdicts(&msgs, &base, "good");
    assert!(good.windows(2).all(|w| w[0].seq < w[1].seq), "verdict numbers in order");
    assert!(
        good.iter().all(|v| v.part_id.starts_with("hello-") || v.part_id == "during-storm"),
        "a refused trigger got a verdict: {:?}",
        good.iter().map(|v| &v.part_id).collect::<Vec<_>>()
    );
    assert!(!run.is_finished(), "the daemon ended");

    tx.send(Signal::Stop).unwrap();
    run.join().expect("no panic").expect("clean stop");
    sub.stop();
}
