//! Pipeline throughput with three live-view clients on the console vs none,
//! side by side in one run: the daemon in-process, one synthetic camera
//! delivering as fast as the pipeline takes frames (`fps = 0`), the console
//! on loopback. Phases alternate (none, three, none, three, …) so that load
//! from elsewhere on the box falls on both alike; each phase counts decided
//! frames over `--seconds`. Each client reads the MJPEG stream
//! (`/api/live/cam/stream.mjpg`) as a browser tab would. Prints figures; no
//! pass/fail.
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
    println!("console live-view bench: 1 synthetic camera 640x480, demo model, CPU, {seconds} s per phase");
    println!("{:>5} {:>8} {:>12} {:>16}", "round", "viewers", "pipeline fps", "live fps/viewer");
    let mut sums = [(0.0, 0u32); 2];
    for round in 1..=rounds {
        for (k, viewers) in [0usize, 3].into_iter().enumerate() {
            let stop = Arc::new(AtomicBool::new(false));
            let parts = Arc::new(AtomicU64::new(0));
            let clients: Vec<_> = (0..viewers).map(|_| viewer(addr, stop.clone(), parts.clone())).collect();
            std::thread::sleep(Duration::from_secs(1)); // streams running
            let (p0, d0, t0) = (parts.load(Ordering::Relaxed), decided(addr), Instant::now());
            std::thread::sleep(Duration::from_secs(seconds));
            let (p1, d1, dt) = (parts.load(Ordering::Relaxed), decided(addr), t0.elapsed().as_secs_f64());
            stop.store(true, Ordering::Relaxed);
            for c in clients {
                let _ = c.join();
            }
            let fps = (d1 - d0) as f64 / dt;
            let live = if viewers > 0 { (p1 - p0) as f64 / dt / viewers as f64 } else { 0.0 };
            println!("{round:>5} {viewers:>8} {fps:>12.1} {live:>16.2}");
            sums[k].0 += fps;
            sums[k].1 += 1;
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
    let _ = tx.send(Signal::Stop);
    let _ = run.join();
}
