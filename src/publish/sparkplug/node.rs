//! The I/O-free edge node: what ganomalyd's Sparkplug B messages say and
//! when. Its methods change state and return the messages to publish
//! ([`Out`]); the connection task publishes them. Tested without a network.
//!
//! # Sessions and numbers
//! A session is one MQTT connection: its CONNECT carries the will (NDEATH
//! with the session's `bdSeq`), and once it is up [`EdgeNode::birth`] gives
//! NBIRTH (`seq` 0, the same `bdSeq`) and a DBIRTH per camera. Every later
//! message of the node (DBIRTH, DDATA, DDEATH) takes the next `seq`, 255
//! wrapping to 0; NDEATH has none. A rebirth (NCMD `Node Control/Rebirth`)
//! is a birth on the same connection: same `bdSeq`, `seq` from 0 again.
//!
//! # Devices
//! One device per camera (device id = camera name). A camera going offline
//! is a DDEATH (the specification: an edge node that loses a device
//! publishes its DDEATH); coming back, a DBIRTH. Score, raw score and
//! threshold change every frame: their DDATA is held to one per
//! `ddata_interval` per camera. Alarm state, camera state and verdict counts
//! are sent at once (with the latest score, if it changed).
//!
//! # Verdicts
//! A verdict is one DDATA of the `Verdict/...` metrics, each stamped with the
//! verdict's own time, sent through the store-and-forward outbox. It is
//! flagged `is_historical` when it was decided before its device's DBIRTH on
//! this session: it waited through an outage (or a camera's offline time),
//! so a host files it as history rather than as the tag's current value.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::payload::{DataType, Form, Metric, Payload, Value};
use crate::events::{AlarmEvent, AlarmKind, ScoreEvent, Verdict, VerdictEvent};

/// Topic namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";
/// The NCMD metric that asks for a rebirth.
pub const REBIRTH: &str = "Node Control/Rebirth";

/// The model a camera runs, for its DBIRTH.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelInfo {
    pub path: String,
    /// Hex sha256 of the file; empty when it could not be read.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NBirth,
    DBirth,
    DData,
    DDeath,
    NDeath,
    /// A verdict or alarm-event DDATA carrying this outbox row.
    Stored(i64),
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    pub topic: String,
    pub qos: Qos,
    pub kind: Kind,
    pub payload: Payload,
}

/// What the Sparkplug outbox holds: verdicts and alarm events, as their
/// JSON payloads (told apart by their fields).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Stored {
    Verdict(VerdictEvent),
    Alarm(AlarmEvent),
}

impl Stored {
    pub fn camera(&self) -> &str {
        match self {
            Stored::Verdict(v) => &v.camera,
            Stored::Alarm(a) => &a.camera,
        }
    }
    /// When it happened, ms since the epoch.
    pub fn ts(&self) -> u64 {
        match self {
            Stored::Verdict(v) => v.ts,
            Stored::Alarm(a) => a.ts,
        }
    }
}

/// Verdict counts of one camera since the daemon started, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: u64,
    pub ng: u64,
    pub error: u64,
    pub timeout: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Changed {
    score: bool,
    /// Alarm state, camera state, counts: sent at once.
    urgent: bool,
}

#[derive(Debug, Clone, Default)]
struct Device {
    online: Option<bool>,
    alarm: Option<bool>,
    /// Normalised score, raw score, threshold, frame time.
    score: Option<(f64, f64, f64, u64)>,
    counts: Counts,
    model: ModelInfo,
    last_verdict: Option<VerdictEvent>,
    last_alarm: Option<AlarmEvent>,
    /// When the pipeline last changed each state value (ms since epoch).
    state_ts: u64,
    /// DBIRTH sent on this session (ms since epoch), no DDEATH since.
    born_ms: Option<u64>,
    changed: Changed,
    last_data: Option<Instant>,
}

/// The edge node's state across sessions.
#[derive(Debug)]
pub struct EdgeNode {
    group: String,
    node: String,
    bd_seq: u8,
    seq: u8,
    /// A session is up and born.
    live: bool,
    devices: BTreeMap<String, Device>,
    interval: Duration,
    software: String,
}

