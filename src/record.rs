//! The inspection record: every verdict and every alarm event, kept in a
//! SQLite file (`record.sqlite`, beside the MQTT outbox by default) for the
//! audit a customer complaint asks for: which model (sha256), threshold and
//! settings judged part 4711, and when. `ganomalyd verdicts` exports it.
//!
//! Its own file and thread, not a table in the outbox: the outbox deletes a
//! row once the broker has it, the record keeps it for `max_age_s` (days);
//! the record is kept with MQTT off too; and a fault of one file (disk full,
//! corruption) does not take the other down.
//!
//! [`start`] wraps the daemon's [`Publisher`]: every call goes on to it
//! unchanged; verdicts and alarms are also queued ([`QUEUE`]) to the `record`
//! thread, which writes them in batches (one transaction per batch).
//! Backpressure: the queue never blocks a pipeline thread; when it is full
//! (the disk stalled for seconds) the event is logged in full at ERROR and
//! counted in `dropped`. Retention: rows older than `max_age_s` (by their
//! wall-clock time) and beyond `max_rows` (oldest first) are deleted at
//! start, every minute and every [`PRUNE_EVERY`] rows.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use rusqlite::{params, Connection};
use serde::Serialize;

use crate::config::RecordSettings;
use crate::events::{now_ms, AlarmEvent, Publisher, ScoreEvent, Snapshot, StatsReport, VerdictEvent};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("record directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("record: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("record: cannot start its thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Events waiting for the record thread: at 40 verdicts a second, over a
/// minute and a half of a stalled disk.
pub const QUEUE: usize = 4096;
/// Rows written between two retention passes (besides the minute tick).
pub const PRUNE_EVERY: u64 = 1024;
const TICK: Duration = Duration::from_secs(60);

/// One row of the record, as stored and exported.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Row {
    pub id: i64,
    /// `verdict` or `alarm`.
    pub kind: String,
    pub camera: String,
    /// The event's time, ms since epoch (a verdict's decision, an alarm event's time).
    pub ts_ms: i64,
    /// The part id (verdicts) or the alarm id.
    pub key: String,
    /// `ok`/`ng`/`error`/`timeout`, or `start`/`end`.
    pub outcome: String,
    pub seq: Option<i64>,
    pub score: Option<f64>,
    pub raw_score: Option<f64>,
    pub threshold: Option<f64>,
    pub model_sha256: Option<String>,
    pub settings_digest: Option<String>,
    pub latency_ms: Option<f64>,
    pub snapshot: Option<String>,
    pub reason: Option<String>,
    /// The JSON payload exactly as published.
    pub payload: String,
}

impl Row {
    fn verdict(ev: &VerdictEvent) -> Option<Row> {
        let payload = serde_json::to_string(ev).ok()?;
        let outcome = serde_json::to_value(ev.verdict).ok()?.as_str()?.to_string();
        Some(Row {
            id: 0,
            kind: "verdict".into(),
            camera: ev.camera.clone(),
            ts_ms: ev.ts as i64,
            key: ev.part_id.clone(),
            outcome,
            seq: Some(ev.seq as i64),
            score: ev.score,
            raw_score: ev.raw_score,
            threshold: ev.threshold,
            model_sha256: ev.model_sha256.clone(),
            settings_digest: ev.settings_digest.clone(),
            latency_ms: Some(ev.latency_ms),
            snapshot: ev.snapshot.clone(),
            reason: ev.reason.clone(),
            payload,
        })
    }

    fn alarm(ev: &AlarmEvent) -> Option<Row> {
        let payload = serde_json::to_string(ev).ok()?;
        let outcome = serde_json::to_value(ev.kind).ok()?.as_str()?.to_string();
        Some(Row {
            id: 0,
            kind: "alarm".into(),
            camera: ev.camera.clone(),
            ts_ms: ev.ts as i64,
            key: ev.id.clone(),
            outcome,
            seq: Some(ev.seq as i64),
            score: Some(ev.peak),
            raw_score: Some(ev.peak_raw),
            threshold: None,
            model_sha256: None,
            settings_digest: None,
            latency_ms: None,
            snapshot: ev.snapshot.clone(),
            reason: ev.reason.and_then(|r| serde_json::to_value(r).ok()).and_then(|v| v.as_str().map(String::from)),
            payload,
        })
    }
}

/// What the record counts.
#[derive(Debug, Default)]
pub struct RecordStats {
    pub written: AtomicU64,
    /// Events not recorded: queue full, a failed write, or no file.
    pub dropped: AtomicU64,
    /// Rows deleted by retention.
    pub pruned: AtomicU64,
    /// The file could not be opened.
    pub fault: AtomicBool,
}

enum Op {
    Row(Box<Row>),
    Flush(Sender<()>),
    Stop,
}

/// The running record: stop it with [`close`](Self::close).
pub struct RecordHandle {
    tx: Sender<Op>,
    pub stats: Arc<RecordStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RecordHandle {
    /// Waits (up to `timeout`) until everything queued so far is written.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx.send_timeout(Op::Flush(tx), timeout).is_ok() && rx.recv_timeout(timeout).is_ok()
    }

    /// Writes what is queued and ends the thread (the wrapped publisher
    /// records nothing from then on).
    pub fn close(mut self, timeout: Duration) {
        if !self.flush(timeout) || self.tx.send_timeout(Op::Stop, timeout).is_err() {
            tracing::warn!("the inspection record did not drain in time");
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The publisher that records verdicts and alarms on their way to `inner`.
struct Recording {
    inner: Arc<dyn Publisher>,
    tx: Sender<Op>,
    stats: Arc<RecordStats>,
}

impl Recording {
    fn keep(&self, row: Option<Row>) {
        let Some(row) = row else { return };
        if let Err(TrySendError::Full(Op::Row(row)) | TrySendError::Disconnected(Op::Row(row))) =
            self.tx.try_send(Op::Row(Box::new(row)))
        {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(payload = %row.payload, "inspection record not taking rows (disk stalled): not recorded, logged here in full");
        }
    }
}

impl Publisher for Recording {
    fn score(&self, ev: &ScoreEvent) {
        self.inner.score(ev)
    }
    fn alarm(&self, ev: &AlarmEvent) {
        self.keep(Row::alarm(ev));
        self.inner.alarm(ev)
    }
    fn alarm_durable(&self, ev: &AlarmEvent, timeout: Duration) -> bool {
        self.keep(Row::alarm(ev));
        self.inner.alarm_durable(ev, timeout)
    }
    fn camera_online(&self, camera: &str, online: bool) {
        self.inner.camera_online(camera, online)
    }
    fn alarm_state(&self, camera: &str, active: bool) {
        self.inner.alarm_state(camera, active)
    }
    fn snapshot(&self, snap: &Snapshot) {
        self.inner.snapshot(snap)
    }
    fn stats(&self, report: &StatsReport) {
        self.inner.stats(report)
    }
    fn verdict(&self, ev: &VerdictEvent) {
        self.keep(Row::verdict(ev));
        self.inner.verdict(ev)
    }
    fn event(&self, ev: &crate::commands::CommandEvent) {
        self.inner.event(ev)
    }
}

/// Opens the record on its thread and wraps `inner`. A file that does not
/// open is a fault (logged, flagged; events are then not recorded), never a
/// reason to stop detection.
pub fn start(
    settings: &RecordSettings,
    inner: Arc<dyn Publisher>,
) -> Result<(Arc<dyn Publisher>, RecordHandle), RecordError> {
    let stats = Arc::new(RecordStats::default());
    let db = match open(&settings.path) {
        Ok(db) => Some(db),
        Err(e) => {
            stats.fault.store(true, Ordering::Relaxed);
            tracing::error!(error = %crate::base::report::chain(&e), "inspection record unavailable: verdicts and alarms are published but not recorded");
            None
        }
    };
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    let mut store = Store {
        db,
        max_age_ms: settings.max_age.as_millis() as i64,
        max_rows: settings.max_rows,
        stats: stats.clone(),
        since_prune: 0,
    };
    store.prune();
    let thread = std::thread::Builder::new()
        .name("record".into())
        .spawn(move || serve(&mut store, &rx))
        .map_err(RecordError::Thread)?;
    let publisher: Arc<dyn Publisher> = Arc::new(Recording { inner, tx: tx.clone(), stats: stats.clone() });
    Ok((publisher, RecordHandle { tx, stats, thread: Some(thread) }))
}

/// Opens (creating) the file with its schema.
pub fn open(path: &Path) -> Result<Connection, RecordError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| RecordError::Dir { path: dir.display().to_string(), source })?;
    }
    let err = |source| RecordError::Open { path: path.display().to_string(), source };
    let db = Connection::open(path).map_err(err)?;
    // WAL: `ganomalyd verdicts` reads while the daemon writes.
    db.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(())).map_err(err)?;
    db.execute_batch(
        "PRAGMA synchronous=NORMAL;
         PRAGMA busy_timeout=5000;
         CREATE TABLE IF NOT EXISTS record (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             kind TEXT NOT NULL,
             camera TEXT NOT NULL,
             ts_ms INTEGER NOT NULL,
             key TEXT NOT NULL,
             outcome TEXT NOT NULL,
             seq INTEGER,
             score REAL,
             raw_score REAL,
             threshold REAL,
             model_sha256 TEXT,
             settings_digest TEXT,
             latency_ms REAL,
             snapshot TEXT,
             reason TEXT,
             payload TEXT NOT NULL
         );
         CREATE INDEX IF NOT EXISTS record_ts ON record (ts_ms);",
    )
    .map_err(err)?;
    Ok(db)
}

