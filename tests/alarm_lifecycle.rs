//! No dangling alarms (issue 16, item 7), against a real broker: a clean stop
//! ends the active alarm (`end`, reason `shutdown`); a daemon killed with
//! SIGKILL during an alarm ends it when it starts again (reason `restart`);
//! the restarted daemon's alarm ids are new.
//!
//! The camera is synthetic with a defect in every frame, and the alarm needs
//! 10,000 clear frames to end, so an alarm starts at once and stays active
//! until the daemon stops.

mod mqtt_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ganomalyd::alarm::alarm_number;
use ganomalyd::alarm_state::{path_beside, AlarmJournal};
use ganomalyd::cmds::run::{daemon, Signal};
use ganomalyd::events::{AlarmEvent, AlarmKind, EndReason};
use mqtt_support::*;

/// `dir/ganomalyd.toml`: the demo model, one synthetic camera `cam` with a
/// defect in every frame, MQTT to `b` under `prefix`, the outbox in `dir`.
fn write_config(dir: &Path, b: &Broker, prefix: &str) -> PathBuf {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    let body = format!(
        r#"[inference]
providers = ["cpu"]
[defaults]
model = "{model}"
fps = 30
[cameras.cam]
source = {{ kind = "synthetic", size = 64, variations = 2, defect_every = 1, defect_frames = 1, strength = 1.0 }}
[cameras.cam.alarm]
threshold = 0.3
clear_threshold = 0.05
min_frames = 1
clear_frames = 10000
[mqtt]
host = "{host}"
port = {port}
topic_prefix = "{prefix}"
node_id = "box"
client_id = "{prefix}"
outbox_path = "outbox.sqlite"
keep_alive_s = 5
reconnect_min_s = 0.05
reconnect_max_s = 0.5
score_max_rate_hz = 1
"#,
        model = model.display(),
        host = b.host,
        port = b.port,
    );
    let p = dir.join("ganomalyd.toml");
    std::fs::write(&p, body).expect("write config");
    p
}

fn find(msgs: &[Msg], pred: impl Fn(&AlarmEvent) -> bool) -> Option<AlarmEvent> {
    alarms_of(msgs).into_iter().find(|a| pred(a))
}

fn open_alarms(dir: &Path) -> Vec<String> {
    let j = AlarmJournal::open(&path_beside(&dir.join("outbox.sqlite"))).expect("journal");
    j.open_alarms().expect("read").into_iter().map(|a| a.id).collect()
}

#[test]
fn a_clean_stop_ends_the_active_alarm_with_reason_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let b = broker(dir.path());
    let prefix = unique("stop");
    let cfg = write_config(dir.path(), &b, &prefix);
    let sub = rt.block_on(Sub::start(&b.host, b.port, &format!("{prefix}/#"), false));
    let settings = ganomalyd::config::load(&cfg).expect("the config compiles");

    let (tx, rx) = crossbeam_channel::unbounded();
    let run = std::thread::spawn(move || daemon(settings, cfg, rx));
    let msgs = rt.block_on(
        sub.wait(Duration::from_secs(90), "an alarm start", |m| find(m, |a| a.kind == AlarmKind::Start).is_some()),
    );
    let start = find(&msgs, |a| a.kind == AlarmKind::Start).expect("start");
    assert_eq!(open_alarms(dir.path()), vec![start.id.clone()], "the start is journaled while active");

    tx.send(Signal::Stop).expect("stop");
    run.join().expect("the daemon did not panic").expect("a clean stop");
    let msgs = rt.block_on(sub.wait(Duration::from_secs(10), "the alarm's end", |m| {
        find(m, |a| a.kind == AlarmKind::End && a.id == start.id).is_some()
    }));
    let end = find(&msgs, |a| a.kind == AlarmKind::End && a.id == start.id).expect("end");
    assert_eq!(end.reason, Some(EndReason::Shutdown), "{end:?}");
    assert_eq!(end.start_ts, start.start_ts);
    assert!(end.end_ts.is_some_and(|t| t >= start.ts) && end.seq >= start.seq && end.frames >= start.frames, "{end:?}");
    let states = sub.on(&format!("{prefix}/box/cam/state"));
    assert_eq!(states.last().map(Msg::text).as_deref(), Some("OFF"), "the retained state ends OFF");
    assert!(open_alarms(dir.path()).is_empty(), "nothing left open after a clean stop");
    assert_eq!(alarms_of(&msgs).iter().filter(|a| a.kind == AlarmKind::Start).count(), 1);
}

