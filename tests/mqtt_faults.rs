//! The outbox against a bad day: a broker that refuses one alarm, an outbox
//! file that is corrupt or on a read-only disk, a TLS file gone after
//! `check-config` passed, an embedded broker whose port is taken. The
//! publisher must start in each case, keep every alarm it can and say what is
//! wrong; the refused alarm must not hold up the others.

mod mqtt_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ganomalyd::events::Publisher;
use ganomalyd::publish::{EmbeddedBroker, MqttConfig, MqttPublisher, PublisherCounters, TlsConfig};
use mqtt_support::*;

async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mosquitto_or_skip(dir: &std::path::Path, extra: &str) -> Option<Mosquitto> {
    let m = Mosquitto::start(dir, extra);
    if m.is_none() {
        // `make test` sets GANOMALY_REQUIRE_MOSQUITTO: CI must not pass by skipping.
        assert!(std::env::var_os("GANOMALY_REQUIRE_MOSQUITTO").is_none(), "no mosquitto binary");
        eprintln!("SKIPPED: no mosquitto binary (set MOSQUITTO_BIN)");
    }
    m
}

/// Mosquitto with an ACL that lets anonymous clients write only `status` and
/// the `good` camera's topics. What Mosquitto 2.0 does with a QoS 1 publish
/// to the denied `bad` camera: PUBACK, and drop it (MQTT 3.1.1 has no refusal
/// short of closing). So the closing brokers (EMQX, HiveMQ, AWS IoT) are
/// emulated with [`ClosingProxy`] in front of that Mosquitto: after
/// `dead_letter_after_closes` closes the refused alarm is dead-lettered and
/// every other alarm arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_alarm_is_dead_lettered_and_the_rest_flow() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("deny");
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        format!(
            "topic readwrite {prefix}/box1/status\ntopic readwrite {prefix}/box1/good/#\n\
             topic readwrite {prefix}/box2/status\ntopic readwrite {prefix}/box2/good/#\ntopic read {prefix}/#\n"
        ),
    )
    .unwrap();
    let Some(m) = mosquitto_or_skip(dir.path(), &format!("acl_file {}", acl.display())) else { return };
    let sub = Sub::start("127.0.0.1", m.port, &format!("{prefix}/+/+/alarm"), false).await;

    // Mosquitto's own behaviour, straight to it: acknowledged, never delivered.
    let cfg = test_config("127.0.0.1", m.port, &prefix, "box2", &dir.path().join("direct.sqlite"));
    let (direct, handle) = MqttPublisher::start(&cfg, &tokio::runtime::Handle::current()).unwrap();
    direct.alarm(&alarm(0, "bad"));
    direct.alarm(&alarm(0, "good"));
    until("both PUBACKs from mosquitto", Duration::from_secs(10), || direct.counters().alarms_acked == 2).await;
    sub.wait(Duration::from_secs(5), "the permitted alarm", |m| !alarms_of(m).is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got: Vec<String> = alarms_of(&sub.all()).iter().map(|a| a.camera.clone()).collect();
    assert_eq!(got, ["good"], "mosquitto 2.0 acknowledged the denied publish and dropped it");
    assert_eq!(direct.counters().alarms_dead_lettered, 0);
    handle.shutdown().await;

    // A broker that closes on the denied topic.
    let bad_topic = format!("{prefix}/box1/bad/alarm");
    let proxy = ClosingProxy::start(m.addr(), &bad_topic).await;
    let mut cfg = test_config("127.0.0.1", proxy.port, &prefix, "box1", &dir.path().join("outbox.sqlite"));
    cfg.dead_letter_after_closes = 3;
    let (p, handle) = MqttPublisher::start(&cfg, &tokio::runtime::Handle::current()).unwrap();
    // good 0..2, the refused one, good 2..8: the refused one is third in line.
    for i in 0..2 {
        p.alarm(&alarm(i, "good"));
    }
    p.alarm(&alarm(0, "bad"));
    for i in 2..8 {
        p.alarm(&alarm(i, "good"));
    }
    let want: Vec<_> = (0..8).map(|i| key(&alarm(i, "good"))).collect();
    sub.wait(Duration::from_secs(30), "the 8 permitted alarms", |m| {
        dedupe(&alarms_of(m).into_iter().filter(|a| a.id.starts_with("good")).collect::<Vec<_>>()).0.len() >= 8
    })
    .await;
    let good: Vec<_> = alarms_of(&sub.all()).into_iter().filter(|a| a.id.starts_with("good")).collect();
    let (order, dups) = dedupe(&good);
    assert_eq!(order[..8], want[..], "every permitted alarm, first arrivals in order");
    until("the outbox to drain", Duration::from_secs(10), || p.counters().alarms_pending == 0).await;
    let c: PublisherCounters = p.counters();
    assert_eq!(c.alarms_dead_lettered, 1, "{c:?}");
    assert_eq!(proxy.closes(), 3, "dead-lettered at the third close, not before, not later");
    let dead = handle.outbox().call(|s| s.dead_letters()).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (_, camera, payload, reason) = &dead[0];
    assert_eq!(camera, "bad");
    assert_eq!(serde_json::from_slice::<ganomalyd::events::AlarmEvent>(payload).unwrap(), alarm(0, "bad"));
    assert!(reason.contains("closed the connection 3 times"), "{reason}");
    eprintln!("refused alarm: {} closes, dead-lettered; 8 others delivered ({dups} duplicates); {c:?}", proxy.closes());
    handle.shutdown().await;
    sub.stop();
}

