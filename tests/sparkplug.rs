//! Sparkplug B (issue 14, item 4) against Mosquitto, checked by an
//! independent implementation: `tests/sparkplug_host.py` decodes every
//! message with pysparkplug (PyPI; the protobuf code generated from the
//! specification's `.proto`) and sends the rebirth NCMD it encodes.
//!
//! - [`births_data_rebirth_and_deaths_of_the_daemon`]: the daemon binary as a
//!   child process: NBIRTH (bdSeq, `Node Control/Rebirth`), DBIRTH (the
//!   camera's metrics, the model's sha256), DDATA decoded against the
//!   DBIRTH, `seq` continuous and wrapping 255 → 0, a rebirth NCMD answered
//!   by a new NBIRTH with the same bdSeq, NDEATH (the will) with the
//!   NBIRTH's bdSeq after SIGKILL, the next start's bdSeq one more, and its
//!   NDEATH on a clean stop.
//! - [`verdicts_of_an_outage_go_out_historical`]: the edge node in-process
//!   behind a TCP proxy that is cut: verdicts handed over in the outage, and
//!   while the camera is offline, arrive afterwards flagged
//!   `is_historical`, stamped with their own time, in order, each once.
//!
//! Skipped without Mosquitto or pysparkplug unless `GANOMALY_REQUIRE_MOSQUITTO`
//! / `GANOMALY_REQUIRE_PYTHON` are set (as `make test` does).

mod mqtt_support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ganomalyd::events::{now_ms, Publisher, Verdict, VerdictEvent, PAYLOAD_SCHEMA};
use ganomalyd::publish::sparkplug::{ModelInfo, SparkplugConfig, SparkplugPublisher};
use mqtt_support::*;
use serde_json::Value;

/// Mosquitto: `MQTT_TEST_URL` (as `make test` sets), else one of the test's own.
fn broker(dir: &Path) -> Option<(String, u16, Option<Mosquitto>)> {
    if let Some((host, port)) = external_broker() {
        return Some((host, port, None));
    }
    if let Some(m) = Mosquitto::start(dir, "") {
        return Some(("127.0.0.1".into(), m.port, Some(m)));
    }
    assert!(
        std::env::var_os("GANOMALY_REQUIRE_MOSQUITTO").is_none(),
        "no Mosquitto (MQTT_TEST_URL or /usr/sbin/mosquitto)"
    );
    eprintln!("SKIPPED: no Mosquitto");
    None
}

fn python() -> Option<PathBuf> {
    let p = std::env::var_os("GANOMALY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let ok = Command::new(&p).args(["-c", "import pysparkplug, paho.mqtt"]).status().is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("GANOMALY_REQUIRE_PYTHON").is_none(),
            "{} cannot import pysparkplug: run `make venv`",
            p.display()
        );
        eprintln!("SKIPPED: no python with pysparkplug (make venv)");
        return None;
    }
    Some(p)
}

/// The Sparkplug host: the Python observer as a child process, its decoded
/// messages collected in arrival order.
struct Host {
    child: Child,
    stdin: ChildStdin,
    msgs: Arc<Mutex<Vec<Value>>>,
}

impl Host {
    fn start(python: &Path, host: &str, port: u16, group: &str, node: &str) -> Host {
        Host::start_as(python, host, port, group, node, None)
    }

