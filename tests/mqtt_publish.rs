//! The MQTT publisher against a real broker: the embedded rumqttd always, and
//! the broker at `MQTT_TEST_URL` (Mosquitto in CI) when that is set. A
//! subscriber checks the exact topics, payloads, QoS and retain flags of
//! `docs/mqtt.md`, the last will on a kill, `offline` on a clean stop, and
//! `ganomalyd watch`'s output.

mod mqtt_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ganomalyd::events::{CameraStats, Publisher, ScoreEvent, Snapshot, StatsReport, PAYLOAD_SCHEMA};
use ganomalyd::publish::{EmbeddedBroker, MqttPublisher};
use mqtt_support::*;
use rumqttc::QoS;

fn embedded() -> (String, u16) {
    let b = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).expect("embedded broker");
    (b.addr().ip().to_string(), b.addr().port())
}

/// Every broker this run tests against: (name, host, port, strict QoS), and
/// what keeps a test-started Mosquitto alive. rumqttd 0.20 forwards every
/// message at the subscription's QoS (router/routing.rs), not min(publish,
/// subscription) as MQTT says, so a subscriber on it cannot see the QoS the
/// daemon used: QoS is asserted on the Mosquitto brokers only.
/// (name, host, port, strict QoS)
type Target = (&'static str, String, u16, bool);

fn brokers(dir: &std::path::Path) -> (Vec<Target>, Option<Mosquitto>) {
    let (h, p) = embedded();
    let mut v = vec![("embedded rumqttd", h, p, false)];
    let m = Mosquitto::start(dir, "");
    if let Some(m) = &m {
        v.push(("mosquitto started by the test", "127.0.0.1".into(), m.port, true));
    }
    if let Some((h, p)) = external_broker() {
        v.push(("MQTT_TEST_URL", h, p, true));
    }
    (v, m)
}

fn score(camera: &str, seq: u64) -> ScoreEvent {
    ScoreEvent {
        schema: PAYLOAD_SCHEMA,
        camera: camera.into(),
        seq,
        ts: ganomalyd::events::now_ms(),
        score: 0.25 + seq as f64 / 1000.0,
        raw_score: 0.004,
        threshold: 0.01,
        kind: "latent".into(),
        latency_ms: 3.5,
    }
}

fn one<'a>(msgs: &'a [Msg], topic: &str) -> &'a Msg {
    msgs.iter().find(|m| m.topic == topic).unwrap_or_else(|| panic!("no message on {topic}"))
}

