//! The per-camera alarm state machine (DESIGN.md "Scores and alarms").
//!
//! - Idle: an alarm is raised after `min_frames` *consecutive* frames with a
//!   normalized score ≥ `threshold`; the event's start is the first of them.
//! - Active: it ends after `clear_frames` consecutive frames below
//!   `clear_threshold` (hysteresis: a score between the two thresholds resets
//!   that count, so a part hovering at the threshold does not flap).
//! - Cooldown: for `cooldown_ms` after an end (frame time), no new alarm.
//!
//! Time is the frames' capture time, never the clock at decision, so that
//! the same frames give the same events however loaded the machine is.

use crate::config::AlarmConfig;
use crate::events::{AlarmEvent, AlarmKind, PAYLOAD_SCHEMA};

/// One scored frame as the state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub seq: u64,
    pub ts_ms: u64,
    pub score: f64,
    pub raw: f64,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Idle { run: u64, first: Option<Scored>, peak: f64, peak_raw: f64 },
    Active { id: String, first: Scored, peak: f64, peak_raw: f64, frames: u64, below: u64 },
    Cooldown { until_ms: u64 },
}

/// Alarm state of one camera.
#[derive(Debug, Clone)]
pub struct AlarmMachine {
    camera: String,
    cfg: AlarmConfig,
    state: State,
    /// Alarms raised so far, for unique ids.
    count: u64,
}

impl AlarmMachine {
    pub fn new(camera: &str, cfg: AlarmConfig) -> Self {
        AlarmMachine { camera: camera.to_string(), cfg, state: idle(), count: 0 }
    }

    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active { .. })
    }

    /// New thresholds/timing (SIGHUP). An alarm in progress carries on under them.
    pub fn reconfigure(&mut self, cfg: AlarmConfig) {
        self.cfg = cfg;
    }

    /// Feeds one frame; returns the event it causes, if any.
    pub fn observe(&mut self, f: Scored) -> Option<AlarmEvent> {
        let cfg = self.cfg;
        if let State::Cooldown { until_ms } = self.state {
            if f.ts_ms < until_ms {
                return None;
            }
            self.state = idle();
        }
        match &mut self.state {
            State::Idle { run, first, peak, peak_raw } => {
                if f.score >= cfg.threshold {
                    if *run == 0 {
                        *first = Some(f);
                        *peak = f.score;
                        *peak_raw = f.raw;
                    } else if f.score > *peak {
                        *peak = f.score;
                        *peak_raw = f.raw;
                    }
                    *run += 1;
                    if *run >= cfg.min_frames {
                        let first = first.unwrap_or(f);
                        let (peak, peak_raw, frames) = (*peak, *peak_raw, *run);
                        self.count += 1;
                        let id = format!("{}-{}-{}", self.camera, first.ts_ms, self.count);
                        let ev = self.event(&id, AlarmKind::Start, &f, &first, peak, peak_raw, frames);
                        self.state = State::Active { id, first, peak, peak_raw, frames, below: 0 };
                        return Some(ev);
                    }
                } else {
                    self.state = idle();
                }
                None
            }
            State::Active { id, first, peak, peak_raw, frames, below } => {
                if f.score > *peak {
                    *peak = f.score;
                    *peak_raw = f.raw;
                }
                if f.score >= cfg.threshold {
                    *frames += 1;
                }
                if f.score < cfg.clear_threshold {
                    *below += 1;
                } else {
                    *below = 0;
                }
                if *below >= cfg.clear_frames {
                    let (id, first, peak, peak_raw, frames) = (id.clone(), *first, *peak, *peak_raw, *frames);
                    let mut ev = self.event(&id, AlarmKind::End, &f, &first, peak, peak_raw, frames);
                    ev.end_ts = Some(f.ts_ms);
                    self.state = if cfg.cooldown_ms > 0 {
                        State::Cooldown { until_ms: f.ts_ms.saturating_add(cfg.cooldown_ms) }
                    } else {
                        idle()
                    };
                    return Some(ev);
                }
                None
            }
            State::Cooldown { .. } => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        id: &str,
        kind: AlarmKind,
        now: &Scored,
        first: &Scored,
        peak: f64,
        peak_raw: f64,
        frames: u64,
    ) -> AlarmEvent {
        AlarmEvent {
            schema: PAYLOAD_SCHEMA,
            id: id.to_string(),
            camera: self.camera.clone(),
            kind,
            ts: now.ts_ms,
            start_ts: first.ts_ms,
            end_ts: None,
            peak,
            peak_raw,
            frames,
            first_seq: first.seq,
            seq: now.seq,
            snapshot: None,
        }
    }
}

