//! Wedged sources: a camera whose read never returns (a driver stuck in an
//! ioctl, a network read with no timeout of its own) cannot report itself,
//! because its thread is the one stuck. [`CameraWatch`] is the part of a
//! camera that other threads can see: the camera thread marks when each read
//! (or open) starts and ends, and the pipeline's watch thread
//! ([`spawn_watch`]) reports a camera offline once a read has been running
//! longer than its `read_timeout_s`. The camera's online state lives here, so
//! both threads report through one place and each change is published once;
//! when the read finally returns a frame, the camera is online again.
//!
//! At shutdown a camera thread still stuck in a read cannot be joined: the
//! pipeline waits [`STOP_GRACE`] for it, then closes its queue
//! ([`CameraWatch::close_queue`]: its only sender is dropped, so the stages after it drain and finish)
//! and leaves the thread behind for the process exit to end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::Frame;
use crate::base::stop::sleep_unless_stopped;
use crate::events::Publisher;
use crate::metrics::CameraCounters;

/// How long a stop waits for a camera thread before leaving it behind. Reads
/// of well-behaved sources return within a frame interval, an http-mjpeg read
/// within its `timeout_s` (≤ 8 s) most of the time; 3 s keeps the whole stop
/// (this, the drain, the exporter's 2 s and the publisher's 5 s flush) well
/// inside the unit's `TimeoutStopSec=20`.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Whether a read that started at `since_ms` (0: no read running) has run
/// longer than `timeout_ms` at `now_ms`.
pub fn wedged(since_ms: u64, now_ms: u64, timeout_ms: u64) -> bool {
    since_ms != 0 && now_ms.saturating_sub(since_ms) > timeout_ms
}

/// One camera, as the watch thread and the pipeline see it.
pub struct CameraWatch {
    name: String,
    timeout: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` (at least 1) when the running read started; 0: none.
    read_since: AtomicU64,
    /// What was last reported: `None` until the first open succeeds or fails.
    state: Mutex<Option<bool>>,
    counters: Arc<CameraCounters>,
    publisher: Arc<dyn Publisher>,
    /// The camera's queue: taken from a thread that never came back.
    queue: Mutex<Option<Sender<Frame>>>,
    /// A reload removed or restarted the camera: its last word was `offline`.
    retired: AtomicBool,
}

impl std::fmt::Debug for CameraWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CameraWatch").field("name", &self.name).field("timeout", &self.timeout).finish()
    }
}

impl CameraWatch {
    pub fn new(
        name: &str,
        timeout: Duration,
        counters: Arc<CameraCounters>,
        publisher: Arc<dyn Publisher>,
        queue: Sender<Frame>,
    ) -> CameraWatch {
        CameraWatch {
            name: name.to_string(),
            timeout,
            epoch: Instant::now(),
            read_since: AtomicU64::new(0),
            state: Mutex::new(None),
            counters,
            publisher,
            queue: Mutex::new(Some(queue)),
            retired: AtomicBool::new(false),
        }
    }

    /// A reload removed this camera (or replaced its thread): reports it
    /// offline once, and ignores what its ending thread still reports.
    pub fn retire(&self, why: &str) {
        self.set_online(false, why);
        self.retired.store(true, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Reports the camera online or offline, once per change (nothing more
    /// once [`retire`](Self::retire)d).
    pub fn set_online(&self, online: bool, source: &str) {
        let Ok(mut state) = self.state.lock() else { return };
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        if *state != Some(online) {
            *state = Some(online);
            self.counters.online.store(online, Ordering::Relaxed);
            self.publisher.camera_online(&self.name, online);
            tracing::info!(camera = %self.name, %source, online, "camera state");
        }
    }

    /// The camera thread enters a read (or an open) of its source.
    pub fn read_started(&self) {
        self.read_since.store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn read_ended(&self) {
        self.read_since.store(0, Ordering::Relaxed);
    }

    /// Reports the camera offline if its read has outlived the timeout; true
    /// when it is wedged.
    pub fn check(&self) -> bool {
        let since = self.read_since.load(Ordering::Relaxed);
        if !wedged(since, self.now_ms(), self.timeout.as_millis() as u64) {
            return false;
        }
        let reported_off = self.state.lock().map(|s| *s == Some(false)).unwrap_or(true);
        if !reported_off {
            tracing::warn!(
                camera = %self.name,
                read_timeout_s = self.timeout.as_secs_f64(),
                "camera wedged: a read of its source has not returned; reported offline"
            );
            self.set_online(false, "wedged read");
        }
        true
    }

    /// Sends a frame with `send` while the queue is still attached.
    pub fn with_queue<T>(&self, send: impl FnOnce(&Sender<Frame>) -> T) -> Option<T> {
        let queue = self.queue.lock().ok()?;
        queue.as_ref().map(send)
    }

    /// Closes the camera's queue (this holds its only sender): the camera
    /// thread does so when it ends, the pipeline for a thread that did not
    /// stop in time.
    pub fn close_queue(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The cameras the watch thread checks; a reload replaces the list.
pub type Watched = Arc<RwLock<Vec<Arc<CameraWatch>>>>;

/// Checks every camera a few times per shortest timeout until `stop`.
pub fn spawn_watch(cameras: Watched, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("cam-watch".into()).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let now: Vec<Arc<CameraWatch>> = cameras.read().map(|c| c.clone()).unwrap_or_default();
            for c in &now {
                c.check();
            }
            let shortest = now.iter().map(|c| c.timeout).min().unwrap_or(Duration::from_secs(1));
            let every = (shortest / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
            sleep_unless_stopped(every, &stop);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Recorded, Recorder};

    #[test]
    fn a_read_is_wedged_only_past_its_timeout() {
        assert!(!wedged(0, 1_000_000, 10), "no read running");
        assert!(!wedged(1000, 1500, 500));
        assert!(wedged(1000, 1501, 500));
        assert!(!wedged(5000, 1000, 10), "a clock read before the start is not a wedge");
    }

    #[test]
    fn state_changes_are_published_once_from_either_thread() {
        let rec = Recorder::default();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let counters = Arc::new(CameraCounters::default());
        let w = CameraWatch::new("a", Duration::ZERO, counters.clone(), Arc::new(rec.clone()), tx);
        w.set_online(true, "test");
        w.set_online(true, "test");
        assert!(!w.check(), "not in a read");
        w.read_started();
        std::thread::sleep(Duration::from_millis(3));
        assert!(w.check() && w.check(), "past a zero timeout");
        assert!(!counters.online.load(Ordering::Relaxed));
        w.read_ended();
        w.set_online(true, "test");
        let states: Vec<bool> = rec
            .events()
            .into_iter()
            .filter_map(|e| if let Recorded::CameraOnline(_, on) = e { Some(on) } else { None })
            .collect();
        assert_eq!(states, [true, false, true]);
        assert!(w.with_queue(|_| ()).is_some());
        w.close_queue();
        assert!(w.with_queue(|_| ()).is_none());
        assert!(rx.recv().is_err(), "the queue closed with its only sender");
    }
}
