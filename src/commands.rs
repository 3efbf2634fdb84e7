//! Commands from outside the daemon: parsed from MQTT topics and HTTP
//! requests, checked against `[commands]`, routed by name to the stage that
//! carries them out, and answered on the events topic.
//!
//! ```text
//! MQTT <prefix>/<node>/cmd/<name>            ─┐                      ┌─► trigger  → verdict stage
//! MQTT <prefix>/<node>/<camera>/cmd/<name>   ─┼─► Intake::dispatch ──┼─► reload   → daemon loop
//! HTTP POST /api/cmd/<camera|->/<name>       ─┘   (checks, counts)   └─► record, calibrate, feedback → …
//! ```
//! Every command gets at least one answer, published on
//! `<prefix>/<node>/events` (node commands) or `<prefix>/<node>/<camera>/events`
//! (camera commands) as a [`CommandEvent`]: `refused` (with the reason) by the
//! intake or the handler, else `accepted`, then optionally `progress`, then
//! `done` or `failed`. An HTTP caller gets the first answer that is not
//! `progress` as its response.
//!
//! A handler registers a bounded channel for its command name
//! ([`Intake::register`]); the intake never blocks on it: a full channel is a
//! `refused` answer ("busy"), counted. Commands are refused unless
//! `[commands] enabled = true` and the name is in `allow`, so a daemon that
//! never asked for remote control does not act on a stray message; the
//! refusal is still published so that whoever sent it learns why.
//!
//! Retained MQTT messages on a command topic are refused: a retained
//! `trigger` or `record` would run again on every reconnect.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};

use crate::events::{now_ms, Publisher, PAYLOAD_SCHEMA};

/// The commands the daemon knows. Each has one handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandName {
    /// A part is in front of a triggered camera: score it, publish a verdict.
    Trigger,
    /// Re-read the whole config (like SIGHUP). A node command.
    Reload,
    /// Write good frames of a camera for training.
    Record,
    /// Set a camera's threshold from live scores of good parts.
    Calibrate,
    /// The operator's verdict on an alarm (false alarm or defect).
    Feedback,
}

impl CommandName {
    pub const ALL: [CommandName; 5] =
        [CommandName::Trigger, CommandName::Reload, CommandName::Record, CommandName::Calibrate, CommandName::Feedback];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::Trigger => "trigger",
            CommandName::Reload => "reload",
            CommandName::Record => "record",
            CommandName::Calibrate => "calibrate",
            CommandName::Feedback => "feedback",
        }
    }

    pub fn parse(s: &str) -> Option<CommandName> {
        CommandName::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn names() -> Vec<&'static str> {
        CommandName::ALL.iter().map(|c| c.as_str()).collect()
    }

    /// Node commands address the daemon, camera commands one camera.
    pub fn is_node_command(self) -> bool {
        matches!(self, CommandName::Reload)
    }
}

/// `[commands]`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSettings {
    pub enabled: bool,
    /// The commands that are carried out; the others are refused.
    pub allow: BTreeSet<CommandName>,
    /// Commands over HTTP on the `[metrics]` port too.
    pub http: bool,
}

impl Default for CommandSettings {
    fn default() -> Self {
        CommandSettings { enabled: false, allow: CommandName::ALL.into_iter().collect(), http: true }
    }
}

/// Where a command came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Mqtt,
    Http,
}

/// What an answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Refused,
    Accepted,
    Progress,
    Done,
    Failed,
}

/// An answer to a command, or an event a stage reports on its own (drift,
/// reload results): the payload of the `events` topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandEvent {
    pub schema: u32,
    pub ts: u64,
    /// The command answered, or the name of a spontaneous event (`drift`...).
    pub command: String,
    /// `None`: a node command or event (published on `<prefix>/<node>/events`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub camera: Option<String>,
    pub status: Status,
    /// The command's `request_id`, echoed so that a caller can match answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Why it was refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whatever else the handler reports (progress counts, results).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

impl CommandEvent {
    /// An event that answers no command (drift, reload outcomes of SIGHUP).
    pub fn spontaneous(name: &str, camera: Option<&str>, status: Status) -> CommandEvent {
        CommandEvent {
            schema: PAYLOAD_SCHEMA,
            ts: now_ms(),
            command: name.to_string(),
            camera: camera.map(str::to_string),
            status,
            request_id: None,
            reason: None,
            detail: serde_json::Map::new(),
        }
    }
}

