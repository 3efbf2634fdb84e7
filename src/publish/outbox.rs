//! The durable alarm outbox: every alarm event is a row in a SQLite file
//! before it is published, and the row is deleted only when the broker has
//! acknowledged it (PUBACK). A broker outage or a daemon restart therefore
//! loses no alarm; row ids (AUTOINCREMENT, never reused) give the order.
//!
//! # One thread owns the file
//! SQLite runs on the `outbox` thread only, never on an inference thread or on
//! the network runtime's worker: [`Outbox`] is a handle that sends it
//! commands. Two channels, each with its policy:
//! - alarms from the pipeline: bounded ([`ALARM_QUEUE`]). When it is full
//!   (the disk has stalled for a long time) the calling thread waits up to
//!   [`ALARM_QUEUE_WAIT`] for room (frames are dropped upstream meanwhile,
//!   counted); past that the alarm is logged in full at ERROR and counted in
//!   `alarms_dropped`: never dropped silently.
//! - the sender task's reads, acknowledgements and dead letters: unbounded
//!   but bounded by design, since the sender asks for rows only after the
//!   previous read was answered, acknowledges at most the alarm window's rows
//!   per read, and dead-letters at most one row per lost connection.
//!
//! Before a command of the sender is handled, every alarm already queued is
//! stored, so a read sees every alarm raised before it was asked for.
//!
//! # Age without the wall clock
//! An edge box without an RTC boots in 1970 (or at its last shutdown) and NTP
//! steps the clock forward later: a wall-clock age would then prune every
//! queued alarm. Age is measured on the boot clock instead (`CLOCK_BOOTTIME`
//! through `/proc/uptime`: monotonic, suspend included). Each row stores the
//! boot-clock time at which its age was zero; the file remembers which boot it
//! was last used in and the boot-clock time it was last seen (updated every
//! minute). After a reboot every row is rebased onto the new boot with the age
//! it had reached when last seen: the time the box was off (or the daemon not
//! running across a reboot) does not count, the at most one minute between the
//! last "seen" and the shutdown is not counted either. Alarms therefore expire
//! after `outbox_max_age_s` of the box being up, never early.
//!
//! # When the file fails
//! A file that cannot be opened (corrupt, read-only directory) or a write that
//! fails does not stop detection: alarms are then held in memory, at most
//! [`MEMORY_ROWS`] (oldest dropped beyond, counted and logged), published and
//! acknowledged like stored ones, and written to the file as soon as a write
//! succeeds again (a file that failed to open is not retried until restart).
//! The fault is reported in the counters (`outbox_fault`, `/healthz`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::Notify;

/// Alarms waiting for the outbox thread. An alarm is two events (start,
/// end); 1,024 is minutes of a disk stall at any plausible alarm rate.
pub const ALARM_QUEUE: usize = 1024;
/// How long a pipeline thread waits for room in a full [`ALARM_QUEUE`].
pub const ALARM_QUEUE_WAIT: Duration = Duration::from_secs(1);
/// Alarms held in memory while the file cannot take them (a few hundred bytes
/// each: well under a megabyte).
pub const MEMORY_ROWS: usize = 1000;
/// The topic leaf of alarm rows.
pub const LEAF_ALARM: &str = "alarm";
/// The topic leaf of verdict rows.
pub const LEAF_VERDICT: &str = "verdict";

/// How often the thread prunes by age, records the boot-clock time it was
/// last seen, and retries writing alarms held in memory.
const TICK: Duration = Duration::from_secs(60);
/// Retry tick while alarms are held in memory.
const MEMORY_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("outbox directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("outbox: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("outbox: cannot start its thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// One queued alarm (or verdict: `leaf` says which topic it goes to).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub camera: String,
    /// The topic leaf it is published on: `<prefix>/<node>/<camera>/<leaf>`
    /// (`alarm`, `verdict`). Rows of outboxes written before verdicts are `alarm`.
    pub leaf: String,
    /// The JSON payload exactly as it will be published.
    pub payload: Vec<u8>,
    /// Wall-clock time it was queued (informative only: ages use the boot clock).
    pub created_ms: u64,
    /// Boot-clock time at which its age was zero (negative after a reboot rebase).
    origin_ms: i64,
}

/// The clock ages are measured on. [`SystemBootClock`] in the daemon; tests
/// step it by hand.
pub trait BootClock: Send + 'static {
    /// The same within one boot of the machine, different after a reboot.
    fn boot_id(&self) -> String;
    /// Milliseconds since boot; never jumps (unlike the wall clock).
    fn now_ms(&self) -> i64;
}

/// `/proc/sys/kernel/random/boot_id` and `/proc/uptime` (CLOCK_BOOTTIME).
/// Where those are missing, a clock of this process, so that each start
/// counts as a new boot (ages then count while the daemon runs).
#[derive(Debug)]
pub struct SystemBootClock {
    started: Instant,
    fallback_id: String,
}

impl Default for SystemBootClock {
    fn default() -> Self {
        SystemBootClock {
            started: Instant::now(),
            fallback_id: format!("process-{}-{}", std::process::id(), crate::events::now_ms()),
        }
    }
}

impl BootClock for SystemBootClock {
    fn boot_id(&self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty() && std::fs::read_to_string("/proc/uptime").is_ok())
            .unwrap_or_else(|| self.fallback_id.clone())
    }

    fn now_ms(&self) -> i64 {
        let uptime = std::fs::read_to_string("/proc/uptime").ok();
        match uptime.as_deref().and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse::<f64>().ok()) {
            Some(s) if s.is_finite() && s >= 0.0 => (s * 1000.0) as i64,
            _ => self.started.elapsed().as_millis() as i64,
        }
    }
}

