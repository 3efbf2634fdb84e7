//! The config half of issue 16's bad-input suite, and its rule "if
//! `check-config` says ok, `run` must not fail on the config".
//!
//! - [`broken_configs_are_refused_naming_the_key_and_no_secret`]: each broken
//!   config goes through `config::load`, the compile `check-config` and `run`
//!   share, with the world probed (files, devices, password sources); each
//!   must be refused with a problem that names the key, and no message may
//!   hold the secret `hunter2-SECRET` that every config with a credential
//!   carries (in a password file, a password variable, a camera URL or a line
//!   next to the wrong key).
//! - [`boundary_configs_run`]: configs with each numeric key at its accepted
//!   minimum or maximum compile, and the daemon runs each in-process for about
//!   a second and stops cleanly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ganomalyd::cmds::run::{daemon, Signal};
use ganomalyd::config::{self, ConfigError};

mod support;

const SECRET: &str = "hunter2-SECRET";
/// A variable this test sets to the secret.
const PW_VAR: &str = "GANOMALYD_TEST_BOUNDS_PW";

fn demo_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx")
}

/// A valid config as sections (name, body), each case appending to a
/// section's body or adding sections: the result is what the case's
/// broken key is added to.
fn text(dir: &Path, changes: &[(&str, &str)]) -> String {
    let mut sections: Vec<(String, String)> = vec![
        ("inference".into(), String::new()),
        ("snapshots".into(), String::new()),
        (
            "defaults".into(),
            format!(
                "model = \"{}\"\nsource = {{ kind = \"synthetic\", size = 64, variations = 2 }}\n",
                demo_model().display()
            ),
        ),
        ("cameras.cam".into(), String::new()),
    ];
    for (name, body) in changes {
        let body = body.replace("{DIR}", &dir.display().to_string());
        match sections.iter_mut().find(|(n, _)| n == name) {
            Some((_, b)) => b.push_str(&format!("{body}\n")),
            None => sections.push((name.to_string(), format!("{body}\n"))),
        }
    }
    // Snapshots and an `[mqtt]` table's outbox go to the test's folder
    // unless the case says where.
    if let Some((_, b)) = sections.iter_mut().find(|(n, _)| n == "inference") {
        if !b.contains("providers =") {
            b.push_str("providers = [\"cpu\"]\n");
        }
    }
    if let Some((_, b)) = sections.iter_mut().find(|(n, _)| n == "snapshots") {
        if !b.contains("dir =") {
            b.push_str(&format!("dir = \"{}\"\n", dir.join("snaps").display()));
        }
    }
    if let Some((_, b)) = sections.iter_mut().find(|(n, _)| n == "mqtt") {
        if !b.contains("outbox_path") {
            b.push_str(&format!("outbox_path = \"{}\"\n", dir.join("outbox.sqlite").display()));
        }
    }
    sections.iter().filter(|(n, _)| !n.is_empty()).map(|(n, b)| format!("[{n}]\n{b}")).collect()
}

/// Files some cases point at, in `dir`.
fn fixtures(dir: &Path) {
    std::fs::create_dir_all(dir.join("frames/snaps")).expect("mkdir");
    image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9])).save(dir.join("frames/a.png")).expect("png");
    std::fs::create_dir_all(dir.join("bmps")).expect("mkdir");
    std::fs::write(dir.join("bmps/a.bmp"), b"BM not really").expect("bmp");
    std::fs::create_dir_all(dir.join("fakes")).expect("mkdir");
    std::fs::write(dir.join("fakes/a.png"), format!("not a png {SECRET}")).expect("fake");
    std::fs::write(dir.join("pw"), format!("{SECRET}\n")).expect("pw");
    std::fs::write(dir.join("long-pw"), "p".repeat(70_000)).expect("pw");
    std::fs::write(dir.join("empty.pem"), "").expect("pem");
    std::fs::write(dir.join("not-a-model.onnx"), "hello").expect("model");
}