async fn topics_scenario(broker: &str, host: &str, port: u16, strict_qos: bool) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("topics");
    let base = format!("{prefix}/box1");
    let status = format!("{base}/status");
    let t = |leaf: &str| format!("{base}/cam1/{leaf}");
    let sub = Sub::start(host, port, &format!("{prefix}/#"), false).await;

    let mut cfg = test_config(host, port, &prefix, "box1", &dir.path().join("outbox.sqlite"));
    cfg.score_max_rate_hz = 5.0;
    cfg.discovery = true;
    cfg.discovery_prefix = format!("{prefix}/ha");
    let (publisher, handle) = MqttPublisher::start(&cfg, &tokio::runtime::Handle::current()).unwrap();
    let p: Arc<dyn Publisher> = publisher.clone();
    sub.wait(Duration::from_secs(10), "status online", |m| m.iter().any(|m| m.topic == status && m.text() == "online"))
        .await;

    p.camera_online("cam1", true);
    p.alarm_state("cam1", true);
    let ev = alarm(0, "cam1");
    p.alarm(&ev);
    // 40 scores in 1 s, at most 5 per second published.
    let t0 = Instant::now();
    for i in 0..40 {
        p.score(&score("cam1", i));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let score_window = t0.elapsed().as_secs_f64();
    // Bigger than rumqttc's and rumqttd's default packet limits (10/20 kB).
    let jpeg: Vec<u8> = [0xff, 0xd8].into_iter().chain((0..300_000u32).map(|i| (i % 251) as u8)).collect();
    p.snapshot(&Snapshot { camera: "cam1".into(), alarm_id: ev.id.clone(), jpeg: jpeg.clone() });
    let report = StatsReport {
        schema: PAYLOAD_SCHEMA,
        ts: 5,
        provider: "cpu".into(),
        cameras: vec![CameraStats {
            camera: "cam1".into(),
            online: true,
            fps: 25.0,
            frames: 100,
            ..Default::default()
        }],
    };
    p.stats(&report);

    let want = [t("camera"), t("state"), t("alarm"), t("score"), t("snapshot"), format!("{base}/stats")];
    let msgs = sub
        .wait(Duration::from_secs(10), "every topic", |m| want.iter().all(|w| m.iter().any(|m| &m.topic == w)))
        .await;

    // The QoS a subscriber sees, where the broker lets it see the publisher's.
    let qos = |m: &Msg, want: QoS| {
        if strict_qos {
            assert_eq!(m.qos, want, "{broker}: QoS of {}", m.topic);
        }
    };
    let st = one(&msgs, &status);
    assert_eq!(st.text(), "online");
    qos(st, QoS::AtLeastOnce);
    let cam = one(&msgs, &t("camera"));
    assert_eq!(cam.text(), "online");
    qos(cam, QoS::AtLeastOnce);
    let state = one(&msgs, &t("state"));
    assert_eq!(state.text(), "ON");
    qos(state, QoS::AtLeastOnce);
    let a = one(&msgs, &t("alarm"));
    qos(a, QoS::AtLeastOnce);
    assert_eq!(serde_json::from_slice::<ganomalyd::events::AlarmEvent>(&a.payload).unwrap(), ev);
    let v: serde_json::Value = serde_json::from_slice(&a.payload).unwrap();
    assert_eq!((v["schema"].as_u64(), v["type"].as_str()), (Some(1), Some("start")));
    let s = one(&msgs, &t("score"));
    qos(s, QoS::AtMostOnce);
    let got: ScoreEvent = serde_json::from_slice(&s.payload).unwrap();
    assert_eq!(got, ScoreEvent { ts: got.ts, ..score("cam1", 0) }, "{broker}: the first score goes out, whole");
    let snap = one(&msgs, &t("snapshot"));
    assert_eq!(snap.payload.len(), jpeg.len());
    qos(snap, QoS::AtMostOnce);
    assert!(snap.payload == jpeg);
    let stats = one(&msgs, &format!("{base}/stats"));
    qos(stats, QoS::AtMostOnce);
    let sv: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    assert_eq!(serde_json::from_value::<StatsReport>(sv.clone()).unwrap(), report);
    assert!(sv["mqtt"]["connected"].as_bool().unwrap());
    assert_eq!(sv["mqtt"]["alarms_queued"], 1);

    // Throttle: 5 Hz over the window (+1 for the first, +1 for timer slack).
    let scores = msgs.iter().filter(|m| m.topic == t("score")).count();
    let max = (score_window * 5.0).ceil() as usize + 2;
    assert!((3..=max).contains(&scores), "{broker}: {scores} scores in {score_window:.2} s, max {max}");
    let c = publisher.counters();
    assert_eq!(c.scores_published as usize, scores);
    assert_eq!(c.scores_published + c.scores_throttled, 40);

    // Home Assistant discovery: three retained configs, available on `status`.
    let ha: Vec<&Msg> = msgs.iter().filter(|m| m.topic.starts_with(&format!("{prefix}/ha/"))).collect();
    assert_eq!(ha.len(), 3, "{:?}", ha.iter().map(|m| &m.topic).collect::<Vec<_>>());
    for m in &ha {
        qos(m, QoS::AtLeastOnce);
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["availability_topic"], status.as_str());
    }

    // Retained: a subscriber arriving now gets exactly the retained topics.
    let late = Sub::start(host, port, &format!("{prefix}/#"), false).await;
    let retained_topics = [status.clone(), t("camera"), t("state"), t("snapshot")];
    let lm = late
        .wait(Duration::from_secs(5), "retained messages", |m| {
            retained_topics.iter().all(|w| m.iter().any(|m| &m.topic == w))
        })
        .await;
    for m in &lm {
        assert!(m.retain, "{broker}: {} delivered to a late subscriber without the retain flag", m.topic);
        assert!(
            !m.topic.ends_with("/alarm") && !m.topic.ends_with("/score") && !m.topic.ends_with("/stats"),
            "{} retained",
            m.topic
        );
    }
    assert_eq!(one(&lm, &t("state")).text(), "ON");
    assert_eq!(one(&lm, &t("snapshot")).payload.len(), jpeg.len());
    late.stop();

    // Alarm cleared, then a clean stop: OFF, then `offline` (QoS 1) before the disconnect.
    p.alarm_state("cam1", false);
    handle.shutdown().await;
    let msgs = sub
        .wait(Duration::from_secs(5), "OFF and offline", |m| {
            m.iter().any(|m| m.topic == status && m.text() == "offline")
                && m.iter().any(|m| m.topic == t("state") && m.text() == "OFF")
        })
        .await;
    let off = msgs.iter().rev().find(|m| m.topic == status).unwrap();
    assert_eq!(off.text(), "offline");
    qos(off, QoS::AtLeastOnce);
    let late = Sub::start(host, port, &status, false).await;
    let lm = late.wait(Duration::from_secs(5), "retained offline", |m| !m.is_empty()).await;
    assert_eq!((lm[0].text().as_str(), lm[0].retain), ("offline", true), "{broker}");
    assert_eq!(publisher.counters().alarms_pending, 0);
    late.stop();
    sub.stop();
    let mut leftovers: Vec<String> = retained_topics.to_vec();
    leftovers.extend(ha.iter().map(|m| m.topic.clone()));
    clear_retained(host, port, &leftovers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_payloads_qos_and_retain_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (brokers, _mosquitto) = brokers(dir.path());
    for (name, host, port, strict_qos) in brokers {
        eprintln!("broker: {name} {host}:{port}");
        topics_scenario(name, &host, port, strict_qos).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_fires_when_the_daemon_is_killed() {
    let bdir = tempfile::tempdir().unwrap();
    let (brokers, _mosquitto) = brokers(bdir.path());
    for (name, host, port, strict_qos) in brokers {
        let dir = tempfile::tempdir().unwrap();
        let prefix = unique("will");
        let status = format!("{prefix}/box1/status");
        let sub = Sub::start(&host, port, &status, false).await;
        let cfg = test_config(&host, port, &prefix, "box1", &dir.path().join("outbox.sqlite"));
        // The daemon on a runtime of its own, so that it can die alone.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (_publisher, handle) = MqttPublisher::start(&cfg, rt.handle()).unwrap();
        sub.wait(Duration::from_secs(10), "online", |m| m.iter().any(|m| m.text() == "online")).await;
        let killed = Instant::now();
        // No DISCONNECT, no `offline` publish: the socket just goes, as in a crash.
        rt.shutdown_background();
        drop(handle);
        let msgs = sub
            .wait(cfg.keep_alive() * 2 + Duration::from_secs(5), "last will", |m| {
                m.last().is_some_and(|m| m.text() == "offline")
            })
            .await;
        let will = msgs.last().unwrap();
        if strict_qos {
            assert_eq!(will.qos, QoS::AtLeastOnce, "{name}");
        }
        eprintln!("{name}: last will `offline` {} ms after the kill", killed.elapsed().as_millis());
        let late = Sub::start(&host, port, &status, false).await;
        let lm = late.wait(Duration::from_secs(5), "retained will", |m| !m.is_empty()).await;
        assert_eq!((lm[0].text().as_str(), lm[0].retain), ("offline", true), "{name}: the will is retained");
        late.stop();
        sub.stop();
        clear_retained(&host, port, &[status]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_and_watch_print_what_the_daemon_says() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cfg = test_config("unused.invalid", 1, "plant", "box7", &dir.path().join("outbox.sqlite"));
    cfg.embedded = true;
    cfg.embedded_listen = format!("127.0.0.1:{port}").parse().unwrap();
    let (publisher, handle) = MqttPublisher::start(&cfg, &tokio::runtime::Handle::current()).unwrap();
    assert_eq!(handle.broker_addr().map(|a| a.port()), Some(port));
    let p: Arc<dyn Publisher> = publisher.clone();
    p.camera_online("cam1", true);
    // Retained state is on the broker before watch subscribes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !publisher.counters().connected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let args = |json: bool| ganomalyd::cmds::watch::WatchArgs {
        config: None,
        host: Some("127.0.0.1".into()),
        port: Some(port),
        prefix: Some("plant".into()),
        node: None,
        camera: None,
        json,
        no_scores: false,
        count: Some(3),
    };
    let watch = |json: bool| {
        let a = args(json);
        tokio::spawn(async move {
            let mut out = Vec::new();
            ganomalyd::cmds::watch::run_to(a, &mut out).await.map(|_| String::from_utf8(out).unwrap())
        })
    };
    let (plain, json) = (watch(false), watch(true));
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.alarm(&alarm(0, "cam1"));
    let plain =
        tokio::time::timeout(Duration::from_secs(10), plain).await.expect("watch printed 3 lines").unwrap().unwrap();
    let json = tokio::time::timeout(Duration::from_secs(10), json)
        .await
        .expect("watch --json printed 3 lines")
        .unwrap()
        .unwrap();
    eprintln!("{plain}");
    let lines: Vec<&str> = plain.lines().collect();
    assert_eq!(lines.len(), 3, "{plain}");
    assert!(lines.iter().any(|l| l.contains("box7") && l.ends_with("daemon online (retained)")), "{plain}");
    assert!(lines.iter().any(|l| l.contains("box7/cam1") && l.ends_with("camera online (retained)")), "{plain}");
    assert!(lines.iter().any(|l| l.contains("box7/cam1") && l.contains("ALARM START id cam1-0")), "{plain}");
    let kinds: Vec<String> = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.contains(&"alarm".to_string()) && kinds.contains(&"status".to_string()), "{json}");
    handle.shutdown().await;
}
