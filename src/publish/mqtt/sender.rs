//! The sender task: turns what the pipeline handed over into publishes on the
//! current connection (scores, camera state, snapshots, stats, discovery;
//! each stats report once, as the pipeline hands it over: no timer here),
//! sends outbox rows within the alarm window and deletes each on its PUBACK,
//! re-publishes the retained state after every (re)connect, and drives the
//! clean stop. Packet-id bookkeeping is [`Delivery`]'s.

use crate::base::report::chain;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Outgoing, QoS};
use tokio::sync::{mpsc, watch};

use super::handoff::{inc, CameraState, Leaf, Shared};
use super::link::Link;
use super::state::{Action, Delivery, Tag};
use crate::events::{now_ms, ScoreEvent, StatsReport};
use crate::publish::discovery;

/// How long a clean stop waits for `offline` and in-flight alarms to be
/// acknowledged before it disconnects anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Retry tick for publishes refused because rumqttc's request queue was full,
/// and for the outbox age bound.
const HOUSEKEEPING: Duration = Duration::from_millis(250);
const PRUNE_EVERY: Duration = Duration::from_secs(60);

pub(super) struct SendTask {
    shared: Arc<Shared>,
    /// The current connection's client; None while there is none.
    client: Option<AsyncClient>,
    delivery: Delivery,
    discovery: Option<String>,
    /// Cameras whose discovery config went out on this connection.
    discovered: HashSet<String>,
}

impl SendTask {
    /// `alarm_window`: alarms awaiting their PUBACK at once; `discovery`: the
    /// Home Assistant prefix, when discovery is on.
    pub(super) fn new(shared: Arc<Shared>, alarm_window: usize, discovery: Option<String>) -> Self {
        SendTask { shared, client: None, delivery: Delivery::new(alarm_window), discovery, discovered: HashSet::new() }
    }