impl EdgeNode {
    /// `cameras`: every configured camera with its model; `interval`: the
    /// shortest time between two score DDATA of one camera.
    pub fn new(group: &str, node: &str, cameras: Vec<(String, ModelInfo)>, interval: Duration) -> EdgeNode {
        let devices = cameras.into_iter().map(|(name, model)| (name, Device { model, ..Device::default() })).collect();
        EdgeNode {
            group: group.to_string(),
            node: node.to_string(),
            bd_seq: 0,
            seq: 0,
            live: false,
            devices,
            interval,
            software: format!("ganomalyd {}", env!("CARGO_PKG_VERSION")),
        }
    }

    fn node_topic(&self, kind: &str) -> String {
        format!("{NAMESPACE}/{}/{kind}/{}", self.group, self.node)
    }

    fn device_topic(&self, kind: &str, camera: &str) -> String {
        format!("{NAMESPACE}/{}/{kind}/{}/{camera}", self.group, self.node)
    }

    /// `spBv1.0/STATE/<host_id>`: the primary host's state.
    pub fn state_topic(host_id: &str) -> String {
        format!("{NAMESPACE}/STATE/{host_id}")
    }

    /// `spBv1.0/<group>/NCMD/<node>`: subscribed on every session.
    pub fn ncmd_topic(&self) -> String {
        self.node_topic("NCMD")
    }

    pub fn bd_seq(&self) -> u8 {
        self.bd_seq
    }

    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Whether `camera`'s device is born on this session.
    pub fn is_born(&self, camera: &str) -> bool {
        self.live && self.devices.get(camera).is_some_and(|d| d.born_ms.is_some())
    }

    /// A new connection is about to be made with `bd_seq` in its will.
    pub fn connecting(&mut self, bd_seq: u8) {
        self.bd_seq = bd_seq;
        self.lost();
    }

