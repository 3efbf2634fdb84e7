//! The open-alarm journal: which alarms have started and not yet ended, kept
//! on disk so that none dangles on the broker after the daemon dies during
//! one, and the number of each camera's last alarm, so that ids stay unique
//! across restarts.
//!
//! - A clean stop ends every active alarm itself (reason `shutdown`, see
//!   `alarm.rs`); nothing is left open here.
//! - After a crash (kill -9, panic = abort, power cut) the next start finds
//!   the alarms still open, publishes an `end` with reason `restart` for each
//!   (through the outbox, before any new alarm), and forgets them.
//!
//! It is its own SQLite file beside the MQTT outbox (`<outbox>.open-alarms.sqlite`,
//! [`path_beside`]) so that the outbox keeps one owner. Writes happen on the
//! journal's own thread, never on the inference thread: [`Journaled`] wraps
//! the publisher and hands alarm events (and alarm states, to keep their
//! order) to that thread, which journals a `start` *before* handing it to
//! the publisher (outbox) and an `end` *after* the outbox thread confirms
//! it is in the outbox file (an `end` not confirmed, because it was dropped
//! on a stalled disk or held in memory, stays open). A crash between the two
//! leaves either an open entry whose start never went out (the restart then
//! sends an `end` for an unknown id) or an extra `end` (consumers already
//! de-duplicate on (`id`, `type`)), never a start without an end.
//!
//! Backpressure: the queue holds [`QUEUE`] events. Alarms are never dropped,
//! so when it is full (the disk stalls for that many alarms) the caller
//! waits, counted and logged; frames queue and drop upstream as usual.
//!
//! A journal that cannot be opened does not stop detection: the pipeline
//! runs without it (logged at ERROR), and a crash may then leave an alarm open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use rusqlite::{params, Connection};

use crate::alarm::alarm_number;
use crate::events::{now_ms, AlarmEvent, AlarmKind, EndReason, Publisher, ScoreEvent, Snapshot, StatsReport};

