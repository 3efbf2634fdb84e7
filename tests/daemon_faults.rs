//! `ganomalyd run` in-process when the world is wrong at start, after a
//! `check-config` that passed: a corrupt outbox file and a TLS file removed;
//! a read-only outbox directory and the embedded broker's port taken.
//! Detection must keep running (frames decided), and `/healthz` and
//! `/metrics` must say what is wrong (degraded, still 200).

mod mqtt_support;
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ganomalyd::cmds::run::{daemon, Signal};
use ganomalyd::config::Settings;

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut r = ureq::get(&format!("http://127.0.0.1:{port}{path}"))
        .config()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .call()
        .ok()?;
    Some((r.status().as_u16(), r.body_mut().read_to_string().ok()?))
}

fn decided(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|x| x.strip_prefix("ganomalyd_frames_decided_total{camera=\"cam\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Writes the config, compiles it as `check-config` would (everything in
/// place), then lets `break_it` spoil the world before the daemon runs.
fn config(dir: &Path, mqtt: &str, metrics_port: u16) -> (Settings, PathBuf) {
    let model = support::fixture_model(dir, "m.onnx", 7);
    let extra = format!("[metrics]\nenabled = true\nlisten = \"127.0.0.1:{metrics_port}\"\n{mqtt}");
    let path = support::write_config(dir, &model, 30, r#"{ kind = "synthetic", size = 64 }"#, &extra);
    let settings = ganomalyd::config::load(&path).expect("check-config passes");
    (settings, path)
}

/// Runs the daemon until `/healthz` says `degraded` with `reasons` and frames
/// keep being decided; then stops it.
fn runs_degraded(settings: Settings, path: PathBuf, port: u16, reasons: &[&str], gauges: &[&str]) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let run = std::thread::spawn(move || daemon(settings, path, rx));
    let t = Instant::now();
    let health = loop {
        assert!(!run.is_finished(), "the daemon ended: {:?}", run.join());
        assert!(t.elapsed() < Duration::from_secs(90), "no degraded /healthz within 90 s");
        if let Some((200, body)) = get(port, "/healthz") {
            let h: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            if h["status"] == "degraded" && h["degraded"].as_array().map_or(0, Vec::len) == reasons.len() {
                break h;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = health["degraded"].to_string();
    for r in reasons {
        assert!(text.contains(r), "`{r}` not in {health}");
    }
    // Detection goes on: more frames decided from one scrape to the next.
    let first = get(port, "/metrics").expect("metrics").1;
    let t = Instant::now();
    loop {
        let now = get(port, "/metrics").expect("metrics").1;
        if decided(&now) > decided(&first) {
            for g in gauges {
                assert!(now.lines().any(|l| l == *g), "missing `{g}` in\n{now}");
            }
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no frames decided:\n{now}");
        std::thread::sleep(Duration::from_millis(100));
    }
    tx.send(Signal::Stop).expect("stop");
    let result = run.join().expect("no panic");
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn a_corrupt_outbox_and_a_removed_tls_file_leave_detection_running_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
    let port = mqtt_support::free_port();
    let mqtt = format!(
        "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\noutbox_path = \"outbox.sqlite\"\n[mqtt.tls]\nca_file = \"ca.pem\"\n",
        mqtt_support::free_port()
    );
    let (settings, path) = config(dir.path(), &mqtt, port);
    std::fs::write(dir.path().join("outbox.sqlite"), vec![7u8; 8192]).unwrap();
    std::fs::remove_file(&ca).unwrap();
    runs_degraded(
        settings,
        path,
        port,
        &["alarm outbox file unavailable", "MQTT cannot connect"],
        &["ganomalyd_outbox_fault 1", "ganomalyd_mqtt_link_fault 1"],
    );
}

#[test]
fn a_read_only_outbox_dir_and_a_taken_broker_port_leave_detection_running_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let port = mqtt_support::free_port();
    let broker = mqtt_support::free_port();
    let mqtt = format!("[mqtt]\nembedded = true\nembedded_listen = \"127.0.0.1:{broker}\"\n");
    let (mut settings, path) = config(dir.path(), &mqtt, port);
    let ro = mqtt_support::ReadOnlyDir::new();
    if let Some(m) = settings.mqtt.as_mut() {
        m.outbox_path = ro.path.join("outbox.sqlite");
    }
    let _holder = std::net::TcpListener::bind(("127.0.0.1", broker)).expect("hold the broker's port");
    runs_degraded(
        settings,
        path,
        port,
        &["alarm outbox file unavailable", "MQTT cannot connect"],
        &["ganomalyd_outbox_fault 1", "ganomalyd_mqtt_link_fault 1"],
    );
}