    /// The connection is gone: nothing is born any more.
    pub fn lost(&mut self) {
        self.live = false;
        for d in self.devices.values_mut() {
            d.born_ms = None;
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq = self.seq.wrapping_add(1);
        u64::from(self.seq)
    }

    /// The NDEATH: the will of every connection, and the last message of a
    /// clean stop. Only `bdSeq`, no `seq`.
    pub fn death(&self, now_ms: u64) -> Out {
        let bd = Metric::new("bdSeq", now_ms, Value::Int64(i64::from(self.bd_seq)), Form::Birth);
        Out {
            topic: self.node_topic("NDEATH"),
            qos: Qos::AtLeastOnce,
            kind: Kind::NDeath,
            payload: Payload { timestamp: Some(now_ms), metrics: vec![bd], ..Payload::default() },
        }
    }

    /// NBIRTH and a DBIRTH for every camera not known to be offline: after
    /// each CONNACK and on each rebirth request.
    pub fn birth(&mut self, now: Instant, now_ms: u64) -> Vec<Out> {
        self.live = true;
        self.seq = 0;
        let t = now_ms;
        let metrics = vec![
            Metric::new("bdSeq", t, Value::Int64(i64::from(self.bd_seq)), Form::Birth),
            Metric::new(REBIRTH, t, Value::Boolean(false), Form::Birth),
            Metric::new("Properties/Software", t, Value::String(self.software.clone()), Form::Birth),
            Metric::new("Properties/Cameras", t, Value::UInt64(self.devices.len() as u64), Form::Birth),
        ];
        let mut out = vec![Out {
            topic: self.node_topic("NBIRTH"),
            qos: Qos::AtMostOnce,
            kind: Kind::NBirth,
            payload: Payload { timestamp: Some(t), metrics, seq: Some(0), ..Payload::default() },
        }];
        let cameras: Vec<String> = self.devices.keys().cloned().collect();
        for cam in cameras {
            if let Some(d) = self.devices.get_mut(&cam) {
                d.born_ms = None;
                if d.online != Some(false) {
                    out.push(self.dbirth(&cam, now, t));
                }
            }
        }
        out
    }

    fn dbirth(&mut self, camera: &str, now: Instant, t: u64) -> Out {
        let seq = self.next_seq();
        let topic = self.device_topic("DBIRTH", camera);
        let d = self.devices.entry(camera.to_string()).or_default();
        d.born_ms = Some(t);
        d.changed = Changed::default();
        d.last_data = Some(now);
        let mut metrics = state_metrics(d, t, Form::Birth, true);
        metrics.extend(verdict_metrics(d.last_verdict.as_ref(), t, Form::Birth, false));
        metrics.extend(alarm_metrics(d.last_alarm.as_ref(), t, Form::Birth, false));
        Out {
            topic,
            qos: Qos::AtMostOnce,
            kind: Kind::DBirth,
            payload: Payload { timestamp: Some(t), metrics, seq: Some(seq), ..Payload::default() },
        }
    }

    pub fn score(&mut self, ev: &ScoreEvent) {
        let d = self.devices.entry(ev.camera.clone()).or_default();
        d.score = Some((ev.score, ev.raw_score, ev.threshold, ev.ts));
        d.changed.score = true;
    }

    pub fn alarm_state(&mut self, camera: &str, active: bool, now_ms: u64) {
        let d = self.devices.entry(camera.to_string()).or_default();
        if d.alarm != Some(active) {
            d.alarm = Some(active);
            d.state_ts = now_ms;
            d.changed.urgent = true;
        }
    }

    pub fn camera_online(&mut self, camera: &str, online: bool, now_ms: u64) {
        let d = self.devices.entry(camera.to_string()).or_default();
        if d.online != Some(online) {
            d.online = Some(online);
            d.state_ts = now_ms;
            d.changed.urgent = true;
        }
    }

    /// Counts a verdict handed over (its DDATA goes through the outbox).
    pub fn count(&mut self, ev: &VerdictEvent, now_ms: u64) {
        let d = self.devices.entry(ev.camera.clone()).or_default();
        let c = &mut d.counts;
        match ev.verdict {
            Verdict::Ok => c.ok += 1,
            Verdict::Ng => c.ng += 1,
            Verdict::Error => c.error += 1,
            Verdict::Timeout => c.timeout += 1,
        }
        d.last_verdict = Some(ev.clone());
        d.state_ts = now_ms;
        d.changed.urgent = true;
    }

    /// Notes an alarm event handed over (its DDATA goes through the outbox).
    pub fn note_alarm(&mut self, ev: &AlarmEvent) {
        self.devices.entry(ev.camera.clone()).or_default().last_alarm = Some(ev.clone());
    }

    /// What is due now: DDEATH for cameras gone offline, DBIRTH for cameras
    /// back (or new), DDATA for changes (scores at most once per interval).
    pub fn due(&mut self, now: Instant, now_ms: u64) -> Vec<Out> {
        if !self.live {
            return Vec::new();
        }
        let mut out = Vec::new();
        let cameras: Vec<String> = self.devices.keys().cloned().collect();
        for cam in cameras {
            let Some(d) = self.devices.get(&cam) else { continue };
            let (born, online, changed, last) = (d.born_ms.is_some(), d.online, d.changed, d.last_data);
            if born && online == Some(false) {
                let seq = self.next_seq();
                let topic = self.device_topic("DDEATH", &cam);
                if let Some(d) = self.devices.get_mut(&cam) {
                    d.born_ms = None;
                    d.changed = Changed::default();
                }
                out.push(Out {
                    topic,
                    qos: Qos::AtMostOnce,
                    kind: Kind::DDeath,
                    payload: Payload { timestamp: Some(now_ms), seq: Some(seq), ..Payload::default() },
                });
            } else if !born && online != Some(false) {
                out.push(self.dbirth(&cam, now, now_ms));
            } else if born {
                let rate_ok = last.is_none_or(|l| now.saturating_duration_since(l) >= self.interval);
                if changed.urgent || (changed.score && rate_ok) {
                    let seq = self.next_seq();
                    let topic = self.device_topic("DDATA", &cam);
                    let Some(d) = self.devices.get_mut(&cam) else { continue };
                    let mut metrics = state_metrics(d, now_ms, Form::Data, changed.urgent);
                    if !changed.score {
                        metrics.retain(|m| !is_score_metric(m));
                    }
                    d.changed = Changed::default();
                    d.last_data = Some(now);
                    out.push(Out {
                        topic,
                        qos: Qos::AtMostOnce,
                        kind: Kind::DData,
                        payload: Payload { timestamp: Some(now_ms), metrics, seq: Some(seq), ..Payload::default() },
                    });
                }
            }
        }
        out
    }

    /// The DDATA of a stored verdict or alarm event (outbox row `row`), or
    /// None while its camera's device is not born (it waits).
    pub fn stored(&mut self, row: i64, ev: &Stored, now_ms: u64) -> Option<Out> {
        let born_ms = self.devices.get(ev.camera()).and_then(|d| d.born_ms).filter(|_| self.live)?;
        let historical = ev.ts() < born_ms;
        let seq = self.next_seq();
        let metrics = match ev {
            Stored::Verdict(v) => verdict_metrics(Some(v), v.ts, Form::Data, historical),
            Stored::Alarm(a) => alarm_metrics(Some(a), a.ts, Form::Data, historical),
        };
        Some(Out {
            topic: self.device_topic("DDATA", ev.camera()),
            // QoS 1, unlike other DDATA: the outbox row is deleted on its PUBACK.
            qos: Qos::AtLeastOnce,
            kind: Kind::Stored(row),
            payload: Payload { timestamp: Some(now_ms), metrics, seq: Some(seq), ..Payload::default() },
        })
    }

    /// [`stored`](Self::stored) for a verdict.
    pub fn verdict(&mut self, row: i64, ev: &VerdictEvent, now_ms: u64) -> Option<Out> {
        self.stored(row, &Stored::Verdict(ev.clone()), now_ms)
    }
}

/// The primary host application's STATE payload (Sparkplug 3.0, JSON on
/// `spBv1.0/STATE/<host_id>`, retained).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct HostState {
    pub online: bool,
    /// The host's time of the message, ms since the epoch.
    pub timestamp: u64,
}

