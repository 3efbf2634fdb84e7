//! What a shadow model costs the camera's own path: one synthetic camera on
//! the bundled demo model, unpaced (as fast as the pipeline takes frames)
//! and paced at 30 fps, without and with a shadow (a copy of the same model,
//! on its own inference thread). Prints decided frames per second, latency
//! p50/p99 and drops of the real path, and what the shadow scored and
//! dropped. Figures, not pass/fail: on a box whose cores the real model
//! already fills, the shadow's session competes for them.
//!
//! `cargo bench --bench shadow` (release), or `cargo test --bench shadow`
//! (a debug build of the daemon's code; ONNX Runtime is native either way).
//! `SHADOW_BENCH_S` sets the measuring window (default 10 s).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ganomalyd::metrics::CameraCounters;
use ganomalyd::pipeline::{Pipeline, StartOptions};
use ganomalyd::publish::NullPublisher;

fn main() {
    // `cargo test --bench` passes harness flags; there are none to honour.
    if std::env::var_os("ORT_DYLIB_PATH").is_none() {
        if let Some(lib) = ganomalyd::runtime::dev_library(Path::new(env!("CARGO_MANIFEST_DIR"))) {
            std::env::set_var("ORT_DYLIB_PATH", lib);
        }
    }
    let secs: u64 = std::env::var("SHADOW_BENCH_S").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    let cand = dir.path().join("candidate.onnx");
    std::fs::copy(&demo, &cand).expect("copy the demo model");
    println!("shadow bench: demo model, 1 synthetic camera 64x64, max_batch 8, {secs} s per run");
    println!("| camera | shadow | real fps | real p50 ms | real p99 ms | real dropped | shadow decided/s | shadow dropped | agreement |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for fps in [0u32, 30] {
        for shadow in [false, true] {
            run(dir.path(), &demo, shadow.then_some(cand.as_path()), fps, secs);
        }
    }
}

fn run(dir: &Path, model: &Path, shadow: Option<&Path>, fps: u32, secs: u64) {
    let shadow_key = shadow.map(|s| format!("shadow_model = \"{}\"\n", s.display())).unwrap_or_default();
    let text = format!(
        "[inference]\nproviders = [\"cpu\"]\nmax_batch = 8\n[snapshots]\nenabled = false\n\
         [cameras.cam]\nmodel = \"{}\"\nfps = {fps}\n{shadow_key}source = {{ kind = \"synthetic\", size = 64, variations = 4 }}\n",
        model.display()
    );
    let settings = ganomalyd::config::compile_str(&text, dir).expect("compiles");
    let opts = StartOptions { stats: false, ..StartOptions::default() };
    let p = Pipeline::start(&settings, Arc::new(NullPublisher), opts).expect("starts");
    let cam = p.counters().into_iter().next().expect("a camera").1;
    std::thread::sleep(Duration::from_secs(2));
    let get = |c: &CameraCounters| (CameraCounters::get(&c.decided), CameraCounters::get(&c.dropped));
    let shadow_figures = |c: &CameraCounters| c.shadow().map(|s| s.stats());
    let (d0, dr0) = get(&cam);
    let s0 = shadow_figures(&cam);
    if let Ok(mut h) = cam.latency.lock() {
        *h = Default::default();
    }
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let dt = t.elapsed().as_secs_f64();
    let (d1, dr1) = get(&cam);
    let s1 = shadow_figures(&cam);
    let (p50, p99) = cam.latency.lock().map(|h| (h.quantile(0.5), h.quantile(0.99))).unwrap_or_default();
    let (shadow_fps, shadow_dropped, agreement) = match (s0, s1) {
        (Some(a), Some(b)) => (
            format!("{:.0}", (b.shadow_decided - a.shadow_decided) as f64 / dt),
            format!("{}", b.dropped - a.dropped),
            format!("{:.3}", b.agreement),
        ),
        _ => ("-".into(), "-".into(), "-".into()),
    };
    println!(
        "| {} | {} | {:.0} | {p50:.2} | {p99:.2} | {} | {shadow_fps} | {shadow_dropped} | {agreement} |",
        if fps == 0 { "unpaced".to_string() } else { format!("{fps} fps") },
        if shadow.is_some() { "yes" } else { "no" },
        (d1 - d0) as f64 / dt,
        dr1 - dr0,
    );
    drop(p.shutdown());
}
