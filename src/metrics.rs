//! Per-camera counters and latency histograms shared by the pipeline stages,
//! read by the periodic `stats` report and by `ganomalyd bench`.
//!
//! Counters are atomics so that the camera thread, the preprocess workers and
//! the inference thread each bump theirs without a lock; only the latency
//! histogram (written by the inference thread alone) sits behind a mutex that
//! readers take briefly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::events::CameraStats;
use crate::shadow::ShadowCompare;

/// Everything counted for one camera.
#[derive(Debug, Default)]
pub struct CameraCounters {
    /// Frames the source delivered.
    pub captured: AtomicU64,
    /// Frames dropped because the stage after the camera was behind (drop-oldest).
    pub dropped: AtomicU64,
    /// Frames that could not be read, decoded or preprocessed, skipped.
    pub broken: AtomicU64,
    /// Frames that reached an alarm decision.
    pub decided: AtomicU64,
    /// Tiles scored (a tiled camera, `tiles.rs`: each of its frames is several
    /// model inputs; every other count here is frames).
    pub tiles: AtomicU64,
    /// The hottest tile of the latest tiled frame, plus one (0: none yet).
    pub hot_tile: AtomicU64,
    pub online: AtomicBool,
    /// Capture → alarm decision.
    pub latency: Mutex<LatencyHistogram>,
    /// The same frames' latency by stage ([`STAGE_NAMES`]).
    pub stages: Mutex<StageLatency>,
    /// The alarm state machine is in an alarm.
    pub alarm_active: AtomicBool,
    /// Alarm `start` events.
    pub alarms_raised: AtomicU64,
    /// The latest normalised score (f64 bits; 0.5 = the calibrated threshold).
    pub last_score: AtomicU64,
    /// The video decoder the source uses, once known (GStreamer sources).
    pub decoder: Mutex<Option<String>>,
    /// Score drift (`drift`): the latest shift of the alarm-free scores' median
    /// in reference spreads (f64 bits), once judged.
    pub drift_shift: AtomicU64,
    pub drift_known: AtomicBool,
    /// Operator feedback stored: alarms confirmed false (`ok`), and confirmed defects.
    pub feedback_false_alarms: AtomicU64,
    pub feedback_defects: AtomicU64,
    /// The comparison with the camera's shadow model, while it has one.
    pub shadow: Mutex<Option<Arc<ShadowCompare>>>,
    /// Verdicts of a triggered camera, by outcome.
    pub verdicts_ok: AtomicU64,
    pub verdicts_ng: AtomicU64,
    pub verdicts_error: AtomicU64,
    pub verdicts_timeout: AtomicU64,
    /// Triggers refused because their part id was answered (or pending) already.
    pub triggers_duplicate: AtomicU64,
    /// Triggers refused for their payload (no part id, bad `ts`).
    pub triggers_refused: AtomicU64,
    /// The camera is triggered (its stats carry verdict counts).
    pub triggered: AtomicBool,
}