fn idle() -> State {
    State::Idle { run: 0, first: None, peak: 0.0, peak_raw: 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(min_frames: u64, clear_frames: u64, cooldown_ms: u64) -> AlarmConfig {
        AlarmConfig { threshold: 0.5, clear_threshold: 0.4, min_frames, clear_frames, cooldown_ms }
    }

    /// Runs scores through a machine; frame i has seq i and ts 100·i.
    fn run(m: &mut AlarmMachine, scores: &[f64]) -> Vec<(AlarmKind, u64, u64, u64)> {
        scores
            .iter()
            .enumerate()
            .filter_map(|(i, &s)| m.observe(Scored { seq: i as u64, ts_ms: 100 * i as u64, score: s, raw: s * 10.0 }))
            .map(|e| (e.kind, e.first_seq, e.seq, e.frames))
            .collect()
    }

    #[test]
    fn raises_after_min_consecutive_frames_and_clears_after_clear_frames() {
        let mut m = AlarmMachine::new("c", cfg(3, 2, 0));
        let ev = run(&mut m, &[0.1, 0.6, 0.7, 0.1, 0.6, 0.7, 0.9, 0.8, 0.3, 0.45, 0.3, 0.3, 0.1]);
        // Run at 1-2 broken by 3; run 4-6 raises at 6; 8 below, 9 in the band
        // (resets), 10 and 11 below → end at 11.
        assert_eq!(ev, vec![(AlarmKind::Start, 4, 6, 3), (AlarmKind::End, 4, 11, 4)]);
    }

    #[test]
    fn events_carry_id_peak_and_times() {
        let mut m = AlarmMachine::new("line3", cfg(1, 1, 0));
        let s = m.observe(Scored { seq: 7, ts_ms: 700, score: 0.6, raw: 6.0 }).expect("start");
        assert!(m.observe(Scored { seq: 8, ts_ms: 800, score: 0.95, raw: 9.5 }).is_none());
        let e = m.observe(Scored { seq: 9, ts_ms: 900, score: 0.1, raw: 1.0 }).expect("end");
        assert_eq!(s.id, e.id);
        assert!(s.id.starts_with("line3-700-"));
        assert_eq!((e.start_ts, e.end_ts, e.peak, e.peak_raw, e.frames), (700, Some(900), 0.95, 9.5, 2));
        assert_eq!(s.end_ts, None);
        let s2 = m.observe(Scored { seq: 10, ts_ms: 1000, score: 0.9, raw: 9.0 }).expect("second alarm");
        assert_ne!(s2.id, s.id);
    }

    #[test]
    fn cooldown_suppresses_new_alarms_for_its_duration() {
        let mut m = AlarmMachine::new("c", cfg(1, 1, 250));
        // start 0, end 1 (ts 100); cooldown until ts 350: frames 2 and 3 ignored, 4 raises.
        let ev = run(&mut m, &[0.9, 0.1, 0.9, 0.9, 0.9]);
        assert_eq!(ev, vec![(AlarmKind::Start, 0, 0, 1), (AlarmKind::End, 0, 1, 1), (AlarmKind::Start, 4, 4, 1)]);
    }

    #[test]
    fn threshold_is_inclusive_and_clear_is_exclusive() {
        let mut m = AlarmMachine::new("c", cfg(1, 1, 0));
        assert!(m.observe(Scored { seq: 0, ts_ms: 0, score: 0.5, raw: 0.0 }).is_some());
        assert!(m.observe(Scored { seq: 1, ts_ms: 1, score: 0.4, raw: 0.0 }).is_none());
        assert!(m.is_active());
        assert!(m.observe(Scored { seq: 2, ts_ms: 2, score: 0.399, raw: 0.0 }).is_some());
        assert!(!m.is_active());
    }
}