/// (section, what to append to it); section `rename` renames camera `cam`.
type Changes = Vec<(&'static str, String)>;

/// (what, changes, the key the refusal must name).
fn cases() -> Vec<(&'static str, Changes, &'static str)> {
    let s = |v: &str| v.to_string();
    let long_name = "c".repeat(65);
    let long_prefix = format!("topic_prefix = \"{}\"", "p".repeat(1025));
    let long_user = format!("username = \"{}\"", "u".repeat(70_000));
    let cred_url = format!("http://admin:{SECRET}@");
    let mut c: Vec<(&'static str, Changes, &'static str)> = vec![
        // [pipeline]
        (
            "stats interval beyond a Duration",
            vec![("pipeline", s("stats_interval_s = 1e20"))],
            "pipeline.stats_interval_s",
        ),
        ("stats interval zero", vec![("pipeline", s("stats_interval_s = 0.0"))], "pipeline.stats_interval_s"),
        ("no frame queue", vec![("pipeline", s("frame_queue = 0"))], "pipeline.frame_queue"),
        ("huge frame queue", vec![("pipeline", s("frame_queue = 100000"))], "pipeline.frame_queue"),
        ("no preprocess thread", vec![("pipeline", s("preprocess_threads = 0"))], "pipeline.preprocess_threads"),
        ("10k preprocess threads", vec![("pipeline", s("preprocess_threads = 10000"))], "pipeline.preprocess_threads"),
        // [inference]
        ("batch zero", vec![("inference", s("max_batch = 0"))], "inference.max_batch"),
        ("batch of a million", vec![("inference", s("max_batch = 1000000"))], "inference.max_batch"),
        ("batch wait beyond a Duration", vec![("inference", s("max_wait_s = 1e20"))], "inference.max_wait_s"),
        ("negative batch wait", vec![("inference", s("max_wait_s = -1.0"))], "inference.max_wait_s"),
        ("100k intra threads", vec![("inference", s("intra_threads = 100000"))], "inference.intra_threads"),
        ("GPU 4e9", vec![("inference", s("device_id = 4000000000"))], "inference.device_id"),
        ("no provider", vec![("inference", s("providers = []"))], "inference.providers"),
        (
            "accelerator required, none listed",
            vec![("inference", s("require_accelerator = true"))],
            "inference.require_accelerator",
        ),
        (
            "missing ORT library",
            vec![("inference", s("ort_library = \"/nonexistent/libonnxruntime.so\""))],
            "inference.ort_library",
        ),
        ("a wait as a word", vec![("inference", s("max_wait_s = \"soon\""))], "inference.max_wait_s"),
        // [snapshots]
        ("quality 0", vec![("snapshots", s("quality = 0"))], "snapshots.quality"),
        ("quality 101", vec![("snapshots", s("quality = 101"))], "snapshots.quality"),
        ("overlay 2", vec![("snapshots", s("overlay_alpha = 2.0"))], "snapshots.overlay_alpha"),
        ("retain none", vec![("snapshots", s("retain = 0"))], "snapshots.retain"),
        ("retain 10 million", vec![("snapshots", s("retain = 10000000"))], "snapshots.retain"),
        (
            "snapshots inside a replay folder",
            vec![
                ("cameras.cam", s("source = { kind = \"replay\", path = \"{DIR}/frames\" }")),
                ("snapshots", s("dir = \"{DIR}/frames/snaps\"")),
            ],
            "snapshots.dir",
        ),
        (
            "snapshots holding a replay folder",
            vec![
                ("cameras.cam", s("source = { kind = \"replay\", path = \"{DIR}/frames/*.png\" }")),
                ("snapshots", s("dir = \"{DIR}\"")),
            ],
            "snapshots.dir",
        ),
        (
            "snapshots in the replay folder, through ..",
            vec![
                ("cameras.cam", s("source = { kind = \"replay\", path = \"{DIR}/frames\" }")),
                ("snapshots", s("dir = \"{DIR}/bmps/../frames\"")),
            ],
            "snapshots.dir",
        ),
        // [metrics]
        ("listen without port", vec![("metrics", s("listen = \"localhost\""))], "metrics.listen"),
        ("stale after 1e20 s", vec![("metrics", s("stale_after_s = 1e20"))], "metrics.stale_after_s"),
        ("stale after half a second", vec![("metrics", s("stale_after_s = 0.5"))], "metrics.stale_after_s"),
        // [commands]
        ("an unknown command allowed", vec![("commands", s("allow = [\"trigger\", \"explode\"]"))], "commands.allow"),
        (
            "commands over HTTP on a public metrics port",
            vec![("metrics", s("enabled = true\nlisten = \"0.0.0.0:9464\"")), ("commands", s("enabled = true"))],
            "commands.http",
        ),
        // [console]
        (
            "a public console without a credential",
            vec![("console", s("enabled = true\nlisten = \"0.0.0.0:8090\""))],
            "console.listen",
        ),
        ("console listen without port", vec![("console", s("listen = \"localhost\""))], "console.listen"),
        ("console at 100 fps", vec![("console", s("live_fps = 100.0"))], "console.live_fps"),
        ("console history of a year", vec![("console", s("history_s = 3e7"))], "console.history_s"),
        ("console samples at 0 Hz", vec![("console", s("score_rate_hz = 0.0"))], "console.score_rate_hz"),
        ("no console alarms kept", vec![("console", s("alarms_kept = 0"))], "console.alarms_kept"),
        ("a million console snapshots", vec![("console", s("snapshots_kept = 1000000"))], "console.snapshots_kept"),
        ("console connections 0", vec![("console", s("max_connections = 0"))], "console.max_connections"),
        (
            "console token unset",
            vec![("console", s("enabled = true\ntoken_env = \"GANOMALYD_TEST_UNSET_43\""))],
            "console.token_env",
        ),
        (
            "console token and user",
            vec![(
                "console",
                format!("enabled = true\ntoken_env = \"{PW_VAR}\"\nuser = \"op\"\npassword_env = \"{PW_VAR}\""),
            )],
            "console.token_file",
        ),
        (
            "console password without user",
            vec![("console", format!("enabled = true\npassword_env = \"{PW_VAR}\""))],
            "console.user",
        ),
        (
            "missing console password file",
            vec![("console", s("enabled = true\nuser = \"op\"\npassword_file = \"/nonexistent/pw\""))],
            "console.password_file",
        ),
        // cameras and [defaults]
        ("a frame in 3e12 years", vec![("defaults", s("fps = 1e-20"))], "defaults.fps"),
        ("a billion fps", vec![("cameras.cam", s("fps = 1e9"))], "cameras.cam.fps"),
        ("NaN fps", vec![("cameras.cam", s("fps = nan"))], "cameras.cam.fps"),
        ("width 0", vec![("cameras.cam", s("width = 0"))], "cameras.cam.width"),
        (
            "frames over the camera's limits",
            vec![("cameras.cam", s("limits = { max_width = 32, max_height = 32 }"))],
            "cameras.cam.width/height",
        ),
        ("width 100k", vec![("cameras.cam", s("width = 100000"))], "cameras.cam.width"),
        ("height 4e9", vec![("defaults", s("height = 4000000000"))], "defaults.height"),
        ("empty roi", vec![("cameras.cam", s("roi = { x = 0, y = 0, width = 0, height = 8 }"))], "cameras.cam.roi"),
        (
            "roi outside",
            vec![("cameras.cam", s("roi = { x = 60, y = 0, width = 10, height = 10 }"))],
            "cameras.cam.roi",
        ),
        (
            "roi far away on a replay",
            vec![
                ("cameras.cam", s("source = { kind = \"replay\", path = \"{DIR}/frames\" }")),
                ("cameras.cam", s("roi = { x = 4000000000, y = 0, width = 10, height = 10 }")),
                ("snapshots", s("enabled = false")),
            ],
            "cameras.cam.roi",
        ),
        ("missing model", vec![("cameras.cam", s("model = \"/nonexistent/m.onnx\""))], "cameras.cam.model"),
        ("a model that is text", vec![("cameras.cam", s("model = \"{DIR}/not-a-model.onnx\""))], "cameras.cam.model"),
        ("unknown score", vec![("cameras.cam", s("score = \"psnr\""))], "cameras.cam.score"),
        // alarms
        ("threshold 1.5", vec![("cameras.cam.alarm", s("threshold = 1.5"))], "cameras.cam.alarm.threshold"),
        (
            "clear above threshold",
            vec![("cameras.cam.alarm", s("threshold = 0.5\nclear_threshold = 0.6"))],
            "cameras.cam.alarm.clear_threshold",
        ),
        ("never clears", vec![("defaults.alarm", s("threshold = 0.01"))], "cameras.cam.alarm.clear_threshold"),
        ("min frames 0", vec![("cameras.cam.alarm", s("min_frames = 0"))], "cameras.cam.alarm.min_frames"),
        (
            "min frames 1e12",
            vec![("cameras.cam.alarm", s("min_frames = 1000000000000"))],
            "cameras.cam.alarm.min_frames",
        ),
        (
            "clear frames 1e12",
            vec![("defaults.alarm", s("clear_frames = 1000000000000"))],
            "defaults.alarm.clear_frames",
        ),
        ("cooldown 1e20 s", vec![("cameras.cam.alarm", s("cooldown_s = 1e20"))], "cameras.cam.alarm.cooldown_s"),
        // camera names: a topic level and a file name
        ("slash in a name", vec![("cameras.\"a/b\"", String::new())], "cameras.a/b"),
        ("$ name", vec![("cameras.\"$SYS\"", String::new())], "cameras.$SYS"),
        ("dot-dot name", vec![("cameras.\"..\"", String::new())], "cameras..."),
        ("wildcard name", vec![("cameras.\"a+b\"", String::new())], "cameras.a+b"),
        ("space in a name", vec![("cameras.\"line 1\"", String::new())], "cameras.line 1"),
        // source kinds
        (
            "synthetic 8 px",
            vec![("cameras.cam", s("source = { kind = \"synthetic\", size = 8 }"))],
            "cameras.cam.source.size",
        ),
        (
            "synthetic frames of 51 GB",
            vec![("cameras.cam", s("source = { kind = \"synthetic\", size = 4096, variations = 1024 }"))],
            "cameras.cam.source.variations",
        ),
        (
            "plaid",
            vec![("cameras.cam", s("source = { kind = \"synthetic\", texture = \"plaid\" }"))],
            "cameras.cam.source.texture",
        ),
        (
            "strength 0",
            vec![("cameras.cam", s("source = { kind = \"synthetic\", strength = 0.0 }"))],
            "cameras.cam.source.strength",
        ),
        (
            "defects longer than their period",
            vec![("cameras.cam", s("source = { kind = \"synthetic\", defect_every = 5, defect_frames = 9 }"))],
            "cameras.cam.source.defect_frames",
        ),
        (
            "replay of nothing",
            vec![("cameras.cam", s("source = { kind = \"replay\", path = \"/nonexistent/x\" }"))],
            "cameras.cam.source.path",
        ),
        (
            "replay of bmps",
            vec![("cameras.cam", s("source = { kind = \"replay\", path = \"{DIR}/bmps\" }"))],
            "cameras.cam.source.path",
        ),
        (
            "replay of fake pngs",
            vec![("cameras.cam", s("source = { kind = \"replay\", path = \"{DIR}/fakes\" }"))],
            "cameras.cam.source.path",
        ),
        (
            "replay of an empty path",
            vec![("cameras.cam", s("source = { kind = \"replay\", path = \"\" }"))],
            "cameras.cam.source.path",
        ),
        (
            "https camera",
            vec![("cameras.cam", s("source = { kind = \"http-mjpeg\", url = \"https://cam/m\" }"))],
            "cameras.cam.source.url",
        ),
        (
            "camera URL without a host",
            vec![("cameras.cam", format!("source = {{ kind = \"http-mjpeg\", url = \"{cred_url}\" }}"))],
            "cameras.cam.source.url",
        ),
        (
            "camera URL with a bad port",
            vec![("cameras.cam", format!("source = {{ kind = \"http-mjpeg\", url = \"{cred_url}cam:99999/m\" }}"))],
            "cameras.cam.source.url",
        ),
        (
            "camera timeout beyond a Duration",
            vec![(
                "cameras.cam",
                format!("source = {{ kind = \"http-mjpeg\", url = \"{cred_url}cam/m\", timeout_s = 1e20 }}"),
            )],
            "cameras.cam.source.timeout_s",
        ),
        (
            "unknown key beside a camera password",
            vec![(
                "cameras.cam",
                format!("source = {{ kind = \"http-mjpeg\", url = \"{cred_url}cam/m\", timeout = 5 }}"),
            )],
            "timeout",
        ),
        (
            "no such device",
            vec![("cameras.cam", s("source = { kind = \"v4l2\", device = \"/dev/video97\" }"))],
            "cameras.cam.source.device",
        ),
        (
            "camera at half a frame per second",
            vec![("cameras.cam", s("source = { kind = \"v4l2\", device = \"/dev/video97\" }\nfps = 0.5"))],
            "cameras.cam.fps",
        ),
        (
            "h264 from v4l2",
            vec![("cameras.cam", s("source = { kind = \"v4l2\", device = \"0\", format = \"h264\" }"))],
            "cameras.cam.source.format",
        ),
        // [mqtt]
        ("port 0", vec![("mqtt", s("port = 0"))], "mqtt.port"),
        ("port 70000", vec![("mqtt", s("port = 70000"))], "mqtt.port"),
        ("empty host", vec![("mqtt", s("host = \"\""))], "mqtt.host"),
        ("credentials in the host", vec![("mqtt", format!("host = \"user:{SECRET}@broker\""))], "mqtt.host"),
        ("port in the host", vec![("mqtt", s("host = \"broker:1883\""))], "mqtt.host"),
        ("space in the host", vec![("mqtt", s("host = \"a b\""))], "mqtt.host"),
        ("keep-alive half a second", vec![("mqtt", s("keep_alive_s = 0.5"))], "mqtt.keep_alive_s"),
        ("keep-alive 1e20", vec![("mqtt", s("keep_alive_s = 1e20"))], "mqtt.keep_alive_s"),
        ("connect timeout 1e20", vec![("mqtt", s("connect_timeout_s = 1e20"))], "mqtt.connect_timeout_s"),
        ("reconnect every millisecond", vec![("mqtt", s("reconnect_min_s = 0.001"))], "mqtt.reconnect_min_s"),
        ("reconnect max 1e20", vec![("mqtt", s("reconnect_max_s = 1e20"))], "mqtt.reconnect_max_s"),
        (
            "reconnect max below min",
            vec![("mqtt", s("reconnect_min_s = 5.0\nreconnect_max_s = 1.0"))],
            "mqtt.reconnect_max_s",
        ),
        ("score queue 2^61", vec![("mqtt", s("score_queue = 2305843009213693952"))], "mqtt.score_queue"),
        ("score queue 0", vec![("mqtt", s("score_queue = 0"))], "mqtt.score_queue"),
        ("outbox age that wraps", vec![("mqtt", s("outbox_max_age_s = 1e20"))], "mqtt.outbox_max_age_s"),
        ("outbox rows i64::MAX", vec![("mqtt", s("outbox_max_rows = 9223372036854775807"))], "mqtt.outbox_max_rows"),
        ("no alarm in flight", vec![("mqtt", s("alarm_inflight = 0"))], "mqtt.alarm_inflight"),
        ("a score a billion seconds apart", vec![("mqtt", s("score_max_rate_hz = 1e-9"))], "mqtt.score_max_rate_hz"),
        ("$ prefix", vec![("mqtt", s("topic_prefix = \"$SYS/ganomalyd\""))], "mqtt.topic_prefix"),
        ("wildcard prefix", vec![("mqtt", s("topic_prefix = \"a/+/b\""))], "mqtt.topic_prefix"),
        ("empty level in prefix", vec![("mqtt", s("topic_prefix = \"a//b\""))], "mqtt.topic_prefix"),
        ("prefix of 1025 bytes", vec![("mqtt", long_prefix)], "mqtt.topic_prefix"),
        ("two-level node", vec![("mqtt", s("node_id = \"a/b\""))], "mqtt.node_id"),
        ("user name of 70 kB", vec![("mqtt", long_user)], "mqtt.username"),
        ("NUL in the client id", vec![("mqtt", s("client_id = \"a\\u0000b\""))], "mqtt.client_id"),
        (
            "credentials in clear text to a remote broker",
            vec![("mqtt", s("host = \"10.0.0.5\"\nusername = \"u\"\npassword_file = \"{DIR}/pw\""))],
            "mqtt.username",
        ),
        ("password without a user", vec![("mqtt", s("password_file = \"{DIR}/pw\""))], "mqtt.username"),
        (
            "missing password file",
            vec![("mqtt", s("username = \"u\"\npassword_file = \"/nonexistent/pw\""))],
            "mqtt.password_file",
        ),
        (
            "password file and variable",
            vec![("mqtt", format!("username = \"u\"\npassword_file = \"{{DIR}}/pw\"\npassword_env = \"{PW_VAR}\""))],
            "mqtt.password_file",
        ),
        (
            "unset password variable",
            vec![("mqtt", s("username = \"u\"\npassword_env = \"GANOMALYD_TEST_UNSET_41\""))],
            "mqtt.password_env",
        ),
        (
            "password of 70 kB",
            vec![("mqtt", s("username = \"u\"\npassword_file = \"{DIR}/long-pw\""))],
            "mqtt.password_file",
        ),
        ("missing CA", vec![("mqtt", s("tls = { ca_file = \"/nonexistent/ca.pem\" }"))], "mqtt.tls.ca_file"),
        ("empty CA", vec![("mqtt", s("tls = { ca_file = \"{DIR}/empty.pem\" }"))], "mqtt.tls.ca_file"),
        (
            "client cert without key",
            vec![("mqtt", s("tls = { ca_file = \"{DIR}/empty.pem\", cert_file = \"{DIR}/empty.pem\" }"))],
            "mqtt.tls.cert_file",
        ),
        (
            "open embedded broker",
            vec![("mqtt", s("embedded = true\nembedded_listen = \"0.0.0.0:1883\""))],
            "mqtt.embedded_listen",
        ),
        (
            "embedded broker with TLS",
            vec![("mqtt", s("embedded = true\ntls = { ca_file = \"{DIR}/empty.pem\" }"))],
            "mqtt.tls",
        ),
        (
            "$ discovery prefix",
            vec![("mqtt", s("discovery = true\ndiscovery_prefix = \"$ha\""))],
            "mqtt.discovery_prefix",
        ),
        (
            "a password key beside a wrong one",
            vec![("mqtt", format!("tls = {{ ca_file = \"x\", password = \"{SECRET}\", cafile = 1 }}"))],
            "mqtt.tls",
        ),
        // [sparkplug]
        ("sparkplug without a group", vec![("sparkplug", String::new())], "sparkplug.group_id"),
        ("a group of two levels", vec![("sparkplug", s("group_id = \"a/b\""))], "sparkplug.group_id"),
        (
            "an edge node with a wildcard",
            vec![("sparkplug", s("group_id = \"g\"\nedge_node_id = \"n+\""))],
            "sparkplug.edge_node_id",
        ),
        (
            "DDATA at a billion Hz",
            vec![("sparkplug", s("group_id = \"g\"\nddata_max_rate_hz = 1e9"))],
            "sparkplug.ddata_max_rate_hz",
        ),
        (
            "DDATA never",
            vec![("sparkplug", s("group_id = \"g\"\nddata_max_rate_hz = 0.0"))],
            "sparkplug.ddata_max_rate_hz",
        ),
        (
            "a primary host id with a wildcard",
            vec![("sparkplug", s("group_id = \"g\"\nprimary_host_id = \"scada#\""))],
            "sparkplug.primary_host_id",
        ),
        (
            "the plain outbox shared",
            vec![
                ("mqtt", s("outbox_path = \"{DIR}/o.sqlite\"")),
                ("sparkplug", s("group_id = \"g\"\noutbox_path = \"{DIR}/o.sqlite\"")),
            ],
            "sparkplug.outbox_path",
        ),
        (
            "the plain client id",
            vec![("mqtt", s("client_id = \"same\"")), ("sparkplug", s("group_id = \"g\"\nclient_id = \"same\""))],
            "sparkplug.client_id",
        ),
        (
            "its broker's keep-alive half a second",
            vec![
                ("sparkplug", s("group_id = \"g\"")),
                ("sparkplug.broker", s("host = \"127.0.0.1\"\nkeep_alive_s = 0.5")),
            ],
            "sparkplug.broker.keep_alive_s",
        ),
        (
            "its broker's credentials in clear text",
            vec![
                ("sparkplug", s("group_id = \"g\"")),
                ("sparkplug.broker", s("host = \"10.0.0.5\"\nusername = \"u\"\npassword_file = \"{DIR}/pw\"")),
            ],
            "sparkplug.broker.username",
        ),
        (
            "its broker's missing password file",
            vec![
                ("sparkplug", s("group_id = \"g\"")),
                ("sparkplug.broker", s("host = \"127.0.0.1\"\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"")),
            ],
            "sparkplug.broker",
        ),
        (
            "its broker's missing CA",
            vec![
                ("sparkplug", s("group_id = \"g\"")),
                ("sparkplug.broker", s("host = \"127.0.0.1\"\ntls = { ca_file = \"/nonexistent/ca.pem\" }")),
            ],
            "sparkplug.broker",
        ),
        (
            "a plain-topic key in its broker",
            vec![("sparkplug", s("group_id = \"g\"")), ("sparkplug.broker", s("host = \"h\"\ntopic_prefix = \"x\""))],
            "topic_prefix",
        ),
        (
            "Sparkplug only on the embedded broker",
            vec![("mqtt", s("embedded = true")), ("sparkplug", s("group_id = \"g\"\nplain_topics = false"))],
            "sparkplug.plain_topics",
        ),
        // renamed keys and the whole file
        ("renamed key", vec![("inference", s("max_wait_ms = 5"))], "inference.max_wait_ms"),
    ];
    // Triggered cameras and the record (issue 14).
    let trig = |body: &str| -> Changes {
        vec![
            ("cameras.cam", s("mode = \"triggered\"")),
            ("cameras.cam.trigger", s(body)),
            ("commands", s("enabled = true")),
        ]
    };
    c.extend([
        ("a mode misspelt", vec![("cameras.cam", s("mode = \"sometimes\""))], "cameras.cam.mode"),
        ("triggered without commands", vec![("cameras.cam", s("mode = \"triggered\""))], "cameras.cam.mode"),
        ("no frame per part", trig("frames = 0"), "cameras.cam.trigger.frames"),
        ("33 frames per part", trig("frames = 33"), "cameras.cam.trigger.frames"),
        ("more nearest frames than the buffer", trig("frames = 10\nbuffer_frames = 4"), "cameras.cam.trigger.frames"),
        ("an empty ring buffer", trig("buffer_frames = 0"), "cameras.cam.trigger.buffer_frames"),
        ("a huge ring buffer", trig("buffer_frames = 1000"), "cameras.cam.trigger.buffer_frames"),
        ("no deadline", trig("deadline_s = 0.0"), "cameras.cam.trigger.deadline_s"),
        ("a deadline beyond a Duration", trig("deadline_s = 1e30"), "cameras.cam.trigger.deadline_s"),
        ("a deadline inside the delay", trig("delay_s = 1.0\ndeadline_s = 0.5"), "cameras.cam.trigger.deadline_s"),
        ("a negative delay", trig("delay_s = -1.0"), "cameras.cam.trigger.delay_s"),
        ("no tolerance", trig("tolerance_s = 0.0"), "cameras.cam.trigger.tolerance_s"),
        ("no pending trigger", trig("max_pending = 0"), "cameras.cam.trigger.max_pending"),
        ("no dedup window", trig("dedup_parts = 0"), "cameras.cam.trigger.dedup_parts"),
        ("an unknown aggregate", trig("aggregate = \"median\""), "cameras.cam.trigger.aggregate"),
        ("an unknown frame choice", trig("from = \"before\""), "cameras.cam.trigger.from"),
        ("a defaults trigger key misspelt", vec![("defaults.trigger", s("deadline = 1"))], "defaults.trigger"),
        ("no record row", vec![("record", s("max_rows = 0"))], "record.max_rows"),
        ("a record kept a second", vec![("record", s("max_age_s = 1.0"))], "record.max_age_s"),
        ("an empty record path", vec![("record", s("path = \"\""))], "record.path"),
        (
            "the record in the outbox file",
            vec![
                ("mqtt", s("embedded = true\noutbox_path = \"{DIR}/same.sqlite\"")),
                ("record", s("path = \"{DIR}/same.sqlite\"")),
            ],
            "record.path",
        ),
    ]);
    c.push(("a name of 65 bytes", vec![], "cameras.c"));
    // The long name replaces `cam` (the only camera then has that name).
    let last = c.len() - 1;
    c[last].1.push(("rename", long_name));
    c
}

#[test]
fn broken_configs_are_refused_naming_the_key_and_no_secret() {
    support::dev_ort();
    let dir = tempfile::tempdir().expect("tempdir");
    fixtures(dir.path());
    std::env::set_var(PW_VAR, SECRET);
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let path = dir.path().join("ganomalyd.toml");
    let mut failures = Vec::new();
    for (what, changes, key) in &cases {
        let renamed = changes.iter().find(|(n, _)| *n == "rename").map(|(_, v)| v.clone());
        let changes: Vec<(&str, &str)> =
            changes.iter().filter(|(n, _)| *n != "rename").map(|(n, b)| (*n, b.as_str())).collect();
        let mut body = text(dir.path(), &changes);
        if let Some(name) = renamed {
            body = body.replace("[cameras.cam]", &format!("[cameras.{name}]"));
        }
        std::fs::write(&path, &body).expect("write config");
        let (shown, named) = match config::load(&path) {
            Ok(_) => {
                failures.push(format!("{what}: accepted\n{body}"));
                continue;
            }
            Err(ConfigError::Invalid { problems, .. }) => {
                let named = problems.iter().any(|p| p.starts_with(key));
                (problems.join("\n"), named)
            }
            Err(e) => {
                let shown = e.to_string();
                let named = shown.contains(key);
                (shown, named)
            }
        };
        if !named {
            failures.push(format!("{what}: no problem names `{key}`:\n{shown}"));
        }
        if shown.contains(SECRET) {
            failures.push(format!("{what}: the secret is shown:\n{shown}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Whether `topic` on the broker at `port` says `online` within 5 s.
fn says_online(port: u16, topic: &str) -> bool {
    let mut opts = rumqttc::MqttOptions::new("bounds-subscriber", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = rumqttc::Client::new(opts, 10);
    client.subscribe(topic, rumqttc::QoS::AtLeastOnce).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) =
            conn.recv_timeout(Duration::from_millis(200))
        {
            if p.topic == topic && p.payload.as_ref() == b"online" {
                return true;
            }
        }
    }
    false
}

/// Runs `body` (written to `dir/ganomalyd.toml`) in-process for about a
/// second: it must compile, keep running, and stop cleanly; with `online`,
/// the daemon's status topic on that broker port must say `online`.
fn runs_for_a_second(dir: &Path, what: &str, body: &str, online: Option<(u16, String)>) {
    let path = dir.join("ganomalyd.toml");
    std::fs::write(&path, body).expect("write config");
    let settings = match config::load(&path) {
        Ok(s) => s,
        Err(e) => panic!("{what}: a boundary config is refused: {e}\n{body}"),
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let run = std::thread::spawn(move || daemon(settings, path, rx));
    let t = Instant::now();
    if let Some((port, topic)) = online {
        assert!(says_online(port, &topic), "{what}: no `online` on {}…", &topic[..topic.len().min(40)]);
    }
    while t.elapsed() < Duration::from_secs(1) {
        assert!(!run.is_finished(), "{what}: the daemon ended by itself: {:?}", run.join());
        std::thread::sleep(Duration::from_millis(50));
    }
    tx.send(Signal::Stop).expect("stop");
    let result = run.join().unwrap_or_else(|_| panic!("{what}: the daemon panicked"));
    assert!(result.is_ok(), "{what}: {result:?}");
}

#[test]
fn boundary_configs_run() {
    support::dev_ort();
    // The console's basic-auth password in the maxima.
    std::env::set_var(PW_VAR, SECRET);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let name64 = "n".repeat(64);
    let prefix = format!("{}/q", "p".repeat(1022));
    let node = "b".repeat(256);
    let (min_port, max_port) = (free_port(), free_port());
    let boundaries: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "minima",
            vec![
                ("inference", "max_batch = 1\nmax_wait_s = 0.0\nintra_threads = 1".into()),
                ("pipeline", "frame_queue = 1\npreprocess_threads = 1\nstats_interval_s = 0.1".into()),
                ("snapshots", "retain = 1\nquality = 1\noverlay_alpha = 0.0".into()),
                ("defaults", "fps = 0.001\nwidth = 1\nheight = 1".into()),
                (
                    "cameras.cam",
                    "source = { kind = \"synthetic\", size = 16, variations = 1, defect_every = 1, defect_frames = 1, strength = 1e-6 }"
                        .into(),
                ),
                ("cameras.cam.alarm", "threshold = 0.06\nmin_frames = 1\nclear_frames = 1\ncooldown_s = 0.0".into()),
                ("metrics", "enabled = true\nlisten = \"127.0.0.1:0\"\nstale_after_s = 2.0".into()),
                (
                    "console",
                    "enabled = true\nlisten = \"127.0.0.1:0\"\nlive_fps = 0.2\nscore_rate_hz = 0.5\nhistory_s = 30.0\n\
                     alarms_kept = 10\nsnapshots_kept = 1\nmax_connections = 4"
                        .into(),
                ),
            ],
        ),
        (
            "maxima",
            vec![
                ("inference", "max_batch = 256\nmax_wait_s = 1.0\ndevice_id = 64\nintra_threads = 1024".into()),
                ("pipeline", "frame_queue = 64\npreprocess_threads = 64\nstats_interval_s = 86400.0".into()),
                ("snapshots", "retain = 100000\nquality = 100\noverlay_alpha = 1.0".into()),
                ("defaults", "fps = 1000.0\nwidth = 8192\nheight = 8192".into()),
                (
                    "cameras.cam",
                    "source = { kind = \"synthetic\", size = 16, variations = 1024, seed = 9223372036854775807 }".into(),
                ),
                (
                    "cameras.cam.alarm",
                    "threshold = 1.0\nclear_threshold = 1.0\nmin_frames = 100000\nclear_frames = 100000\ncooldown_s = 86400.0"
                        .into(),
                ),
                ("metrics", "enabled = true\nlisten = \"127.0.0.1:0\"\nstale_after_s = 3600.0".into()),
                (
                    "console",
                    format!(
                        "enabled = true\nlisten = \"127.0.0.1:0\"\nlive_fps = 15.0\nscore_rate_hz = 50.0\nhistory_s = 3600.0\n\
                         alarms_kept = 100000\nsnapshots_kept = 1000\nmax_connections = 1024\nuser = \"op\"\npassword_env = \"{PW_VAR}\""
                    ),
                ),
            ],
        ),
        (
            "triggered minima, the record's minima",
            vec![
                ("cameras.cam", "mode = \"triggered\"".into()),
                (
                    "cameras.cam.trigger",
                    "frames = 1\nbuffer_frames = 1\ndelay_s = 0.0\ndeadline_s = 0.01\ntolerance_s = 0.001\nmax_pending = 1\ndedup_parts = 1"
                        .into(),
                ),
                ("commands", "enabled = true".into()),
                ("record", format!("path = \"{d}/rec-min.sqlite\"\nmax_age_s = 60.0\nmax_rows = 1")),
            ],
        ),
        (
            "triggered maxima, the record's maxima",
            vec![
                ("cameras.cam", "mode = \"triggered\"\nwidth = 64\nheight = 64".into()),
                (
                    "cameras.cam.trigger",
                    "frames = 32\nbuffer_frames = 300\ndelay_s = 10.0\ndeadline_s = 60.0\ntolerance_s = 3600.0\n\
                     max_pending = 4096\ndedup_parts = 1000000\nfrom = \"after\"\naggregate = \"mean\""
                        .into(),
                ),
                ("commands", "enabled = true".into()),
                ("record", format!("path = \"{d}/rec-max.sqlite\"\nmax_age_s = 315360000.0\nmax_rows = 100000000")),
            ],
        ),
        (
            "mqtt minima, a replay folder beside the snapshots",
            vec![
                ("cameras.cam", format!("source = {{ kind = \"replay\", path = \"{d}/frames/*.png\" }}\nroi = {{ x = 0, y = 0, width = 1, height = 1 }}")),
                ("snapshots", format!("dir = \"{d}/frames-snaps\"")),
                (
                    "mqtt",
                    format!(
                        "embedded = true\nembedded_listen = \"127.0.0.1:{min_port}\"\nkeep_alive_s = 1\nconnect_timeout_s = 1\n\
                         reconnect_min_s = 0.05\nreconnect_max_s = 0.05\nscore_queue = 1\noutbox_max_rows = 1\n\
                         outbox_max_age_s = 1.0\nalarm_inflight = 1\nscore_max_rate_hz = 0.001\ntopic_prefix = \"a\"\nnode_id = \"b\""
                    ),
                ),
                // Its own connection to the embedded broker.
                ("sparkplug", format!("group_id = \"g\"\nddata_max_rate_hz = 0.001\noutbox_path = \"{d}/spb-min.sqlite\"")),
            ],
        ),
        (
            "mqtt maxima, the longest names",
            vec![
                (
                    "mqtt",
                    format!(
                        "embedded = true\nembedded_listen = \"127.0.0.1:{max_port}\"\nkeep_alive_s = 65535\nconnect_timeout_s = 300\n\
                         reconnect_min_s = 3600.0\nreconnect_max_s = 3600.0\nscore_queue = 100000\noutbox_max_rows = 10000000\n\
                         outbox_max_age_s = 31622400.0\nalarm_inflight = 1000\nscore_max_rate_hz = 1000.0\n\
                         topic_prefix = \"{prefix}\"\nnode_id = \"{node}\"\ndiscovery = true\ndiscovery_prefix = \"{prefix}\"\n\
                         client_id = \"{}\"", "i".repeat(65_535)
                    ),
                ),
                (
                    "sparkplug",
                    format!(
                        "group_id = \"{}\"\nedge_node_id = \"{node}\"\nddata_max_rate_hz = 100.0\noutbox_path = \"{d}/spb-max.sqlite\"",
                        "g".repeat(256)
                    ),
                ),
                ("rename", name64.clone()),
            ],
        ),
    ];
    std::fs::create_dir_all(dir.path().join("frames")).expect("mkdir");
    image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9])).save(dir.path().join("frames/a.png")).expect("png");
    for (what, changes) in &boundaries {
        let renamed = changes.iter().find(|(n, _)| *n == "rename").map(|(_, v)| v.clone());
        let changes: Vec<(&str, &str)> =
            changes.iter().filter(|(n, _)| *n != "rename").map(|(n, b)| (*n, b.as_str())).collect();
        let mut body = text(dir.path(), &changes);
        if let Some(name) = renamed {
            body = body.replace("[cameras.cam]", &format!("[cameras.{name}]"));
        }
        let online = if what.starts_with("mqtt minima") {
            Some((min_port, "a/b/status".to_string()))
        } else if what.starts_with("mqtt maxima") {
            Some((max_port, format!("{prefix}/{node}/status")))
        } else {
            None
        };
        runs_for_a_second(dir.path(), what, &body, online);
    }
}
