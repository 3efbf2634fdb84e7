//! What pruning the graph to a camera's score buys (issue 17, item 1): raw
//! ONNX Runtime throughput of the full graph against the graph pruned to
//! each score kind, side by side in one run, through the daemon's own
//! sessions (`infer::Model`, the CPU provider, batch 8, the same input).
//!
//! Per kind: the scores' graph alone (no heat map drawn: snapshots and the
//! console off), and the graph the daemon runs on every frame when snapshots
//! are on (the map joins it when it costs no heavy op: `onnx::prune::Pruner::split`),
//! with the cost of the map session for the one frame whose snapshot is
//! taken (batch 1), and each session's memory (the process's RSS growth while
//! it is built, and the bytes of its graph).
//!
//! Models: the bundled demo (64 px, ngf 16, trained), and a 128 px ngf 32
//! model with random weights and random feature/patch statistics (speed does
//! not depend on the weights' values). Figures, not pass/fail; the full graph
//! is measured in the same rounds as the pruned ones, interleaved.
//!
//! `cargo bench --bench prune`; `PRUNE_BENCH_S` sets each measurement's
//! window (default 1 s, 3 rounds, median shown).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use ganomaly_core::onnx::prune::{self, map_output, score_outputs, Pruner};
use ganomaly_core::{ArchSpec, ModelMetadata, ScoreKind};
use ganomalyd::config::{InferenceSettings, Provider};
use ganomalyd::infer::{BatchOutput, Model, Wants};

const BATCH: usize = 8;
const ROUNDS: usize = 3;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A session and what building it and one batch (its arena) grew the process by.
struct Built {
    model: Model,
    rss_kib: u64,
}

fn build(bytes: &[u8], cfg: &InferenceSettings, wants: Option<Wants>, input: &[f32]) -> Built {
    let before = rss_kib();
    let mut model = Model::from_bytes_for(bytes, Path::new("bench.onnx"), cfg, |_| wants).expect("session");
    let mut out = BatchOutput::default();
    model.run(input, BATCH, &mut out).expect("first batch");
    Built { rss_kib: rss_kib().saturating_sub(before), model }
}

