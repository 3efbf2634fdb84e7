//! `stats` goes out when the pipeline hands a report over (every
//! `pipeline.stats_interval_s`), once per report: the publisher keeps no timer
//! of its own that would re-send the latest one or hold new ones back.

mod mqtt_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ganomalyd::events::{Publisher, StatsReport, PAYLOAD_SCHEMA};
use ganomalyd::publish::{EmbeddedBroker, MqttPublisher};
use mqtt_support::*;

fn report(ts: u64) -> StatsReport {
    StatsReport { schema: PAYLOAD_SCHEMA, ts, provider: "cpu".into(), cameras: Vec::new() }
}

fn stats_ts(msgs: &[Msg]) -> Vec<u64> {
    msgs.iter()
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).expect("stats JSON")["ts"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stats_report_is_published_once_when_handed_over() {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).expect("embedded broker");
    let (host, port) = (broker.addr().ip().to_string(), broker.addr().port());
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("stats");
    let topic = format!("{prefix}/box1/stats");
    let sub = Sub::start(&host, port, &topic, false).await;
    let cfg = test_config(&host, port, &prefix, "box1", &dir.path().join("outbox.sqlite"));
    let (publisher, handle) = MqttPublisher::start(&cfg, &tokio::runtime::Handle::current()).unwrap();
    let p: Arc<dyn Publisher> = publisher.clone();
    // Most likely before the connection is up: it waits in its slot.
    p.stats(&report(100));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !publisher.counters().connected {
        assert!(Instant::now() < deadline, "publisher never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for ts in 101..=103 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        p.stats(&report(ts));
    }
    let msgs = sub.wait(Duration::from_secs(5), "four stats reports", |m| m.len() >= 4).await;
    assert_eq!(stats_ts(&msgs), [100, 101, 102, 103], "each report once, in order");
    // Longer than any stats period the tests configure: nothing is re-sent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stats_ts(&sub.all()), [100, 101, 102, 103], "a report was published again without a new one");
    let v: serde_json::Value = serde_json::from_slice(&msgs[3].payload).unwrap();
    assert_eq!(v["mqtt"]["connected"], true, "the publisher's counters ride along");
    handle.shutdown().await;
    sub.stop();
}
