//! [`Tee`]: one [`Publisher`] that hands every call to several (MQTT and the
//! console). Each of them must not block, so neither can the tee.

use std::sync::Arc;
use std::time::Duration;

use crate::commands::CommandEvent;
use crate::events::{AlarmEvent, Publisher, ScoreEvent, Snapshot, StatsReport, VerdictEvent};

/// Forwards to `primary`, then to each of `others`. Only the primary's
/// durability counts for [`Publisher::alarm_durable`]: the others (views such
/// as the console) are handed the alarm and not waited for.
pub struct Tee {
    primary: Arc<dyn Publisher>,
    others: Vec<Arc<dyn Publisher>>,
}

impl Tee {
    pub fn new(primary: Arc<dyn Publisher>, others: Vec<Arc<dyn Publisher>>) -> Tee {
        Tee { primary, others }
    }

    fn each(&self, f: impl Fn(&dyn Publisher)) {
        f(&*self.primary);
        for p in &self.others {
            f(&**p);
        }
    }
}

impl Publisher for Tee {
    fn score(&self, ev: &ScoreEvent) {
        self.each(|p| p.score(ev));
    }
    fn alarm(&self, ev: &AlarmEvent) {
        self.each(|p| p.alarm(ev));
    }
    fn alarm_durable(&self, ev: &AlarmEvent, timeout: Duration) -> bool {
        for p in &self.others {
            p.alarm(ev);
        }
        self.primary.alarm_durable(ev, timeout)
    }
    fn camera_online(&self, camera: &str, online: bool) {
        self.each(|p| p.camera_online(camera, online));
    }
    fn alarm_state(&self, camera: &str, active: bool) {
        self.each(|p| p.alarm_state(camera, active));
    }
    fn snapshot(&self, snap: &Snapshot) {
        self.each(|p| p.snapshot(snap));
    }
    fn stats(&self, report: &StatsReport) {
        self.each(|p| p.stats(report));
    }
    fn verdict(&self, ev: &VerdictEvent) {
        self.each(|p| p.verdict(ev));
    }
    fn event(&self, ev: &CommandEvent) {
        self.each(|p| p.event(ev));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Recorded, Recorder};

    #[test]
    fn every_call_reaches_every_publisher_and_durability_is_the_primarys() {
        let (a, b) = (Recorder::default(), Recorder::default());
        let tee = Tee::new(Arc::new(a.clone()), vec![Arc::new(b.clone())]);
        tee.camera_online("cam", true);
        tee.alarm_state("cam", false);
        let ev = CommandEvent::spontaneous("drift", Some("cam"), crate::commands::Status::Done);
        tee.event(&ev);
        for r in [&a, &b] {
            assert_eq!(
                r.events(),
                vec![
                    Recorded::CameraOnline("cam".into(), true),
                    Recorded::AlarmState("cam".into(), false),
                    Recorded::Event(ev.clone())
                ]
            );
        }
    }
}
