//! The per-camera alarm state machine (DESIGN.md "Scores and alarms").
//!
//! - Idle: an alarm is raised after `min_frames` *consecutive* frames with a
//!   normalized score ≥ `threshold`; the event's start is the first of them.
//! - Active: it ends after `clear_frames` consecutive frames below
//!   `clear_threshold` (hysteresis: a score between the two thresholds resets
//!   that count, so a part hovering at the threshold does not flap); or when
//!   the daemon stops ([`AlarmMachine::stop`], reason `shutdown`).
//! - Cooldown: for `cooldown_ms` after an end, no new alarm.
//!
//! Time is the frames' capture time, never the clock at decision, so that
//! the same frames give the same events however loaded the machine is. Two
//! clocks: durations (the cooldown) are measured on the monotonic capture
//! instant, which NTP cannot step; the wall-clock `ts_ms` is only published.
//! (On the wall clock, a step back of an hour would have held every alarm
//! off for an hour; a step forward would have cut cooldowns short.)
//!
//! Alarm ids are `<camera>-<first ts>-<n>`, n counting the camera's alarms;
//! the pipeline seeds n from the open-alarm journal (`alarm_state`), so ids
//! stay unique across restarts even when the wall clock repeats itself.

use std::time::{Duration, Instant};

use crate::config::AlarmConfig;
use crate::events::{AlarmEvent, AlarmKind, EndReason, PAYLOAD_SCHEMA};

/// One scored frame as the state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub seq: u64,
    /// Wall-clock capture time, ms since the epoch: published, never subtracted.
    pub ts_ms: u64,
    /// Monotonic capture time: what durations are measured on.
    pub at: Instant,
    pub score: f64,
    pub raw: f64,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Idle {
        run: u64,
        first: Option<Scored>,
        peak: f64,
        peak_raw: f64,
    },
    Active {
        id: String,
        first: Scored,
        last: Scored,
        peak: f64,
        peak_raw: f64,
        frames: u64,
        below: u64,
    },
    /// `until` `None`: longer than an `Instant` can hold, i.e. for the rest of the run.
    Cooldown {
        until: Option<Instant>,
    },
}

/// The id of a camera's `n`th alarm (see the module doc).
pub fn alarm_id(camera: &str, first_ts_ms: u64, n: u64) -> String {
    format!("{camera}-{first_ts_ms}-{n}")
}

