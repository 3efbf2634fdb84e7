//! [`Tee`]: one [`Publisher`] that hands every call to several (the plain
//! MQTT topics and the Sparkplug edge node), in order. Each publisher keeps
//! its own non-blocking policy, so the tee adds none.

use std::sync::Arc;
use std::time::Duration;

use crate::commands::CommandEvent;
use crate::events::{AlarmEvent, Publisher, ScoreEvent, Snapshot, StatsReport, VerdictEvent};

pub struct Tee(pub Vec<Arc<dyn Publisher>>);

impl Publisher for Tee {
    fn score(&self, ev: &ScoreEvent) {
        self.0.iter().for_each(|p| p.score(ev))
    }
    fn alarm(&self, ev: &AlarmEvent) {
        self.0.iter().for_each(|p| p.alarm(ev))
    }
    /// Durable only if durable in every publisher (each is asked, none skipped).
    fn alarm_durable(&self, ev: &AlarmEvent, timeout: Duration) -> bool {
        // Not `all`: it would stop asking at the first `false`.
        let answers: Vec<bool> = self.0.iter().map(|p| p.alarm_durable(ev, timeout)).collect();
        answers.into_iter().all(|d| d)
    }
    fn camera_online(&self, camera: &str, online: bool) {
        self.0.iter().for_each(|p| p.camera_online(camera, online))
    }
    fn alarm_state(&self, camera: &str, active: bool) {
        self.0.iter().for_each(|p| p.alarm_state(camera, active))
    }
    fn snapshot(&self, snap: &Snapshot) {
        self.0.iter().for_each(|p| p.snapshot(snap))
    }
    fn stats(&self, report: &StatsReport) {
        self.0.iter().for_each(|p| p.stats(report))
    }
    fn verdict(&self, ev: &VerdictEvent) {
        self.0.iter().for_each(|p| p.verdict(ev))
    }
    fn event(&self, ev: &CommandEvent) {
        self.0.iter().for_each(|p| p.event(ev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Recorded, Recorder};

    #[test]
    fn every_call_reaches_every_publisher_in_order() {
        let (a, b) = (Recorder::default(), Recorder::default());
        let tee = Tee(vec![Arc::new(a.clone()), Arc::new(b.clone())]);
        tee.camera_online("c", true);
        tee.alarm_state("c", true);
        let want = vec![Recorded::CameraOnline("c".into(), true), Recorded::AlarmState("c".into(), true)];
        assert_eq!((a.events(), b.events()), (want.clone(), want));
    }
}