/// What the outbox counts; read without touching SQLite.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Rows waiting for an acknowledgement, in the file and in memory.
    pub pending: AtomicU64,
    /// Of those, held in memory (the file failed).
    pub in_memory: AtomicU64,
    /// Dropped undelivered: the size, age and memory bounds, a full queue.
    pub dropped: AtomicU64,
    /// Moved to the dead-letter table (a broker that refused them).
    pub dead_lettered: AtomicU64,
    /// Alarms the file could not store (held in memory instead).
    pub errors: AtomicU64,
    /// The file could not be opened: everything is held in memory.
    pub fault: AtomicBool,
}

impl OutboxStats {
    fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }
}

/// Rows the sender task asked for, with the number it gave the request.
#[derive(Debug)]
pub struct RowsReply {
    pub seq: u64,
    pub limit: usize,
    pub rows: Vec<OutboxRow>,
}

type Call = Box<dyn FnOnce(&mut Store) + Send>;

enum Cmd {
    /// `stored`: told whether the row reached the file (for
    /// [`Outbox::push_durable`]).
    Push {
        camera: String,
        leaf: &'static str,
        payload: Vec<u8>,
        stored: Option<Sender<bool>>,
    },
    Read {
        after: i64,
        limit: usize,
        seq: u64,
        reply: tokio::sync::mpsc::UnboundedSender<RowsReply>,
    },
    Ack(i64),
    DeadLetter {
        id: i64,
        reason: String,
    },
    Call(Call),
    Stop,
}

/// Where the outbox lives and how much it may hold.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxSettings {
    pub path: PathBuf,
    pub max_rows: u64,
    pub max_age: Duration,
}

/// Handle to the outbox thread. Cheap to share (`Arc`); never blocks except
/// as [`ALARM_QUEUE`]'s policy says.
#[derive(Debug)]
pub struct Outbox {
    alarms: Sender<Cmd>,
    control: Sender<Cmd>,
    stats: Arc<OutboxStats>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

impl Outbox {
    /// Opens the file on a new `outbox` thread. A file that cannot be opened
    /// is a fault (logged, counted), not an error: alarms are then held in
    /// memory. `wake` is notified after every stored alarm.
    pub fn spawn(settings: OutboxSettings, wake: Arc<Notify>) -> Result<Outbox, OutboxError> {
        Outbox::spawn_with(settings, Box::new(SystemBootClock::default()), wake)
    }

    /// [`spawn`](Self::spawn) on a given clock.
    pub fn spawn_with(
        settings: OutboxSettings,
        clock: Box<dyn BootClock>,
        wake: Arc<Notify>,
    ) -> Result<Outbox, OutboxError> {
        let stats = Arc::new(OutboxStats::default());
        let mut store = Store::open(&settings, clock, stats.clone());
        let (alarms, alarms_rx) = crossbeam_channel::bounded(ALARM_QUEUE);
        let (control, control_rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || serve(&mut store, &alarms_rx, &control_rx, &wake))
            .map_err(OutboxError::Thread)?;
        Ok(Outbox { alarms, control, stats, thread: std::sync::Mutex::new(Some(thread)) })
    }

    /// Queues an alarm (see [`ALARM_QUEUE`] for a full queue).
    pub fn push(&self, camera: &str, payload: Vec<u8>) {
        self.push_to(camera, LEAF_ALARM, payload);
    }

    /// Queues a message for `<camera>/<leaf>` (`verdict`), durable like an alarm.
    pub fn push_to(&self, camera: &str, leaf: &'static str, payload: Vec<u8>) {
        self.enqueue(Cmd::Push { camera: camera.to_string(), leaf, payload, stored: None });
    }

    /// [`push`](Self::push), then waits up to `timeout` for the outbox thread
    /// to say whether the alarm is in the file (`false`: dropped, held in
    /// memory after a failed write, or no answer in time).
    pub fn push_durable(&self, camera: &str, payload: Vec<u8>, timeout: Duration) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.enqueue(Cmd::Push { camera: camera.to_string(), leaf: LEAF_ALARM, payload, stored: Some(tx) })
            && rx.recv_timeout(timeout).unwrap_or(false)
    }