struct Store {
    db: Option<Connection>,
    max_age_ms: i64,
    max_rows: u64,
    stats: Arc<RecordStats>,
    since_prune: u64,
}

fn serve(store: &mut Store, rx: &Receiver<Op>) {
    let mut next_tick = Instant::now() + TICK;
    loop {
        let first = match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(op) => Some(op),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut rows = Vec::new();
        let mut flushes = Vec::new();
        let mut stop = false;
        for op in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match op {
                Op::Row(r) => rows.push(*r),
                Op::Flush(tx) => flushes.push(tx),
                Op::Stop => stop = true,
            }
            if rows.len() >= 512 || stop {
                break;
            }
        }
        if !rows.is_empty() {
            store.write(&rows);
        }
        for f in flushes {
            let _ = f.send(());
        }
        if stop {
            return;
        }
        if Instant::now() >= next_tick || store.since_prune >= PRUNE_EVERY {
            store.prune();
            next_tick = Instant::now() + TICK;
        }
    }
}

impl Store {
    fn write(&mut self, rows: &[Row]) {
        let n = rows.len() as u64;
        let Some(db) = &self.db else {
            self.stats.dropped.fetch_add(n, Ordering::Relaxed);
            return;
        };
        match insert(db, rows) {
            Ok(()) => {
                self.stats.written.fetch_add(n, Ordering::Relaxed);
                self.since_prune += n;
            }
            Err(e) => {
                self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                for r in rows {
                    tracing::error!(error = %e, payload = %r.payload, "inspection record write failed: not recorded, logged here in full");
                }
            }
        }
    }

