//! Pipeline throughput with three live-view clients on the console vs none,
//! side by side in one run: the daemon in-process, one synthetic camera
//! delivering as fast as the pipeline takes frames (`fps = 0`), the console
//! on loopback. Phases alternate (none, three, none, three, …) so that load
//! from elsewhere on the box falls on both alike; each phase counts decided
//! frames over `--seconds`. Each client reads the MJPEG stream
//! (`/api/live/cam/stream.mjpg`) as a browser tab would. On a box that other
//! work loads, fps swings between phases whatever the console does; so the
//! bench also reads the CPU time of the process and of the console's own
//! threads (`/proc/self/task/*/stat`): the frame path's CPU per decided frame
//! (inference and preprocessing threads: the tap's copies run there), and the
//! share of a core the encoder (`console-live`) and the network runtime
//! (`net`, which serves the streams) took, are the console's cost independent
//! of that load. Prints
//! figures; no pass/fail.
//!
//! `cargo bench --bench console_live -- --seconds 10 --rounds 3`
//! (`--profile dev` builds faster and measures the debug build).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ganomalyd::cmds::run::{daemon, Signal};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).expect("send");
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    got.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

fn decided(addr: SocketAddr) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&get(addr, "/api/camera/cam")).expect("json");
    v["decided"].as_u64().expect("decided")
}

/// A live-view client: reads the MJPEG stream until `stop`, counting parts.
fn viewer(addr: SocketAddr, stop: Arc<AtomicBool>, parts: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        s.write_all(b"GET /api/live/cam/stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        let mut buf = vec![0u8; 256 * 1024];
        let needle = b"--ganomalydframe";
        let mut tail: Vec<u8> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    let found = tail.windows(needle.len()).filter(|w| w == needle).count();
                    parts.fetch_add(found as u64, Ordering::Relaxed);
                    let keep = tail.len().min(needle.len() - 1);
                    tail.drain(..tail.len() - keep);
                }
                Err(_) => continue,
            }
        }
    })
}

/// CPU seconds so far of this process's threads, summed per thread name.
fn cpu_by_thread() -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let tick = 100.0; // USER_HZ on Linux
    for e in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // `pid (comm) state ...`: comm may hold spaces, so split at the last `)`.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
        // After the comm: state is field 3, utime 14 and stime 15 (1-based in proc(5)).
        let t = |i: usize| rest.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(comm).or_insert(0.0) += (t(14) + t(15)) / tick;
    }
    out
}

