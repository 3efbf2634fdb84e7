//! `ganomalyd run` in-process (mini-redis style): `cmds::run::daemon` driven
//! through its signal receiver, on the bundled model and a synthetic camera
//! with defects, with no MQTT. It must raise alarms (snapshots on disk), keep
//! running through a reload of a broken file, and return cleanly on Stop.

use std::path::Path;
use std::time::{Duration, Instant};

use ganomalyd::cmds::run::{daemon, Signal};

mod support;

fn jpegs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "jpg")).count())
        .unwrap_or(0)
}

#[test]
fn the_daemon_runs_alarms_survives_a_bad_reload_and_stops_on_its_signal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    let snaps = dir.path().join("snaps");
    let source =
        r#"{ kind = "synthetic", size = 64, variations = 4, defect_every = 40, defect_frames = 10, strength = 1.0 }"#;
    let path = support::write_config(dir.path(), &model, 50, source, "");
    let settings = ganomalyd::config::load(&path).expect("the config compiles");
    assert_eq!(settings.snapshots.as_ref().map(|s| s.dir.clone()), Some(snaps.clone()), "resolved against the file");

    let (tx, rx) = crossbeam_channel::unbounded();
    let run = std::thread::spawn(move || daemon(settings, path, rx));
    let t = Instant::now();
    while jpegs(&snaps) == 0 {
        assert!(!run.is_finished(), "the daemon ended by itself");
        assert!(t.elapsed() < Duration::from_secs(120), "no alarm snapshot within 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A reload of a file that no longer compiles is refused; the daemon goes on.
    std::fs::write(dir.path().join("ganomalyd.toml"), "[cameras.cam]\nfsp = 3\n").expect("break the config");
    tx.send(Signal::Reload).expect("reload");
    let before = jpegs(&snaps);
    let t = Instant::now();
    while jpegs(&snaps) == before {
        assert!(!run.is_finished(), "the daemon ended after a refused reload");
        assert!(t.elapsed() < Duration::from_secs(120), "no alarm after the refused reload");
        std::thread::sleep(Duration::from_millis(50));
    }

    let stop = Instant::now();
    tx.send(Signal::Stop).expect("stop");
    let result = run.join().expect("the daemon thread did not panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(stop.elapsed() < Duration::from_secs(20), "stop took {:?}", stop.elapsed());
}