/// The `n` of an id made by [`alarm_id`].
pub fn alarm_number(id: &str) -> Option<u64> {
    id.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

/// Alarm state of one camera.
#[derive(Debug, Clone)]
pub struct AlarmMachine {
    camera: String,
    cfg: AlarmConfig,
    state: State,
    /// Number of the last alarm raised (this run or, seeded, before it).
    count: u64,
}

impl AlarmMachine {
    /// `last_number`: the number of this camera's last alarm before this run
    /// (0 if none), so that the next id is new.
    pub fn new(camera: &str, cfg: AlarmConfig, last_number: u64) -> Self {
        AlarmMachine { camera: camera.to_string(), cfg, state: idle(), count: last_number }
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
        if let State::Cooldown { until } = self.state {
            if until.is_none_or(|u| f.at < u) {
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
                        let id = alarm_id(&self.camera, first.ts_ms, self.count);
                        let ev = self.event(&id, AlarmKind::Start, &f, &first, peak, peak_raw, frames);
                        self.state = State::Active { id, first, last: f, peak, peak_raw, frames, below: 0 };
                        return Some(ev);
                    }
                } else {
                    self.state = idle();
                }
                None
            }
            State::Active { id, first, last, peak, peak_raw, frames, below } => {
                *last = f;
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
                    let ev = self.end(&id, EndReason::Cleared, &f, &first, peak, peak_raw, frames);
                    self.state = match cfg.cooldown_ms {
                        0 => idle(),
                        ms => State::Cooldown { until: f.at.checked_add(Duration::from_millis(ms)) },
                    };
                    return Some(ev);
                }
                None
            }
            State::Cooldown { .. } => None,
        }
    }

    /// The daemon is stopping: ends an active alarm (reason `shutdown`, at its
    /// last frame) so that it does not dangle on the broker.
    pub fn stop(&mut self) -> Option<AlarmEvent> {
        self.end_with(EndReason::Shutdown)
    }

    /// Ends an active alarm now, at its last frame, for `reason` (`shutdown`,
    /// or `reload` for a camera a reload removed or restarted); the machine
    /// is idle afterwards and its numbering goes on.
    pub fn end_with(&mut self, reason: EndReason) -> Option<AlarmEvent> {
        let State::Active { id, first, last, peak, peak_raw, frames, .. } = &self.state else { return None };
        let ev = self.end(id, reason, last, first, *peak, *peak_raw, *frames);
        self.state = idle();
        Some(ev)
    }

    pub fn config(&self) -> AlarmConfig {
        self.cfg
    }

    #[allow(clippy::too_many_arguments)]
    fn end(
        &self,
        id: &str,
        reason: EndReason,
        now: &Scored,
        first: &Scored,
        peak: f64,
        peak_raw: f64,
        frames: u64,
    ) -> AlarmEvent {
        let mut ev = self.event(id, AlarmKind::End, now, first, peak, peak_raw, frames);
        ev.end_ts = Some(now.ts_ms);
        ev.reason = Some(reason);
        ev
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
            reason: None,
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

    /// A frame at `ms` on both clocks (the wall clock starting at 1e12).
    fn at(t0: Instant, seq: u64, ms: u64, score: f64) -> Scored {
        Scored { seq, ts_ms: 1_000_000_000_000 + ms, at: t0 + Duration::from_millis(ms), score, raw: score * 10.0 }
    }

    /// Runs scores through a machine; frame i has seq i and is 100·i ms in.
    fn run(m: &mut AlarmMachine, scores: &[f64]) -> Vec<(AlarmKind, u64, u64, u64)> {
        let t0 = Instant::now();
        scores
            .iter()
            .enumerate()
            .filter_map(|(i, &s)| m.observe(at(t0, i as u64, 100 * i as u64, s)))
            .map(|e| (e.kind, e.first_seq, e.seq, e.frames))
            .collect()
    }

    #[test]
    fn raises_after_min_consecutive_frames_and_clears_after_clear_frames() {
        let mut m = AlarmMachine::new("c", cfg(3, 2, 0), 0);
        let ev = run(&mut m, &[0.1, 0.6, 0.7, 0.1, 0.6, 0.7, 0.9, 0.8, 0.3, 0.45, 0.3, 0.3, 0.1]);
        // Run at 1-2 broken by 3; run 4-6 raises at 6; 8 below, 9 in the band
        // (resets), 10 and 11 below → end at 11.
        assert_eq!(ev, vec![(AlarmKind::Start, 4, 6, 3), (AlarmKind::End, 4, 11, 4)]);
    }

    #[test]
    fn events_carry_id_peak_times_and_reason() {
        let t0 = Instant::now();
        let mut m = AlarmMachine::new("line3", cfg(1, 1, 0), 0);
        let s = m.observe(at(t0, 7, 700, 0.6)).expect("start");
        assert!(m.observe(at(t0, 8, 800, 0.95)).is_none());
        let e = m.observe(at(t0, 9, 900, 0.1)).expect("end");
        assert_eq!(s.id, e.id);
        assert_eq!(s.id, alarm_id("line3", 1_000_000_000_700, 1));
        assert_eq!(alarm_number(&s.id), Some(1));
        let wall = 1_000_000_000_000;
        assert_eq!((e.start_ts, e.end_ts, e.peak, e.peak_raw, e.frames), (wall + 700, Some(wall + 900), 0.95, 9.5, 2));
        assert_eq!((s.end_ts, s.reason, e.reason), (None, None, Some(EndReason::Cleared)));
        let s2 = m.observe(at(t0, 10, 1000, 0.9)).expect("second alarm");
        assert_ne!(s2.id, s.id);
    }

    #[test]
    fn numbering_continues_after_the_seeded_last_number() {
        // The same camera, the same wall-clock ms (a box whose clock came back
        // to the same time after a restart): the id still differs.
        let t0 = Instant::now();
        let first = AlarmMachine::new("cam-1", cfg(1, 1, 0), 0).observe(at(t0, 0, 0, 0.9)).expect("start");
        let again = AlarmMachine::new("cam-1", cfg(1, 1, 0), 41).observe(at(t0, 0, 0, 0.9)).expect("start");
        assert_eq!(alarm_number(&first.id), Some(1));
        assert_eq!(alarm_number(&again.id), Some(42));
        assert_ne!(first.id, again.id);
    }

    #[test]
    fn stop_ends_an_active_alarm_at_its_last_frame_and_nothing_else() {
        let t0 = Instant::now();
        let mut m = AlarmMachine::new("c", cfg(1, 3, 0), 0);
        assert!(m.stop().is_none(), "idle: nothing to end");
        let s = m.observe(at(t0, 1, 100, 0.9)).expect("start");
        assert!(m.observe(at(t0, 2, 200, 0.97)).is_none());
        let e = m.stop().expect("an end on stop");
        assert_eq!((e.kind, e.reason), (AlarmKind::End, Some(EndReason::Shutdown)));
        assert_eq!((e.id.as_str(), e.seq, e.end_ts, e.peak, e.frames), (s.id.as_str(), 2, Some(e.ts), 0.97, 2));
        assert!(!m.is_active() && m.stop().is_none(), "ended once");
    }

    #[test]
    fn cooldown_suppresses_new_alarms_for_its_duration() {
        let mut m = AlarmMachine::new("c", cfg(1, 1, 250), 0);
        // start 0, end 1 (100 ms); cooldown until 350 ms: frames 2 and 3 ignored, 4 raises.
        let ev = run(&mut m, &[0.9, 0.1, 0.9, 0.9, 0.9]);
        assert_eq!(ev, vec![(AlarmKind::Start, 0, 0, 1), (AlarmKind::End, 0, 1, 1), (AlarmKind::Start, 4, 4, 1)]);
    }

    #[test]
    fn cooldown_follows_the_monotonic_clock_when_the_wall_clock_steps() {
        let t0 = Instant::now();
        let hour = 3_600_000;
        let frame = |seq, mono_ms, wall_ms, score| Scored {
            seq,
            ts_ms: wall_ms,
            at: t0 + Duration::from_millis(mono_ms),
            score,
            raw: score,
        };
        // NTP steps the wall clock back an hour right after the end: the
        // cooldown (1 s) still ends 1 s later.
        let mut m = AlarmMachine::new("c", cfg(1, 1, 1000), 0);
        assert!(m.observe(frame(0, 0, 10 * hour, 0.9)).is_some());
        assert!(m.observe(frame(1, 100, 10 * hour + 100, 0.1)).is_some(), "end");
        assert!(m.observe(frame(2, 600, 9 * hour + 600, 0.9)).is_none(), "within the cooldown");
        assert!(m.observe(frame(3, 1200, 9 * hour + 1200, 0.9)).is_some(), "cooldown over after 1.1 s");
        // Stepped forward an hour: the cooldown is not cut short.
        let mut m = AlarmMachine::new("c", cfg(1, 1, 1000), 0);
        assert!(m.observe(frame(0, 0, 10 * hour, 0.9)).is_some());
        assert!(m.observe(frame(1, 100, 10 * hour + 100, 0.1)).is_some(), "end");
        assert!(m.observe(frame(2, 600, 11 * hour + 600, 0.9)).is_none(), "still within the cooldown");
    }

    #[test]
    fn a_huge_cooldown_suppresses_without_overflowing_the_instant() {
        let mut m = AlarmMachine::new("c", cfg(1, 1, u64::MAX), 0);
        let ev = run(&mut m, &[0.9, 0.1, 0.9, 0.9]);
        assert_eq!(ev.len(), 2, "{ev:?}");
    }

    #[test]
    fn threshold_is_inclusive_and_clear_is_exclusive() {
        let t0 = Instant::now();
        let mut m = AlarmMachine::new("c", cfg(1, 1, 0), 0);
        assert!(m.observe(at(t0, 0, 0, 0.5)).is_some());
        assert!(m.observe(at(t0, 1, 1, 0.4)).is_none());
        assert!(m.is_active());
        assert!(m.observe(at(t0, 2, 2, 0.399)).is_some());
        assert!(!m.is_active());
    }
}
