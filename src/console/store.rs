//! The console's memory: recent score samples per camera, alarms with their
//! snapshots, verdicts and events, each bounded, fed by [`ConsolePublisher`].
//!
//! The publisher is called on the inference thread (scores, alarms), the
//! snapshot writer (snapshots) and the command handlers (events); it never
//! blocks and takes no lock: scores are thinned to `score_rate_hz` per camera
//! with atomics (each sample carries the highest score of its interval, for
//! the chart, and the last frame's, an unbiased draw for the histogram), and
//! everything goes over one bounded channel with `try_send`. Policy when the
//! channel is full: the item is dropped and counted (`dropped`); the console
//! shows it. Alarms are not lost to the plant by this: the MQTT outbox keeps
//! its own copy; only the console's view misses one.
//!
//! The store thread applies items to the [`Store`] under a mutex that only it
//! and the HTTP handlers take, never a pipeline thread.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use serde::Serialize;

use crate::commands::CommandEvent;
use crate::events::{AlarmEvent, AlarmKind, EndReason, Publisher, ScoreEvent, Snapshot, StatsReport, VerdictEvent};
use crate::metrics::CameraCounters;

/// Items the store thread may hold unapplied: a few seconds of samples from
/// a few cameras; more means the thread is starved, and dropping is the policy.
pub const CHANNEL: usize = 4096;

/// Events (command answers, drift, reload) kept.
const EVENTS_KEPT: usize = 200;

/// One score sample: `[ts_ms, max, last, raw_last]` in JSON.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub ts: u64,
    /// Highest normalised score since the previous sample.
    pub max: f64,
    /// The normalised score of the frame that closed the interval.
    pub last: f64,
    pub raw: f64,
}

impl Serialize for Sample {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.ts, self.max, self.last, self.raw).serialize(s)
    }
}

/// What the publisher hands to the store thread.
#[derive(Debug)]
pub enum Item {
    Score { camera: usize, sample: Sample, threshold_raw: f64 },
    Alarm(AlarmEvent),
    Snapshot(Snapshot),
    Verdict(VerdictEvent),
    Event(CommandEvent),
}

/// An alarm as the history shows it: its `start` and `end` merged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlarmRow {
    pub id: String,
    pub camera: String,
    pub start_ts: u64,
    pub end_ts: Option<u64>,
    pub peak: f64,
    pub peak_raw: f64,
    pub frames: u64,
    pub snapshot: Option<String>,
    pub reason: Option<EndReason>,
}

/// One camera's history.
#[derive(Debug, Clone, Default)]
pub struct CameraHistory {
    pub samples: VecDeque<Sample>,
    /// The calibrated raw threshold in the latest score.
    pub threshold_raw: Option<f64>,
    /// Frames decided per second over the last second.
    pub fps: f64,
}

/// Everything the console remembers. Pure data: [`Store::apply`] is tested
/// without threads.
#[derive(Debug)]
pub struct Store {
    pub cameras: Vec<CameraHistory>,
    pub alarms: VecDeque<AlarmRow>,
    /// JPEGs by alarm id, oldest first.
    pub snapshots: VecDeque<(String, axum::body::Bytes)>,
    pub verdicts: VecDeque<VerdictEvent>,
    pub events: VecDeque<CommandEvent>,
    samples_kept: usize,
    alarms_kept: usize,
    snapshots_kept: usize,
}

fn push_bounded<T>(q: &mut VecDeque<T>, cap: usize, v: T) {
    while q.len() >= cap.max(1) {
        q.pop_front();
    }
    q.push_back(v);
}

impl Store {
    pub fn new(cameras: usize, samples_kept: usize, alarms_kept: usize, snapshots_kept: usize) -> Store {
        Store {
            cameras: vec![CameraHistory::default(); cameras],
            alarms: VecDeque::new(),
            snapshots: VecDeque::new(),
            verdicts: VecDeque::new(),
            events: VecDeque::new(),
            samples_kept,
            alarms_kept,
            snapshots_kept,
        }
    }

