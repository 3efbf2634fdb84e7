//! The embedded broker's memory is bounded (issue 16.5): rumqttd keeps each
//! subscription filter's messages in an in-memory log that is never freed,
//! and with its example settings (100 MB × 10 segments) weeks of scores fill a
//! small box. Publishing 60 MB under one filter must leave the process at
//! most a few segments larger, as `publish::broker` promises (about 3 MB per
//! filter). With rumqttd's example settings this test sees +125 MB.
//! Alone in its test binary so that the process's RSS is the broker's.

use std::time::{Duration, Instant};

use ganomalyd::publish::EmbeddedBroker;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_topic_flooded_with_messages_holds_only_its_bounded_log() {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().expect("addr")).expect("broker");
    // rumqttd logs messages per subscription filter, and keeps a filter's log
    // after its subscriber leaves: an HMI that once subscribed to everything.
    {
        let opts = MqttOptions::new("hmi", broker.addr().ip().to_string(), broker.addr().port());
        let (sub, mut conn) = Client::new(opts, 4);
        sub.subscribe("ganomalyd/#", QoS::AtMostOnce).expect("subscribe");
        for ev in conn.iter() {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = ev {
                break;
            }
            ev.expect("subscriber connection");
        }
        let _ = sub.disconnect();
    }
    let mut opts = MqttOptions::new("flood", broker.addr().ip().to_string(), broker.addr().port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(opts, 16);
    let acks = std::thread::spawn(move || {
        // QoS 1: each publish acknowledged by the broker, so all of them were
        // taken into its log before the figures are read.
        let mut acked = 0u32;
        for ev in connection.iter() {
            match ev {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == 16_384 {
                        return acked;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("connection: {e}"),
            }
        }
        acked
    });
    let payload = vec![b's'; 4096];
    // Warm-up: the broker's own buffers and the first segments exist.
    let warm = 1024;
    for _ in 0..warm {
        client.publish("ganomalyd/box/line3/score", QoS::AtLeastOnce, false, payload.clone()).expect("publish");
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kb();
    let t = Instant::now();
    for _ in warm..16_384 {
        client.publish("ganomalyd/box/line3/score", QoS::AtLeastOnce, false, payload.clone()).expect("publish");
    }
    let acked = acks.join().expect("ack thread");
    assert_eq!(acked, 16_384);
    let after = rss_kb();
    let grown_mb = after.saturating_sub(before) as f64 / 1024.0;
    println!(
        "published {} MB to one topic in {:.1} s; RSS {} → {} kB (+{grown_mb:.1} MB)",
        ((16_384 - warm) * 4096) >> 20,
        t.elapsed().as_secs_f64(),
        before,
        after
    );
    // 60 MB went through; the log keeps about 3 MB of it (beyond the warm-up's 4 MB).
    assert!(grown_mb < 20.0, "RSS grew {grown_mb:.1} MB for one topic");
}