impl HostState {
    pub fn parse(payload: &[u8]) -> Result<HostState, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

/// What a STATE message asks of the edge node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostAction {
    /// The host is online and the node is not born: NBIRTH and DBIRTHs.
    Birth,
    /// The host went offline while the node was born: NDEATH, disconnect,
    /// connect again and wait for it.
    EndSession,
    Nothing,
}

/// The primary host's state as its STATE messages tell it. An offline STATE
/// older than the last online one is a late death of an earlier host
/// session and changes nothing (the specification's timestamp rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostWatch {
    last_online_ts: Option<u64>,
    online: bool,
}

impl HostWatch {
    /// `live`: the node is born on the current connection.
    pub fn on_state(&mut self, s: HostState, live: bool) -> HostAction {
        let last = self.last_online_ts.unwrap_or(0);
        if s.online {
            if self.last_online_ts.is_some() && s.timestamp < last {
                return HostAction::Nothing;
            }
            self.last_online_ts = Some(s.timestamp);
            self.online = true;
            if live {
                HostAction::Nothing
            } else {
                HostAction::Birth
            }
        } else {
            if s.timestamp < last {
                return HostAction::Nothing;
            }
            self.online = false;
            if live {
                HostAction::EndSession
            } else {
                HostAction::Nothing
            }
        }
    }

    pub fn online(&self) -> bool {
        self.online
    }
}

/// Whether an NCMD payload asks for a rebirth (`Node Control/Rebirth` = true).
pub fn wants_rebirth(payload: &[u8]) -> Result<bool, prost::DecodeError> {
    let p = Payload::decode(payload)?;
    Ok(p.metric(REBIRTH).and_then(|m| m.boolean_value).unwrap_or(false))
}

const SCORE_METRICS: [&str; 3] = ["Score", "Raw Score", "Threshold"];

fn is_score_metric(m: &Metric) -> bool {
    m.name.as_deref().is_some_and(|n| SCORE_METRICS.contains(&n))
}

