//! `make soak`: the release daemon as a process, four synthetic cameras on the
//! bundled demo model, until one million frames are decided, with two broker
//! outages of 20 s (a Mosquitto on a private port, stopped and restarted) and
//! an independent QoS 1 subscriber with a persistent session (`mosquitto_sub
//! -c -i ... -q 1`, its own process). Prints frames decided, alarm events
//! raised (the daemon's log) against received (distinct `(id, type)`), and the
//! daemon's RSS at start / middle / end. Fails (non-zero exit) if an alarm
//! event raised did not arrive.
//!
//! Not part of `make test` (minutes of CPU). `SOAK_FRAMES` overrides the
//! million for a quick try; `SOAK_OUTAGE_S` the 20 s.

#[path = "../tests/mqtt_support/mod.rs"]
#[allow(unused_imports)]
mod mqtt_support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mqtt_support::{free_port, Mosquitto};

const CAMERAS: usize = 4;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// VmRSS of `pid` in MiB.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn metrics(port: u16) -> Option<String> {
    let mut r = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .config()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .call()
        .ok()?;
    r.body_mut().read_to_string().ok()
}

/// Sum of a metric over its label sets (`name{...} v` or `name v`).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// 600 fps per camera, paced: more than the pipeline takes on these boxes
/// (the surplus is dropped drop-oldest, counted), while an unpaced (`fps = 0`)
/// synthetic camera would spin a core of its own making frames to drop.
fn config(dir: &Path, broker: u16, metrics_port: u16) -> PathBuf {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    let mut text = format!(
        "[inference]\nproviders = [\"cpu\"]\nmax_batch = 8\nmax_wait_s = 0.005\n\
         [pipeline]\nstats_interval_s = 5\n\
         [defaults]\nmodel = \"{}\"\nfps = 600\n\
         [defaults.alarm]\nmin_frames = 3\nclear_frames = 5\ncooldown_s = 0\n\
         [metrics]\nenabled = true\nlisten = \"127.0.0.1:{metrics_port}\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {broker}\ntopic_prefix = \"soak\"\nnode_id = \"box\"\n\
         keep_alive_s = 5\nreconnect_min_s = 0.2\nreconnect_max_s = 2\nscore_max_rate_hz = 2\n\
         outbox_path = \"outbox.sqlite\"\n",
        model.display()
    );
    for i in 0..CAMERAS {
        // An episode of 60 defective frames in every 2,000: a few alarms a
        // second across the cameras, thousands over the run.
        text += &format!(
            "[cameras.cam{i}]\nsource = {{ kind = \"synthetic\", texture = \"brushed_metal\", size = 64, seed = {i}, \
             variations = 16, defect_every = 2000, defect_frames = 60, strength = 1.0 }}\n"
        );
    }
    let p = dir.join("soak.toml");
    std::fs::write(&p, text).expect("write the soak config");
    p
}

/// `(id, type)` of every alarm event the daemon logged raising.
fn raised(log: &Path) -> Vec<(String, String)> {
    let f = std::fs::File::open(log).expect("daemon log");
    let field = |line: &str, key: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(|v| v.trim_matches('"').to_string())
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.contains(" alarm ") && l.contains("ganomalyd::decide"))
        .filter_map(|l| Some((field(&l, "id=")?, field(&l, "kind=")?.to_lowercase())))
        .collect()
}

