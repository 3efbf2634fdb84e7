//! The daemon's TOML configuration, parsed, checked and compiled once.
//!
//! ```text
//! text ──toml──► ConfigFile (file.rs: tables as written) ──compile.rs──► Settings (settings.rs: typed, resolved)
//!                        └─ renamed.rs: old keys refused by name
//! ```
//! `check-config` and `run` call the same [`load`]; whatever passes it, `run`
//! starts with, and nothing after it parses a string from the file. Global
//! `[defaults]` apply to each `[cameras.<name>]` field by field; each camera
//! source kind owns its table in `capture/<kind>.rs`.

mod compile;
pub mod file;
mod renamed;
pub mod settings;

use std::path::{Path, PathBuf};

pub use compile::Probe;
pub use file::{
    AlarmTable, CameraTable, ConfigFile, InferenceConfig, MetricsConfig, Overlap, PipelineConfig, RecordConfig,
    SnapshotConfig, TilesTable, TriggerTable,
};
pub use ganomaly_core::preprocess::Roi;
pub use settings::{
    Aggregate, AlarmConfig, CameraMode, CameraPlan, CommissioningSettings, FramesFrom, InferenceSettings,
    MetricsSettings, PipelineSettings, Provider, RecordSettings, ScoreChoice, Settings, ShadowPlan, SnapshotSettings,
    TriggerSettings,
};

/// Errors loading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// `message` is the line, column, parser's message and key; never the
    /// line's text (see [`ParseError`]).
    #[error("config file {path} is not valid TOML for ganomalyd: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n  {}", problems.len(), problems.join("\n  "))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

/// Reads, parses, checks and compiles a config file, with the files and
/// devices it names.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    load_with(path, Probe::World)
}

/// [`load`], looking at the world the file names or not.
pub fn load_with(path: &Path, probe: Probe) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
    // Relative paths in the file are relative to the file, and become absolute.
    compile_text(&text, &crate::base::paths::config_dir(path), probe).map_err(|e| match e {
        Error::Parse(_) => ConfigError::Parse { path: path.into(), message: e.to_string() },
        Error::Invalid(problems) => ConfigError::Invalid { path: path.into(), problems },
    })
}

/// Why a text did not compile (a [`ConfigError`] without the file).
#[derive(Debug)]
pub enum Error {
    Parse(ParseError),
    Invalid(Vec<String>),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Parse(e) => write!(f, "{e}"),
            Error::Invalid(problems) => write!(f, "{}", problems.join("; ")),
        }
    }
}

/// A TOML or schema error as `line L, column C: what, in `key``, without
/// the line itself: toml's own message quotes the whole line, and a line can
/// hold a password next to the key that is wrong (`{ url = "http://u:pw@..",
/// timeout = 5 }`). What remains (the parser's message, which may quote the
/// wrong value) has URL user info hidden.
#[derive(Debug)]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    /// The parser's message and the dotted key it is in.
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.column, self.message)
    }
}

impl std::error::Error for ParseError {}

impl ParseError {
    /// `e` without its quote of `text`. The toml error is not kept as a
    /// cause: its Display is the quote, and error chains print causes.
    fn new(text: &str, mut e: toml::de::Error) -> ParseError {
        let at = e.span().map_or(0, |s| s.start).min(text.len());
        let head = text.get(..at).unwrap_or(text);
        let line = head.matches('\n').count() + 1;
        let column = head.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        // Without its input, toml's Display is the message and `in `<keys>``.
        e.set_input(None);
        let message = e.to_string().trim().replace('\n', ", ");
        ParseError { line, column, message: crate::base::redact::text(&message) }
    }
}

/// Parses TOML, refusing renamed keys by their new names (no other checks).
pub fn parse(text: &str) -> Result<ConfigFile, Error> {
    let parse_error = |e| Error::Parse(ParseError::new(text, e));
    let table: toml::Table = toml::from_str(text).map_err(parse_error)?;
    let renamed = renamed::problems(&table);
    if !renamed.is_empty() {
        return Err(Error::Invalid(renamed));
    }
    // Parsed again into the schema, for error messages that carry a line.
    toml::from_str(text).map_err(parse_error)
}