    /// With `host_id`, it can also publish that primary host's STATE.
    fn start_as(python: &Path, host: &str, port: u16, group: &str, node: &str, host_id: Option<&str>) -> Host {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sparkplug_host.py");
        let port = port.to_string();
        let mut args = vec!["--host", host, "--port", &port, "--group", group, "--node", node];
        if let Some(id) = host_id {
            args.extend(["--host-id", id]);
        }
        let mut child = Command::new(python)
            .arg(script)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Python host");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let sink = msgs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("host printed {line:?}: {e}"));
                sink.lock().unwrap().push(v);
            }
        });
        let h = Host { child, stdin, msgs };
        h.wait(Duration::from_secs(30), "the host's subscription", |m| m.iter().any(|v| v["type"] == "ready"));
        h
    }

    fn all(&self) -> Vec<Value> {
        self.msgs.lock().unwrap().clone()
    }

    /// The Sparkplug messages (not the host's own lines), in arrival order.
    fn sparkplug(&self) -> Vec<Value> {
        self.all().into_iter().filter(|v| !matches!(v["type"].as_str(), Some("ready" | "sent"))).collect()
    }

    fn wait(&self, timeout: Duration, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let msgs = self.all();
            if let Some(e) = msgs.iter().find(|v| v["type"] == "error") {
                panic!("pysparkplug could not decode a message: {e}");
            }
            if done(&msgs) {
                return msgs;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}; got {} messages: {:#?}",
                msgs.len(),
                tail(&msgs)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("write to the host");
        self.stdin.flush().expect("flush");
    }

    /// [`send`](Self::send), and waits until the host says it is published.
    fn command(&mut self, cmd: &str) {
        let before = self.all().iter().filter(|v| v["type"] == "sent" && v["what"] == cmd).count();
        self.send(cmd);
        self.wait(Duration::from_secs(10), cmd, |m| {
            m.iter().filter(|v| v["type"] == "sent" && v["what"] == cmd).count() > before
        });
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(msgs: &[Value]) -> &[Value] {
    &msgs[msgs.len().saturating_sub(8)..]
}

fn of_type<'a>(msgs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    msgs.iter().filter(|v| v["type"] == kind).collect()
}

fn metric<'a>(msg: &'a Value, name: &str) -> &'a Value {
    msg["metrics"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no metric {name} in {msg}"))
}

fn bd_seq(msg: &Value) -> u64 {
    metric(msg, "bdSeq")["value"].as_u64().unwrap_or_else(|| panic!("bdSeq in {msg}"))
}

/// Every message the node published (NCMD is the host's), and checks that
/// `seq` goes up by one from each NBIRTH's 0, 255 wrapping to 0; returns
/// how many times it wrapped outside a birth.
fn check_seq(msgs: &[Value]) -> usize {
    let mut wraps = 0;
    let mut prev: Option<u64> = None;
    for m in msgs {
        match m["type"].as_str() {
            Some("NBIRTH") => {
                assert_eq!(m["seq"], 0, "NBIRTH seq: {m}");
                prev = Some(0);
            }
            Some("NDEATH") => {
                assert_eq!(m["has_seq"], false, "NDEATH carries no seq: {m}");
                prev = None;
            }
            Some("DBIRTH" | "DDATA" | "DDEATH") => {
                let seq = m["seq"].as_u64().unwrap_or_else(|| panic!("seq in {m}"));
                if let Some(p) = prev {
                    assert_eq!(seq, (p + 1) % 256, "seq after {p}: {m}");
                    if p == 255 {
                        wraps += 1;
                    }
                }
                prev = Some(seq);
            }
            _ => {}
        }
    }
    wraps
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).expect("model")).iter().map(|b| format!("{b:02x}")).collect()
}

struct Daemon(Child);