    pub fn apply(&mut self, item: Item) {
        match item {
            Item::Score { camera, sample, threshold_raw } => {
                if let Some(c) = self.cameras.get_mut(camera) {
                    push_bounded(&mut c.samples, self.samples_kept, sample);
                    c.threshold_raw = Some(threshold_raw);
                }
            }
            Item::Alarm(ev) => {
                // Ids are unique per camera and run; the newest rows are at the back.
                match self.alarms.iter_mut().rev().find(|a| a.id == ev.id) {
                    Some(row) => {
                        row.peak = row.peak.max(ev.peak);
                        row.peak_raw = row.peak_raw.max(ev.peak_raw);
                        row.frames = ev.frames;
                        if ev.kind == AlarmKind::End {
                            row.end_ts = ev.end_ts.or(Some(ev.ts));
                            row.reason = ev.reason;
                        }
                        if row.snapshot.is_none() {
                            row.snapshot = ev.snapshot;
                        }
                    }
                    None => {
                        let end = ev.kind == AlarmKind::End;
                        let row = AlarmRow {
                            id: ev.id,
                            camera: ev.camera,
                            start_ts: ev.start_ts,
                            end_ts: if end { ev.end_ts.or(Some(ev.ts)) } else { None },
                            peak: ev.peak,
                            peak_raw: ev.peak_raw,
                            frames: ev.frames,
                            snapshot: ev.snapshot,
                            reason: ev.reason,
                        };
                        push_bounded(&mut self.alarms, self.alarms_kept, row);
                    }
                }
            }
            Item::Snapshot(s) => {
                push_bounded(&mut self.snapshots, self.snapshots_kept, (s.alarm_id, axum::body::Bytes::from(s.jpeg)));
            }
            Item::Verdict(v) => push_bounded(&mut self.verdicts, self.alarms_kept, v),
            Item::Event(e) => push_bounded(&mut self.events, EVENTS_KEPT, e),
        }
    }

    /// The JPEG of an alarm, if still held.
    pub fn snapshot(&self, alarm_id: &str) -> Option<axum::body::Bytes> {
        self.snapshots.iter().rev().find(|(id, _)| id == alarm_id).map(|(_, j)| j.clone())
    }

    /// Whether an alarm's snapshot is held in memory.
    pub fn has_snapshot(&self, alarm_id: &str) -> bool {
        self.snapshots.iter().any(|(id, _)| id == alarm_id)
    }
}

/// Per-camera thinning state, touched only by the thread that scores the camera.
#[derive(Debug)]
struct Thinning {
    index: usize,
    /// Milliseconds since the publisher's epoch when the next sample is due.
    next_ms: AtomicU64,
    /// Highest normalised score (f64 bits) since the last sample. Scores are
    /// clamped to [0, 1], and non-negative floats order like their bits, so
    /// `fetch_max` on the bits is a max on the values.
    max_bits: AtomicU64,
}

/// The [`Publisher`] that feeds the console (combined with MQTT by `publish::Tee`).
#[derive(Debug)]
pub struct ConsolePublisher {
    tx: Sender<Item>,
    cameras: BTreeMap<String, Thinning>,
    interval_ms: u64,
    epoch: Instant,
    /// Items dropped because the store thread was behind.
    pub dropped: AtomicU64,
}