    /// Queues a push as [`ALARM_QUEUE`]'s policy says; `false` if it was dropped.
    fn enqueue(&self, cmd: Cmd) -> bool {
        let cmd = match self.alarms.try_send(cmd) {
            Ok(()) => return true,
            Err(TrySendError::Full(cmd)) => match self.alarms.send_timeout(cmd, ALARM_QUEUE_WAIT) {
                Ok(()) => return true,
                Err(SendTimeoutError::Timeout(c) | SendTimeoutError::Disconnected(c)) => c,
            },
            Err(TrySendError::Disconnected(cmd)) => cmd,
        };
        if let Cmd::Push { camera, leaf, payload, .. } = cmd {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                camera, leaf, payload = %String::from_utf8_lossy(&payload),
                "alarm outbox not taking alarms (disk stalled): this message is dropped, logged here in full"
            );
        }
        false
    }

    /// Asks for up to `limit` rows with an id above `after`, oldest first; the
    /// answer comes on `reply`, tagged `seq`.
    pub fn read(&self, after: i64, limit: usize, seq: u64, reply: tokio::sync::mpsc::UnboundedSender<RowsReply>) {
        let _ = self.control.send(Cmd::Read { after, limit, seq, reply });
    }

    /// The broker has the alarm: forget it.
    pub fn ack(&self, id: i64) {
        let _ = self.control.send(Cmd::Ack(id));
    }

    /// The broker refuses this alarm: move it to the dead-letter table.
    pub fn dead_letter(&self, id: i64, reason: String) {
        let _ = self.control.send(Cmd::DeadLetter { id, reason });
    }

    /// Runs `f` on the outbox thread after everything queued so far, and
    /// waits for its result (tests, tools; never on a hot thread).
    pub fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Store) -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let call: Call = Box::new(move |s| {
            let _ = tx.send(f(s));
        });
        self.control.send(Cmd::Call(call)).ok()?;
        rx.recv().ok()
    }

    pub fn stats(&self) -> &OutboxStats {
        &self.stats
    }

    pub fn pending(&self) -> u64 {
        OutboxStats::get(&self.stats.pending)
    }
    pub fn in_memory(&self) -> u64 {
        OutboxStats::get(&self.stats.in_memory)
    }
    pub fn dropped(&self) -> u64 {
        OutboxStats::get(&self.stats.dropped)
    }
    pub fn dead_lettered(&self) -> u64 {
        OutboxStats::get(&self.stats.dead_lettered)
    }
    pub fn errors(&self) -> u64 {
        OutboxStats::get(&self.stats.errors)
    }
    /// True when the file could not be opened.
    pub fn faulted(&self) -> bool {
        self.stats.fault.load(Ordering::Relaxed)
    }

    /// Stores what is queued, applies what was acknowledged, and ends the
    /// thread (waiting at most `timeout`).
    pub fn close(&self, timeout: Duration) {
        let _ = self.control.send(Cmd::Stop);
        let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) else { return };
        let deadline = Instant::now() + timeout;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            tracing::warn!("alarm outbox thread did not stop in time");
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let _ = self.control.send(Cmd::Stop);
    }
}

/// The outbox thread's loop.
fn serve(store: &mut Store, alarms: &Receiver<Cmd>, control: &Receiver<Cmd>, wake: &Notify) {
    let mut next_tick = Instant::now() + TICK;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let cmd = crossbeam_channel::select! {
            recv(alarms) -> m => m.ok(),
            recv(control) -> m => match m {
                Ok(m) => Some(m),
                Err(_) => return,
            },
            default(wait) => None,
        };
        // Alarms first: a read must see every alarm raised before it.
        let mut stored = false;
        let mut cmd = cmd;
        loop {
            match cmd.take() {
                Some(Cmd::Push { camera, leaf, payload, stored: ack }) => {
                    store.push_acked(&camera, leaf, &payload, ack);
                    stored = true;
                }
                Some(other) => {
                    while let Ok(Cmd::Push { camera, leaf, payload, stored: ack }) = alarms.try_recv() {
                        store.push_acked(&camera, leaf, &payload, ack);
                        stored = true;
                    }
                    if stored {
                        wake.notify_one();
                        stored = false;
                    }
                    match other {
                        Cmd::Read { after, limit, seq, reply } => {
                            let _ = reply.send(RowsReply { seq, limit, rows: store.rows_after(after, limit) });
                        }
                        Cmd::Ack(id) => {
                            store.ack(id);
                        }
                        Cmd::DeadLetter { id, reason } => {
                            store.dead_letter(id, &reason);
                        }
                        Cmd::Call(f) => f(store),
                        Cmd::Stop => {
                            store.tick();
                            return;
                        }
                        Cmd::Push { .. } => {}
                    }
                }
                None => break,
            }
            cmd = alarms.try_recv().ok();
        }
        if stored {
            wake.notify_one();
        }
        if Instant::now() >= next_tick {
            store.tick();
            let every = if store.memory.is_empty() { TICK } else { MEMORY_RETRY };
            next_tick = Instant::now() + every;
        } else if !store.memory.is_empty() && store.db.is_some() {
            next_tick = next_tick.min(Instant::now() + MEMORY_RETRY);
        }
    }
}

/// The outbox itself: the SQLite file (when it opened), the alarms held in
/// memory, and the bounds. Owned by the outbox thread.
pub struct Store {
    db: Option<Connection>,
    memory: VecDeque<OutboxRow>,
    /// Highest id ever given out (file or memory): memory rows take the next
    /// ids, so they keep their id when they reach the file.
    last_id: i64,
    /// Rows in the file.
    in_file: u64,
    max_rows: u64,
    max_age_ms: i64,
    clock: Box<dyn BootClock>,
    stats: Arc<OutboxStats>,
    /// Whether the last [`push`](Self::push) reached the file.
    last_in_file: bool,
}

impl Store {
    /// Opens (creating if needed) the file, rebases ages after a reboot, and
    /// drops rows past the age bound. Never fails: a file that does not open
    /// leaves the store in memory, with the fault logged and flagged.
    pub fn open(settings: &OutboxSettings, clock: Box<dyn BootClock>, stats: Arc<OutboxStats>) -> Store {
        let mut store = Store {
            db: None,
            memory: VecDeque::new(),
            last_id: 0,
            in_file: 0,
            last_in_file: false,
            max_rows: settings.max_rows.max(1),
            max_age_ms: settings.max_age.as_millis().min(i64::MAX as u128) as i64,
            clock,
            stats,
        };
        match store.open_file(&settings.path) {
            Ok((conn, last_id, rows)) => {
                store.db = Some(conn);
                store.last_id = last_id;
                store.in_file = rows;
                store.prune();
                store.update_pending();
            }
            Err(e) => {
                store.stats.fault.store(true, Ordering::Relaxed);
                tracing::error!(
                    error = %crate::base::report::chain(&e),
                    memory_rows = MEMORY_ROWS,
                    "alarm outbox unavailable: detection goes on, alarms are held in memory (lost on restart) until the file is fixed and the daemon restarted"
                );
            }
        }
        store
    }