impl CameraCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The camera's shadow comparison from now on (`None`: no shadow).
    pub fn set_shadow(&self, shadow: Option<Arc<ShadowCompare>>) {
        if let Ok(mut s) = self.shadow.lock() {
            *s = shadow;
        }
    }

    pub fn shadow(&self) -> Option<Arc<ShadowCompare>> {
        self.shadow.lock().ok().and_then(|s| s.clone())
    }

    pub fn set_decoder(&self, decoder: String) {
        if let Ok(mut d) = self.decoder.lock() {
            *d = Some(decoder);
        }
    }

    /// Tile `index` (row-major in the camera's grid) had the frame's score.
    pub fn set_hot_tile(&self, index: usize) {
        self.hot_tile.store(index as u64 + 1, Ordering::Relaxed);
    }

    /// The hottest tile of the latest tiled frame (`None` before one, or untiled).
    pub fn hot_tile(&self) -> Option<u64> {
        self.hot_tile.load(Ordering::Relaxed).checked_sub(1)
    }

    pub fn set_last_score(&self, score: f64) {
        self.last_score.store(score.to_bits(), Ordering::Relaxed);
    }

    pub fn last_score(&self) -> f64 {
        f64::from_bits(self.last_score.load(Ordering::Relaxed))
    }

    pub fn set_drift_shift(&self, shift: f64) {
        self.drift_shift.store(shift.to_bits(), Ordering::Relaxed);
        self.drift_known.store(true, Ordering::Relaxed);
    }

    /// NaN until the first judgement (a 0 would read as "no drift").
    pub fn drift_shift(&self) -> f64 {
        if self.drift_known.load(Ordering::Relaxed) {
            f64::from_bits(self.drift_shift.load(Ordering::Relaxed))
        } else {
            f64::NAN
        }
    }

    /// A decided frame's capture → decision latency, and (when known) the
    /// same latency by stage. Both are recorded under both locks (latency,
    /// then stages: the order [`reset_latency`](Self::reset_latency) takes
    /// them in), so every frame is in both histograms or in neither.
    pub fn record_latency(&self, ms: f64, stages: Option<[f64; STAGES]>) {
        if let Ok(mut h) = self.latency.lock() {
            h.record(ms);
            if let (Some(parts), Ok(mut s)) = (stages, self.stages.lock()) {
                s.record(parts);
            }
        }
    }

    /// Empties both latency histograms at once (`bench`, after its warm-up).
    pub fn reset_latency(&self) {
        if let Ok(mut h) = self.latency.lock() {
            *h = LatencyHistogram::default();
            if let Ok(mut s) = self.stages.lock() {
                *s = StageLatency::default();
            }
        }
    }

    /// A stats entry; `fps` is computed by the caller from two snapshots.
    pub fn stats(&self, camera: &str, fps: f64) -> CameraStats {
        let (p50, p99) = self.latency.lock().map(|h| (h.quantile(0.5), h.quantile(0.99))).unwrap_or((0.0, 0.0));
        CameraStats {
            camera: camera.to_string(),
            online: self.online.load(Ordering::Relaxed),
            fps,
            frames: Self::get(&self.decided),
            dropped: Self::get(&self.dropped),
            broken: Self::get(&self.broken),
            latency_p50_ms: p50,
            latency_p99_ms: p99,
            decoder: self.decoder.lock().ok().and_then(|d| d.clone()),
            drift_shift: Some(self.drift_shift()).filter(|v| v.is_finite()),
            feedback_false_alarms: Self::get(&self.feedback_false_alarms),
            feedback_defects: Self::get(&self.feedback_defects),
            shadow: self.shadow().map(|s| s.stats()),
            verdicts: self.triggered.load(Ordering::Relaxed).then(|| crate::events::VerdictStats {
                ok: Self::get(&self.verdicts_ok),
                ng: Self::get(&self.verdicts_ng),
                error: Self::get(&self.verdicts_error),
                timeout: Self::get(&self.verdicts_timeout),
                duplicates: Self::get(&self.triggers_duplicate),
                refused: Self::get(&self.triggers_refused),
            }),
        }
    }
}

/// How many parts a decided frame's latency is cut into.
pub const STAGES: usize = 5;

/// The parts of a frame's capture → decision latency, in the order the frame
/// passes them: waiting in its camera's queue, being preprocessed, waiting for
/// (and in) a batch, the batch's session run, and its decision. `bench` prints
/// them so that a latency figure says where the time went (a hand-off, the
/// batching wait, or ONNX Runtime itself).
pub const STAGE_NAMES: [&str; STAGES] = ["camera queue", "preprocess", "inference queue", "inference run", "decision"];

/// A frame's passage through the preprocessing pool (`preprocess::Prepared`).
#[derive(Debug, Clone, Copy)]
pub struct Stamps {
    /// Taken off its camera's queue.
    pub taken: Instant,
    /// Its tensor written, about to be queued for inference.
    pub ready: Instant,
}

/// When a frame passed the pipeline's hand-offs after its capture: the
/// preprocessing pool's stamps, and its batch's session run (start, end).
#[derive(Debug, Clone, Copy)]
pub struct Passage {
    pub pool: Stamps,
    pub run: (Instant, Instant),
}

/// A frame's latency by stage ([`STAGE_NAMES`]), in ms: from capture to the
/// pool taking it, the pool's work, from then to its batch's session run (the
/// inference queue and the batching wait), the run, and from the run's end to
/// its decision at `decided` (the frames before it in the batch are decided
/// first). With the clocks in order (they are: each stamp is read after the
/// one before it, on the thread the frame was handed to) the parts add up to
/// `decided − captured`; a stamp out of order counts as 0, never negative.
pub fn stage_ms(captured: Instant, p: &Passage, decided: Instant) -> [f64; STAGES] {
    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1000.0;
    let Stamps { taken, ready } = p.pool;
    [ms(captured, taken), ms(taken, ready), ms(ready, p.run.0), ms(p.run.0, p.run.1), ms(p.run.1, decided)]
}

/// One [`LatencyHistogram`] per stage of [`STAGE_NAMES`].
#[derive(Debug, Clone, Default)]
pub struct StageLatency(pub [LatencyHistogram; STAGES]);

