//! What the pipeline's threads hand over to the sender task without waiting:
//! last-value slots for camera state, snapshots and stats, the alarm outbox,
//! and the counters both sides update.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use super::PublisherCounters;
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
    pub outbox_errors: AtomicU64,
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
    /// Alarms the outbox failed to store: published from memory, best effort.
    pub direct: VecDeque<(String, Vec<u8>)>,
}

pub(super) struct Shared {
    pub topics: Topics,
    pub scores_tx: mpsc::Sender<ScoreEvent>,
    /// None: scores are not published at all.
    pub score_interval: Option<Duration>,
    pub last_score: Mutex<HashMap<String, Instant>>,
    pub snapshots: bool,
    pub pending: Mutex<Pending>,
    pub wake: Notify,
    pub outbox: Outbox,
    pub counters: Counters,
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
            alarms_pending: self.outbox.len().unwrap_or(0),
            alarms_dropped: self.outbox.dropped(),
            outbox_errors: get(&c.outbox_errors),
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