    fn prune(&mut self) {
        self.since_prune = 0;
        let Some(db) = &self.db else { return };
        match prune(db, now_ms() as i64 - self.max_age_ms, self.max_rows) {
            Ok(0) => {}
            Ok(n) => {
                self.stats.pruned.fetch_add(n, Ordering::Relaxed);
                tracing::info!(rows = n, "inspection record: rows past max_age_s or max_rows deleted");
            }
            Err(e) => tracing::error!(error = %e, "inspection record: retention failed"),
        }
    }
}

fn insert(db: &Connection, rows: &[Row]) -> rusqlite::Result<()> {
    let tx = db.unchecked_transaction()?;
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO record (kind, camera, ts_ms, key, outcome, seq, score, raw_score, threshold, model_sha256,
             settings_digest, latency_ms, snapshot, reason, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )?;
        for r in rows {
            st.execute(params![
                r.kind,
                r.camera,
                r.ts_ms,
                r.key,
                r.outcome,
                r.seq,
                r.score,
                r.raw_score,
                r.threshold,
                r.model_sha256,
                r.settings_digest,
                r.latency_ms,
                r.snapshot,
                r.reason,
                r.payload
            ])?;
        }
    }
    tx.commit()
}

/// Deletes rows older than `cutoff_ms` and beyond the newest `max_rows`.
pub fn prune(db: &Connection, cutoff_ms: i64, max_rows: u64) -> rusqlite::Result<u64> {
    let old = db.execute("DELETE FROM record WHERE ts_ms < ?1", params![cutoff_ms])?;
    let over = db.execute(
        "DELETE FROM record WHERE id <= (SELECT MAX(id) FROM record) - ?1",
        params![max_rows.min(i64::MAX as u64) as i64],
    )?;
    Ok((old + over) as u64)
}

/// What an export selects.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub cameras: Vec<String>,
    /// `verdict` or `alarm`; `None`: both.
    pub kind: Option<String>,
}