impl Daemon {
    fn spawn(cfg: &Path) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_ganomalyd"))
            .args(["run", "--config", cfg.to_str().expect("utf8")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ganomalyd");
        Daemon(child)
    }

    fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within {within:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn births_data_rebirth_and_deaths_of_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((host, port, _mosquitto)) = broker(dir.path()) else { return };
    let Some(python) = python() else { return };
    let group = unique("spb");
    let mut sparkplug = Host::start(&python, &host, port, &group, "box");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    let cfg = dir.path().join("ganomalyd.toml");
    // A defect in every frame: an alarm at once (an urgent DDATA); 60 fps and
    // 100 DDATA/s so that seq wraps within seconds.
    std::fs::write(
        &cfg,
        format!(
            r#"[inference]
providers = ["cpu"]
[defaults]
model = "{model}"
fps = 60
[cameras.cam]
source = {{ kind = "synthetic", size = 64, variations = 2, defect_every = 1, defect_frames = 1, strength = 1.0 }}
[cameras.cam.alarm]
threshold = 0.3
clear_threshold = 0.05
min_frames = 1
clear_frames = 10000
[mqtt]
host = "{host}"
port = {port}
topic_prefix = "{group}"
node_id = "box"
client_id = "{group}-plain"
outbox_path = "outbox.sqlite"
keep_alive_s = 5
reconnect_min_s = 0.05
reconnect_max_s = 0.5
[sparkplug]
group_id = "{group}"
client_id = "{group}-spb"
outbox_path = "spb.sqlite"
ddata_max_rate_hz = 100
"#,
            model = model.display(),
        ),
    )
    .expect("write config");
    let started = Instant::now();

    let daemon = Daemon::spawn(&cfg);
    let msgs = sparkplug.wait(Duration::from_secs(90), "NBIRTH, DBIRTH and a score DDATA", |m| {
        of_type(m, "DDATA")
            .iter()
            .any(|d| d["metrics"].as_array().is_some_and(|ms| ms.iter().any(|x| x["name"] == "Score")))
    });
    let nbirth = of_type(&msgs, "NBIRTH")[0].clone();
    assert_eq!(nbirth["topic"], format!("spBv1.0/{group}/NBIRTH/box"));
    assert_eq!(
        (nbirth["seq"].as_u64(), nbirth["qos"].as_u64(), nbirth["retain"].as_bool()),
        (Some(0), Some(0), Some(false))
    );
    let b0 = bd_seq(&nbirth);
    assert_eq!(metric(&nbirth, "bdSeq")["datatype"], "INT64");
    let stored: u64 =
        std::fs::read_to_string(dir.path().join("spb.bdseq")).expect("bdSeq file").trim().parse().expect("a number");
    assert_eq!(b0, stored, "the NBIRTH's bdSeq is the one kept on disk");
    let rebirth = metric(&nbirth, "Node Control/Rebirth");
    assert_eq!((rebirth["datatype"].as_str(), rebirth["value"].as_bool()), (Some("BOOLEAN"), Some(false)));

    let dbirth = of_type(&msgs, "DBIRTH")[0].clone();
    assert_eq!((dbirth["device"].as_str(), dbirth["seq"].as_u64()), (Some("cam"), Some(1)));
    assert_eq!(metric(&dbirth, "Model/SHA256")["value"].as_str(), Some(sha256_hex(&model).as_str()));
    assert!(metric(&dbirth, "Model/Path")["value"].as_str().is_some_and(|p| p.ends_with("demo.onnx")));
    assert_eq!(metric(&dbirth, "Online")["value"], true);
    for (name, datatype) in [
        ("Score", "DOUBLE"),
        ("Threshold", "DOUBLE"),
        ("Alarm", "BOOLEAN"),
        ("Verdicts/OK", "UINT64"),
        ("Verdict/Part ID", "STRING"),
    ] {
        assert_eq!(metric(&dbirth, name)["datatype"], datatype, "{name}");
    }
    assert_eq!(metric(&dbirth, "Verdicts/NG")["value"], 0);
    let ddata = of_type(&msgs, "DDATA")
        .into_iter()
        .find(|d| d["metrics"].as_array().is_some_and(|ms| ms.iter().any(|x| x["name"] == "Score")))
        .cloned()
        .expect("a DDATA");
    let score = metric(&ddata, "Score")["value"].as_f64().expect("a score");
    assert!((0.0..=1.0).contains(&score), "{ddata}");
    assert_eq!(metric(&ddata, "Score")["datatype"], "DOUBLE", "typed from the DBIRTH");
    let first_data = started.elapsed();

    // seq runs on across every message of the node and wraps.
    let msgs = sparkplug.wait(Duration::from_secs(90), "seq wrapping 255 → 0", |m| check_seq(m) >= 1);
    let alarm = of_type(&msgs, "DDATA").into_iter().any(|d| {
        d["metrics"].as_array().is_some_and(|ms| ms.iter().any(|x| x["name"] == "Alarm" && x["value"] == true))
    });
    assert!(alarm, "the alarm state reached SCADA as a DDATA");
    let start = of_type(&msgs, "DDATA")
        .into_iter()
        .find(|d| {
            d["metrics"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|x| x["name"] == "Alarm Event/Type" && x["value"] == "start"))
        })
        .cloned()
        .expect("the alarm's start event as a DDATA");
    assert_eq!(start["qos"], 1, "stored and forwarded: QoS 1");
    assert!(metric(&start, "Alarm Event/ID")["value"].as_str().is_some_and(|id| id.starts_with("cam-")), "{start}");
    assert!(!historical_alarm(&start), "raised during the session: {start}");

    // A rebirth request, encoded by pysparkplug.
    let births_before = of_type(&msgs, "NBIRTH").len();
    sparkplug.send("rebirth");
    let msgs = sparkplug.wait(Duration::from_secs(30), "the NBIRTH of the rebirth", |m| {
        let n = of_type(m, "NBIRTH");
        n.len() > births_before && m.iter().skip_while(|v| *v != n[births_before]).any(|v| v["type"] == "DBIRTH")
    });
    let again = of_type(&msgs, "NBIRTH")[births_before].clone();
    assert_eq!((bd_seq(&again), again["seq"].as_u64()), (b0, Some(0)), "same session, same bdSeq");
    let ncmd = of_type(&msgs, "NCMD");
    assert_eq!(ncmd.len(), 1, "the host's command as the broker carried it");

    // SIGKILL: the broker publishes the will.
    drop(daemon);
    let msgs =
        sparkplug.wait(Duration::from_secs(30), "the NDEATH will after SIGKILL", |m| !of_type(m, "NDEATH").is_empty());
    let death = of_type(&msgs, "NDEATH")[0].clone();
    assert_eq!(bd_seq(&death), b0, "NDEATH's bdSeq is the NBIRTH's");
    assert_eq!((death["qos"].as_u64(), death["retain"].as_bool()), (Some(1), Some(false)));
    assert_eq!(death["metrics"].as_array().map(Vec::len), Some(1), "only bdSeq");
    check_seq(&sparkplug.sparkplug());

    // The next start: a new bdSeq; a clean stop publishes its NDEATH itself.
    let births_before = of_type(&msgs, "NBIRTH").len();
    let daemon = Daemon::spawn(&cfg);
    let msgs = sparkplug
        .wait(Duration::from_secs(90), "the restarted daemon's NBIRTH", |m| of_type(m, "NBIRTH").len() > births_before);
    let b1 = bd_seq(of_type(&msgs, "NBIRTH")[births_before]);
    assert_eq!(b1, (b0 + 1) % 256, "bdSeq is kept across restarts and counts on");
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    sparkplug.wait(Duration::from_secs(10), "the NDEATH of the clean stop", |m| {
        of_type(m, "NDEATH").iter().any(|d| bd_seq(d) == b1)
    });
    std::thread::sleep(Duration::from_millis(500));
    let all = sparkplug.sparkplug();
    // Exactly the will of the killed one and the clean stop's own: the clean
    // stop's DISCONNECT made the broker drop its will, and no connection was
    // left half-made (each would fire a will of its own).
    let deaths = of_type(&all, "NDEATH");
    assert_eq!(deaths.len(), 2, "{deaths:#?}");
    let second_birth = of_type(&all, "NBIRTH").into_iter().find(|b| bd_seq(b) == b1).expect("NBIRTH of b1");
    assert!(
        metric(deaths[1], "bdSeq")["timestamp"].as_u64() > second_birth["timestamp"].as_u64(),
        "the clean stop's NDEATH is made at the stop, not the will made at CONNECT: {}",
        deaths[1]
    );
    let wraps = check_seq(&all);
    eprintln!(
        "sparkplug daemon: {} messages decoded by pysparkplug ({} NBIRTH, {} DBIRTH, {} DDATA, {} NDEATH), seq wrapped {wraps}x, \
         bdSeq {b0} then {b1}, first DDATA {:.1} s after the spawn, wall {:.1} s",
        all.len(),
        of_type(&all, "NBIRTH").len(),
        of_type(&all, "DBIRTH").len(),
        of_type(&all, "DDATA").len(),
        of_type(&all, "NDEATH").len(),
        first_data.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

fn verdict(part: &str, seq: u64) -> VerdictEvent {
    let ts = now_ms();
    VerdictEvent {
        schema: PAYLOAD_SCHEMA,
        camera: "a".into(),
        part_id: part.into(),
        verdict: if seq % 2 == 0 { Verdict::Ok } else { Verdict::Ng },
        seq,
        ts,
        trigger_ts: ts,
        latency_ms: 2.5,
        score: Some(0.25),
        raw_score: Some(0.5),
        threshold: Some(1.0),
        kind: Some("latent".into()),
        model_sha256: Some("00".repeat(32)),
        settings_digest: None,
        frame_ts: vec![ts],
        frame_seq: vec![seq],
        threshold_score: Some(0.5),
        snapshot: None,
        reason: None,
    }
}

/// The verdict DDATA of `part`, in arrival order.
fn verdicts_of<'a>(msgs: &'a [Value], part: &str) -> Vec<&'a Value> {
    msgs.iter()
        .filter(|v| v["type"] == "DDATA")
        .filter(|v| {
            v["metrics"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|m| m["name"] == "Verdict/Part ID" && m["value"] == part))
        })
        .collect()
}