/// The device's state metrics; `all`: also those that rarely change (a
/// birth, or an urgent DDATA, which repeats the small state for simplicity).
fn state_metrics(d: &Device, t: u64, form: Form, all: bool) -> Vec<Metric> {
    let mut m = Vec::new();
    let (score, raw, threshold, frame_ts) = match d.score {
        Some((s, r, th, ts)) => (Value::Double(s), Value::Double(r), Value::Double(th), ts),
        None => (Value::Null(DataType::Double), Value::Null(DataType::Double), Value::Null(DataType::Double), t),
    };
    m.push(Metric::new("Score", frame_ts, score, form));
    m.push(Metric::new("Raw Score", frame_ts, raw, form));
    m.push(Metric::new("Threshold", frame_ts, threshold, form));
    if !all {
        return m;
    }
    let st = if d.state_ts == 0 { t } else { d.state_ts.min(t) };
    let opt_bool = |b: Option<bool>| b.map_or(Value::Null(DataType::Boolean), Value::Boolean);
    m.push(Metric::new("Alarm", st, opt_bool(d.alarm), form));
    // A device being born is online as far as anyone knows (a camera that
    // never reported is not offline).
    m.push(Metric::new("Online", st, Value::Boolean(d.online != Some(false)), form));
    let c = d.counts;
    for (name, n) in
        [("Verdicts/OK", c.ok), ("Verdicts/NG", c.ng), ("Verdicts/Error", c.error), ("Verdicts/Timeout", c.timeout)]
    {
        m.push(Metric::new(name, st, Value::UInt64(n), form));
    }
    if form == Form::Birth {
        m.push(Metric::new("Model/Path", t, Value::String(d.model.path.clone()), form));
        m.push(Metric::new("Model/SHA256", t, Value::String(d.model.sha256.clone()), form));
    }
    m
}

/// `Verdict/...` metrics of `v` (nulls of the right types without one).
fn verdict_metrics(v: Option<&VerdictEvent>, t: u64, form: Form, historical: bool) -> Vec<Metric> {
    let s = |x: Option<&String>| x.map_or(Value::Null(DataType::String), |x| Value::String(x.clone()));
    let f = |x: Option<f64>| x.map_or(Value::Null(DataType::Double), Value::Double);
    let values = match v {
        Some(v) => vec![
            ("Verdict/Part ID", Value::String(v.part_id.clone())),
            ("Verdict/Result", Value::String(verdict_name(v.verdict).into())),
            ("Verdict/Seq", Value::UInt64(v.seq)),
            ("Verdict/Score", f(v.score)),
            ("Verdict/Threshold", f(v.threshold)),
            ("Verdict/Latency ms", Value::Double(v.latency_ms)),
            ("Verdict/Model SHA256", s(v.model_sha256.as_ref())),
            ("Verdict/Reason", s(v.reason.as_ref())),
            ("Verdict/JSON", Value::String(serde_json::to_string(v).unwrap_or_default())),
        ],
        None => vec![
            ("Verdict/Part ID", Value::Null(DataType::String)),
            ("Verdict/Result", Value::Null(DataType::String)),
            ("Verdict/Seq", Value::Null(DataType::UInt64)),
            ("Verdict/Score", Value::Null(DataType::Double)),
            ("Verdict/Threshold", Value::Null(DataType::Double)),
            ("Verdict/Latency ms", Value::Null(DataType::Double)),
            ("Verdict/Model SHA256", Value::Null(DataType::String)),
            ("Verdict/Reason", Value::Null(DataType::String)),
            ("Verdict/JSON", Value::Null(DataType::String)),
        ],
    };
    values.into_iter().map(|(name, value)| Metric::new(name, t, value, form).historical(historical)).collect()
}

