//! Fixtures the daemon's integration tests share: the random-weights model
//! they score with, and configs compiled exactly as `run` compiles them.
//! Each test binary uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ganomaly_core::ArchSpec;
use ganomalyd::config::{InferenceSettings, Provider, Settings};

/// The explicit dev route to ONNX Runtime: the daemon searches no `.venv`
/// itself (a planted library would run as the daemon), so the tests point
/// `ORT_DYLIB_PATH` at the checkout's `.venv` (from `make venv`) when it is
/// unset, as the Makefile does. Called by every helper below; once per test
/// binary, before any thread reads the environment.
pub fn dev_ort() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("ORT_DYLIB_PATH").is_none() {
            if let Some(lib) = ganomalyd::runtime::dev_library(Path::new(env!("CARGO_MANIFEST_DIR"))) {
                std::env::set_var("ORT_DYLIB_PATH", lib);
            }
        }
    });
}

/// The fixtures' architecture: 32 px RGB, small enough to run in debug builds.
pub fn arch() -> ArchSpec {
    ArchSpec { isize: 32, nc: 3, nz: 16, ngf: 8, ndf: 8, extralayers: 0, ..Default::default() }
}

/// Writes an uncalibrated random-weights model of [`arch`] to `dir/name`.
pub fn fixture_model(dir: &Path, name: &str, seed: u64) -> PathBuf {
    dev_ort();
    let bytes = ganomaly_core::onnx::random_model(&arch(), seed).expect("write model");
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write model file");
    p
}

/// The CPU provider alone (the test machines have no GPU).
pub fn cpu() -> InferenceSettings {
    dev_ort();
    InferenceSettings { providers: vec![Provider::Cpu], ..InferenceSettings::default() }
}

/// Compiles a config text as `check-config` and `run` do, relative paths
/// against `dir`; panics with every problem.
pub fn compile(dir: &Path, body: &str) -> Settings {
    dev_ort();
    match ganomalyd::config::compile_str(body, dir) {
        Ok(s) => s,
        Err(e) => panic!("config does not compile: {e}"),
    }
}

/// Writes `dir/ganomalyd.toml`: CPU inference, snapshots in `dir/snaps`,
/// `model` at `fps` for every camera, one camera `cam` with `source` (an
/// inline table), then `extra`.
pub fn write_config(dir: &Path, model: &Path, fps: u32, source: &str, extra: &str) -> PathBuf {
    dev_ort();
    let body = format!(
        "[inference]\nproviders = [\"cpu\"]\n[snapshots]\ndir = \"snaps\"\n\
         [defaults]\nmodel = \"{}\"\nfps = {fps}\n[cameras.cam]\nsource = {source}\n{extra}\n",
        model.display()
    );
    let p = dir.join("ganomalyd.toml");
    std::fs::write(&p, body).expect("write config");
    p
}

/// Waits (at most 2 min) until every source of `p` has ended.
pub fn wait_sources_done(p: &ganomalyd::pipeline::Pipeline, what: &str) {
    let t = std::time::Instant::now();
    while !p.sources_done() {
        assert!(t.elapsed() < std::time::Duration::from_secs(120), "{what} never ended");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