/// One command, as its handler gets it.
#[derive(Debug)]
pub struct Command {
    pub name: CommandName,
    /// `None` for node commands.
    pub camera: Option<String>,
    /// The JSON object sent (an empty object for an empty payload).
    pub body: serde_json::Map<String, serde_json::Value>,
    pub request_id: Option<String>,
    pub origin: Origin,
    /// When it arrived (monotonic / wall clock, ms since epoch).
    pub received: Instant,
    pub received_ms: u64,
    answer: Answer,
}

/// How a command is answered: published, and handed to an HTTP caller.
#[derive(Clone)]
struct Answer {
    publisher: Arc<dyn Publisher>,
    http: Option<Sender<CommandEvent>>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer").field("http", &self.http.is_some()).finish()
    }
}

impl Command {
    /// Publishes an answer (and hands it to the HTTP caller, if any).
    pub fn answer(&self, status: Status, reason: Option<String>, detail: serde_json::Map<String, serde_json::Value>) {
        let ev = CommandEvent {
            schema: PAYLOAD_SCHEMA,
            ts: now_ms(),
            command: self.name.as_str().to_string(),
            camera: self.camera.clone(),
            status,
            request_id: self.request_id.clone(),
            reason,
            detail,
        };
        if status == Status::Refused || status == Status::Failed {
            tracing::warn!(
                command = self.name.as_str(), camera = self.camera.as_deref().unwrap_or("-"),
                status = ?status, reason = ev.reason.as_deref().unwrap_or(""), "command not carried out"
            );
        }
        self.answer.publisher.event(&ev);
        if let Some(tx) = &self.answer.http {
            // Only the first final answer reaches the caller; later ones are published only.
            let _ = tx.try_send(ev);
        }
    }

    pub fn refuse(&self, reason: impl Into<String>) {
        self.answer(Status::Refused, Some(reason.into()), serde_json::Map::new());
    }

    pub fn accept(&self) {
        self.answer(Status::Accepted, None, serde_json::Map::new());
    }

    pub fn done(&self, detail: serde_json::Map<String, serde_json::Value>) {
        self.answer(Status::Done, None, detail);
    }

    pub fn fail(&self, reason: impl Into<String>) {
        self.answer(Status::Failed, Some(reason.into()), serde_json::Map::new());
    }

    /// A string field of the body, if present and a string.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.body.get(key).and_then(|v| v.as_str())
    }
}