impl StageLatency {
    pub fn record(&mut self, ms: [f64; STAGES]) {
        for (h, v) in self.0.iter_mut().zip(ms) {
            h.record(v);
        }
    }

    pub fn merge(&mut self, other: &StageLatency) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            a.merge(b);
        }
    }
}

/// Log-scaled histogram of milliseconds: fixed memory whatever the run length,
/// about 2 % resolution from 10 µs to 100 s.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
    max_ms: f64,
}

const LOWEST_MS: f64 = 0.01;
const GROWTH: f64 = 1.02;
const BUCKETS: usize = 820; // LOWEST_MS · 1.02^820 ≈ 113 s

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { counts: vec![0; BUCKETS], total: 0, max_ms: 0.0 }
    }
}

impl LatencyHistogram {
    fn bucket(ms: f64) -> usize {
        // NaN and anything at or below the floor land in the first bucket.
        if ms.is_nan() || ms <= LOWEST_MS {
            return 0;
        }
        (((ms / LOWEST_MS).ln() / GROWTH.ln()).ceil() as usize).min(BUCKETS - 1)
    }

    pub fn record(&mut self, ms: f64) {
        self.counts[Self::bucket(ms)] += 1;
        self.total += 1;
        if ms > self.max_ms {
            self.max_ms = ms;
        }
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest value recorded.
    pub fn max_ms(&self) -> f64 {
        self.max_ms
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max_ms = self.max_ms.max(other.max_ms);
    }

    /// Upper edge of the bucket holding quantile `q` (0 when empty).
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return (LOWEST_MS * GROWTH.powi(i as i32)).min(self.max_ms);
            }
        }
        self.max_ms
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mb() -> Option<f64> {
    status_mb("VmHWM")
}

/// Resident set size of this process now, in MiB (Linux `VmRSS`), if known.
pub fn rss_mb() -> Option<f64> {
    status_mb("VmRSS")
}

/// A `kB` figure of `/proc/self/status` (`VmRSS`, `VmHWM`) in MiB.
fn status_mb(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frames_latency_is_cut_at_its_hand_offs() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let p = Passage { pool: Stamps { taken: at(1), ready: at(3) }, run: (at(6), at(10)) };
        let parts = stage_ms(t0, &p, at(11));
        assert_eq!(parts, [1.0, 2.0, 3.0, 4.0, 1.0]);
        // In order, the parts add up to capture → decision.
        assert_eq!(parts.iter().sum::<f64>(), 11.0);
        // A stamp before the one it follows is 0, never negative.
        let p = Passage { pool: Stamps { taken: at(1), ready: at(3) }, run: (at(3), at(4)) };
        assert_eq!(stage_ms(at(2), &p, at(4)), [0.0, 2.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn a_frame_is_in_both_latency_histograms_or_in_neither() {
        let c = CameraCounters::default();
        c.record_latency(5.0, Some([1.0, 1.0, 1.0, 1.0, 1.0]));
        // A frame whose stages are unknown counts in the whole only.
        c.record_latency(7.0, None);
        let count = |c: &CameraCounters| {
            let s = c.stages.lock().expect("stages");
            (c.latency.lock().expect("latency").count(), s.0.iter().map(LatencyHistogram::count).collect::<Vec<_>>())
        };
        assert_eq!(count(&c), (2, vec![1; STAGES]));
        c.reset_latency();
        assert_eq!(count(&c), (0, vec![0; STAGES]));
    }

    #[test]
    fn quantiles_are_within_the_bucket_resolution() {
        let mut h = LatencyHistogram::default();
        for i in 1..=1000 {
            h.record(i as f64 / 10.0); // 0.1 .. 100 ms
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((p50 - 50.0).abs() / 50.0 < 0.025, "p50 {p50}");
        assert!((p99 - 99.0).abs() / 99.0 < 0.025, "p99 {p99}");
        assert_eq!(h.quantile(1.0), 100.0);
        assert_eq!(LatencyHistogram::default().quantile(0.5), 0.0);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = LatencyHistogram::default();
        let mut b = LatencyHistogram::default();
        a.record(1.0);
        b.record(3.0);
        b.record(3.0);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert!((a.quantile(0.5) - 3.0).abs() < 0.1);
    }

    #[test]
    fn peak_rss_is_readable_on_linux() {
        assert!(peak_rss_mb().is_some_and(|mb| mb > 0.0));
        // The peak is never below the current figure.
        let (now, peak) = (rss_mb().unwrap_or(0.0), peak_rss_mb().unwrap_or(0.0));
        assert!(now > 0.0 && peak >= now, "VmRSS {now} MiB, VmHWM {peak} MiB");
    }
}
