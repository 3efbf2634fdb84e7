//! The inference threads' heartbeat, read by the watchdog and `/healthz`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// When the inference threads last showed life: they store the milliseconds
/// since `epoch` after every batch and at least once a second when idle.
#[derive(Debug, Clone)]
pub struct Liveness {
    heartbeat: Arc<AtomicU64>,
    epoch: Instant,
}

impl Liveness {
    pub fn silent_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).saturating_sub(self.heartbeat.load(Ordering::Relaxed))
    }

    /// A heartbeat last seen about `silent_ms` ago.
    #[cfg(test)]
    pub fn new_for_test(silent_ms: u64) -> Liveness {
        let now = Instant::now();
        let epoch = now.checked_sub(std::time::Duration::from_millis(silent_ms)).unwrap_or(now);
        Liveness { heartbeat: Arc::new(AtomicU64::new(0)), epoch }
    }

    /// A heartbeat that starts now (no beat yet: silent since its creation).
    pub fn start() -> Liveness {
        Liveness { heartbeat: Arc::new(AtomicU64::new(0)), epoch: Instant::now() }
    }

    /// Called by an inference thread after every batch and when idle.
    pub fn beat(&self) {
        self.heartbeat.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