    fn open_file(&self, path: &Path) -> Result<(Connection, i64, u64), OutboxError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| OutboxError::Dir { path: dir.display().to_string(), source })?;
        }
        let open_err = |source| OutboxError::Open { path: path.display().to_string(), source };
        let conn = Connection::open(path).map_err(open_err)?;
        // WAL + NORMAL: a commit survives a daemon crash without an fsync per
        // alarm (which on an SD card stalls for tens of ms); only a power cut
        // can lose the last commits.
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(())).map_err(open_err)?;
        conn.execute_batch(
            "PRAGMA synchronous=NORMAL;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS alarm_outbox (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 camera TEXT NOT NULL,
                 payload BLOB NOT NULL,
                 created_ms INTEGER NOT NULL,
                 leaf TEXT NOT NULL DEFAULT 'alarm'
             );
             CREATE TABLE IF NOT EXISTS alarm_dead_letter (
                 id INTEGER PRIMARY KEY,
                 camera TEXT NOT NULL,
                 payload BLOB NOT NULL,
                 created_ms INTEGER NOT NULL,
                 dead_ms INTEGER NOT NULL,
                 reason TEXT NOT NULL,
                 leaf TEXT NOT NULL DEFAULT 'alarm'
             );
             CREATE TABLE IF NOT EXISTS outbox_clock (
                 k INTEGER PRIMARY KEY CHECK (k = 0),
                 boot_id TEXT NOT NULL,
                 seen_ms INTEGER NOT NULL
             );",
        )
        .map_err(open_err)?;
        let now = self.clock.now_ms();
        // Outboxes written before ages used the boot clock: their rows start
        // their age now (never pruned early).
        let has_origin = conn
            .prepare("SELECT 1 FROM pragma_table_info('alarm_outbox') WHERE name = 'origin_ms'")
            .and_then(|mut st| st.exists([]))
            .map_err(open_err)?;
        if !has_origin {
            conn.execute_batch("ALTER TABLE alarm_outbox ADD COLUMN origin_ms INTEGER").map_err(open_err)?;
        }
        conn.execute("UPDATE alarm_outbox SET origin_ms = ?1 WHERE origin_ms IS NULL", params![now])
            .map_err(open_err)?;
        // Outboxes written before verdicts shared them: every row they hold is an alarm.
        for table in ["alarm_outbox", "alarm_dead_letter"] {
            let has_leaf = conn
                .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = 'leaf'"))
                .and_then(|mut st| st.exists([]))
                .map_err(open_err)?;
            if !has_leaf {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN leaf TEXT NOT NULL DEFAULT 'alarm'"))
                    .map_err(open_err)?;
            }
        }
        let boot = self.clock.boot_id();
        let last: Option<(String, i64)> = conn
            .query_row("SELECT boot_id, seen_ms FROM outbox_clock WHERE k = 0", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(open_err)?;
        if let Some((last_boot, seen)) = last.filter(|(b, _)| *b != boot) {
            // A reboot: each row keeps the age it had when last seen.
            let n = conn
                .execute("UPDATE alarm_outbox SET origin_ms = origin_ms - ?1 + ?2", params![seen, now])
                .map_err(open_err)?;
            tracing::info!(rows = n, last_boot, "alarm outbox: ages carried over from the previous boot");
        }
        conn.execute(
            "INSERT INTO outbox_clock (k, boot_id, seen_ms) VALUES (0, ?1, ?2)
             ON CONFLICT(k) DO UPDATE SET boot_id = excluded.boot_id, seen_ms = excluded.seen_ms",
            params![boot, now],
        )
        .map_err(open_err)?;
        let seq: i64 = conn
            .query_row("SELECT seq FROM sqlite_sequence WHERE name = 'alarm_outbox'", [], |r| r.get(0))
            .optional()
            .map_err(open_err)?
            .unwrap_or(0);
        let (max_id, rows): (Option<i64>, i64) = conn
            .query_row("SELECT MAX(id), COUNT(*) FROM alarm_outbox", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(open_err)?;
        Ok((conn, seq.max(max_id.unwrap_or(0)), rows as u64))
    }

    fn update_pending(&self) {
        self.stats.pending.store(self.in_file + self.memory.len() as u64, Ordering::Relaxed);
        self.stats.in_memory.store(self.memory.len() as u64, Ordering::Relaxed);
    }

    fn count_dropped(&self, n: u64) {
        self.stats.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// [`push`](Self::push), telling `ack` whether the row is in the file.
    fn push_acked(&mut self, camera: &str, leaf: &str, payload: &[u8], ack: Option<Sender<bool>>) {
        self.push_leaf(camera, leaf, payload);
        if let Some(ack) = ack {
            let _ = ack.send(self.last_in_file);
        }
    }

    /// Appends an alarm; returns its id. Beyond the row bound the oldest rows
    /// are dropped (counted and logged): the newest alarms matter most.
    pub fn push(&mut self, camera: &str, payload: &[u8]) -> i64 {
        self.push_leaf(camera, LEAF_ALARM, payload)
    }

    /// [`push`](Self::push) for the topic leaf `leaf`.
    pub fn push_leaf(&mut self, camera: &str, leaf: &str, payload: &[u8]) -> i64 {
        let row = OutboxRow {
            id: self.last_id + 1,
            camera: camera.to_string(),
            leaf: leaf.to_string(),
            payload: payload.to_vec(),
            created_ms: crate::events::now_ms(),
            origin_ms: self.clock.now_ms(),
        };
        self.last_id = row.id;
        // Memory first, so that alarms reach the file in the order raised.
        self.drain_memory();
        let stored = match (&self.db, self.memory.is_empty()) {
            (Some(db), true) => match insert(db, &row) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, id = row.id, camera, "alarm outbox write failed: alarm held in memory");
                    false
                }
            },
            _ => false,
        };
        self.last_in_file = stored;
        if stored {
            self.in_file += 1;
            self.bound_file();
        } else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.memory.push_back(row.clone());
            let limit = MEMORY_ROWS.min(self.max_rows as usize);
            if self.memory.len() > limit {
                let gone = self.memory.len() - limit;
                self.memory.drain(..gone);
                self.count_dropped(gone as u64);
                tracing::warn!(dropped = gone, limit, "alarms held in memory over the limit: oldest dropped");
            }
        }
        self.update_pending();
        row.id
    }

    /// Drops the oldest rows of the file beyond the row bound.
    fn bound_file(&mut self) {
        let Some(db) = &self.db else { return };
        let excess = self.in_file.saturating_sub(self.max_rows);
        if excess == 0 {
            return;
        }
        match db.execute(
            "DELETE FROM alarm_outbox WHERE id IN (SELECT id FROM alarm_outbox ORDER BY id LIMIT ?1)",
            params![excess as i64],
        ) {
            Ok(gone) => {
                self.in_file -= gone as u64;
                self.count_dropped(gone as u64);
                tracing::warn!(
                    dropped = gone,
                    max_rows = self.max_rows,
                    "alarm outbox full: oldest undelivered alarms dropped"
                );
            }
            Err(e) => tracing::error!(error = %e, "alarm outbox: bounding the row count failed"),
        }
    }

    /// Writes alarms held in memory to the file, oldest first, with their ids.
    fn drain_memory(&mut self) {
        let Some(db) = &self.db else { return };
        let mut moved = 0;
        while let Some(row) = self.memory.front() {
            if let Err(e) = insert(db, row) {
                tracing::debug!(error = %e, "alarm outbox still failing; alarms stay in memory");
                break;
            }
            self.memory.pop_front();
            moved += 1;
        }
        if moved > 0 {
            self.in_file += moved;
            tracing::info!(rows = moved, "alarms held in memory written to the outbox");
            self.bound_file();
            self.update_pending();
        }
    }

    /// Up to `limit` rows with an id above `after`, oldest first (file rows
    /// always have lower ids than memory rows).
    pub fn rows_after(&mut self, after: i64, limit: usize) -> Vec<OutboxRow> {
        let mut rows = Vec::new();
        if let Some(db) = &self.db {
            match select_after(db, after, limit) {
                Ok(r) => rows = r,
                Err(e) => {
                    // Not the memory rows either: their higher ids would skip these.
                    tracing::error!(error = %e, "alarm outbox read failed");
                    return rows;
                }
            }
        }
        let room = limit.saturating_sub(rows.len());
        rows.extend(self.memory.iter().filter(|r| r.id > after).take(room).cloned());
        rows
    }

    /// The broker has the alarm: forget it. False if it was already gone.
    pub fn ack(&mut self, id: i64) -> bool {
        let gone = if let Some(i) = self.memory.iter().position(|r| r.id == id) {
            self.memory.remove(i);
            true
        } else if let Some(db) = &self.db {
            match db.execute("DELETE FROM alarm_outbox WHERE id = ?1", params![id]) {
                Ok(n) => {
                    self.in_file -= (n as u64).min(self.in_file);
                    n > 0
                }
                Err(e) => {
                    tracing::error!(error = %e, row = id, "alarm outbox delete failed: it will be sent again");
                    false
                }
            }
        } else {
            false
        };
        self.update_pending();
        gone
    }

    /// Moves a row the broker refuses to the dead-letter table (bounded like
    /// the outbox), logs it in full and counts it.
    pub fn dead_letter(&mut self, id: i64, reason: &str) -> bool {
        let row = if let Some(i) = self.memory.iter().position(|r| r.id == id) {
            self.memory.remove(i)
        } else if let Some(db) = &self.db {
            match move_to_dead_letter(db, id, reason, self.max_rows) {
                Ok(row) => {
                    if row.is_some() {
                        self.in_file = self.in_file.saturating_sub(1);
                    }
                    row
                }
                Err(e) => {
                    tracing::error!(error = %e, row = id, "alarm dead-letter move failed");
                    None
                }
            }
        } else {
            None
        };
        self.update_pending();
        let Some(row) = row else { return false };
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            row = id, camera = %row.camera, reason, payload = %String::from_utf8_lossy(&row.payload),
            "alarm moved to the dead-letter table: the broker refuses it; later alarms go on"
        );
        true
    }

    /// Drops rows past the age bound (counted and logged); returns how many.
    pub fn prune(&mut self) -> u64 {
        let cutoff = self.clock.now_ms().saturating_sub(self.max_age_ms);
        let mut gone = 0u64;
        if let Some(db) = &self.db {
            match db.execute("DELETE FROM alarm_outbox WHERE origin_ms < ?1", params![cutoff]) {
                Ok(n) => {
                    gone += n as u64;
                    self.in_file = self.in_file.saturating_sub(n as u64);
                }
                Err(e) => tracing::error!(error = %e, "alarm outbox prune failed"),
            }
        }
        let before = self.memory.len();
        self.memory.retain(|r| r.origin_ms >= cutoff);
        gone += (before - self.memory.len()) as u64;
        if gone > 0 {
            self.count_dropped(gone);
            tracing::warn!(
                dropped = gone,
                max_age_s = self.max_age_ms / 1000,
                "undelivered alarms older than the outbox's max age dropped"
            );
        }
        self.update_pending();
        gone
    }

    /// Once a minute: prune, note the boot-clock time, retry memory rows.
    fn tick(&mut self) {
        self.drain_memory();
        self.prune();
        if let Some(db) = &self.db {
            if let Err(e) = db.execute("UPDATE outbox_clock SET seen_ms = ?1 WHERE k = 0", params![self.clock.now_ms()])
            {
                tracing::debug!(error = %e, "alarm outbox: clock note failed");
            }
        }
    }

    /// Rows waiting, file and memory.
    pub fn len(&self) -> u64 {
        self.in_file + self.memory.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dead-letter table's rows: (id, camera, payload, reason).
    pub fn dead_letters(&self) -> Vec<(i64, String, Vec<u8>, String)> {
        let Some(db) = &self.db else { return Vec::new() };
        let rows =
            db.prepare("SELECT id, camera, payload, reason FROM alarm_dead_letter ORDER BY id").and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect::<Result<Vec<_>, _>>()
            });
        rows.unwrap_or_default()
    }
}

