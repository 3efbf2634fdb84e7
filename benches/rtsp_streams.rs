//! 8 RTSP cameras, 640×480 H.264 at 15 fps, decoded on the CPU (libav through
//! decodebin) and scored by the demo model through the whole pipeline:
//! frames decided per second, dropped and broken frames, CPU per stream and
//! the peak RSS of the daemon's process.
//!
//! The cameras are gst-rtsp-server in a child process (this binary with
//! `--serve`), so that the encoder's CPU is not counted as the daemon's; the
//! mount is shared (one encoder, 8 RTSP sessions, each decoded on its own).
//!
//! `cargo bench --bench rtsp_streams [-- --streams 8 --seconds 20]`

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ganomalyd::events::Recorder;
use ganomalyd::metrics::CameraCounters;
use ganomalyd::pipeline::{Pipeline, StartOptions};

#[path = "../tests/gst_support/mod.rs"]
mod gst_support;

const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;
const FPS: u32 = 15;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Process CPU seconds (user + system) from /proc/self/stat; USER_HZ is 100
/// on Linux.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name's closing parenthesis; utime, stime are 14, 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident set (VmHWM), MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn serve() {
    let server = gst_support::RtspServer::start_new(gst_support::ServerOptions {
        width: WIDTH,
        height: HEIGHT,
        fps: FPS,
        shared: true,
        ..Default::default()
    });
    println!("{}", server.port);
    let _ = std::io::stdout().flush();
    // Until the parent closes our stdin.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve") {
        return serve();
    }
    // `cargo bench` passes `--bench`; only our flags matter.
    let streams = arg(&args, "--streams", 8) as usize;
    let seconds = arg(&args, "--seconds", 20);
    let warmup = 5;

    let exe = std::env::current_exe().expect("bench binary");
    let mut server = Command::new(exe)
        .arg("--serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the RTSP server process");
    let mut out = BufReader::new(server.stdout.take().expect("stdout"));
    let mut port = String::new();
    out.read_line(&mut port).expect("port");
    let port: u16 = port.trim().parse().expect("a port");

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut body = String::from(
        "[inference]\nproviders = [\"cpu\"]\n[snapshots]\nenabled = false\n[defaults]\nmodel = \"models/demo.onnx\"\n",
    );
    body.push_str(&format!("width = {WIDTH}\nheight = {HEIGHT}\nfps = {FPS}\n"));
    for i in 0..streams {
        body.push_str(&format!(
            "[cameras.cam{i}]\nsource = {{ kind = \"rtsp\", url = \"rtsp://127.0.0.1:{port}/cam\", latency_ms = 100 }}\n"
        ));
    }
    let cfg = ganomalyd::config::compile_str(&body, root).unwrap_or_else(|e| panic!("config: {e}"));
    let opts = StartOptions { sources: BTreeMap::new(), stats: false, ..StartOptions::default() };
    let p = Pipeline::start(&cfg, Arc::new(Recorder::default()), opts).expect("pipeline");

    let totals = |p: &Pipeline| {
        p.counters().iter().fold((0, 0, 0), |(d, dr, b), (_, c)| {
            (
                d + CameraCounters::get(&c.decided),
                dr + CameraCounters::get(&c.dropped),
                b + CameraCounters::get(&c.broken),
            )
        })
    };
    std::thread::sleep(Duration::from_secs(warmup));
    let (d0, dr0, b0) = totals(&p);
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let (d1, dr1, b1) = totals(&p);
    let cpu1 = cpu_seconds();
    let dt = t0.elapsed().as_secs_f64();
    let decoders: Vec<String> = p
        .counters()
        .iter()
        .filter_map(|(_, c)| c.decoder.lock().ok().and_then(|d| d.clone()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let online = p.counters().iter().filter(|(_, c)| c.online.load(std::sync::atomic::Ordering::Relaxed)).count();
    let report = p.shutdown();
    drop(server.stdin.take());
    let _ = server.wait();

    let decided = (d1 - d0) as f64;
    let offered = (streams as u32 * FPS) as f64 * dt;
    let cpu = cpu1 - cpu0;
    println!(
        "rtsp bench: {streams} streams of {WIDTH}x{HEIGHT} H.264 at {FPS} fps, {dt:.1} s after {warmup} s of warm-up"
    );
    println!("  decoder             {}", decoders.join(", "));
    println!("  cameras online      {online}/{streams}");
    println!("  frames decided/s    {:.1} (offered {:.1})", decided / dt, offered / dt);
    println!("  dropped             {} ({:.2} % of offered)", dr1 - dr0, 100.0 * (dr1 - dr0) as f64 / offered);
    println!("  broken              {}", b1 - b0);
    println!(
        "  CPU                 {:.2} cores in all, {:.1} % of a core per stream",
        cpu / dt,
        100.0 * cpu / dt / streams as f64
    );
    println!("  peak RSS            {:.0} MiB", peak_rss_mib());
    println!(
        "  latency p50/p99     {:.1} / {:.1} ms (capture → decision)",
        report.latency.quantile(0.5),
        report.latency.quantile(0.99)
    );
}