/// Parses, checks and compiles `text`, resolving relative paths against `base`.
pub fn compile_str(text: &str, base: &Path) -> Result<Settings, Error> {
    compile_text(text, base, Probe::World)
}

fn compile_text(text: &str, base: &Path, probe: Probe) -> Result<Settings, Error> {
    compile::compile(&parse(text)?, base, probe).map_err(Error::Invalid)
}

/// Checks and compiles a parsed file, with the files and devices it names.
pub fn compile(file: &ConfigFile, base: &Path) -> Result<Settings, Vec<String>> {
    compile::compile(file, base, Probe::World)
}

/// [`compile`], looking at the world the file names or not.
pub fn compile_with(file: &ConfigFile, base: &Path, probe: Probe) -> Result<Settings, Vec<String>> {
    compile::compile(file, base, probe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::SourceConfig;

    /// The problems a text has (it must parse).
    fn problems(text: &str) -> Vec<String> {
        let file = parse(text).expect("parses");
        match compile(&file, Path::new("/nonexistent")) {
            Ok(_) => Vec::new(),
            Err(p) => p,
        }
    }

    /// One problem starting with each of `want`, and no other.
    fn assert_exactly(problems: &[String], want: &[&str]) {
        for w in want {
            assert!(problems.iter().any(|p| p.starts_with(w)), "missing `{w}` in {problems:#?}");
        }
        assert_eq!(problems.len(), want.len(), "{problems:#?}");
    }

    /// A real model file with every score (the bundled demo model).
    fn demo_model() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx")
    }

    #[test]
    fn camera_inherits_defaults_and_overrides_single_fields() {
        let text = format!(
            r#"
            [defaults]
            model = "{}"
            fps = 10
            score = "recon"
            source = {{ kind = "synthetic", size = 64 }}
            [defaults.alarm]
            min_frames = 4
            threshold = 0.6
            [cameras.a]
            [cameras.b]
            fps = 30
            score = "map_max"
            [cameras.b.alarm]
            min_frames = 2
            "#,
            demo_model().display()
        );
        let s = compile_str(&text, Path::new("/")).expect("compiles");
        assert_eq!(s.cameras.len(), 2);
        let (a, b) = (&s.cameras[0], &s.cameras[1]);
        assert_eq!(a.fps, 10.0);
        assert_eq!(a.alarm.min_frames, 4);
        assert_eq!(a.score, ScoreChoice::Kind(ganomaly_core::ScoreKind::Recon));
        assert_eq!(b.fps, 30.0);
        assert_eq!(b.alarm.min_frames, 2);
        // Not overridden: inherited from [defaults.alarm], not the built-in default.
        assert_eq!(b.alarm.threshold, 0.6);
        // Clear threshold follows the threshold when unset.
        assert!((b.alarm.clear_threshold - 0.55).abs() < 1e-9);
        assert_eq!(b.score, ScoreChoice::Kind(ganomaly_core::ScoreKind::MapMax));
        assert_eq!(a.model, demo_model());
        assert!(format!("{:?}", a.source).starts_with("SyntheticPlan"), "{:?}", a.source);
    }

    #[test]
    fn trigger_settings_inherit_defaults_field_by_field_and_the_record_sits_beside_the_outbox() {
        let text = format!(
            r#"
            [commands]
            enabled = true
            [defaults]
            model = "{}"
            source = {{ kind = "synthetic" }}
            mode = "triggered"
            [defaults.trigger]
            frames = 3
            deadline_s = 2.0
            [cameras.a]
            [cameras.a.trigger]
            aggregate = "mean"
            delay_s = 0.25
            [cameras.b]
            mode = "continuous"
            "#,
            demo_model().display()
        );
        let s = compile_str(&text, Path::new("/")).expect("compiles");
        let a = s.cameras[0].mode.trigger().expect("a is triggered");
        assert_eq!(
            (a.frames, a.deadline, a.aggregate, a.from, a.delay_ms, a.buffer_frames),
            (3, std::time::Duration::from_secs(2), Aggregate::Mean, FramesFrom::Nearest, 250, 8)
        );
        assert!(s.cameras[1].mode.trigger().is_none(), "b overrides the default mode");
        assert_eq!(s.record, None, "without [mqtt] and without a path nothing is recorded");
        let s =
            compile_str(&format!("{text}\n[mqtt]\nembedded = true\noutbox_path = \"/d/o.sqlite\"\n"), Path::new("/"))
                .expect("compiles");
        assert_eq!(s.record.expect("recorded").path, Path::new("/d/record.sqlite"));
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let s = compile_str(
            "[defaults]\nmodel = \"../models/demo.onnx\"\nsource = { kind = \"synthetic\" }\n[snapshots]\ndir = \"snaps\"\n[cameras.a]\n",
            &dir,
        )
        .expect("compiles");
        assert_eq!(s.cameras[0].model, dir.join("../models/demo.onnx"));
        assert_eq!(s.snapshots.expect("on by default").dir, dir.join("snaps"));
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let problems = problems(
            r#"
            [inference]
            max_batch = 0
            [pipeline]
            frame_queue = 0
            [defaults]
            model = "/does/not/exist.onnx"
            [cameras.line3]
            source = { kind = "synthetic", texture = "plaid", size = 64 }
            roi = { x = 60, y = 0, width = 10, height = 10 }
            score = "psnr"
            [cameras.line3.alarm]
            min_frames = 0
            threshold = 0.4
            clear_threshold = 0.6
            "#,
        );
        let want = [
            "inference.max_batch:",
            "pipeline.frame_queue:",
            "cameras.line3.alarm.min_frames: must be ≥ 1",
            "cameras.line3.alarm.clear_threshold: must be ≤ threshold",
            "cameras.line3.source.texture: `plaid`",
            "cameras.line3.score: `psnr`",
            "cameras.line3.roi:",
            "cameras.line3.model: /does/not/exist.onnx does not exist",
        ];
        assert_exactly(&problems, &want);
    }

    #[test]
    fn a_problem_in_defaults_is_named_there_once() {
        let p = problems(
            "[defaults]\nmodel = \"/m.onnx\"\nsource = { kind = \"synthetic\", texture = \"plaid\" }\n[cameras.a]\n[cameras.b]\n",
        );
        assert_eq!(p.iter().filter(|p| p.starts_with("defaults.source.texture: `plaid`")).count(), 1, "{p:#?}");
    }

    #[test]
    fn unknown_keys_are_rejected_at_every_level() {
        for text in [
            "colour = 1\n",
            "[inference]\nprovider = [\"cpu\"]\n",
            "[cameras.a]\nfsp = 3\n",
            "[cameras.a.alarm]\nmin_frame = 3\n",
            "[cameras.a]\nsource = { kind = \"replay\", path = \"x\", lop = true }\n",
            "[cameras.a]\nsource = { kind = \"firewire\" }\n",
        ] {
            assert!(matches!(parse(text), Err(Error::Parse(_))), "accepted: {text}");
        }
    }

    #[test]
    fn renamed_keys_are_refused_with_their_replacement() {
        let Err(Error::Invalid(p)) = parse(
            "[inference]\nmax_wait_ms = 5\n[mqtt]\nreconnect_min_ms = 10\nreconnect_max_ms = 20\nstats_interval_s = 5\n",
        ) else {
            panic!("accepted")
        };
        let want = [
            "inference.max_wait_ms: renamed to `max_wait_s`",
            "mqtt.reconnect_min_ms: renamed to `reconnect_min_s`",
            "mqtt.reconnect_max_ms: renamed to `reconnect_max_s`",
            "mqtt.stats_interval_s: removed",
        ];
        assert_exactly(&p, &want);
        assert!(p[0].contains("0.005"), "the message converts the value: {}", p[0]);
    }

    #[test]
    fn wrong_types_name_the_key() {
        let Err(Error::Parse(err)) = parse("[cameras.a]\nfps = \"fast\"\n") else { panic!("accepted") };
        assert!(err.to_string().contains("fps"), "{err}");
    }

    #[test]
    fn missing_camera_device_is_named() {
        let p = problems(
            "[defaults]\nmodel = \"/m.onnx\"\n[cameras.cam1]\nsource = { kind = \"v4l2\", device = \"/dev/video97\" }\n",
        );
        assert!(p.iter().any(|p| p.starts_with("cameras.cam1.source.device:") && p.contains("/dev/video97")), "{p:#?}");
    }

    #[test]
    fn shipped_configs_use_only_known_keys_and_sane_values() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        // On a dev machine the example's models, devices and files don't
        // exist; anything else it reports is a mistake in the example.
        let example = parse(include_str!("../../config/ganomalyd.toml")).expect("example parses");
        assert_eq!(example.cameras.len(), 2);
        if let Err(problems) = compile(&example, &dir) {
            for p in problems {
                assert!(p.contains("does not exist") || p.starts_with("mqtt."), "example config: {p}");
            }
        }
        let demo = parse(include_str!("../../config/demo.toml")).expect("demo parses");
        assert!(
            matches!(&demo.defaults.source, Some(SourceConfig::Synthetic(s)) if s.defect_every > 0)
                || demo
                    .cameras
                    .values()
                    .any(|c| matches!(&c.source, Some(SourceConfig::Synthetic(s)) if s.defect_every > 0))
        );
        let s = compile(&demo, &dir).expect("the demo config compiles as shipped");
        assert_eq!(s.cameras[0].model, dir.join("../models/demo.onnx"));
        assert!(format!("{:?}", s.cameras[0].source).starts_with("SyntheticPlan"));
    }

    #[test]
    fn a_defaults_source_no_camera_uses_is_still_checked() {
        let p = problems(
            "[defaults]\nmodel = \"/m.onnx\"\nsource = { kind = \"synthetic\", texture = \"plaid\" }\n[cameras.a]\nsource = { kind = \"synthetic\" }\n",
        );
        assert!(p.iter().any(|p| p.starts_with("defaults.source.texture: `plaid`")), "{p:#?}");
    }

    #[test]
    fn a_pacing_too_slow_for_the_clock_is_refused() {
        let p = problems("[defaults]\nfps = 1e-30\n");
        assert!(p.iter().any(|p| p.starts_with("defaults.fps: must be between 0.001 and 1000")), "{p:#?}");
        assert!(!problems("[defaults]\nfps = 0\n").iter().any(|p| p.contains("fps")));
    }

    #[test]
    fn a_disabled_mqtt_table_is_checked_and_an_enabled_one_reads_its_files() {
        let p = problems("[mqtt]\nenabled = false\nport = 0\n");
        assert!(p.iter().any(|p| p.starts_with("mqtt.port:")), "{p:#?}");
        let p = problems(
            "[mqtt]\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"\n[mqtt.tls]\nca_file = \"/nonexistent/ca.pem\"\n",
        );
        assert!(p.iter().any(|p| p.starts_with("mqtt.password_file /nonexistent/pw:")), "{p:#?}");
        assert!(p.iter().any(|p| p.starts_with("mqtt.tls.ca_file /nonexistent/ca.pem:")), "{p:#?}");
    }

    #[test]
    fn parse_errors_never_show_a_cameras_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.toml");
        std::fs::write(
            &path,
            "[cameras.a]\nsource = { kind = \"http-mjpeg\", url = \"http://admin:s3cret@cam/m\", timeout = 5 }\n",
        )
        .expect("write");
        let e = load(&path).expect_err("unknown key").to_string();
        assert!(e.contains("timeout") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn parse_errors_name_line_and_key_but_never_quote_the_line() {
        let text = "[mqtt]\nhost = \"broker\"\n[cameras.a]\nsource = { kind = \"http-mjpeg\", url = \"http://10.0.0.5/m\", password = \"hunter2-SECRET\", timeout_s = \"5\" }\n";
        let Err(Error::Parse(e)) = parse(text) else { panic!("accepted") };
        let shown = e.to_string();
        assert!(!shown.contains("hunter2-SECRET"), "{shown}");
        assert_eq!(e.line, 4, "{shown}");
        assert!(shown.contains("password") && shown.contains("cameras.a.source"), "names the key: {shown}");
        let Err(Error::Parse(e)) = parse("[cameras.a]\nfps = \"fast\"\n") else { panic!("accepted") };
        assert!(e.to_string().starts_with("line 2, column 7:") && e.to_string().contains("fps"), "{e}");
    }

    #[test]
    fn a_relative_config_path_gives_absolute_settings() {
        // Tests run in the package root, so this path is relative to it.
        let s = load(Path::new("config/demo.toml")).expect("the demo config compiles");
        let model = &s.cameras[0].model;
        assert!(model.is_absolute(), "{}", model.display());
        assert_eq!(model.canonicalize().expect("exists"), demo_model().canonicalize().expect("exists"));
        let snaps = s.snapshots.expect("demo snapshots").dir;
        assert!(snaps.is_absolute() && snaps.ends_with("out/demo/snapshots"), "{}", snaps.display());
        assert!(s.mqtt.expect("demo mqtt").outbox_path.is_absolute());
    }

    #[test]
    fn offline_checks_the_file_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.toml");
        let text = "[inference]\nort_library = \"/nonexistent/libonnxruntime.so\"\n\
            [defaults]\nmodel = \"/nonexistent/m.onnx\"\n\
            [cameras.a]\nsource = { kind = \"v4l2\", device = \"/dev/video97\" }\n\
            [cameras.b]\nsource = { kind = \"replay\", path = \"/nonexistent/frames\" }\n\
            [mqtt]\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"\n";
        std::fs::write(&path, text).expect("write");
        let Err(ConfigError::Invalid { problems, .. }) = load(&path) else { panic!("the missing files pass") };
        assert_eq!(problems.len(), 6, "model twice, device, replay folder, ort library, password: {problems:#?}");
        let s = load_with(&path, Probe::Offline).expect("offline, only the file is checked");
        assert_eq!(s.cameras.len(), 2);
        // Ranges are still checked offline.
        std::fs::write(&path, format!("{text}[pipeline]\nframe_queue = 0\n")).expect("write");
        let Err(ConfigError::Invalid { problems, .. }) = load_with(&path, Probe::Offline) else { panic!("accepted") };
        assert!(problems.len() == 1 && problems[0].starts_with("pipeline.frame_queue:"), "{problems:#?}");
    }

    #[test]
    fn the_packaged_config_checks_as_installed_offline() {
        // Its model and directories exist only on a box with the package:
        // `make test-deb` checks it there with the world; here, the file alone.
        let text = include_str!("../../packaging/ganomalyd.toml");
        let file = parse(text).expect("the packaged config parses");
        let s = compile::compile(&file, Path::new("/etc/ganomalyd"), Probe::Offline).expect("it compiles");
        assert_eq!(s.cameras[0].model, Path::new("/usr/share/ganomalyd/models/demo.onnx"));
        assert!(s.mqtt.expect("the embedded broker").embedded);
    }

    #[test]
    fn no_cameras_is_a_problem() {
        assert!(problems("").iter().any(|p| p.starts_with("cameras:")));
    }

    #[test]
    fn disabled_sections_compile_to_none() {
        let text = format!(
            "[snapshots]\nenabled = false\n[mqtt]\nenabled = false\n[defaults]\nmodel = \"{}\"\nsource = {{ kind = \"synthetic\" }}\n[cameras.a]\n",
            demo_model().display()
        );
        let s = compile_str(&text, Path::new("/")).expect("compiles");
        assert!(s.snapshots.is_none() && s.mqtt.is_none() && s.metrics.is_none());
        assert_eq!(s.inference.max_wait, std::time::Duration::from_millis(5));
    }
}
