//! What the pipeline's threads hand over to the sender task without waiting:
//! last-value slots for camera state, snapshots and stats, the alarm outbox,
//! and the counters both sides update.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use super::PublisherCounters;
use crate::commands::{CommandEvent, Intake};
use crate::events::{ScoreEvent, Snapshot, StatsReport};
use crate::publish::outbox::Outbox;
use crate::publish::Topics;

#[derive(Default)]
pub(super) struct Counters {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub scores_published: AtomicU64,
    pub scores_throttled: AtomicU64,
    pub scores_dropped: AtomicU64,
    pub alarms_queued: AtomicU64,
    pub alarms_acked: AtomicU64,
    /// Verdicts written to the outbox (they share it with alarms).
    pub verdicts_queued: AtomicU64,
    /// Command answers and stage events lost to a full queue (see [`EVENT_QUEUE`]).
    pub events_dropped: AtomicU64,
    /// A connection cannot even be attempted: TLS or password files, or the
    /// embedded broker's port (the link task retries with its backoff).
    pub link_fault: AtomicBool,
}

pub(super) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Retained per-camera state: the last value the pipeline set.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CameraState {
    pub online: Option<bool>,
    pub alarm: Option<bool>,
}

/// The two retained per-camera topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Leaf {
    Camera,
    State,
}

/// What the pipeline handed over since the sender task last looked.
#[derive(Default)]
pub(super) struct Pending {
    pub cameras: BTreeMap<String, CameraState>,
    pub dirty: BTreeSet<(String, Leaf)>,
    /// Latest snapshot per camera (older ones are superseded: the topic is retained).
    pub snapshots: HashMap<String, Snapshot>,
    /// The pipeline's latest report, not yet published (a newer one replaces it).
    pub stats: Option<StatsReport>,
    /// Command answers and stage events, oldest first, at most [`EVENT_QUEUE`].
    pub events: VecDeque<CommandEvent>,
}

/// Events waiting for the broker: answers are best effort (the command's
/// effect, e.g. a verdict, is what is durable), so a long outage keeps only
/// the newest ones; the oldest are dropped and counted.
pub(super) const EVENT_QUEUE: usize = 256;

pub(super) struct Shared {
    pub topics: Topics,
    pub scores_tx: mpsc::Sender<ScoreEvent>,
    /// None: scores are not published at all.
    pub score_interval: Option<Duration>,
    pub last_score: Mutex<HashMap<String, Instant>>,
    pub snapshots: bool,
    pub pending: Mutex<Pending>,
    /// Shared with the outbox thread, which wakes the sender after storing alarms.
    pub wake: Arc<Notify>,
    pub outbox: Outbox,
    pub counters: Counters,
    /// Where incoming command messages go, once the daemon has set it up
    /// (the sender task subscribes to the command topics from then on).
    pub commands: OnceLock<Arc<Intake>>,
}

impl Shared {
    pub fn counters(&self) -> PublisherCounters {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PublisherCounters {
            connected: c.connected.load(Ordering::Relaxed),
            connects: get(&c.connects),
            scores_published: get(&c.scores_published),
            scores_throttled: get(&c.scores_throttled),
            scores_dropped: get(&c.scores_dropped),
            alarms_queued: get(&c.alarms_queued),
            alarms_acked: get(&c.alarms_acked),
            verdicts_queued: get(&c.verdicts_queued),
            events_dropped: get(&c.events_dropped),
            alarms_pending: self.outbox.pending(),
            alarms_in_memory: self.outbox.in_memory(),
            alarms_dropped: self.outbox.dropped(),
            alarms_dead_lettered: self.outbox.dead_lettered(),
            outbox_errors: self.outbox.errors(),
            outbox_fault: self.outbox.faulted(),
            link_fault: c.link_fault.load(Ordering::Relaxed),
        }
    }

    /// The pending slots. A poisoned lock means a panic elsewhere; keep
    /// publishing what we can.
    pub fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the pending slots and wakes the sender task.
    pub fn with_pending(&self, f: impl FnOnce(&mut Pending)) {
        f(&mut self.pending());
        self.wake.notify_one();
    }
}