fn main() {
    let seconds = arg("--seconds", 10);
    let rounds = arg("--rounds", 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let cfg = dir.path().join("ganomalyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[inference]\nproviders = [\"cpu\"]\n[snapshots]\nenabled = false\n[defaults]\nmodel = \"{}\"\nfps = 0\n\
             [cameras.cam]\nsource = {{ kind = \"synthetic\", size = 640, variations = 4 }}\n\
             [console]\nenabled = true\nlisten = \"{addr}\"\n",
            model.display()
        ),
    )
    .expect("config");
    let settings = ganomalyd::config::load(&cfg).expect("config compiles");
    let (tx, rx) = crossbeam_channel::unbounded();
    let run = std::thread::spawn(move || daemon(settings, cfg, rx));
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() || decided(addr) == 0 {
        assert!(t.elapsed() < Duration::from_secs(120), "the daemon did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3)); // warm-up
    println!("console live-view bench: 1 synthetic camera 640x640, demo model, CPU, {seconds} s per phase");
    println!(
        "{:>5} {:>8} {:>12} {:>16} {:>14} {:>16} {:>12}",
        "round", "viewers", "pipeline fps", "live fps/viewer", "path ms/frame", "console-live %", "net %"
    );
    let mut sums = [(0.0, 0u32); 2];
    let mut cpu_per_frame = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    let mut fps_none = 0.0;
    for round in 1..=rounds {
        for (k, viewers) in [0usize, 3].into_iter().enumerate() {
            let stop = Arc::new(AtomicBool::new(false));
            let parts = Arc::new(AtomicU64::new(0));
            let clients: Vec<_> = (0..viewers).map(|_| viewer(addr, stop.clone(), parts.clone())).collect();
            std::thread::sleep(Duration::from_secs(1)); // streams running
            let (p0, d0, c0, t0) = (parts.load(Ordering::Relaxed), decided(addr), cpu_by_thread(), Instant::now());
            std::thread::sleep(Duration::from_secs(seconds));
            let (p1, d1, c1, dt) =
                (parts.load(Ordering::Relaxed), decided(addr), cpu_by_thread(), t0.elapsed().as_secs_f64());
            let used = |name: Option<&str>| -> f64 {
                c1.iter()
                    .filter(|(n, _)| name.is_none_or(|want| n.as_str() == want))
                    .map(|(n, v)| v - c0.get(n).copied().unwrap_or(0.0))
                    .sum()
            };
            stop.store(true, Ordering::Relaxed);
            for c in clients {
                let _ = c.join();
            }
            let fps = (d1 - d0) as f64 / dt;
            let live = if viewers > 0 { (p1 - p0) as f64 / dt / viewers as f64 } else { 0.0 };
            // The frame path's threads (the synthetic camera at fps 0 spins
            // producing frames that are dropped, so it is left out).
            let path: f64 = c1
                .iter()
                .filter(|(n, _)| n.as_str() == "infer" || n.starts_with("prep-"))
                .map(|(n, v)| v - c0.get(n).copied().unwrap_or(0.0))
                .sum();
            let per_frame = path * 1000.0 / (d1 - d0).max(1) as f64;
            let (enc, net) = (used(Some("console-live")) / dt * 100.0, used(Some("net")) / dt * 100.0);
            println!("{round:>5} {viewers:>8} {fps:>12.1} {live:>16.2} {per_frame:>14.3} {enc:>16.1} {net:>12.1}");
            if std::env::var_os("CONSOLE_BENCH_THREADS").is_some() {
                let mut by: Vec<(String, f64)> =
                    c1.iter().map(|(n, v)| (n.clone(), (v - c0.get(n).copied().unwrap_or(0.0)) / dt * 100.0)).collect();
                by.sort_by(|a, b| b.1.total_cmp(&a.1));
                let shown: Vec<String> = by.iter().take(8).map(|(n, v)| format!("{n} {v:.1}%")).collect();
                println!("      threads: {}", shown.join(", "));
            }
            sums[k].0 += fps;
            sums[k].1 += 1;
            cpu_per_frame[k].push(per_frame);
            if viewers == 0 {
                fps_none = fps;
            } else {
                ratios.push(fps / fps_none);
            }
            // Let the taps' want expire before a phase without viewers.
            std::thread::sleep(Duration::from_secs(4));
        }
    }
    let none = sums[0].0 / f64::from(sums[0].1.max(1));
    let three = sums[1].0 / f64::from(sums[1].1.max(1));
    println!(
        "mean pipeline fps: no viewer {none:.1}, three viewers {three:.1}: {:+.1} %",
        (three / none - 1.0) * 100.0
    );
    ratios.sort_by(f64::total_cmp);
    let median = |v: &[f64]| if v.is_empty() { f64::NAN } else { v[v.len() / 2] };
    println!("median of each round's three/none fps ratio: {:+.1} %", (median(&ratios) - 1.0) * 100.0);
    let mut a = cpu_per_frame[0].clone();
    let mut b = cpu_per_frame[1].clone();
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    println!(
        "median CPU of the frame path (inference + preprocessing threads) per decided frame: \
         no viewer {:.3} ms, three viewers {:.3} ms: {:+.1} %",
        median(&a),
        median(&b),
        (median(&b) / median(&a) - 1.0) * 100.0
    );
    let _ = tx.send(Signal::Stop);
    let _ = run.join();
}