fn historical(msg: &Value) -> bool {
    let ms = msg["metrics"].as_array().expect("metrics");
    let h: Vec<bool> = ms
        .iter()
        .filter(|m| m["name"].as_str().is_some_and(|n| n.starts_with("Verdict/")))
        .map(|m| m["is_historical"] == true)
        .collect();
    assert!(h.iter().all(|x| *x == h[0]), "every Verdict metric flagged alike: {msg}");
    h[0]
}

fn historical_alarm(msg: &Value) -> bool {
    let ms = msg["metrics"].as_array().expect("metrics");
    ms.iter()
        .filter(|m| m["name"].as_str().is_some_and(|n| n.starts_with("Alarm Event/")))
        .all(|m| m["is_historical"] == true)
}

#[test]
fn verdicts_of_an_outage_go_out_historical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((host, port, _mosquitto)) = broker(dir.path()) else { return };
    let Some(python) = python() else { return };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let upstream: std::net::SocketAddr = format!("{host}:{port}").parse().expect("broker address");
    let proxy = rt.block_on(Proxy::start(upstream));
    let group = unique("spbv");
    let sparkplug = Host::start(&python, &host, port, &group, "box");
    let text = format!(
        "group_id = \"{group}\"\nedge_node_id = \"box\"\nclient_id = \"{group}\"\noutbox_path = \"spb.sqlite\"\n\
         [broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 2\nconnect_timeout_s = 2\nreconnect_min_s = 0.05\nreconnect_max_s = 0.3\n",
        proxy.port
    );
    let c: SparkplugConfig = toml::from_str(&text).expect("section");
    let mut problems = Vec::new();
    let settings = c.compile(None, dir.path(), &mut problems).unwrap_or_else(|| panic!("{problems:?}"));
    let model = ModelInfo { path: "/models/m.onnx".into(), sha256: "00".repeat(32) };
    let (p, handle) = SparkplugPublisher::start(&settings, vec![("a".into(), model)], rt.handle()).expect("start");
    p.camera_online("a", true);
    sparkplug.wait(Duration::from_secs(30), "DBIRTH", |m| !of_type(m, "DBIRTH").is_empty());

    let live = verdict("p1", 1);
    p.verdict(&live);
    let msgs = sparkplug.wait(Duration::from_secs(30), "the live verdict", |m| !verdicts_of(m, "p1").is_empty());
    let v1 = verdicts_of(&msgs, "p1")[0];
    assert!(!historical(v1), "decided during the session: {v1}");
    assert_eq!(metric(v1, "Verdict/Result")["value"], "ng");
    assert_eq!(metric(v1, "Verdict/Part ID")["timestamp"], live.ts);
    assert_eq!(metric(v1, "Verdict/Score")["datatype"], "DOUBLE");

    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.counters().verdicts_pending > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(handle.counters().verdicts_pending, 0, "p1 acknowledged");

    // The outage: the broker sees the connection end and publishes the will.
    proxy.cut();
    sparkplug.wait(Duration::from_secs(30), "the NDEATH of the cut", |m| !of_type(m, "NDEATH").is_empty());
    let outage: Vec<VerdictEvent> = (2..=4).map(|i| verdict(&format!("p{i}"), i)).collect();
    for v in &outage {
        p.verdict(v);
        std::thread::sleep(Duration::from_millis(20));
    }
    let alarm = ganomalyd::events::AlarmEvent {
        schema: PAYLOAD_SCHEMA,
        id: "a-outage-1".into(),
        camera: "a".into(),
        kind: ganomalyd::events::AlarmKind::Start,
        ts: now_ms(),
        start_ts: now_ms(),
        end_ts: None,
        peak: 0.9,
        peak_raw: 1.8,
        frames: 3,
        first_seq: 1,
        seq: 3,
        snapshot: None,
        reason: None,
    };
    p.alarm(&alarm);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!p.counters().connected);
    assert_eq!(handle.counters().verdicts_pending, 4, "waiting in the Sparkplug outbox");
    rt.block_on(proxy.restore());
    let msgs = sparkplug.wait(Duration::from_secs(30), "the outage's verdicts and alarm", |m| {
        outage.iter().all(|v| !verdicts_of(m, &v.part_id).is_empty())
            && m.iter().any(|v| v["metrics"].as_array().is_some_and(|ms| ms.iter().any(|x| x["value"] == "a-outage-1")))
    });
    // Each CONNECT has its own bdSeq (attempts refused in the outage too).
    let reborn = msgs
        .iter()
        .enumerate()
        .filter(|(_, v)| v["type"] == "NBIRTH")
        .nth(1)
        .map(|(i, _)| i)
        .expect("a new session's NBIRTH");
    let b1 = bd_seq(&msgs[reborn]);
    assert!(b1 > bd_seq(of_type(&msgs, "NBIRTH")[0]), "a new bdSeq: {}", msgs[reborn]);
    // At least once (QoS 1): copies are counted, each must say the same.
    let mut at = Vec::new();
    let mut copies = 0;
    for v in &outage {
        let got = verdicts_of(&msgs, &v.part_id);
        copies += got.len() - 1;
        for g in &got {
            assert!(historical(g), "buffered in the outage: {g}");
            assert_eq!(metric(g, "Verdict/Part ID")["timestamp"], v.ts, "stamped with the verdict's own time");
        }
        at.push(msgs.iter().position(|m| m == got[0]).expect("position"));
    }
    assert!(at[0] > reborn && at.windows(2).all(|w| w[0] < w[1]), "after the new birth, in order: {at:?}");
    let alarm_msgs: Vec<&Value> = msgs
        .iter()
        .filter(|v| {
            v["type"] == "DDATA"
                && v["metrics"]
                    .as_array()
                    .is_some_and(|ms| ms.iter().any(|m| m["name"] == "Alarm Event/ID" && m["value"] == "a-outage-1"))
        })
        .collect();
    assert!(
        !alarm_msgs.is_empty() && alarm_msgs.iter().all(|m| historical_alarm(m)),
        "the outage's alarm event, historical: {alarm_msgs:?}"
    );

    // A camera offline: DDEATH; its verdict waits for the DBIRTH and goes out historical.
    p.camera_online("a", false);
    sparkplug.wait(Duration::from_secs(30), "DDEATH", |m| !of_type(m, "DDEATH").is_empty());
    let offline = verdict("p5", 5);
    p.verdict(&offline);
    std::thread::sleep(Duration::from_millis(500));
    assert!(verdicts_of(&sparkplug.all(), "p5").is_empty(), "no DDATA for a dead device");
    p.camera_online("a", true);
    let msgs =
        sparkplug.wait(Duration::from_secs(30), "the offline camera's verdict", |m| !verdicts_of(m, "p5").is_empty());
    assert!(historical(verdicts_of(&msgs, "p5")[0]));
    let live = verdict("p6", 6);
    p.verdict(&live);
    let msgs =
        sparkplug.wait(Duration::from_secs(30), "a live verdict after all", |m| !verdicts_of(m, "p6").is_empty());
    assert!(!historical(verdicts_of(&msgs, "p6")[0]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.counters().verdicts_pending > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(handle.counters().verdicts_pending, 0, "every verdict acknowledged and deleted");
    let c = handle.counters();
    handle.shutdown_blocking(Duration::from_secs(10));
    let msgs = sparkplug.wait(Duration::from_secs(10), "the NDEATH of the clean stop", |m| {
        of_type(m, "NDEATH").iter().any(|d| bd_seq(d) == b1)
    });
    check_seq(&msgs);
    eprintln!(
        "sparkplug verdicts: {c:?}; {} messages decoded, {copies} duplicate deliveries of the outage's verdicts",
        msgs.len()
    );
}

/// `plain_topics = false`: the daemon (in-process) publishes Sparkplug only;
/// `[mqtt]` just names the broker.
#[test]
fn sparkplug_only_publishes_no_plain_topic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((host, port, _mosquitto)) = broker(dir.path()) else { return };
    let Some(python) = python() else { return };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let group = unique("spbo");
    let plain = rt.block_on(Sub::start(&host, port, &format!("{group}/#"), false));
    let sparkplug = Host::start(&python, &host, port, &group, "box");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    let cfg = dir.path().join("ganomalyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[inference]\nproviders = [\"cpu\"]\n[defaults]\nmodel = \"{}\"\nfps = 10\n\
             [cameras.cam]\nsource = {{ kind = \"synthetic\", size = 64, variations = 2 }}\n\
             [mqtt]\nhost = \"{host}\"\nport = {port}\ntopic_prefix = \"{group}\"\nnode_id = \"box\"\noutbox_path = \"outbox.sqlite\"\n\
             [sparkplug]\ngroup_id = \"{group}\"\nclient_id = \"{group}-spb\"\nplain_topics = false\noutbox_path = \"spb.sqlite\"\n",
            model.display()
        ),
    )
    .expect("write config");
    let settings = ganomalyd::config::load(&cfg).expect("the config compiles");
    assert!(settings.sparkplug.as_ref().is_some_and(|s| !s.plain_topics));
    let (tx, rx) = crossbeam_channel::unbounded();
    let run = std::thread::spawn(move || ganomalyd::cmds::run::daemon(settings, cfg, rx));
    sparkplug.wait(Duration::from_secs(60), "a score DDATA", |m| {
        of_type(m, "DDATA")
            .iter()
            .any(|d| d["metrics"].as_array().is_some_and(|ms| ms.iter().any(|x| x["name"] == "Score")))
    });
    tx.send(ganomalyd::cmds::run::Signal::Stop).expect("stop");
    run.join().expect("no panic").expect("a clean stop");
    let msgs =
        sparkplug.wait(Duration::from_secs(10), "the NDEATH of the clean stop", |m| !of_type(m, "NDEATH").is_empty());
    assert_eq!(bd_seq(of_type(&msgs, "NDEATH")[0]), bd_seq(of_type(&msgs, "NBIRTH")[0]));
    // The plain subscriber has been listening all along.
    let got = plain.all();
    assert!(got.is_empty(), "plain topics published: {:?}", got.iter().map(|m| &m.topic).collect::<Vec<_>>());
}