/// The daemon as a child process (so that it can be killed for real).
struct Daemon(Child);

impl Daemon {
    fn spawn(cfg: &Path) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_ganomalyd"))
            .args(["run", "--config", cfg.to_str().expect("utf8")])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ganomalyd");
        Daemon(child)
    }

    /// SIGTERM, and the exit status once it has drained.
    fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within {within:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn after_a_kill_the_restart_ends_the_open_alarm_and_ids_are_not_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let b = broker(dir.path());
    let prefix = unique("crash");
    let cfg = write_config(dir.path(), &b, &prefix);
    let sub = rt.block_on(Sub::start(&b.host, b.port, &format!("{prefix}/#"), false));
    let is_start = |a: &AlarmEvent| a.kind == AlarmKind::Start;

    let mut first_run = Daemon::spawn(&cfg);
    let msgs = rt.block_on(sub.wait(Duration::from_secs(90), "the first run's alarm", |m| find(m, is_start).is_some()));
    let first = find(&msgs, is_start).expect("start");
    // SIGKILL: no shutdown code runs, as in a crash or an OOM kill.
    first_run.0.kill().expect("SIGKILL");
    first_run.0.wait().expect("reaped");
    assert_eq!(open_alarms(dir.path()), vec![first.id.clone()], "left open by the kill");

    let second_run = Daemon::spawn(&cfg);
    let ended = |a: &AlarmEvent| a.kind == AlarmKind::End && a.id == first.id;
    let fresh = |a: &AlarmEvent| a.kind == AlarmKind::Start && a.id != first.id;
    let msgs = rt.block_on(sub.wait(Duration::from_secs(90), "the restart end and a new alarm", |m| {
        find(m, ended).is_some() && find(m, fresh).is_some()
    }));
    let end = find(&msgs, ended).expect("end");
    assert_eq!(end.reason, Some(EndReason::Restart), "{end:?}");
    assert_eq!((end.start_ts, end.first_seq), (first.start_ts, first.first_seq));
    let second = find(&msgs, fresh).expect("second start");
    let pos = |id: &str, kind: AlarmKind| alarms_of(&msgs).iter().position(|a| a.id == id && a.kind == kind);
    assert!(
        pos(&first.id, AlarmKind::End) < pos(&second.id, AlarmKind::Start),
        "the old alarm ends before a new one starts"
    );
    let (n1, n2) = (alarm_number(&first.id).expect("n"), alarm_number(&second.id).expect("n"));
    assert!(n2 > n1, "alarm numbers restart: {} then {}", first.id, second.id);
    assert_eq!(alarms_of(&msgs).iter().filter(|a| ended(a)).count(), 1, "ended once");

    // And the binary's own clean stop (SIGTERM) ends the second alarm.
    let status = second_run.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let msgs = rt.block_on(sub.wait(Duration::from_secs(10), "the second alarm's end", |m| {
        find(m, |a| a.kind == AlarmKind::End && a.id == second.id).is_some()
    }));
    let end2 = find(&msgs, |a| a.kind == AlarmKind::End && a.id == second.id).expect("end");
    assert_eq!(end2.reason, Some(EndReason::Shutdown), "{end2:?}");
    assert!(open_alarms(dir.path()).is_empty());
}