    pub(super) async fn run(
        mut self,
        mut scores: mpsc::Receiver<ScoreEvent>,
        mut link: mpsc::UnboundedReceiver<Link>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = Instant::now();
        let shared = self.shared.clone();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                msg = link.recv() => match msg {
                    Some(msg) => self.on_link(msg),
                    None => return,
                },
                Some(ev) = scores.recv() => self.publish_score(&ev),
                _ = shared.wake.notified() => self.flush(),
                _ = housekeeping.tick() => {
                    self.flush();
                    if last_prune.elapsed() >= PRUNE_EVERY {
                        last_prune = Instant::now();
                        if let Err(e) = self.shared.outbox.prune_expired(now_ms()) {
                            tracing::error!(error = %e, "alarm outbox prune failed");
                        }
                    }
                }
            }
        }
        self.stop_cleanly(&mut link).await;
    }

    async fn stop_cleanly(&mut self, link: &mut mpsc::UnboundedReceiver<Link>) {
        if self.client.is_none() {
            tracing::info!("MQTT publisher stopped (not connected)");
            return;
        }
        // What the pipeline said last (cameras going offline) goes out first.
        self.flush();
        self.publish(self.shared.topics.status(), QoS::AtLeastOnce, true, b"offline".to_vec(), Tag::Offline);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while !self.delivery.drained() {
            match tokio::time::timeout_at(deadline, link.recv()).await {
                Ok(Some(msg)) => self.on_link(msg),
                _ => break,
            }
        }
        let Some(client) = &self.client else {
            tracing::warn!("MQTT connection lost while stopping");
            return;
        };
        let _ = client.try_disconnect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, link.recv()).await {
            if let Link::Event { event: Event::Outgoing(Outgoing::Disconnect), .. } = msg {
                break;
            }
        }
        let c = self.shared.counters();
        tracing::info!(
            alarms_pending = c.alarms_pending,
            scores_dropped = c.scores_dropped,
            "MQTT publisher stopped: offline published, disconnected"
        );
        self.shared.counters.connected.store(false, Ordering::Relaxed);
    }

    fn on_link(&mut self, msg: Link) {
        match msg {
            Link::Up { gen, client } => {
                let n = self.shared.counters.connects.fetch_add(1, Ordering::Relaxed) + 1;
                self.shared.counters.connected.store(true, Ordering::Relaxed);
                tracing::info!(connects = n, pending_alarms = self.shared.outbox.len().unwrap_or(0), "MQTT connected");
                self.client = Some(client);
                self.delivery.connected(gen);
                self.discovered.clear();
                self.republish_retained();
                self.flush();
            }
            Link::Down { gen, error, retry_in } => {
                let retry_in_ms = retry_in.as_millis() as u64;
                if self.delivery.disconnected(gen) {
                    self.client = None;
                    self.shared.counters.connected.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %chain(&error), retry_in_ms, "MQTT connection lost; alarms queue in the outbox");
                } else {
                    tracing::warn!(error = %chain(&error), retry_in_ms, "MQTT connect failed");
                }
            }
            Link::Event { gen, event } => {
                if let Action::DeleteRow(row) = self.delivery.on_event(gen, &event) {
                    inc(&self.shared.counters.alarms_acked);
                    if let Err(e) = self.shared.outbox.ack(row) {
                        tracing::error!(error = %e, row, "alarm outbox delete failed: it will be sent again");
                    }
                    self.pump_alarms();
                }
            }
        }
    }

    /// Hands one publish to rumqttc; false if there is no connection or its
    /// request queue is full.
    fn publish(&mut self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>, tag: Tag) -> bool {
        let Some(client) = &self.client else { return false };
        match client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                self.delivery.queued(tag);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "publish not queued");
                false
            }
        }
    }

    fn publish_score(&mut self, ev: &ScoreEvent) {
        let counters = &self.shared.counters;
        if self.client.is_none() {
            inc(&counters.scores_dropped);
            return;
        }
        self.discover(&ev.camera);
        let payload = match serde_json::to_vec(ev) {
            Ok(p) => p,
            Err(_) => return,
        };
        let topic = self.shared.topics.camera(&ev.camera, "score");
        if self.publish(topic, QoS::AtMostOnce, false, payload, Tag::Other) {
            inc(&self.shared.counters.scores_published);
        } else {
            inc(&self.shared.counters.scores_dropped);
        }
    }

    /// The pipeline's report plus the publisher's own counters under `mqtt`;
    /// false if rumqttc's queue was full.
    fn publish_stats(&mut self, report: &StatsReport) -> bool {
        let counters = self.shared.counters();
        tracing::debug!(?counters, "publisher counters");
        let mut v = match serde_json::to_value(report) {
            Ok(v) => v,
            Err(_) => return true,
        };
        if let (Some(obj), Ok(c)) = (v.as_object_mut(), serde_json::to_value(counters)) {
            obj.insert("mqtt".into(), c);
        }
        let topic = self.shared.topics.stats();
        self.publish(topic, QoS::AtMostOnce, false, v.to_string().into_bytes(), Tag::Other)
    }

    fn state_payload(leaf: Leaf, st: CameraState) -> Option<&'static [u8]> {
        match leaf {
            Leaf::Camera => st.online.map(|o| if o { &b"online"[..] } else { &b"offline"[..] }),
            Leaf::State => st.alarm.map(|a| if a { &b"ON"[..] } else { &b"OFF"[..] }),
        }
    }

    fn publish_state(&mut self, camera: &str, leaf: Leaf, st: CameraState) -> bool {
        let Some(payload) = Self::state_payload(leaf, st) else { return true };
        let topic = self.shared.topics.camera(camera, if leaf == Leaf::Camera { "camera" } else { "state" });
        self.publish(topic, QoS::AtLeastOnce, true, payload.to_vec(), Tag::Other)
    }

    /// After a (re)connect: `online` and every camera's last state, since a
    /// broker that restarted has forgotten its retained messages.
    fn republish_retained(&mut self) {
        self.publish(self.shared.topics.status(), QoS::AtLeastOnce, true, b"online".to_vec(), Tag::Other);
        let cameras = self.shared.pending().cameras.clone();
        for (cam, st) in &cameras {
            self.discover(cam);
            for leaf in [Leaf::Camera, Leaf::State] {
                if !self.publish_state(cam, leaf, *st) {
                    // Queue full: leave it to the next flush.
                    self.shared.with_pending(|p| {
                        p.dirty.insert((cam.clone(), leaf));
                    });
                }
            }
        }
    }

    fn discover(&mut self, camera: &str) {
        let Some(prefix) = self.discovery.clone() else { return };
        if self.client.is_none() || self.discovered.contains(camera) {
            return;
        }
        self.discovered.insert(camera.to_string());
        for (topic, payload) in discovery::camera_configs(&prefix, &self.shared.topics, camera) {
            self.publish(topic, QoS::AtLeastOnce, true, payload, Tag::Other);
        }
    }

    /// Publishes whatever the pipeline left in the pending slots, then alarms.
    fn flush(&mut self) {
        if self.client.is_none() {
            return;
        }
        let (dirty, cameras, snapshots, direct, stats) = {
            let mut p = self.shared.pending();
            let dirty = std::mem::take(&mut p.dirty);
            let cams: BTreeMap<String, CameraState> =
                dirty.iter().filter_map(|(c, _)| p.cameras.get(c).map(|s| (c.clone(), *s))).collect();
            (dirty, cams, std::mem::take(&mut p.snapshots), std::mem::take(&mut p.direct), p.stats.take())
        };
        let mut retry = Vec::new();
        for (cam, leaf) in dirty {
            self.discover(&cam);
            let st = cameras.get(&cam).copied().unwrap_or_default();
            if !self.publish_state(&cam, leaf, st) {
                retry.push((cam, leaf));
            }
        }
        let mut snap_retry = Vec::new();
        for (cam, snap) in snapshots {
            let topic = self.shared.topics.camera(&cam, "snapshot");
            if !self.publish(topic, QoS::AtMostOnce, true, snap.jpeg.clone(), Tag::Other) {
                snap_retry.push((cam, snap));
            }
        }
        let mut direct_retry = VecDeque::new();
        for (cam, payload) in direct {
            let topic = self.shared.topics.camera(&cam, "alarm");
            if !direct_retry.is_empty() || !self.publish(topic, QoS::AtLeastOnce, false, payload.clone(), Tag::Other) {
                direct_retry.push_back((cam, payload));
            }
        }
        // Each report is published once; the pipeline sends the next one.
        let stats_retry = match stats {
            Some(report) if !self.publish_stats(&report) => Some(report),
            _ => None,
        };
        if !retry.is_empty() || !snap_retry.is_empty() || !direct_retry.is_empty() || stats_retry.is_some() {
            let mut p = self.shared.pending();
            if let Some(report) = stats_retry {
                // Queue full: again at the next flush, unless a newer one came.
                p.stats.get_or_insert(report);
            }
            p.dirty.extend(retry);
            for (cam, snap) in snap_retry {
                p.snapshots.entry(cam).or_insert(snap);
            }
            for d in direct_retry.into_iter().rev() {
                p.direct.push_front(d);
            }
        }
        self.pump_alarms();
    }

    /// Sends outbox rows in id order while the window has room.
    fn pump_alarms(&mut self) {
        while let Some(next) = self.delivery.next_rows() {
            let rows = match self.shared.outbox.next_after(next.after, next.limit) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(error = %e, "alarm outbox read failed");
                    return;
                }
            };
            if rows.is_empty() {
                return;
            }
            for row in rows {
                let topic = self.shared.topics.camera(&row.camera, "alarm");
                if !self.publish(topic, QoS::AtLeastOnce, false, row.payload, Tag::Alarm(row.id)) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use rumqttc::{MqttOptions, Packet, PubAck};
    use tokio::sync::Notify;

    use super::super::handoff::{Counters, Pending};
    use super::*;
    use crate::publish::outbox::Outbox;
    use crate::publish::Topics;

    /// A task with a live-looking connection whose requests nobody sends: the
    /// events rumqttc would report are fed in by hand.
    fn task(dir: &std::path::Path, inflight: usize) -> (SendTask, rumqttc::EventLoop) {
        let (scores_tx, _) = mpsc::channel(4);
        let shared = Arc::new(Shared {
            topics: Topics::new("t", "n"),
            scores_tx,
            score_interval: None,
            last_score: Mutex::new(HashMap::new()),
            snapshots: true,
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            outbox: Outbox::open(&dir.join("o.sqlite"), 100, Duration::from_secs(3600)).unwrap(),
            counters: Counters::default(),
        });
        let mut t = SendTask::new(shared, inflight, None);
        let (client, el) = AsyncClient::new(MqttOptions::new("x", "127.0.0.1", 1), 100);
        t.on_link(Link::Up { gen: 1, client });
        (t, el)
    }

    fn ev(t: &mut SendTask, gen: u64, event: Event) {
        t.on_link(Link::Event { gen, event });
    }

    fn puback(pkid: u16) -> Event {
        Event::Incoming(Packet::PubAck(PubAck::new(pkid)))
    }

    fn pending_ids(t: &SendTask) -> Vec<i64> {
        t.shared.outbox.next_after(0, 100).unwrap().iter().map(|r| r.id).collect()
    }

    #[test]
    fn rows_are_deleted_on_their_own_puback_even_across_a_pkid_collision() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, _el) = task(dir.path(), 10);
        let ids: Vec<i64> = (0..3).map(|_| t.shared.outbox.push("cam", b"{}", now_ms()).unwrap()).collect();
        t.flush();
        assert_eq!(t.delivery.alarms_in_flight(), 3);
        // `online` went first (republish on connect), untagged.
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(1)));
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(2))); // row 0
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(3))); // row 1
                                                              // Row 2 collides on id 2 (the broker acked out of order).
        ev(&mut t, 1, Event::Outgoing(Outgoing::AwaitAck(2)));
        ev(&mut t, 1, puback(3));
        assert_eq!(pending_ids(&t), [ids[0], ids[2]]);
        // rumqttc 0.24 reported the parked publish before the PUBACK that freed id 2...
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(2)));
        ev(&mut t, 1, puback(2));
        assert_eq!(pending_ids(&t), [ids[2]], "that PUBACK was row 0's, not row 2's");
        ev(&mut t, 1, puback(2));
        assert!(pending_ids(&t).is_empty());
        ev(&mut t, 1, puback(1)); // `online`
        assert_eq!(t.shared.counters().alarms_acked, 3);
        assert_eq!(t.delivery.alarms_in_flight(), 0);
    }

    #[test]
    fn window_limits_in_flight_and_a_reconnect_resends_unacked_rows_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, _el) = task(dir.path(), 2);
        let ids: Vec<i64> = (0..5).map(|_| t.shared.outbox.push("cam", b"{}", now_ms()).unwrap()).collect();
        t.flush();
        assert_eq!((t.delivery.alarms_in_flight(), t.delivery.last_sent()), (2, ids[1]), "window of 2");
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(1))); // online
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(2))); // row 0
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(3))); // row 1
        ev(&mut t, 1, puback(2));
        assert_eq!(t.delivery.last_sent(), ids[2], "an ack opens the window");
        // Connection lost before row 1's ack; events of the dead connection are ignored.
        let eof = rumqttc::ConnectionError::Io(std::io::ErrorKind::UnexpectedEof.into());
        t.on_link(Link::Down { gen: 1, error: eof, retry_in: Duration::from_millis(1) });
        ev(&mut t, 1, puback(3));
        assert_eq!(pending_ids(&t), ids[1..]);
        let (client, _el2) = AsyncClient::new(MqttOptions::new("x", "127.0.0.1", 1), 100);
        t.on_link(Link::Up { gen: 2, client });
        assert_eq!(
            (t.delivery.alarms_in_flight(), t.delivery.last_sent()),
            (2, ids[2]),
            "resent from the oldest unacked row"
        );
        // New connection: online, camera states (none), then rows 1 and 2.
        ev(&mut t, 2, Event::Outgoing(Outgoing::Publish(1)));
        ev(&mut t, 2, Event::Outgoing(Outgoing::Publish(2)));
        ev(&mut t, 2, puback(2));
        assert_eq!(pending_ids(&t), ids[2..]);
    }
}
