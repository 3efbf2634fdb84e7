//! The command intake end to end: the daemon in-process against a real broker
//! (Mosquitto under `make test`, else the embedded rumqttd). A `reload` over
//! MQTT and over HTTP is carried out and answered on the events topic (and in
//! the HTTP response) with its `request_id`; an unknown camera, an unknown
//! command name and a malformed body are refused with their reason, and the daemon
//! goes on; with `[commands]` off every command is refused, saying how to turn
//! them on.

mod mqtt_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ganomalyd::cmds::run::{daemon, Signal};
use ganomalyd::commands::{CommandEvent, Status};
use ganomalyd::publish::EmbeddedBroker;
use mqtt_support::*;
use rumqttc::QoS;

struct Broker {
    host: String,
    port: u16,
    _embedded: Option<EmbeddedBroker>,
}

fn broker() -> Broker {
    if let Some((host, port)) = external_broker() {
        return Broker { host, port, _embedded: None };
    }
    let b = EmbeddedBroker::start("127.0.0.1:0".parse().expect("addr")).expect("embedded broker");
    Broker { host: b.addr().ip().to_string(), port: b.addr().port(), _embedded: Some(b) }
}

fn write_config(dir: &Path, b: &Broker, prefix: &str, metrics_port: u16, enabled: bool) -> PathBuf {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    let body = format!(
        r#"[inference]
providers = ["cpu"]
[snapshots]
enabled = false
[defaults]
model = "{model}"
fps = 20
[cameras.cam]
source = {{ kind = "synthetic", size = 64, variations = 2 }}
[mqtt]
host = "{host}"
port = {port}
topic_prefix = "{prefix}"
node_id = "box"
client_id = "{prefix}"
outbox_path = "outbox.sqlite"
reconnect_min_s = 0.05
reconnect_max_s = 0.5
score_max_rate_hz = 1
[metrics]
enabled = true
listen = "127.0.0.1:{metrics_port}"
[commands]
enabled = {enabled}
"#,
        model = model.display(),
        host = b.host,
        port = b.port,
    );
    let p = dir.join("ganomalyd.toml");
    std::fs::write(&p, body).expect("write config");
    p
}

fn events_of(msgs: &[Msg], topic: &str) -> Vec<CommandEvent> {
    msgs.iter().filter(|m| m.topic == topic).filter_map(|m| serde_json::from_slice(&m.payload).ok()).collect()
}

/// `POST path` with `body`; the status code and the response body.
fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    let code = got.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = got.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// Starts the daemon and waits until it listens for commands (a `reload`
/// answered proves the subscription is in place).
fn start(
    dir: &Path,
    b: &Broker,
    enabled: bool,
    rt: &tokio::runtime::Runtime,
) -> (
    String,
    u16,
    Sub,
    crossbeam_channel::Sender<Signal>,
    std::thread::JoinHandle<Result<(), ganomalyd::cmds::run::DaemonError>>,
) {
    let prefix = unique("cmd");
    let metrics_port = free_port();
    let cfg = write_config(dir, b, &prefix, metrics_port, enabled);
    let sub = rt.block_on(Sub::start(&b.host, b.port, &format!("{prefix}/#"), false));
    let settings = ganomalyd::config::load(&cfg).expect("the config compiles");
    let (tx, rx) = crossbeam_channel::unbounded();
    let run = std::thread::spawn(move || daemon(settings, cfg, rx));
    rt.block_on(sub.wait(Duration::from_secs(60), "status online", |m| {
        m.iter().any(|m| m.topic == format!("{prefix}/box/status") && m.payload == b"online")
    }));
    (prefix, metrics_port, sub, tx, run)
}