/// `Alarm Event/...` metrics of `a` (nulls of the right types without one).
fn alarm_metrics(a: Option<&AlarmEvent>, t: u64, form: Form, historical: bool) -> Vec<Metric> {
    let s = |x: Option<&String>| x.map_or(Value::Null(DataType::String), |x| Value::String(x.clone()));
    let values = match a {
        Some(a) => vec![
            ("Alarm Event/ID", Value::String(a.id.clone())),
            ("Alarm Event/Type", Value::String(if a.kind == AlarmKind::Start { "start" } else { "end" }.into())),
            ("Alarm Event/Start", Value::UInt64(a.start_ts)),
            ("Alarm Event/Peak", Value::Double(a.peak)),
            ("Alarm Event/Frames", Value::UInt64(a.frames)),
            ("Alarm Event/Snapshot", s(a.snapshot.as_ref())),
            ("Alarm Event/JSON", Value::String(serde_json::to_string(a).unwrap_or_default())),
        ],
        None => vec![
            ("Alarm Event/ID", Value::Null(DataType::String)),
            ("Alarm Event/Type", Value::Null(DataType::String)),
            ("Alarm Event/Start", Value::Null(DataType::UInt64)),
            ("Alarm Event/Peak", Value::Null(DataType::Double)),
            ("Alarm Event/Frames", Value::Null(DataType::UInt64)),
            ("Alarm Event/Snapshot", Value::Null(DataType::String)),
            ("Alarm Event/JSON", Value::Null(DataType::String)),
        ],
    };
    values.into_iter().map(|(name, value)| Metric::new(name, t, value, form).historical(historical)).collect()
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Ok => "ok",
        Verdict::Ng => "ng",
        Verdict::Error => "error",
        Verdict::Timeout => "timeout",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::PAYLOAD_SCHEMA;

    fn node() -> EdgeNode {
        let model = ModelInfo { path: "/m.onnx".into(), sha256: "ab".into() };
        EdgeNode::new("g", "n", vec![("a".into(), model.clone()), ("b".into(), model)], Duration::from_secs(1))
    }

    fn score(camera: &str, s: f64) -> ScoreEvent {
        ScoreEvent {
            schema: PAYLOAD_SCHEMA,
            camera: camera.into(),
            seq: 1,
            ts: 5,
            score: s,
            raw_score: s * 2.0,
            threshold: 1.0,
            kind: "latent".into(),
            latency_ms: 1.0,
        }
    }

    fn verdict(camera: &str, part: &str, ts: u64) -> VerdictEvent {
        VerdictEvent {
            schema: PAYLOAD_SCHEMA,
            camera: camera.into(),
            part_id: part.into(),
            verdict: Verdict::Ng,
            seq: 1,
            ts,
            trigger_ts: ts,
            latency_ms: 3.0,
            score: Some(0.7),
            raw_score: Some(1.4),
            threshold: Some(1.0),
            kind: Some("latent".into()),
            model_sha256: Some("ab".into()),
            settings_digest: None,
            frame_ts: vec![ts],
            frame_seq: vec![1],
            threshold_score: Some(0.5),
            snapshot: None,
            reason: None,
        }
    }

    fn seqs(out: &[Out]) -> Vec<Option<u64>> {
        out.iter().map(|o| o.payload.seq).collect()
    }

    fn value(o: &Out, name: &str) -> Option<Metric> {
        o.payload.metric(name).cloned()
    }

    #[test]
    fn birth_is_nbirth_with_bdseq_and_rebirth_then_a_dbirth_per_camera() {
        let mut n = node();
        n.connecting(7);
        let t = Instant::now();
        let out = n.birth(t, 100);
        let kinds: Vec<_> = out.iter().map(|o| (o.kind, o.topic.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (Kind::NBirth, "spBv1.0/g/NBIRTH/n"),
                (Kind::DBirth, "spBv1.0/g/DBIRTH/n/a"),
                (Kind::DBirth, "spBv1.0/g/DBIRTH/n/b")
            ]
        );
        assert_eq!(seqs(&out), [Some(0), Some(1), Some(2)]);
        let bd = value(&out[0], "bdSeq").unwrap();
        assert_eq!((bd.long_value, bd.datatype), (Some(7), Some(DataType::Int64 as u32)));
        let rebirth = value(&out[0], REBIRTH).unwrap();
        assert_eq!((rebirth.boolean_value, rebirth.datatype), (Some(false), Some(11)));
        let death = n.death(101);
        assert_eq!(
            (death.payload.seq, death.qos, death.topic.as_str()),
            (None, Qos::AtLeastOnce, "spBv1.0/g/NDEATH/n")
        );
        assert_eq!(death.payload.metrics.len(), 1);
        assert_eq!(death.payload.metrics[0].long_value, Some(7), "NDEATH carries the NBIRTH's bdSeq");
        // Every birth metric has a name, a datatype and a timestamp.
        for o in &out {
            assert!(o
                .payload
                .metrics
                .iter()
                .all(|m| m.name.is_some() && m.datatype.is_some() && m.timestamp.is_some()));
            assert_eq!(o.qos, Qos::AtMostOnce);
        }
        let model = value(&out[1], "Model/SHA256").unwrap();
        assert_eq!(model.string_value.as_deref(), Some("ab"));
        assert_eq!(value(&out[1], "Score").unwrap().is_null, Some(true), "no score yet");
    }

    #[test]
    fn seq_wraps_from_255_to_0_across_every_message() {
        let mut n = node();
        let t = Instant::now();
        let mut all = n.birth(t, 1);
        for i in 0..300u64 {
            n.alarm_state("a", i % 2 == 0, 2 + i);
            all.extend(n.due(t, 2 + i));
        }
        let s: Vec<u64> = all.iter().map(|o| o.payload.seq.unwrap()).collect();
        for w in s.windows(2) {
            assert_eq!(w[1], (w[0] + 1) % 256, "{w:?}");
        }
        assert!(s.contains(&255) && s.len() > 256);
        // A rebirth starts from 0 again.
        let again = n.birth(t, 500);
        assert_eq!(seqs(&again), [Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn scores_are_rate_limited_and_state_changes_go_at_once() {
        let mut n = node();
        let t0 = Instant::now();
        n.birth(t0, 1);
        n.score(&score("a", 0.2));
        assert!(n.due(t0 + Duration::from_millis(10), 2).is_empty(), "within the interval of the DBIRTH");
        let out = n.due(t0 + Duration::from_millis(1000), 3);
        assert_eq!(out.len(), 1);
        assert_eq!(value(&out[0], "Score").unwrap().double_value, Some(0.2));
        assert!(value(&out[0], "Alarm").is_none(), "a score DDATA carries only the score metrics");
        assert!(out[0].payload.metrics.iter().all(|m| m.datatype.is_none()), "no datatypes in DDATA");
        n.score(&score("a", 0.3));
        assert!(n.due(t0 + Duration::from_millis(1500), 4).is_empty());
        n.alarm_state("a", true, 5);
        let out = n.due(t0 + Duration::from_millis(1501), 5);
        assert_eq!(out.len(), 1, "the alarm does not wait");
        assert_eq!(value(&out[0], "Alarm").unwrap().boolean_value, Some(true));
        assert_eq!(value(&out[0], "Score").unwrap().double_value, Some(0.3), "with the score that was waiting");
        assert!(n.due(t0 + Duration::from_secs(10), 6).is_empty(), "nothing changed");
    }

    #[test]
    fn an_offline_camera_is_a_ddeath_and_its_return_a_dbirth() {
        let mut n = node();
        let t = Instant::now();
        n.birth(t, 1);
        n.camera_online("b", false, 2);
        let out = n.due(t, 2);
        assert_eq!((out.len(), out[0].kind, out[0].topic.as_str()), (1, Kind::DDeath, "spBv1.0/g/DDEATH/n/b"));
        assert!(!n.is_born("b"));
        n.score(&score("b", 0.5));
        assert!(n.due(t + Duration::from_secs(5), 3).is_empty(), "no DDATA for a dead device");
        // A rebirth leaves it out too.
        let births = n.birth(t, 4);
        assert_eq!(births.len(), 2, "NBIRTH and a's DBIRTH");
        n.camera_online("b", true, 5);
        let out = n.due(t, 5);
        assert_eq!((out.len(), out[0].kind), (1, Kind::DBirth));
        assert_eq!(value(&out[0], "Online").unwrap().boolean_value, Some(true));
        assert_eq!(value(&out[0], "Score").unwrap().double_value, Some(0.5), "current values in the DBIRTH");
    }

    #[test]
    fn verdicts_wait_for_their_device_and_are_historical_when_older_than_its_birth() {
        let mut n = node();
        let t = Instant::now();
        let v = verdict("a", "p1", 50);
        n.count(&v, 50);
        assert!(n.verdict(1, &v, 60).is_none(), "no session");
        n.connecting(1);
        let births = n.birth(t, 100);
        let counts = value(&births[1], "Verdicts/NG").unwrap();
        assert_eq!(counts.long_value, Some(1));
        assert_eq!(value(&births[1], "Verdict/Part ID").unwrap().string_value.as_deref(), Some("p1"));
        let out = n.verdict(1, &v, 101).unwrap();
        assert_eq!((out.kind, out.qos, out.topic.as_str()), (Kind::Stored(1), Qos::AtLeastOnce, "spBv1.0/g/DDATA/n/a"));
        let part = value(&out, "Verdict/Part ID").unwrap();
        assert_eq!(
            (part.string_value.as_deref(), part.is_historical, part.timestamp),
            (Some("p1"), Some(true), Some(50))
        );
        let live = verdict("a", "p2", 150);
        let out = n.verdict(2, &live, 151).unwrap();
        assert_eq!(value(&out, "Verdict/Part ID").unwrap().is_historical, None, "decided during the session");
        assert_eq!(value(&out, "Verdict/Result").unwrap().string_value.as_deref(), Some("ng"));
        n.camera_online("a", false, 160);
        let _ = n.due(t, 160);
        assert!(n.verdict(3, &verdict("a", "p3", 170), 171).is_none(), "its device is dead: it waits");
    }

    #[test]
    fn alarm_events_are_stored_data_too_and_historical_after_an_outage() {
        let mut n = node();
        let t = Instant::now();
        let start = AlarmEvent {
            schema: PAYLOAD_SCHEMA,
            id: "a-1".into(),
            camera: "a".into(),
            kind: AlarmKind::Start,
            ts: 40,
            start_ts: 40,
            end_ts: None,
            peak: 0.9,
            peak_raw: 1.8,
            frames: 3,
            first_seq: 1,
            seq: 3,
            snapshot: None,
            reason: None,
        };
        let stored = Stored::Alarm(start.clone());
        let json = serde_json::to_vec(&stored).unwrap();
        assert_eq!(serde_json::from_slice::<Stored>(&json).unwrap(), stored, "told apart from a verdict");
        let v = Stored::Verdict(verdict("a", "p", 1));
        assert_eq!(serde_json::from_slice::<Stored>(&serde_json::to_vec(&v).unwrap()).unwrap(), v);
        n.note_alarm(&start);
        let births = n.birth(t, 100);
        assert_eq!(value(&births[1], "Alarm Event/ID").unwrap().string_value.as_deref(), Some("a-1"));
        let out = n.stored(7, &stored, 101).unwrap();
        assert_eq!((out.kind, out.qos), (Kind::Stored(7), Qos::AtLeastOnce));
        let ty = value(&out, "Alarm Event/Type").unwrap();
        assert_eq!((ty.string_value.as_deref(), ty.is_historical, ty.timestamp), (Some("start"), Some(true), Some(40)));
        assert!(out.payload.metrics.iter().all(|m| m.name.as_deref().is_some_and(|n| n.starts_with("Alarm Event/"))));
    }

    #[test]
    fn the_primary_host_s_state_births_and_ends_sessions_by_its_timestamps() {
        let st = |online, timestamp| HostState { online, timestamp };
        let mut h = HostWatch::default();
        assert_eq!(h.on_state(st(false, 5), false), HostAction::Nothing, "offline before anything: wait");
        assert_eq!(h.on_state(st(true, 10), false), HostAction::Birth);
        assert!(h.online());
        assert_eq!(h.on_state(st(true, 10), true), HostAction::Nothing, "already born");
        assert_eq!(h.on_state(st(false, 9), true), HostAction::Nothing, "an older host session's death");
        assert!(h.online());
        assert_eq!(h.on_state(st(false, 10), true), HostAction::EndSession, "equal timestamps count");
        assert!(!h.online());
        assert_eq!(h.on_state(st(true, 8), false), HostAction::Nothing, "an older online");
        assert_eq!(h.on_state(st(true, 20), false), HostAction::Birth, "after the reconnect");
        assert_eq!(
            HostState::parse(br#"{"online": true, "timestamp": 1700000000000}"#).unwrap(),
            st(true, 1_700_000_000_000)
        );
        assert!(HostState::parse(b"ONLINE").is_err(), "Sparkplug 2.2's plain text STATE is not read");
        assert_eq!(EdgeNode::state_topic("scada1"), "spBv1.0/STATE/scada1");
    }

    #[test]
    fn ncmd_rebirth_is_read_from_the_payload() {
        let cmd = |v: bool| {
            Payload {
                timestamp: Some(1),
                metrics: vec![Metric::new(REBIRTH, 1, Value::Boolean(v), Form::Birth)],
                ..Payload::default()
            }
            .encode()
        };
        assert!(wants_rebirth(&cmd(true)).unwrap());
        assert!(!wants_rebirth(&cmd(false)).unwrap());
        assert!(!wants_rebirth(&Payload::default().encode()).unwrap());
        assert!(wants_rebirth(b"\xff\xff\xff").is_err());
    }
}