/// Why the intake refused a command before any handler saw it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown command `{name}` (known: {known})", name = .0, known = CommandName::names().join(", "))]
    UnknownCommand(String),
    #[error("commands are disabled: set [commands] enabled = true to accept them")]
    Disabled,
    #[error("command `{0}` is not in [commands].allow")]
    NotAllowed(&'static str),
    #[error("unknown camera `{0}`")]
    UnknownCamera(String),
    #[error("`{0}` is a node command: send it to <prefix>/<node>/cmd/{0}")]
    NodeCommand(&'static str),
    #[error("`{0}` is a camera command: send it to <prefix>/<node>/<camera>/cmd/{0}")]
    CameraCommand(&'static str),
    #[error("the payload is not a JSON object: {0}")]
    BadJson(String),
    #[error("retained command messages are ignored (they would run again on every reconnect)")]
    Retained,
    #[error("nothing in this daemon carries out `{0}`")]
    NoHandler(&'static str),
    #[error("busy: `{0}` commands are queued to capacity; try again")]
    Busy(&'static str),
    #[error("commands over HTTP are disabled ([commands] http = false)")]
    HttpDisabled,
}

/// Where a command topic points, relative to `<prefix>/<node>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub camera: Option<String>,
    pub name: String,
}

/// Parses `<base>/cmd/<name>` or `<base>/<camera>/cmd/<name>`; `None` for
/// any other topic.
pub fn parse_topic(base: &str, topic: &str) -> Option<Address> {
    let rest = topic.strip_prefix(base)?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["cmd", name] => Some(Address { camera: None, name: (*name).to_string() }),
        [camera, "cmd", name] => Some(Address { camera: Some((*camera).to_string()), name: (*name).to_string() }),
        _ => None,
    }
}

/// The MQTT filters that cover every command topic of `base`.
pub fn topic_filters(base: &str) -> [String; 2] {
    [format!("{base}/cmd/+"), format!("{base}/+/cmd/+")]
}

/// Counts per command name.
#[derive(Debug, Default)]
pub struct CommandCounters {
    pub received: AtomicU64,
    pub refused: AtomicU64,
}

/// Capacity of each handler's queue: commands are small and handlers quick;
/// more waiting than this means the handler is stuck, and refusing tells the
/// sender at once instead of acting on a stale command later.
pub const HANDLER_QUEUE: usize = 256;

/// Receives commands, checks them, hands them to their handlers.
pub struct Intake {
    settings: RwLock<CommandSettings>,
    publisher: Arc<dyn Publisher>,
    cameras: RwLock<BTreeSet<String>>,
    handlers: Mutex<BTreeMap<CommandName, Sender<Command>>>,
    counters: BTreeMap<CommandName, CommandCounters>,
    /// Commands with an unknown name (per name they would be unbounded).
    unknown: AtomicU64,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake").field("settings", &self.settings).finish()
    }
}

impl Intake {
    pub fn new(settings: CommandSettings, publisher: Arc<dyn Publisher>, cameras: &[String]) -> Arc<Intake> {
        Arc::new(Intake {
            settings: RwLock::new(settings),
            publisher,
            cameras: RwLock::new(cameras.iter().cloned().collect()),
            handlers: Mutex::new(BTreeMap::new()),
            counters: CommandName::ALL.into_iter().map(|c| (c, CommandCounters::default())).collect(),
            unknown: AtomicU64::new(0),
        })
    }

    /// The handler of `name` from now on; returns the receiver it reads.
    /// Registering again replaces the previous handler (its queue closes).
    pub fn register(&self, name: CommandName) -> Receiver<Command> {
        let (tx, rx) = crossbeam_channel::bounded(HANDLER_QUEUE);
        self.handlers.lock().unwrap_or_else(|e| e.into_inner()).insert(name, tx);
        rx
    }

    /// The cameras commands may name (after a reload changed them).
    pub fn set_cameras(&self, cameras: &[String]) {
        *self.cameras.write().unwrap_or_else(|e| e.into_inner()) = cameras.iter().cloned().collect();
    }

    /// New `[commands]` settings (reload).
    pub fn set_settings(&self, settings: CommandSettings) {
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = settings;
    }

    pub fn counters(&self, name: CommandName) -> (u64, u64) {
        let c = &self.counters[&name];
        (c.received.load(Ordering::Relaxed), c.refused.load(Ordering::Relaxed))
    }

    /// Commands refused because their name is unknown.
    pub fn unknown(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }

    /// An MQTT message on a command topic (`base` is `<prefix>/<node>`).
    /// Topics that are not command topics are ignored.
    pub fn from_mqtt(&self, base: &str, topic: &str, payload: &[u8], retained: bool) {
        let Some(addr) = parse_topic(base, topic) else { return };
        let answer = Answer { publisher: self.publisher.clone(), http: None };
        self.dispatch(addr, payload, retained, Origin::Mqtt, answer);
    }

    /// An HTTP request; waits up to `timeout` for the first answer that is
    /// not `progress`. `camera` is `-` for node commands.
    pub fn from_http(&self, camera: &str, name: &str, payload: &[u8], timeout: Duration) -> Option<CommandEvent> {
        let (tx, rx) = crossbeam_channel::bounded(8);
        let addr = Address { camera: (camera != "-").then(|| camera.to_string()), name: name.to_string() };
        let answer = Answer { publisher: self.publisher.clone(), http: Some(tx) };
        self.dispatch(addr, payload, false, Origin::Http, answer);
        let deadline = Instant::now() + timeout;
        loop {
            match rx.recv_deadline(deadline) {
                Ok(ev) if ev.status == Status::Progress => continue,
                Ok(ev) => return Some(ev),
                Err(_) => return None,
            }
        }
    }

    fn dispatch(&self, addr: Address, payload: &[u8], retained: bool, origin: Origin, answer: Answer) {
        let Some(name) = CommandName::parse(&addr.name) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            let ev = CommandEvent {
                reason: Some(Refusal::UnknownCommand(addr.name.clone()).to_string()),
                ..CommandEvent::spontaneous(&addr.name, addr.camera.as_deref(), Status::Refused)
            };
            tracing::warn!(command = %addr.name, "unknown command refused");
            answer.publisher.event(&ev);
            if let Some(tx) = &answer.http {
                let _ = tx.try_send(ev);
            }
            return;
        };
        let counters = &self.counters[&name];
        counters.received.fetch_add(1, Ordering::Relaxed);
        let (body, bad_json) = match parse_body(payload) {
            Ok(b) => (b, None),
            Err(e) => (serde_json::Map::new(), Some(e)),
        };
        let request_id = body.get("request_id").and_then(|v| v.as_str()).map(str::to_string);
        let cmd = Command {
            name,
            camera: addr.camera,
            body,
            request_id,
            origin,
            received: Instant::now(),
            received_ms: now_ms(),
            answer,
        };
        match self.check(&cmd, retained, bad_json) {
            Err(refusal) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                cmd.refuse(refusal.to_string());
            }
            Ok(tx) => {
                if let Err(e) = tx.try_send(cmd) {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    let (TrySendError::Full(cmd) | TrySendError::Disconnected(cmd)) = e;
                    cmd.refuse(Refusal::Busy(name.as_str()).to_string());
                }
            }
        }
    }

    /// The checks every command passes before its handler sees it, in the
    /// order a sender would fix them.
    fn check(&self, cmd: &Command, retained: bool, bad_json: Option<String>) -> Result<Sender<Command>, Refusal> {
        let name = cmd.name.as_str();
        if retained {
            return Err(Refusal::Retained);
        }
        {
            let s = self.settings.read().unwrap_or_else(|e| e.into_inner());
            if !s.enabled {
                return Err(Refusal::Disabled);
            }
            if cmd.origin == Origin::Http && !s.http {
                return Err(Refusal::HttpDisabled);
            }
            if !s.allow.contains(&cmd.name) {
                return Err(Refusal::NotAllowed(name));
            }
        }
        match (&cmd.camera, cmd.name.is_node_command()) {
            (Some(_), true) => return Err(Refusal::NodeCommand(name)),
            (None, false) => return Err(Refusal::CameraCommand(name)),
            (Some(c), false) if !self.cameras.read().unwrap_or_else(|e| e.into_inner()).contains(c) => {
                return Err(Refusal::UnknownCamera(c.clone()));
            }
            _ => {}
        }
        if let Some(e) = bad_json {
            return Err(Refusal::BadJson(e));
        }
        self.handlers.lock().unwrap_or_else(|e| e.into_inner()).get(&cmd.name).cloned().ok_or(Refusal::NoHandler(name))
    }
}