#[derive(Debug, thiserror::Error)]
pub enum AlarmStateError {
    #[error("open-alarm journal {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("open-alarm journal directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("open-alarm journal: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot start the alarm journal thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// The journal of the outbox at `outbox`: `/var/lib/ganomalyd/outbox.sqlite`
/// → `/var/lib/ganomalyd/outbox.open-alarms.sqlite`.
pub fn path_beside(outbox: &Path) -> PathBuf {
    outbox.with_extension("open-alarms.sqlite")
}

/// The `end` published for an alarm found open at start-up. Its last frame
/// is unknown (it died with the daemon), so `end_ts` is the restart's time:
/// an upper bound of when the alarm really ended.
pub fn restart_end(start: &AlarmEvent, now_ms: u64) -> AlarmEvent {
    AlarmEvent {
        kind: AlarmKind::End,
        ts: now_ms,
        end_ts: Some(now_ms),
        snapshot: None,
        reason: Some(EndReason::Restart),
        ..start.clone()
    }
}

/// The SQLite file: open alarms (their start events) and each camera's last alarm number.
#[derive(Debug)]
pub struct AlarmJournal {
    conn: Connection,
}

impl AlarmJournal {
    pub fn open(path: &Path) -> Result<AlarmJournal, AlarmStateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| AlarmStateError::Dir { path: dir.display().to_string(), source })?;
        }
        let open_err = |source| AlarmStateError::Open { path: path.display().to_string(), source };
        let conn = Connection::open(path).map_err(open_err)?;
        // As the outbox: WAL + NORMAL survives a daemon crash without an fsync
        // per alarm; only a power cut can lose the last commits.
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(())).map_err(open_err)?;
        conn.execute_batch(
            "PRAGMA synchronous=NORMAL;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS open_alarms (
                 id TEXT PRIMARY KEY,
                 camera TEXT NOT NULL,
                 start_event TEXT NOT NULL,
                 opened_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS alarm_numbers (
                 camera TEXT PRIMARY KEY,
                 last INTEGER NOT NULL
             );",
        )
        .map_err(open_err)?;
        Ok(AlarmJournal { conn })
    }

    /// A `start` opens its alarm (and raises the camera's last number); an `end` closes it.
    pub fn record(&mut self, ev: &AlarmEvent) -> Result<(), AlarmStateError> {
        match ev.kind {
            AlarmKind::Start => {
                // Serialising a plain struct of numbers and strings cannot fail.
                let json = serde_json::to_string(ev).unwrap_or_default();
                let tx = self.conn.transaction()?;
                tx.execute(
                    "INSERT OR REPLACE INTO open_alarms (id, camera, start_event, opened_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![ev.id, ev.camera, json, now_ms() as i64],
                )?;
                if let Some(n) = alarm_number(&ev.id) {
                    tx.execute(
                        "INSERT INTO alarm_numbers (camera, last) VALUES (?1, ?2)
                         ON CONFLICT(camera) DO UPDATE SET last = max(last, excluded.last)",
                        params![ev.camera, n as i64],
                    )?;
                }
                tx.commit()?;
            }
            AlarmKind::End => {
                self.conn.execute("DELETE FROM open_alarms WHERE id = ?1", params![ev.id])?;
            }
        }
        Ok(())
    }

    /// Start events of the alarms still open, oldest first. A row that no
    /// longer parses (hand-edited, or from a newer build) is logged and dropped.
    pub fn open_alarms(&self) -> Result<Vec<AlarmEvent>, AlarmStateError> {
        let mut st = self.conn.prepare("SELECT id, start_event FROM open_alarms ORDER BY rowid")?;
        let rows: Vec<(String, String)> =
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        let mut open = Vec::with_capacity(rows.len());
        for (id, json) in rows {
            match serde_json::from_str::<AlarmEvent>(&json) {
                Ok(ev) => open.push(ev),
                Err(e) => {
                    tracing::error!(id = %id, error = %e, "open-alarm journal: unreadable entry dropped (its alarm cannot be ended)");
                    self.conn.execute("DELETE FROM open_alarms WHERE id = ?1", params![id])?;
                }
            }
        }
        Ok(open)
    }

    /// Each camera's last alarm number.
    pub fn last_numbers(&self) -> Result<BTreeMap<String, u64>, AlarmStateError> {
        let mut st = self.conn.prepare("SELECT camera, last FROM alarm_numbers")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Events the journal thread may hold (see the module doc's backpressure).
pub const QUEUE: usize = 256;

enum Op {
    Alarm(AlarmEvent),
    State(String, bool),
    Flush(Sender<()>),
}

/// How long the journal thread waits for an `end` to reach the outbox file
/// (milliseconds normally; a stalled disk keeps the alarm open instead).
const DURABLE_WAIT: Duration = Duration::from_secs(2);

/// A [`Publisher`] whose alarm events go through the journal thread.
pub struct Journaled {
    inner: Arc<dyn Publisher>,
    tx: Sender<Op>,
    waits: Arc<AtomicU64>,
}

impl Journaled {
    /// Queues `op`; waits when the queue is full (alarms are never dropped);
    /// hands it to the publisher directly once the journal thread is gone.
    fn queue(&self, op: Op) {
        let op = match self.tx.try_send(op) {
            Ok(()) => return,
            Err(TrySendError::Full(op)) => {
                self.waits.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(queue = QUEUE, "alarm journal behind (slow disk?): the caller waits");
                match self.tx.send(op) {
                    Ok(()) => return,
                    Err(e) => e.into_inner(),
                }
            }
            Err(TrySendError::Disconnected(op)) => op,
        };
        match op {
            Op::Alarm(ev) => self.inner.alarm(&ev),
            Op::State(camera, active) => self.inner.alarm_state(&camera, active),
            Op::Flush(_) => {}
        }
    }
}

impl Publisher for Journaled {
    fn score(&self, ev: &ScoreEvent) {
        self.inner.score(ev)
    }
    fn alarm(&self, ev: &AlarmEvent) {
        self.queue(Op::Alarm(ev.clone()))
    }
    fn camera_online(&self, camera: &str, online: bool) {
        self.inner.camera_online(camera, online)
    }
    fn alarm_state(&self, camera: &str, active: bool) {
        self.queue(Op::State(camera.to_string(), active))
    }
    fn snapshot(&self, snap: &Snapshot) {
        self.inner.snapshot(snap)
    }
    fn stats(&self, report: &StatsReport) {
        self.inner.stats(report)
    }
    // Without these the trait's defaults would only log them: verdicts and
    // command answers would never reach a broker.
    fn verdict(&self, ev: &crate::events::VerdictEvent) {
        self.inner.verdict(ev)
    }
    fn event(&self, ev: &crate::commands::CommandEvent) {
        self.inner.event(ev)
    }
}

/// What the pipeline keeps of a running journal.
pub struct JournalHandle {
    tx: Sender<Op>,
    /// Times a caller had to wait on a full queue.
    pub waits: Arc<AtomicU64>,
}

impl JournalHandle {
    /// Waits (up to `timeout`) until everything queued so far has been
    /// journaled and handed to the publisher. The pipeline calls it once its
    /// threads have ended, before the publisher drains.
    pub fn flush(&self, timeout: Duration) -> bool {
        // One deadline for both waits: the stop's budget (TimeoutStopSec).
        let deadline = std::time::Instant::now() + timeout;
        let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
        if self.tx.send_deadline(Op::Flush(ack_tx), deadline).is_err() {
            return false;
        }
        ack_rx.recv_deadline(deadline).is_ok()
    }
}

/// A started journal: the publisher to hand the pipeline, its handle, and
/// each camera's last alarm number (to seed the alarm machines).
pub struct Started {
    pub publisher: Arc<dyn Publisher>,
    pub handle: JournalHandle,
    pub last_numbers: BTreeMap<String, u64>,
}

/// Opens the journal at `path`, ends the alarms a previous run left open
/// (reason `restart`, on `inner`, before anything else is published), and
/// starts the journal thread in front of `inner`.
pub fn start(path: &Path, inner: Arc<dyn Publisher>) -> Result<Started, AlarmStateError> {
    let mut journal = AlarmJournal::open(path)?;
    let now = now_ms();
    for start in journal.open_alarms()? {
        let end = restart_end(&start, now);
        tracing::warn!(
            camera = %start.camera, id = %start.id, started = start.start_ts,
            "alarm left open by a previous run (the daemon died during it): ending it (reason restart)"
        );
        let durable = inner.alarm_durable(&end, DURABLE_WAIT);
        inner.alarm_state(&start.camera, false);
        if durable {
            journal.record(&end)?;
        } else {
            tracing::error!(id = %start.id, "the restart end is not in the outbox file: the alarm stays open in the journal");
        }
    }
    let last_numbers = journal.last_numbers()?;
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    let writer_inner = inner.clone();
    std::thread::Builder::new().name("alarm-journal".into()).spawn(move || writer(journal, rx, writer_inner))?;
    let waits = Arc::new(AtomicU64::new(0));
    let publisher: Arc<dyn Publisher> = Arc::new(Journaled { inner, tx: tx.clone(), waits: waits.clone() });
    Ok(Started { publisher, handle: JournalHandle { tx, waits }, last_numbers })
}

/// The journal thread: ends when every sender is gone.
fn writer(mut journal: AlarmJournal, rx: Receiver<Op>, inner: Arc<dyn Publisher>) {
    let record = |journal: &mut AlarmJournal, ev: &AlarmEvent| {
        if let Err(e) = journal.record(ev) {
            tracing::error!(
                id = %ev.id, kind = ?ev.kind, error = %e,
                "open-alarm journal write failed: after a crash this alarm may stay open"
            );
        }
    };
    for op in rx {
        match op {
            Op::Alarm(ev) if ev.kind == AlarmKind::Start => {
                record(&mut journal, &ev);
                inner.alarm(&ev);
            }
            // Forgotten only once the `end` is in the outbox file: an end
            // dropped, held in memory, or lost in a crash before its write
            // leaves the alarm open, so the next start ends it (an extra
            // `end`, which consumers de-duplicate, rather than none).
            Op::Alarm(ev) => {
                if inner.alarm_durable(&ev, DURABLE_WAIT) {
                    record(&mut journal, &ev);
                } else {
                    tracing::warn!(
                        id = %ev.id, "alarm end not confirmed in the outbox file: kept open in the journal (a restart ends it)"
                    );
                }
            }
            Op::State(camera, active) => inner.alarm_state(&camera, active),
            Op::Flush(ack) => {
                let _ = ack.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Recorded, Recorder, PAYLOAD_SCHEMA};

    fn start_event(camera: &str, n: u64) -> AlarmEvent {
        AlarmEvent {
            schema: PAYLOAD_SCHEMA,
            id: crate::alarm::alarm_id(camera, 1_700_000_000_000 + n, n),
            camera: camera.into(),
            kind: AlarmKind::Start,
            ts: 1_700_000_000_100 + n,
            start_ts: 1_700_000_000_000 + n,
            end_ts: None,
            peak: 0.9,
            peak_raw: 1.5,
            frames: 3,
            first_seq: 10,
            seq: 12,
            snapshot: Some("x.jpg".into()),
            reason: None,
        }
    }

    #[test]
    fn path_sits_beside_the_outbox() {
        assert_eq!(
            path_beside(Path::new("/var/lib/ganomalyd/outbox.sqlite")),
            Path::new("/var/lib/ganomalyd/outbox.open-alarms.sqlite")
        );
    }

    #[test]
    fn open_alarms_and_numbers_survive_a_reopen_and_an_end_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/j.sqlite");
        {
            let mut j = AlarmJournal::open(&path).unwrap();
            j.record(&start_event("a", 3)).unwrap();
            j.record(&start_event("b", 7)).unwrap();
            j.record(&start_event("a", 4)).unwrap();
            let end = AlarmEvent { kind: AlarmKind::End, reason: Some(EndReason::Cleared), ..start_event("a", 3) };
            j.record(&end).unwrap();
        }
        let j = AlarmJournal::open(&path).unwrap();
        let open: Vec<String> = j.open_alarms().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(open, [start_event("b", 7).id, start_event("a", 4).id]);
        let numbers = j.last_numbers().unwrap();
        assert_eq!((numbers["a"], numbers["b"]), (4, 7));
    }

    #[test]
    fn a_restart_ends_what_a_crash_left_open_once_and_seeds_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite");
        // The crashed run: journaled a start, never its end.
        AlarmJournal::open(&path).unwrap().record(&start_event("cam", 5)).unwrap();

        let rec = Recorder::default();
        let started = start(&path, Arc::new(rec.clone())).unwrap();
        assert_eq!(started.last_numbers.get("cam"), Some(&5));
        let events = rec.events();
        let Some(Recorded::Alarm(end)) = events.first() else { panic!("{events:?}") };
        assert_eq!(
            (end.id.as_str(), end.kind, end.reason),
            (start_event("cam", 5).id.as_str(), AlarmKind::End, Some(EndReason::Restart))
        );
        assert_eq!((end.start_ts, end.snapshot.as_deref()), (start_event("cam", 5).start_ts, None));
        assert!(end.end_ts.is_some_and(|t| t >= end.start_ts));
        assert_eq!(events.get(1), Some(&Recorded::AlarmState("cam".into(), false)));
        drop(started);

        // The next start has nothing left to end.
        let rec2 = Recorder::default();
        let again = start(&path, Arc::new(rec2.clone())).unwrap();
        assert!(rec2.events().is_empty(), "{:?}", rec2.events());
        assert_eq!(again.last_numbers.get("cam"), Some(&5));
    }

    #[test]
    fn the_wrapper_journals_in_order_and_flush_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite");
        let rec = Recorder::default();
        let started = start(&path, Arc::new(rec.clone())).unwrap();
        let s = start_event("cam", 1);
        started.publisher.alarm(&s);
        started.publisher.alarm_state("cam", true);
        started.publisher.alarm(&start_event("other", 1));
        assert!(started.handle.flush(Duration::from_secs(5)), "flush answered");
        assert_eq!(
            rec.events(),
            vec![
                Recorded::Alarm(s.clone()),
                Recorded::AlarmState("cam".into(), true),
                Recorded::Alarm(start_event("other", 1))
            ]
        );
        let end = AlarmEvent { kind: AlarmKind::End, reason: Some(EndReason::Cleared), ..s };
        started.publisher.alarm(&end);
        assert!(started.handle.flush(Duration::from_secs(5)));
        // Only `other` is still open, as the journal on disk says.
        let open: Vec<String> =
            AlarmJournal::open(&path).unwrap().open_alarms().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(open, [start_event("other", 1).id]);
        assert_eq!(started.handle.waits.load(Ordering::Relaxed), 0);
    }

    /// A publisher whose outbox never confirms a write (a stalled disk, or
    /// alarms held in memory after a failed write).
    struct NotDurable(Recorder);
    impl Publisher for NotDurable {
        fn score(&self, ev: &ScoreEvent) {
            self.0.score(ev)
        }
        fn alarm(&self, ev: &AlarmEvent) {
            self.0.alarm(ev)
        }
        fn alarm_durable(&self, ev: &AlarmEvent, _timeout: Duration) -> bool {
            self.0.alarm(ev);
            false
        }
        fn camera_online(&self, camera: &str, online: bool) {
            self.0.camera_online(camera, online)
        }
        fn alarm_state(&self, camera: &str, active: bool) {
            self.0.alarm_state(camera, active)
        }
        fn snapshot(&self, snap: &Snapshot) {
            self.0.snapshot(snap)
        }
        fn stats(&self, report: &StatsReport) {
            self.0.stats(report)
        }
    }

    #[test]
    fn verdicts_and_command_answers_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Recorder::default();
        let started = start(&dir.path().join("j.sqlite"), Arc::new(rec.clone())).unwrap();
        let v = crate::events::VerdictEvent {
            schema: PAYLOAD_SCHEMA,
            camera: "cam".into(),
            part_id: "p1".into(),
            verdict: crate::events::Verdict::Ok,
            seq: 1,
            ts: 1,
            trigger_ts: 1,
            latency_ms: 1.0,
            score: None,
            raw_score: None,
            threshold: None,
            kind: None,
            model_sha256: None,
            settings_digest: None,
            frame_ts: Vec::new(),
            frame_seq: Vec::new(),
            threshold_score: None,
            snapshot: None,
            reason: None,
        };
        started.publisher.verdict(&v);
        let answer = crate::commands::CommandEvent::spontaneous("reload", None, crate::commands::Status::Done);
        started.publisher.event(&answer);
        assert_eq!(rec.events(), vec![Recorded::Verdict(v), Recorded::Event(answer)]);
    }

    #[test]
    fn an_end_not_confirmed_in_the_outbox_file_keeps_the_alarm_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite");
        let rec = Recorder::default();
        let started = start(&path, Arc::new(NotDurable(rec.clone()))).unwrap();
        let s = start_event("cam", 1);
        started.publisher.alarm(&s);
        started.publisher.alarm(&AlarmEvent { kind: AlarmKind::End, reason: Some(EndReason::Cleared), ..s.clone() });
        assert!(started.handle.flush(Duration::from_secs(5)));
        assert_eq!(rec.events().len(), 2, "both went to the publisher: {:?}", rec.events());
        let open: Vec<String> =
            AlarmJournal::open(&path).unwrap().open_alarms().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(open, std::slice::from_ref(&s.id), "the end may be lost in a crash: the next start must end it");
        drop(started);
        // The next start ends it; with a durable outbox it is then forgotten.
        let rec2 = Recorder::default();
        let _again = start(&path, Arc::new(rec2.clone())).unwrap();
        assert!(
            matches!(rec2.events().first(), Some(Recorded::Alarm(e)) if e.id == s.id && e.reason == Some(EndReason::Restart))
        );
        assert!(AlarmJournal::open(&path).unwrap().open_alarms().unwrap().is_empty());
    }

    #[test]
    fn an_unreadable_entry_is_dropped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite");
        let mut j = AlarmJournal::open(&path).unwrap();
        j.record(&start_event("cam", 1)).unwrap();
        j.conn
            .execute(
                "INSERT INTO open_alarms (id, camera, start_event, opened_ms) VALUES ('x', 'cam', 'not json', 0)",
                [],
            )
            .unwrap();
        let open = j.open_alarms().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(j.open_alarms().unwrap().len(), 1, "the bad row is gone");
    }
}