fn fps(m: &mut Model, input: &[f32], window: Duration) -> f64 {
    let mut out = BatchOutput::default();
    m.run(input, BATCH, &mut out).expect("warm-up");
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < window {
        m.run(input, BATCH, &mut out).expect("run");
        n += BATCH;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Milliseconds of one on-demand map (batch 1), median of a few.
fn map_ms(m: &mut Model, input: &[f32], output: &str) -> Option<f64> {
    if !m.map_on_demand(output) {
        return None;
    }
    let mut out = BatchOutput::default();
    m.run(input, BATCH, &mut out).expect("run");
    let mut buf = Vec::new();
    let mut t: Vec<f64> = (0..21)
        .map(|_| {
            let s = Instant::now();
            m.heat_map_into(&out, input, 0, output, &mut buf);
            s.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    t.sort_by(f64::total_cmp);
    Some(t[t.len() / 2])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn graph_kib(bytes: &[u8], outputs: &[&str]) -> usize {
    prune::prune(bytes, outputs).map(|b| b.len() / 1024).unwrap_or(0)
}

fn bench_model(label: &str, bytes: &[u8], cfg: &InferenceSettings, window: Duration) {
    let meta: ModelMetadata = ganomaly_core::onnx::read_metadata(bytes).expect("metadata");
    let pruner = Pruner::new(bytes).expect("graph");
    let all_outputs: Vec<String> = pruner.outputs().iter().map(|s| s.to_string()).collect();
    let all: Vec<&str> = all_outputs.iter().map(String::as_str).collect();
    let len = (meta.preprocess.color.channels() * meta.preprocess.size * meta.preprocess.size) as usize;
    let input: Vec<f32> = (0..BATCH * len).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
    let mut full = build(bytes, cfg, None, &input);
    let kinds: Vec<ScoreKind> = ScoreKind::ALL.into_iter().filter(|k| meta.score(*k).is_some()).collect();
    // Per kind: scores only, and what runs every frame with snapshots on.
    let mut rows: Vec<(ScoreKind, Built, Built)> = Vec::new();
    for &k in &kinds {
        let bare = Wants { kinds: BTreeSet::from([k]), maps: BTreeSet::new() };
        let drawn = Wants { kinds: bare.kinds.clone(), maps: BTreeSet::from([map_output(&meta, k)]) };
        // With the map on demand, `drawn`'s every-frame graph is `bare`'s, plus a map session.
        rows.push((k, build(bytes, cfg, Some(bare), &input), build(bytes, cfg, Some(drawn), &input)));
    }
    let mut full_fps = Vec::new();
    let mut got: Vec<(Vec<f64>, Vec<f64>)> = rows.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for _ in 0..ROUNDS {
        full_fps.push(fps(&mut full.model, &input, window));
        for (r, (_, b, d)) in rows.iter_mut().enumerate() {
            got[r].0.push(fps(&mut b.model, &input, window));
            got[r].1.push(fps(&mut d.model, &input, window));
        }
    }
    let ffps = median(full_fps);
    println!();
    println!(
        "{label}: full graph {ffps:.0} fps, {} KiB graph, session +{} MiB RSS",
        graph_kib(bytes, &all),
        full.rss_kib / 1024
    );
    println!("| score | pruned fps (scores only) | ÷ full | every-frame fps with snapshots on | ÷ full | map on demand (1 frame) | graph KiB (scores / + maps) | session RSS MiB (scores / with maps) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (r, (k, b, d)) in rows.iter_mut().enumerate() {
        let scores = score_outputs(&meta, *k);
        let map = map_output(&meta, *k);
        let split = pruner.split(&scores, &[map]).expect("split");
        let pf = median(got[r].0.clone());
        let df = median(got[r].1.clone());
        let on_demand = map_ms(&mut d.model, &input, map);
        let every: Vec<&str> = split.every_frame.iter().map(String::as_str).collect();
        let od: Vec<&str> = split.on_demand.iter().map(String::as_str).collect();
        let kib_maps = graph_kib(bytes, &every) + if od.is_empty() { 0 } else { graph_kib(bytes, &od) };
        println!(
            "| {} | {pf:.0} | {:.2} | {df:.0} | {:.2} | {} | {} / {} | {:.1} / {:.1} |",
            k.as_str(),
            pf / ffps,
            df / ffps,
            on_demand.map_or(format!("in every frame ({map})"), |ms| format!("{ms:.2} ms ({map})")),
            graph_kib(bytes, &scores),
            kib_maps,
            b.rss_kib as f64 / 1024.0,
            d.rss_kib as f64 / 1024.0,
        );
    }
}

fn main() {
    // `cargo test --bench` passes harness flags; there are none to honour.
    if std::env::var_os("ORT_DYLIB_PATH").is_none() {
        if let Some(lib) = ganomalyd::runtime::dev_library(Path::new(env!("CARGO_MANIFEST_DIR"))) {
            std::env::set_var("ORT_DYLIB_PATH", lib);
        }
    }
    let secs: f64 = std::env::var("PRUNE_BENCH_S").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    let window = Duration::from_secs_f64(secs);
    let cfg = InferenceSettings { providers: vec![Provider::Cpu], ..InferenceSettings::default() };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "prune bench: raw ONNX Runtime (CPU provider, daemon session options), batch {BATCH}, {ROUNDS} rounds of {secs} s, median; load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    match std::fs::read(&demo) {
        Ok(bytes) => bench_model("demo model (64 px RGB, ngf 16, trained)", &bytes, &cfg, window),
        Err(e) => println!("models/demo.onnx not readable ({e}): skipped"),
    }
    let arch = ArchSpec { isize: 128, nc: 3, nz: 100, ngf: 32, ndf: 32, extralayers: 0, ..Default::default() };
    let bytes = ganomaly_core::onnx::random_model(&arch, 1).expect("model");
    bench_model("128 px RGB, ngf/ndf 32, random weights and statistics", &bytes, &cfg, window);
}