impl ConsolePublisher {
    pub fn new(cameras: &[String], interval: Duration) -> (ConsolePublisher, Receiver<Item>) {
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL);
        let cameras = cameras
            .iter()
            .enumerate()
            .map(|(index, n)| (n.clone(), Thinning { index, next_ms: AtomicU64::new(0), max_bits: AtomicU64::new(0) }))
            .collect();
        let interval_ms = (interval.as_millis() as u64).max(1);
        (ConsolePublisher { tx, cameras, interval_ms, epoch: Instant::now(), dropped: AtomicU64::new(0) }, rx)
    }

    fn send(&self, item: Item) {
        match self.tx.try_send(item) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Publisher for ConsolePublisher {
    fn score(&self, ev: &ScoreEvent) {
        let Some(t) = self.cameras.get(ev.camera.as_str()) else { return };
        let score = if ev.score.is_finite() { ev.score.clamp(0.0, 1.0) } else { 0.0 };
        t.max_bits.fetch_max(score.to_bits(), Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        if now < t.next_ms.load(Ordering::Relaxed) {
            return;
        }
        t.next_ms.store(now + self.interval_ms, Ordering::Relaxed);
        let max = f64::from_bits(t.max_bits.swap(0, Ordering::Relaxed));
        let sample = Sample { ts: ev.ts, max, last: score, raw: ev.raw_score };
        self.send(Item::Score { camera: t.index, sample, threshold_raw: ev.threshold });
    }
    fn alarm(&self, ev: &AlarmEvent) {
        self.send(Item::Alarm(ev.clone()));
    }
    // State and online come from the cameras' counters, read directly.
    fn camera_online(&self, _: &str, _: bool) {}
    fn alarm_state(&self, _: &str, _: bool) {}
    fn snapshot(&self, snap: &Snapshot) {
        self.send(Item::Snapshot(snap.clone()));
    }
    fn stats(&self, _: &StatsReport) {}
    fn verdict(&self, ev: &VerdictEvent) {
        self.send(Item::Verdict(ev.clone()));
    }
    fn event(&self, ev: &CommandEvent) {
        self.send(Item::Event(ev.clone()));
    }
}

/// The cameras' counters in the console's camera order, once the pipeline
/// runs; replaced when a reload gives a camera new ones (removed, then added
/// back). `None`: not known yet.
pub type Counters = Arc<std::sync::RwLock<Vec<Option<Arc<CameraCounters>>>>>;

/// Applies items until `stop`; once a second, works out each camera's fps
/// from its `decided` counter.
pub fn spawn_store_thread(
    rx: Receiver<Item>,
    store: Arc<Mutex<Store>>,
    counters: Counters,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("console-store".into()).spawn(move || {
        let mut last: Option<(Instant, Vec<u64>)> = None;
        while !stop.load(Ordering::Relaxed) {
            let first = match rx.recv_timeout(Duration::from_millis(250)) {
                Ok(i) => Some(i),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = first {
                s.apply(i);
                // Whatever queued meanwhile, under the same lock.
                for i in rx.try_iter().take(1024) {
                    s.apply(i);
                }
            }
            let now: Option<Vec<u64>> = {
                let cs = counters.read().unwrap_or_else(|e| e.into_inner());
                (!cs.is_empty())
                    .then(|| cs.iter().map(|c| c.as_deref().map_or(0, |c| CameraCounters::get(&c.decided))).collect())
            };
            if let Some(now) = now {
                match &last {
                    Some((t, prev)) if t.elapsed() >= Duration::from_secs(1) => {
                        let dt = t.elapsed().as_secs_f64();
                        for ((h, n), p) in s.cameras.iter_mut().zip(&now).zip(prev) {
                            h.fps = n.saturating_sub(*p) as f64 / dt;
                        }
                        last = Some((Instant::now(), now));
                    }
                    Some(_) => {}
                    None => last = Some((Instant::now(), now)),
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::PAYLOAD_SCHEMA;

    fn alarm(kind: AlarmKind, id: &str, ts: u64, peak: f64, snapshot: Option<&str>) -> AlarmEvent {
        AlarmEvent {
            schema: PAYLOAD_SCHEMA,
            id: id.into(),
            camera: "cam".into(),
            kind,
            ts,
            start_ts: 10,
            end_ts: (kind == AlarmKind::End).then_some(ts),
            peak,
            peak_raw: peak * 2.0,
            frames: ts,
            first_seq: 1,
            seq: ts,
            snapshot: snapshot.map(String::from),
            reason: (kind == AlarmKind::End).then_some(EndReason::Cleared),
        }
    }

    #[test]
    fn start_and_end_merge_into_one_row_and_old_rows_go() {
        let mut s = Store::new(1, 3, 2, 1);
        s.apply(Item::Alarm(alarm(AlarmKind::Start, "cam-10-1", 10, 0.7, Some("f.jpg"))));
        s.apply(Item::Alarm(alarm(AlarmKind::End, "cam-10-1", 20, 0.9, None)));
        assert_eq!(s.alarms.len(), 1);
        let r = &s.alarms[0];
        assert_eq!((r.end_ts, r.peak, r.snapshot.as_deref()), (Some(20), 0.9, Some("f.jpg")));
        // An end whose start was never seen is a row of its own.
        s.apply(Item::Alarm(alarm(AlarmKind::End, "cam-10-2", 30, 0.6, None)));
        s.apply(Item::Alarm(alarm(AlarmKind::Start, "cam-10-3", 40, 0.6, None)));
        let ids: Vec<&str> = s.alarms.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["cam-10-2", "cam-10-3"], "two kept, the oldest gone");

        s.apply(Item::Snapshot(Snapshot { camera: "cam".into(), alarm_id: "a".into(), jpeg: vec![1] }));
        s.apply(Item::Snapshot(Snapshot { camera: "cam".into(), alarm_id: "b".into(), jpeg: vec![2] }));
        assert!(s.snapshot("a").is_none() && s.snapshot("b").is_some_and(|j| j[..] == [2]));
    }

    #[test]
    fn samples_are_bounded_per_camera_and_unknown_cameras_ignored() {
        let mut s = Store::new(2, 3, 10, 1);
        for ts in 0..5 {
            let sample = Sample { ts, max: 0.1, last: 0.1, raw: 1.0 };
            s.apply(Item::Score { camera: 1, sample, threshold_raw: 2.0 });
            s.apply(Item::Score { camera: 7, sample, threshold_raw: 2.0 });
        }
        let ts: Vec<u64> = s.cameras[1].samples.iter().map(|x| x.ts).collect();
        assert_eq!(ts, [2, 3, 4]);
        assert!(s.cameras[0].samples.is_empty());
        assert_eq!(s.cameras[1].threshold_raw, Some(2.0));
    }

    fn score(camera: &str, ts: u64, score: f64) -> ScoreEvent {
        ScoreEvent {
            schema: PAYLOAD_SCHEMA,
            camera: camera.into(),
            seq: ts,
            ts,
            score,
            raw_score: score,
            threshold: 0.5,
            kind: "recon".into(),
            latency_ms: 1.0,
        }
    }

    #[test]
    fn scores_are_thinned_and_a_sample_keeps_the_peak_of_its_interval() {
        let (p, rx) = ConsolePublisher::new(&["cam".into()], Duration::from_secs(3600));
        p.score(&score("cam", 1, 0.2));
        p.score(&score("cam", 2, 0.9));
        p.score(&score("cam", 3, 0.1));
        p.score(&score("other", 4, 0.1));
        let got: Vec<Item> = rx.try_iter().collect();
        assert_eq!(got.len(), 1, "one sample per interval: {got:?}");
        // The interval closes later: a zero interval shows the peak carried.
        let (p, rx) = ConsolePublisher::new(&["cam".into()], Duration::from_millis(1));
        p.score(&score("cam", 1, 0.3));
        std::thread::sleep(Duration::from_millis(5));
        p.score(&score("cam", 2, 0.8));
        let samples: Vec<Sample> = rx
            .try_iter()
            .filter_map(|i| if let Item::Score { sample, .. } = i { Some(sample) } else { None })
            .collect();
        assert_eq!(samples.last().map(|s| (s.max, s.last)), Some((0.8, 0.8)));
    }

    #[test]
    fn a_full_channel_drops_and_counts_without_blocking() {
        let (p, _rx) = ConsolePublisher::new(&["cam".into()], Duration::from_secs(1));
        for i in 0..(CHANNEL + 10) {
            p.alarm(&alarm(AlarmKind::Start, &format!("cam-1-{i}"), 1, 0.6, None));
        }
        assert_eq!(p.dropped.load(Ordering::Relaxed), 10);
    }
}