/// Sparkplug 3.0's primary host: no births before its online STATE; its
/// offline STATE ends the session (NDEATH, a new CONNECT with a new bdSeq)
/// and data waits, historical afterwards; a stale offline STATE (older than
/// the last online one) changes nothing.
#[test]
fn births_wait_for_the_primary_host_and_its_offline_state_ends_the_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((host, port, _mosquitto)) = broker(dir.path()) else { return };
    let Some(python) = python() else { return };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let group = unique("spbh");
    let host_id = format!("{group}-scada");
    let mut scada = Host::start_as(&python, &host, port, &group, "box", Some(&host_id));
    let text = format!(
        "group_id = \"{group}\"\nedge_node_id = \"box\"\nclient_id = \"{group}\"\noutbox_path = \"spb.sqlite\"\nprimary_host_id = \"{host_id}\"\n\
         [broker]\nhost = \"{host}\"\nport = {port}\nkeep_alive_s = 2\nconnect_timeout_s = 2\nreconnect_min_s = 0.05\nreconnect_max_s = 0.3\n"
    );
    let c: SparkplugConfig = toml::from_str(&text).expect("section");
    let mut problems = Vec::new();
    let settings = c.compile(None, dir.path(), &mut problems).unwrap_or_else(|| panic!("{problems:?}"));
    let model = ModelInfo { path: "/models/m.onnx".into(), sha256: "00".repeat(32) };
    let (p, handle) = SparkplugPublisher::start(&settings, vec![("a".into(), model)], rt.handle()).expect("start");
    p.camera_online("a", true);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.counters().connected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.counters().connected, "connected");
    std::thread::sleep(Duration::from_millis(700));
    assert!(of_type(&scada.all(), "NBIRTH").is_empty(), "no births before the host is online");

    scada.command("state online");
    let msgs =
        scada.wait(Duration::from_secs(20), "births after the online STATE", |m| !of_type(m, "DBIRTH").is_empty());
    let b0 = bd_seq(of_type(&msgs, "NBIRTH")[0]);
    p.verdict(&verdict("h1", 1));
    scada.wait(Duration::from_secs(20), "a live verdict", |m| !verdicts_of(m, "h1").is_empty());

    // An offline STATE older than the last online one: a late death of an
    // earlier host session. Nothing happens.
    scada.command("state stale");
    std::thread::sleep(Duration::from_millis(700));
    assert!(of_type(&scada.all(), "NDEATH").is_empty(), "a stale offline STATE ended the session");

    scada.command("state offline");
    let msgs =
        scada.wait(Duration::from_secs(20), "the NDEATH of the session's end", |m| !of_type(m, "NDEATH").is_empty());
    assert_eq!(bd_seq(of_type(&msgs, "NDEATH")[0]), b0);
    let waiting = verdict("h2", 2);
    p.verdict(&waiting);
    // Reconnected, and waiting for the host.
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.counters().connects < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(p.counters().connects, 2, "a new session after the host's offline STATE");
    std::thread::sleep(Duration::from_millis(700));
    let msgs = scada.all();
    assert_eq!(of_type(&msgs, "NBIRTH").len(), 1, "no births while the host is offline");
    assert!(verdicts_of(&msgs, "h2").is_empty(), "no data while the host is offline");

    scada.command("state online");
    let msgs =
        scada.wait(Duration::from_secs(20), "births and the waiting verdict", |m| !verdicts_of(m, "h2").is_empty());
    let births = of_type(&msgs, "NBIRTH");
    assert_eq!(births.len(), 2, "{births:?}");
    assert!(bd_seq(births[1]) > b0, "a new CONNECT, a new bdSeq");
    let h2 = verdicts_of(&msgs, "h2")[0];
    assert!(historical(h2), "it waited for the host: {h2}");
    check_seq(&msgs);
    scada.command("clear");
    handle.shutdown_blocking(Duration::from_secs(10));
    eprintln!("sparkplug primary host: {:?}", p.counters());
}