/// The rows `q` selects, oldest first.
pub fn select(db: &Connection, q: &Query) -> rusqlite::Result<Vec<Row>> {
    let mut sql = String::from(
        "SELECT id, kind, camera, ts_ms, key, outcome, seq, score, raw_score, threshold, model_sha256, settings_digest,
         latency_ms, snapshot, reason, payload FROM record WHERE ts_ms >= ?1 AND ts_ms <= ?2",
    );
    let mut args: Vec<rusqlite::types::Value> =
        vec![q.since_ms.unwrap_or(i64::MIN).into(), q.until_ms.unwrap_or(i64::MAX).into()];
    if let Some(k) = &q.kind {
        args.push(k.clone().into());
        sql += &format!(" AND kind = ?{}", args.len());
    }
    if !q.cameras.is_empty() {
        let mut marks = Vec::new();
        for c in &q.cameras {
            args.push(c.clone().into());
            marks.push(format!("?{}", args.len()));
        }
        sql += &format!(" AND camera IN ({})", marks.join(", "));
    }
    sql += " ORDER BY id";
    let mut st = db.prepare(&sql)?;
    let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
        Ok(Row {
            id: r.get(0)?,
            kind: r.get(1)?,
            camera: r.get(2)?,
            ts_ms: r.get(3)?,
            key: r.get(4)?,
            outcome: r.get(5)?,
            seq: r.get(6)?,
            score: r.get(7)?,
            raw_score: r.get(8)?,
            threshold: r.get(9)?,
            model_sha256: r.get(10)?,
            settings_digest: r.get(11)?,
            latency_ms: r.get(12)?,
            snapshot: r.get(13)?,
            reason: r.get(14)?,
            payload: r.get(15)?,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{AlarmKind, Recorder, Verdict, PAYLOAD_SCHEMA};

    fn verdict(camera: &str, part: &str, seq: u64, ts: u64) -> VerdictEvent {
        VerdictEvent {
            schema: PAYLOAD_SCHEMA,
            camera: camera.into(),
            part_id: part.into(),
            verdict: if seq % 2 == 0 { Verdict::Ng } else { Verdict::Ok },
            seq,
            ts,
            trigger_ts: ts - 3,
            latency_ms: 3.0,
            score: Some(0.4),
            raw_score: Some(1.2),
            threshold: Some(1.5),
            threshold_score: Some(0.5),
            kind: Some("recon".into()),
            model_sha256: Some("ab".into()),
            settings_digest: Some("cd".into()),
            frame_ts: vec![ts - 5],
            frame_seq: vec![seq],
            snapshot: None,
            reason: None,
        }
    }

    #[test]
    fn verdicts_and_alarms_are_recorded_as_published_and_passed_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/record.sqlite");
        let rec = Recorder::default();
        let settings = RecordSettings { path: path.clone(), max_age: Duration::from_secs(86_400), max_rows: 100 };
        let (p, handle) = start(&settings, Arc::new(rec.clone())).unwrap();
        let now = now_ms();
        let v = verdict("a", "4711", 1, now);
        p.verdict(&v);
        let mut alarm = AlarmEvent {
            schema: PAYLOAD_SCHEMA,
            id: "b-1-1".into(),
            camera: "b".into(),
            kind: AlarmKind::Start,
            ts: now + 1,
            start_ts: now,
            end_ts: None,
            peak: 0.9,
            peak_raw: 3.0,
            frames: 3,
            first_seq: 1,
            seq: 3,
            snapshot: None,
            reason: None,
        };
        p.alarm(&alarm);
        alarm.kind = AlarmKind::End;
        alarm.reason = Some(crate::events::EndReason::Cleared);
        p.alarm(&alarm);
        assert!(handle.flush(Duration::from_secs(10)));
        assert_eq!(rec.events().len(), 3, "passed on");
        let db = open(&path).unwrap();
        let rows = select(&db, &Query::default()).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].kind.as_str(), rows[0].key.as_str(), rows[0].outcome.as_str()), ("verdict", "4711", "ok"));
        assert_eq!(serde_json::from_str::<VerdictEvent>(&rows[0].payload).unwrap(), v);
        assert_eq!((rows[2].outcome.as_str(), rows[2].reason.as_deref()), ("end", Some("cleared")));
        let only = Query { kind: Some("alarm".into()), cameras: vec!["b".into()], ..Query::default() };
        assert_eq!(select(&db, &only).unwrap().len(), 2);
        let later = Query { since_ms: Some(now as i64 + 1), ..Query::default() };
        assert_eq!(select(&db, &later).unwrap().len(), 2);
        handle.close(Duration::from_secs(5));
    }

    #[test]
    fn retention_bounds_age_and_rows() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("r.sqlite")).unwrap();
        let rows: Vec<Row> =
            (0..10).map(|i| Row::verdict(&verdict("a", &format!("p{i}"), i, 1000 + i)).unwrap()).collect();
        insert(&db, &rows).unwrap();
        assert_eq!(prune(&db, 1003, 100).unwrap(), 3, "older than the cutoff");
        assert_eq!(prune(&db, 0, 4).unwrap(), 3, "beyond the newest 4");
        let keys: Vec<String> = select(&db, &Query::default()).unwrap().into_iter().map(|r| r.key).collect();
        assert_eq!(keys, ["p6", "p7", "p8", "p9"]);
    }

    #[test]
    fn a_file_that_cannot_open_is_a_fault_and_detection_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let rec = Recorder::default();
        let settings = RecordSettings { path, max_age: Duration::from_secs(60), max_rows: 10 };
        let (p, handle) = start(&settings, Arc::new(rec.clone())).unwrap();
        p.verdict(&verdict("a", "1", 1, now_ms()));
        assert!(handle.flush(Duration::from_secs(5)));
        assert!(handle.stats.fault.load(Ordering::Relaxed));
        assert_eq!(handle.stats.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(rec.events().len(), 1, "still published");
    }
}