/// Distinct `(id, type)` received, and all messages.
fn received(file: &Path) -> (HashSet<(String, String)>, usize) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut set = HashSet::new();
    let mut n = 0;
    for line in text.lines() {
        let Some((_, payload)) = line.split_once(' ') else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) else { continue };
        if let (Some(id), Some(kind)) = (v["id"].as_str(), v["type"].as_str()) {
            n += 1;
            set.insert((id.to_string(), kind.to_string()));
        }
    }
    (set, n)
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let frames = env_u64("SOAK_FRAMES", 1_000_000);
    let outage = Duration::from_secs(env_u64("SOAK_OUTAGE_S", 20));
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(mut broker) = Mosquitto::start(dir.path(), "") else {
        eprintln!("soak: no mosquitto binary (apt-get install mosquitto, or set MOSQUITTO_BIN)");
        std::process::exit(2);
    };
    let sub_file = dir.path().join("received.txt");
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1", "-c", "-i", "soak-subscriber", "-v"])
        .args(["-t", "soak/box/+/alarm"])
        .stdout(std::fs::File::create(&sub_file).expect("subscriber file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (Debian's mosquitto-clients)");
    std::thread::sleep(Duration::from_millis(500));

    let metrics_port = free_port();
    let cfg = config(dir.path(), broker.port, metrics_port);
    let log = dir.path().join("daemon.log");
    let daemon = Command::new(env!("CARGO_BIN_EXE_ganomalyd"))
        .args(["run", "--config"])
        .arg(&cfg)
        .current_dir(dir.path())
        .env("RUST_LOG", "info,ort=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start the daemon");
    let pid = daemon.id();
    let mut daemon = Daemon(daemon);

    let t0 = Instant::now();
    let (mut rss_start, mut rss_mid, mut rss_max) = (None, None, 0f64);
    let outages_at = [frames * 3 / 10, frames * 65 / 100];
    let mut outages_done = 0;
    let mut last_decided: u64;
    let mut last_print = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if let Ok(Some(status)) = daemon.0.try_wait() {
            panic!("the daemon exited: {status}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(t0.elapsed() < Duration::from_secs(30 * 60), "soak over 30 minutes");
        let Some(m) = metrics(metrics_port) else { continue };
        let decided = metric(&m, "ganomalyd_frames_decided_total");
        let rss = rss_mb(pid);
        rss_max = rss_max.max(rss);
        if rss_start.is_none() && decided >= frames / 50 {
            rss_start = Some((decided, rss));
        }
        if rss_mid.is_none() && decided >= frames / 2 {
            rss_mid = Some((decided, rss));
        }
        if last_print.elapsed() >= Duration::from_secs(15) {
            last_print = Instant::now();
            eprintln!(
                "soak: {:>4.0} s, {decided} frames decided, RSS {rss:.1} MiB, alarms queued {} pending {}",
                t0.elapsed().as_secs_f64(),
                metric(&m, "ganomalyd_alarms_queued_total"),
                metric(&m, "ganomalyd_alarms_pending")
            );
        }
        last_decided = decided;
        if outages_done < outages_at.len() && decided >= outages_at[outages_done] {
            eprintln!("soak: broker outage {} of {} s at {decided} frames", outages_done + 1, outage.as_secs());
            broker.stop();
            std::thread::sleep(outage);
            broker.resume();
            outages_done += 1;
        }
        if decided >= frames {
            break;
        }
    }
    let run_s = t0.elapsed().as_secs_f64();
    let decided = last_decided;
    let rss_end = rss_mb(pid);
    // Let the outbox drain, then stop the daemon as systemd would.
    let t = Instant::now();
    while metrics(metrics_port).is_none_or(|m| metric(&m, "ganomalyd_alarms_pending") > 0) {
        assert!(t.elapsed() < Duration::from_secs(120), "the outbox did not drain in 2 minutes");
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = metrics(metrics_port).unwrap_or_default();
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    let status = daemon.0.wait().expect("wait for the daemon");
    let raised = raised(&log);
    let want: HashSet<_> = raised.iter().cloned().collect();
    let t = Instant::now();
    let (got, messages) = loop {
        let (got, n) = received(&sub_file);
        if want.is_subset(&got) || t.elapsed() > Duration::from_secs(30) {
            break (got, n);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = sub.kill();
    let _ = sub.wait();
    let missing: Vec<_> = want.difference(&got).collect();
    let (s_frames, s_rss) = rss_start.unwrap_or((0, f64::NAN));
    let (m_frames, m_rss) = rss_mid.unwrap_or((0, f64::NAN));
    println!("soak: {CAMERAS} synthetic cameras, demo model, {outages_done} broker outages of {} s", outage.as_secs());
    println!("  frames decided      {decided} in {run_s:.0} s ({:.0} frames/s incl. outages)", decided as f64 / run_s);
    println!(
        "  alarm events raised {} (distinct {}), received {} distinct in {messages} messages ({} duplicates), missing {}",
        raised.len(),
        want.len(),
        got.intersection(&want).count(),
        messages.saturating_sub(got.len()),
        missing.len()
    );
    println!(
        "  daemon counters     queued {} acked {} dropped {} dead-lettered {} connects {}",
        metric(&m, "ganomalyd_alarms_queued_total"),
        metric(&m, "ganomalyd_alarms_acked_total"),
        metric(&m, "ganomalyd_alarms_dropped_total"),
        metric(&m, "ganomalyd_alarms_dead_lettered_total"),
        metric(&m, "ganomalyd_mqtt_connects_total"),
    );
    println!(
        "  RSS (MiB)           start {s_rss:.1} (at {s_frames} frames), middle {m_rss:.1} (at {m_frames}), end {rss_end:.1} (at {decided}), max {rss_max:.1}"
    );
    println!("  daemon exit         {status}");
    if !missing.is_empty() {
        eprintln!("soak: FAILED, alarm events raised and never received: {:?}", &missing[..missing.len().min(20)]);
        std::process::exit(1);
    }
    if !status.success() {
        eprintln!("soak: FAILED, the daemon did not stop cleanly");
        std::process::exit(1);
    }
}