/// Raises `n` alarms on `camera` and waits until the broker acknowledged them all.
async fn delivered(p: &Arc<MqttPublisher>, n: u64, camera: &str, sub: &Sub) {
    for i in 0..n {
        p.alarm(&alarm(i, camera));
    }
    let want: Vec<_> = (0..n).map(|i| key(&alarm(i, camera))).collect();
    sub.wait(Duration::from_secs(20), "every alarm", |m| dedupe(&alarms_of(m)).0.len() >= want.len()).await;
    assert_eq!(dedupe(&alarms_of(&sub.all())).0, want);
    until("the acknowledgements", Duration::from_secs(10), || p.counters().alarms_pending == 0).await;
}

async fn outbox_fault_scenario(name: &str, outbox: std::path::PathBuf) {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let prefix = unique(name);
    let sub = Sub::start("127.0.0.1", broker.addr().port(), &format!("{prefix}/#"), false).await;
    let cfg = test_config("127.0.0.1", broker.addr().port(), &prefix, "box1", &outbox);
    let (p, handle) = MqttPublisher::start(&cfg, &tokio::runtime::Handle::current()).expect("the publisher starts");
    let c = p.counters();
    assert!(c.outbox_fault, "{name}: the fault is reported: {c:?}");
    delivered(&p, 6, "cam1", &sub).await;
    let c = p.counters();
    assert_eq!((c.alarms_acked, c.outbox_errors, c.alarms_in_memory, c.alarms_dropped), (6, 6, 0, 0), "{name}: {c:?}");
    handle.shutdown().await;
    sub.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_outbox_file_holds_alarms_in_memory_and_delivers_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.sqlite");
    std::fs::write(&path, vec![0x42u8; 16 << 10]).unwrap();
    outbox_fault_scenario("corrupt", path.clone()).await;
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x42u8; 16 << 10], "the corrupt file is left for inspection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_outbox_dir_holds_alarms_in_memory_and_delivers_them() {
    let ro = ReadOnlyDir::new();
    outbox_fault_scenario("readonly", ro.path.join("outbox.sqlite")).await;
}

/// The CA file is gone at start (removed after `check-config`): the
/// publisher starts, reports the fault, keeps alarms in the outbox, and
/// connects once the file is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tls_file_at_start_is_a_fault_retried_until_the_file_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let prefix = unique("tls");
    let ca = dir.path().join("ca.pem");
    let mut cfg = test_config("127.0.0.1", broker.addr().port(), &prefix, "box1", &dir.path().join("o.sqlite"));
    cfg.tls = Some(TlsConfig { ca_file: ca.clone(), cert_file: None, key_file: None });
    let (p, handle) = MqttPublisher::start(&cfg, &tokio::runtime::Handle::current()).expect("the publisher starts");
    until("the link fault", Duration::from_secs(5), || p.counters().link_fault).await;
    for i in 0..4 {
        p.alarm(&alarm(i, "cam1"));
    }
    until("4 alarms in the outbox", Duration::from_secs(5), || p.counters().alarms_pending == 4).await;
    assert!(!p.counters().connected && !p.counters().outbox_fault);
    // A CA file that parses: the fault clears (a TLS handshake with the plain
    // embedded broker then fails like any broker outage, retried).
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
    until("the fault to clear", Duration::from_secs(5), || !p.counters().link_fault).await;
    assert_eq!(p.counters().alarms_pending, 4, "nothing lost meanwhile");
    handle.shutdown().await;
}

/// The embedded broker's port is held by someone else at start: detection
/// goes on, and the broker starts once the port is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_embedded_broker_port_is_retried_until_it_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let prefix = unique("port");
    let cfg = MqttConfig {
        embedded: true,
        embedded_listen: addr,
        ..test_config("127.0.0.1", 1, &prefix, "box1", &dir.path().join("o.sqlite"))
    };
    let (p, handle) = MqttPublisher::start(&cfg, &tokio::runtime::Handle::current()).expect("the publisher starts");
    assert!(p.counters().link_fault && handle.broker_addr().is_none(), "{:?}", p.counters());
    for i in 0..4 {
        p.alarm(&alarm(i, "cam1"));
    }
    until("4 alarms in the outbox", Duration::from_secs(5), || p.counters().alarms_pending == 4).await;
    drop(holder);
    until("the broker and the connection", Duration::from_secs(15), || p.counters().connected).await;
    assert_eq!(handle.broker_addr(), Some(addr));
    until("the queued alarms acknowledged", Duration::from_secs(10), || p.counters().alarms_pending == 0).await;
    let sub = Sub::start("127.0.0.1", addr.port(), &format!("{prefix}/#"), false).await;
    p.alarm(&alarm(4, "cam1"));
    sub.wait(Duration::from_secs(10), "an alarm after the recovery", |m| !alarms_of(m).is_empty()).await;
    // The broker forwards to the subscriber before our PUBACK arrives: wait for it.
    until("the fifth alarm acknowledged", Duration::from_secs(10), || p.counters().alarms_acked == 5).await;
    let c = p.counters();
    assert!(!c.link_fault && c.alarms_pending == 0, "{c:?}");
    handle.shutdown().await;
    sub.stop();
}