#[test]
fn reload_over_mqtt_and_http_is_answered_and_bad_commands_are_refused_with_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let b = broker();
    let (prefix, metrics_port, sub, tx, run) = start(dir.path(), &b, true, &rt);
    let base = format!("{prefix}/box");
    let node_events = format!("{base}/events");
    let cam_events = format!("{base}/cam/events");

    // The subscription is made once the pipeline runs: send until answered.
    let answered = rt.block_on(async {
        for _ in 0..100 {
            sub.client
                .publish(format!("{base}/cmd/reload"), QoS::AtLeastOnce, false, r#"{"request_id":"r1"}"#)
                .await
                .expect("publish");
            tokio::time::sleep(Duration::from_millis(300)).await;
            if events_of(&sub.all(), &node_events).iter().any(|e| e.request_id.as_deref() == Some("r1")) {
                return true;
            }
        }
        false
    });
    assert!(answered, "no answer to cmd/reload");
    let ev = events_of(&sub.all(), &node_events).into_iter().find(|e| e.request_id.as_deref() == Some("r1")).unwrap();
    assert_eq!((ev.command.as_str(), ev.status), ("reload", Status::Done), "{ev:?}");

    // Bad commands: each refused on the events topic of its address, with its reason.
    rt.block_on(async {
        let c = &sub.client;
        c.publish(format!("{base}/nope/cmd/trigger"), QoS::AtLeastOnce, false, r#"{"request_id":"r2"}"#).await.unwrap();
        c.publish(format!("{base}/cam/cmd/trigger"), QoS::AtLeastOnce, false, "{not json").await.unwrap();
        c.publish(format!("{base}/cam/cmd/reload"), QoS::AtLeastOnce, false, r#"{"request_id":"r3"}"#).await.unwrap();
        c.publish(format!("{base}/cam/cmd/explode"), QoS::AtLeastOnce, false, "{}").await.unwrap();
    });
    let msgs = rt.block_on(sub.wait(Duration::from_secs(30), "four refusals", |m| {
        let n = events_of(m, &format!("{base}/nope/events")).len() + events_of(m, &cam_events).len();
        n >= 4
    }));
    let unknown_cam = events_of(&msgs, &format!("{base}/nope/events"));
    assert_eq!(unknown_cam[0].status, Status::Refused);
    assert!(unknown_cam[0].reason.as_deref().unwrap().contains("unknown camera `nope`"), "{unknown_cam:?}");
    assert_eq!(unknown_cam[0].request_id.as_deref(), Some("r2"));
    let cam = events_of(&msgs, &cam_events);
    let reasons: Vec<&str> = cam.iter().filter_map(|e| e.reason.as_deref()).collect();
    assert!(cam.iter().all(|e| e.status == Status::Refused), "{cam:?}");
    assert!(reasons.iter().any(|r| r.contains("not a JSON object")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("node command")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("unknown command `explode`")), "{reasons:?}");

    // Over HTTP: the answer is the response.
    let addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let (code, body) = post(addr, "/api/cmd/-/reload", r#"{"request_id":"h1"}"#);
    assert_eq!(code, 200, "{body}");
    let ev: CommandEvent = serde_json::from_str(&body).expect("JSON answer");
    assert_eq!((ev.status, ev.request_id.as_deref()), (Status::Done, Some("h1")));
    let (code, body) = post(addr, "/api/cmd/nope/trigger", "{}");
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("unknown camera"), "{body}");

    // A broken config: the reload fails, says why, and the daemon goes on.
    let cfg = dir.path().join("ganomalyd.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, "[cameras.cam]\nfsp = 3\n").unwrap();
    let (code, body) = post(addr, "/api/cmd/-/reload", "{}");
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("reload refused") && body.contains("fsp"), "{body}");
    std::fs::write(&cfg, good).unwrap();
    assert!(!run.is_finished(), "the daemon ended");

    tx.send(Signal::Stop).unwrap();
    run.join().expect("no panic").expect("clean stop");
    sub.stop();
}

#[test]
fn with_commands_off_every_command_is_refused_saying_how_to_enable_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let b = broker();
    let (prefix, metrics_port, sub, tx, run) = start(dir.path(), &b, false, &rt);
    let base = format!("{prefix}/box");
    let refused = rt.block_on(async {
        for _ in 0..100 {
            sub.client.publish(format!("{base}/cmd/reload"), QoS::AtLeastOnce, false, "{}").await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            if !events_of(&sub.all(), &format!("{base}/events")).is_empty() {
                return true;
            }
        }
        false
    });
    assert!(refused, "no answer");
    let ev = &events_of(&sub.all(), &format!("{base}/events"))[0];
    assert_eq!(ev.status, Status::Refused);
    assert!(ev.reason.as_deref().unwrap().contains("[commands] enabled = true"), "{ev:?}");
    let addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let (code, body) = post(addr, "/api/cmd/-/reload", "{}");
    assert_eq!(code, 422, "{body}");

    tx.send(Signal::Stop).unwrap();
    run.join().expect("no panic").expect("clean stop");
    sub.stop();
}
