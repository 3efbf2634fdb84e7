//! The inference threads' heartbeat, read by the watchdog and `/healthz`:
//! the daemon is alive while it *decides frames*, not merely while a thread
//! runs.
//!
//! A beat counts when a batch was decided ([`Beat::Decided`]), or when there
//! was nothing to decide ([`Beat::Idle`]: no frame reached inference for a
//! second: every camera offline, a triggered camera waiting for parts, a line
//! at rest). An idle pipeline is not wedged: restarting the daemon would not
//! bring a camera back, and the cameras' own state is reported beside it
//! (`/healthz` body, `camera` topics, `camera_online`). A batch that fails
//! ([`Beat::Failed`]: ONNX Runtime returns an error, or every score of the
//! batch is unusable) does not count, and it marks the heartbeat *failing*:
//! idle seconds between failing batches do not count either, until a batch is
//! decided again. So a model that fails every batch is silent from its last
//! decided batch on, however slowly the frames come, and the watchdog and
//! `/healthz` see it within their limits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What an inference thread reports after each wait or batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// At least one frame of the batch was decided.
    Decided,
    /// Nothing arrived to decide.
    Idle,
    /// The batch arrived and no frame of it could be decided.
    Failed,
}

/// The heartbeat after `beat`, from `failing` (the last batch failed):
/// whether the beat counts as life, and whether it is failing afterwards.
pub fn counts(beat: Beat, failing: bool) -> (bool, bool) {
    match beat {
        Beat::Decided => (true, false),
        Beat::Idle => (!failing, failing),
        Beat::Failed => (false, true),
    }
}

/// When the inference threads last showed life (see the module doc).
#[derive(Debug, Clone)]
pub struct Liveness {
    /// Milliseconds since `epoch` of the last beat that counted.
    heartbeat: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    epoch: Instant,
}

impl Liveness {
    pub fn silent_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).saturating_sub(self.heartbeat.load(Ordering::Relaxed))
    }

    /// True while the last batch failed and none has been decided since.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// A heartbeat last seen about `silent_ms` ago.
    #[cfg(test)]
    pub fn new_for_test(silent_ms: u64) -> Liveness {
        let now = Instant::now();
        let epoch = now.checked_sub(std::time::Duration::from_millis(silent_ms)).unwrap_or(now);
        Liveness { heartbeat: Arc::new(AtomicU64::new(0)), failing: Arc::default(), epoch }
    }

    /// A heartbeat that starts now (no beat yet: silent since its creation).
    pub fn start() -> Liveness {
        Liveness { heartbeat: Arc::new(AtomicU64::new(0)), failing: Arc::default(), epoch: Instant::now() }
    }

    /// Called by an inference thread after every batch and every idle wait.
    /// Several models' threads share one heartbeat: one of them deciding
    /// clears another's failing mark (see `exporter` for what that hides).
    pub fn beat(&self, beat: Beat) {
        let (alive, failing) = counts(beat, self.failing.load(Ordering::Relaxed));
        self.failing.store(failing, Ordering::Relaxed);
        if alive {
            self.heartbeat.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_decided_frames_or_a_healthy_idle_count() {
        assert_eq!(counts(Beat::Decided, true), (true, false));
        assert_eq!(counts(Beat::Idle, false), (true, false));
        assert_eq!(counts(Beat::Failed, false), (false, true));
        // Idle seconds between failing batches are not life.
        assert_eq!(counts(Beat::Idle, true), (false, true));
    }

    #[test]
    fn failing_batches_leave_the_heartbeat_silent() {
        let l = Liveness::new_for_test(60_000);
        l.beat(Beat::Failed);
        l.beat(Beat::Idle);
        assert!(l.failing() && l.silent_ms() >= 60_000, "{}", l.silent_ms());
        l.beat(Beat::Decided);
        assert!(!l.failing() && l.silent_ms() < 60_000, "{}", l.silent_ms());
        l.beat(Beat::Idle);
        assert!(l.silent_ms() < 60_000);
    }
}