fn insert(db: &Connection, row: &OutboxRow) -> rusqlite::Result<()> {
    db.prepare_cached(
        "INSERT INTO alarm_outbox (id, camera, payload, created_ms, origin_ms, leaf) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![row.id, row.camera, row.payload, row.created_ms as i64, row.origin_ms, row.leaf])?;
    Ok(())
}

fn select_after(db: &Connection, after: i64, limit: usize) -> rusqlite::Result<Vec<OutboxRow>> {
    let mut st = db.prepare_cached(
        "SELECT id, camera, payload, created_ms, origin_ms, leaf FROM alarm_outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = st.query_map(params![after, limit as i64], |r| {
        Ok(OutboxRow {
            id: r.get(0)?,
            camera: r.get(1)?,
            payload: r.get(2)?,
            created_ms: r.get::<_, i64>(3)?.max(0) as u64,
            origin_ms: r.get(4)?,
            leaf: r.get(5)?,
        })
    })?;
    rows.collect()
}

fn move_to_dead_letter(db: &Connection, id: i64, reason: &str, max_rows: u64) -> rusqlite::Result<Option<OutboxRow>> {
    let tx = db.unchecked_transaction()?;
    let row = tx
        .query_row(
            "SELECT id, camera, payload, created_ms, origin_ms, leaf FROM alarm_outbox WHERE id = ?1",
            params![id],
            |r| {
                Ok(OutboxRow {
                    id: r.get(0)?,
                    camera: r.get(1)?,
                    payload: r.get(2)?,
                    created_ms: r.get::<_, i64>(3)?.max(0) as u64,
                    origin_ms: r.get(4)?,
                    leaf: r.get(5)?,
                })
            },
        )
        .optional()?;
    if let Some(row) = &row {
        tx.execute(
            "INSERT OR REPLACE INTO alarm_dead_letter (id, camera, payload, created_ms, dead_ms, reason, leaf)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                row.id,
                row.camera,
                row.payload,
                row.created_ms as i64,
                crate::events::now_ms() as i64,
                reason,
                row.leaf
            ],
        )?;
        tx.execute("DELETE FROM alarm_outbox WHERE id = ?1", params![id])?;
        // Bounded like the outbox: a broker refusing everything cannot fill the disk.
        tx.execute(
            "DELETE FROM alarm_dead_letter WHERE id NOT IN (SELECT id FROM alarm_dead_letter ORDER BY id DESC LIMIT ?1)",
            params![max_rows as i64],
        )?;
    }
    tx.commit()?;
    Ok(row)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicI64;
    use std::sync::Mutex;

    use super::*;

    /// A boot clock the test steps and reboots.
    #[derive(Clone, Default)]
    struct FakeClock(Arc<(Mutex<String>, AtomicI64)>);
    impl FakeClock {
        fn set(&self, boot: &str, ms: i64) {
            *self.0 .0.lock().unwrap() = boot.into();
            self.0 .1.store(ms, Ordering::Relaxed);
        }
    }
    impl BootClock for FakeClock {
        fn boot_id(&self) -> String {
            self.0 .0.lock().unwrap().clone()
        }
        fn now_ms(&self) -> i64 {
            self.0 .1.load(Ordering::Relaxed)
        }
    }

    fn settings(path: &Path, max_rows: u64, max_age_s: u64) -> OutboxSettings {
        OutboxSettings { path: path.to_path_buf(), max_rows, max_age: Duration::from_secs(max_age_s) }
    }

    fn store(s: &OutboxSettings, clock: &FakeClock) -> Store {
        Store::open(s, Box::new(clock.clone()), Arc::default())
    }

    fn row_ids(rows: &[OutboxRow]) -> Vec<i64> {
        rows.iter().map(|r| r.id).collect()
    }

    #[test]
    fn fifo_survives_reopen_and_ack_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(&dir.path().join("sub/outbox.sqlite"), 100, 3600);
        let clock = FakeClock::default();
        clock.set("b1", 1_000);
        let ids: Vec<i64> = {
            let mut ob = store(&s, &clock);
            (0..5).map(|i| ob.push("cam", format!("{{\"n\":{i}}}").as_bytes())).collect()
        };
        let mut ob = store(&s, &clock);
        assert_eq!(ob.len(), 5);
        let rows = ob.rows_after(0, 3);
        assert_eq!(row_ids(&rows), ids[..3]);
        assert_eq!(rows[1].payload, b"{\"n\":1}");
        assert!(ob.ack(ids[0]));
        assert!(!ob.ack(ids[0]), "second ack of the same row");
        assert_eq!(ob.rows_after(ids[2], 10).len(), 2);
        for &id in &ids[1..] {
            ob.ack(id);
        }
        assert!(ob.is_empty());
        // Ids are never reused, so order holds across deletes and reopens.
        let next = ob.push("cam", b"{}");
        assert!(next > ids[4]);
        drop(ob);
        let mut ob = store(&s, &clock);
        assert!(ob.push("cam", b"{}") > next);
    }

    #[test]
    fn bounds_drop_oldest_and_expired_and_count_them() {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::default();
        clock.set("b1", 0);
        let mut ob = store(&settings(&dir.path().join("o.sqlite"), 3, 60), &clock);
        let ids: Vec<i64> = (0..5).map(|_| ob.push("cam", b"{}")).collect();
        assert_eq!(row_ids(&ob.rows_after(0, 10)), ids[2..]);
        assert_eq!(ob.stats.dropped.load(Ordering::Relaxed), 2);
        clock.set("b1", 30_000);
        let young = ob.push("cam", b"{}"); // over max rows too: drops ids[2]
        assert_eq!(ob.stats.dropped.load(Ordering::Relaxed), 3);
        clock.set("b1", 61_000);
        assert_eq!(ob.prune(), 2, "ids[3] and ids[4] are 61 s old");
        assert_eq!(row_ids(&ob.rows_after(0, 10)), [young]);
        assert_eq!((ob.stats.dropped.load(Ordering::Relaxed), ob.stats.pending.load(Ordering::Relaxed)), (5, 1));
    }

    /// The defect this clock fixes: NTP stepping the wall clock forward by
    /// years must not age a single row.
    #[test]
    fn a_wall_clock_step_ages_nothing_and_a_reboot_keeps_the_age_reached() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(&dir.path().join("o.sqlite"), 100, 600);
        let clock = FakeClock::default();
        clock.set("boot-a", 5_000);
        let mut ob = store(&s, &clock);
        let a = ob.push("cam", b"{}");
        // The row's wall-clock stamp is 1970-ish relative to a stepped clock:
        // pretend it is ancient. Only the boot clock matters.
        ob.db.as_ref().unwrap().execute("UPDATE alarm_outbox SET created_ms = 0", []).unwrap();
        clock.set("boot-a", 5_000 + 300_000);
        ob.tick(); // seen at 5 min of age
        assert_eq!(ob.prune(), 0);
        assert_eq!(ob.len(), 1);
        drop(ob);
        // Reboot: the new boot's clock starts near zero. The row has 5 min of
        // age and gets 10 min in all, however long the box was off.
        clock.set("boot-b", 2_000);
        let mut ob = store(&s, &clock);
        assert_eq!(ob.len(), 1, "a reboot ages nothing");
        let b = ob.push("cam", b"{}");
        clock.set("boot-b", 2_000 + 299_000);
        assert_eq!(ob.prune(), 0, "4 min 59 s after the reboot: 9 min 59 s old");
        clock.set("boot-b", 2_000 + 301_000);
        assert_eq!(ob.prune(), 1, "past 10 min of age in all");
        assert_eq!(row_ids(&ob.rows_after(0, 10)), [b]);
        assert!(b > a);
    }

    #[test]
    fn an_outbox_of_the_old_schema_is_upgraded_and_its_rows_start_their_age_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE alarm_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, camera TEXT NOT NULL,
                 payload BLOB NOT NULL, created_ms INTEGER NOT NULL);
                 INSERT INTO alarm_outbox (camera, payload, created_ms) VALUES ('cam', X'7B7D', 0);",
            )
            .unwrap();
        }
        let clock = FakeClock::default();
        clock.set("b", 1_000_000);
        let mut ob = store(&settings(&path, 100, 60), &clock);
        assert_eq!(ob.len(), 1, "a 1970 wall-clock stamp is not an age");
        assert_eq!(ob.push("cam", b"{}"), 2);
        clock.set("b", 1_061_000);
        assert_eq!(ob.prune(), 2);
    }

    #[test]
    fn an_outbox_from_before_verdicts_keeps_its_alarms_and_takes_verdicts_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        // The schema as the previous release wrote it, with a queued alarm and a dead letter.
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE alarm_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, camera TEXT NOT NULL,
                 payload BLOB NOT NULL, created_ms INTEGER NOT NULL, origin_ms INTEGER);
                 CREATE TABLE alarm_dead_letter (id INTEGER PRIMARY KEY, camera TEXT NOT NULL, payload BLOB NOT NULL,
                 created_ms INTEGER NOT NULL, dead_ms INTEGER NOT NULL, reason TEXT NOT NULL);
                 CREATE TABLE outbox_clock (k INTEGER PRIMARY KEY CHECK (k = 0), boot_id TEXT NOT NULL, seen_ms INTEGER NOT NULL);
                 INSERT INTO alarm_outbox (camera, payload, created_ms, origin_ms) VALUES ('cam', X'7B7D', 0, 0);
                 INSERT INTO alarm_outbox (camera, payload, created_ms, origin_ms) VALUES ('cam', X'7B317D', 0, 0);
                 INSERT INTO alarm_dead_letter VALUES (9, 'cam', X'7B7D', 0, 0, 'old');",
            )
            .unwrap();
        }
        let clock = FakeClock::default();
        clock.set("b", 1_000);
        let mut ob = store(&settings(&path, 100, 3600), &clock);
        assert_eq!(ob.len(), 2);
        let v = ob.push_leaf("cam", LEAF_VERDICT, b"{\"part_id\":\"1\"}");
        assert_eq!(v, 3, "ids go on after the old rows");
        let rows = ob.rows_after(0, 10);
        let leaves: Vec<(&str, i64)> = rows.iter().map(|r| (r.leaf.as_str(), r.id)).collect();
        assert_eq!(leaves, [("alarm", 1), ("alarm", 2), ("verdict", 3)]);
        assert_eq!(rows[1].payload, b"{1}");
        assert!(ob.dead_letter(v, "refused"));
        drop(ob);
        // Reopened (migrated already): still the same rows, the dead letter keeps its leaf.
        let ob = store(&settings(&path, 100, 3600), &clock);
        assert_eq!(ob.len(), 2);
        let c = Connection::open(&path).unwrap();
        let dead: Vec<(i64, String)> = c
            .prepare("SELECT id, leaf FROM alarm_dead_letter ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(dead, [(3, "verdict".to_string()), (9, "alarm".to_string())]);
    }

    #[test]
    fn a_corrupt_file_is_a_fault_and_alarms_are_held_in_memory_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        std::fs::write(&path, vec![0x5au8; 8192]).unwrap();
        let clock = FakeClock::default();
        let mut ob = store(&settings(&path, 100_000, 60), &clock);
        assert!(ob.stats.fault.load(Ordering::Relaxed), "a corrupt file must be reported");
        let ids: Vec<i64> = (0..MEMORY_ROWS as u64 + 5).map(|i| ob.push("cam", format!("{i}").as_bytes())).collect();
        assert_eq!(ob.len(), MEMORY_ROWS as u64);
        assert_eq!(ob.stats.dropped.load(Ordering::Relaxed), 5, "the memory bound drops, counted");
        assert_eq!(ob.stats.errors.load(Ordering::Relaxed), MEMORY_ROWS as u64 + 5);
        let rows = ob.rows_after(0, 3);
        assert_eq!(row_ids(&rows), ids[5..8], "memory rows are served in order, oldest kept first");
        assert!(ob.ack(ids[5]));
        assert_eq!(ob.stats.pending.load(Ordering::Relaxed), MEMORY_ROWS as u64 - 1);
        assert!(ob.dead_letter(ids[6], "test"));
        assert_eq!(ob.stats.dead_lettered.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn alarms_held_in_memory_reach_the_file_in_order_with_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let clock = FakeClock::default();
        let mut ob = store(&settings(&path, 100, 60), &clock);
        let first = ob.push("cam", b"1");
        // A write failure (disk full, I/O error): a trigger refuses inserts.
        let db = ob.db.as_ref().unwrap();
        db.execute_batch("CREATE TRIGGER no BEFORE INSERT ON alarm_outbox BEGIN SELECT RAISE(FAIL, 'disk full'); END;")
            .unwrap();
        let held: Vec<i64> = (0..3).map(|_| ob.push("cam", b"m")).collect();
        assert_eq!((ob.memory.len(), ob.stats.errors.load(Ordering::Relaxed)), (3, 3));
        assert_eq!(row_ids(&ob.rows_after(0, 10)), [first, held[0], held[1], held[2]]);
        ob.db.as_ref().unwrap().execute_batch("DROP TRIGGER no").unwrap();
        let after = ob.push("cam", b"2");
        assert!(ob.memory.is_empty(), "memory written out before the new alarm");
        drop(ob);
        let mut ob = store(&settings(&path, 100, 60), &clock);
        assert_eq!(row_ids(&ob.rows_after(0, 10)), [first, held[0], held[1], held[2], after]);
    }

    #[test]
    fn a_dead_letter_leaves_the_outbox_for_its_own_table() {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::default();
        let mut ob = store(&settings(&dir.path().join("o.sqlite"), 2, 60), &clock);
        let ids: Vec<i64> = (0..3).map(|_| ob.push("cam", b"{}")).collect();
        assert!(ob.dead_letter(ids[1], "closed 5 times"));
        assert!(!ob.dead_letter(ids[1], "again"), "gone already");
        assert_eq!(row_ids(&ob.rows_after(0, 10)), [ids[2]]);
        ob.push("cam", b"{}");
        let i = ob.push("cam", b"{}");
        ob.dead_letter(i - 1, "x");
        ob.dead_letter(i, "y");
        let dead: Vec<i64> = ob.dead_letters().iter().map(|d| d.0).collect();
        assert_eq!(dead, [i - 1, i], "the dead-letter table is bounded like the outbox");
        assert_eq!(ob.stats.dead_lettered.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn the_thread_stores_alarms_before_answering_a_later_read() {
        let dir = tempfile::tempdir().unwrap();
        let wake = Arc::new(Notify::new());
        let ob =
            Outbox::spawn_with(settings(&dir.path().join("o.sqlite"), 100, 60), Box::new(FakeClock::default()), wake)
                .unwrap();
        for i in 0..50 {
            ob.push("cam", format!("{i}").into_bytes());
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        ob.read(0, 100, 7, tx);
        let reply = rx.blocking_recv().unwrap();
        assert_eq!((reply.seq, reply.rows.len()), (7, 50));
        ob.ack(reply.rows[0].id);
        assert_eq!(ob.call(|s| s.len()), Some(49));
        assert_eq!(ob.pending(), 49);
        ob.close(Duration::from_secs(5));
    }
}