/// The payload as a JSON object; empty means `{}`.
fn parse_body(payload: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("expected an object like {\"part_id\": \"4711\"}".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Recorded, Recorder};

    fn intake(enabled: bool) -> (Arc<Intake>, Recorder) {
        let rec = Recorder::default();
        let s = CommandSettings { enabled, ..CommandSettings::default() };
        (Intake::new(s, Arc::new(rec.clone()), &["line1".to_string()]), rec)
    }

    fn events(rec: &Recorder) -> Vec<CommandEvent> {
        rec.events().into_iter().filter_map(|e| if let Recorded::Event(e) = e { Some(e) } else { None }).collect()
    }

    #[test]
    fn topics_parse_into_node_and_camera_addresses() {
        let base = "ganomalyd/box";
        assert_eq!(
            parse_topic(base, "ganomalyd/box/cmd/reload"),
            Some(Address { camera: None, name: "reload".into() })
        );
        assert_eq!(
            parse_topic(base, "ganomalyd/box/line1/cmd/trigger"),
            Some(Address { camera: Some("line1".into()), name: "trigger".into() })
        );
        for other in ["ganomalyd/box/line1/score", "ganomalyd/boxer/cmd/reload", "ganomalyd/box/a/b/cmd/x", "x"] {
            assert_eq!(parse_topic(base, other), None, "{other}");
        }
        let [node, cam] = topic_filters(base);
        assert_eq!((node.as_str(), cam.as_str()), ("ganomalyd/box/cmd/+", "ganomalyd/box/+/cmd/+"));
    }

    #[test]
    fn a_good_command_reaches_its_handler_with_its_body() {
        let (intake, rec) = intake(true);
        let rx = intake.register(CommandName::Trigger);
        intake.from_mqtt("p/n", "p/n/line1/cmd/trigger", br#"{"part_id":"4711","request_id":"r1"}"#, false);
        let cmd = rx.try_recv().expect("handed over");
        assert_eq!((cmd.camera.as_deref(), cmd.str_field("part_id")), (Some("line1"), Some("4711")));
        assert_eq!(cmd.request_id.as_deref(), Some("r1"));
        cmd.done(serde_json::Map::new());
        let ev = events(&rec);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].status, ev[0].request_id.as_deref()), (Status::Done, Some("r1")));
        assert_eq!(intake.counters(CommandName::Trigger), (1, 0));
    }

    #[test]
    fn every_refusal_is_published_with_its_reason_and_counted() {
        let (off, rec) = intake(false);
        let _rx = off.register(CommandName::Trigger);
        off.from_mqtt("p/n", "p/n/line1/cmd/trigger", b"{}", false);
        assert!(events(&rec)[0].reason.as_deref().unwrap().contains("enabled = true"));

        let (on, rec) = intake(true);
        let _rx = on.register(CommandName::Trigger);
        let _reload = on.register(CommandName::Reload);
        let cases: [(&str, &[u8], bool, &str); 8] = [
            ("p/n/line1/cmd/trigger", b"{not json", false, "not a JSON object"),
            ("p/n/line1/cmd/trigger", b"[1,2]", false, "expected an object"),
            ("p/n/nope/cmd/trigger", b"{}", false, "unknown camera `nope`"),
            ("p/n/cmd/trigger", b"{}", false, "camera command"),
            ("p/n/line1/cmd/reload", b"{}", false, "node command"),
            ("p/n/line1/cmd/trigger", b"{}", true, "retained"),
            ("p/n/line1/cmd/record", b"{}", false, "nothing in this daemon carries out `record`"),
            ("p/n/line1/cmd/explode", b"{}", false, "unknown command `explode`"),
        ];
        for (topic, payload, retained, _) in cases {
            on.from_mqtt("p/n", topic, payload, retained);
        }
        let ev = events(&rec);
        assert_eq!(ev.len(), cases.len());
        for (e, (topic, _, _, want)) in ev.iter().zip(cases) {
            assert_eq!(e.status, Status::Refused, "{topic}");
            assert!(e.reason.as_deref().unwrap_or("").contains(want), "{topic}: {:?} lacks {want}", e.reason);
        }
        assert_eq!(on.counters(CommandName::Trigger), (5, 5));
        assert_eq!(on.unknown(), 1);
    }

    #[test]
    fn a_full_handler_queue_refuses_instead_of_blocking() {
        let (intake, rec) = intake(true);
        let _rx = intake.register(CommandName::Trigger);
        for _ in 0..HANDLER_QUEUE + 3 {
            intake.from_mqtt("p/n", "p/n/line1/cmd/trigger", b"{}", false);
        }
        let busy = events(&rec).iter().filter(|e| e.reason.as_deref().unwrap_or("").starts_with("busy")).count();
        assert_eq!(busy, 3);
    }

    #[test]
    fn not_allowed_commands_are_refused_and_http_answers_the_caller() {
        let rec = Recorder::default();
        let s = CommandSettings { enabled: true, allow: [CommandName::Reload].into_iter().collect(), http: true };
        let intake = Intake::new(s, Arc::new(rec.clone()), &[]);
        let rx = intake.register(CommandName::Reload);
        let ev = intake.from_http("line1", "trigger", b"{}", Duration::from_secs(1)).expect("answered");
        assert!(ev.reason.unwrap().contains("not in [commands].allow"));

        // A handler answering on its own thread: the caller gets its first final answer.
        let worker = std::thread::spawn(move || {
            let cmd = rx.recv().unwrap();
            cmd.answer(Status::Progress, None, serde_json::Map::new());
            cmd.done(serde_json::Map::new());
        });
        let ev = intake.from_http("-", "reload", b"", Duration::from_secs(10)).expect("answered");
        assert_eq!(ev.status, Status::Done);
        worker.join().unwrap();

        intake.set_settings(CommandSettings { enabled: true, http: false, ..CommandSettings::default() });
        let ev = intake.from_http("-", "reload", b"", Duration::from_secs(1)).expect("answered");
        assert!(ev.reason.unwrap().contains("http = false"));
    }
}
