//! The sender task: turns what the pipeline handed over into publishes on the
//! current connection (scores, camera state, snapshots, stats, discovery;
//! each stats report once, as the pipeline hands it over: no timer here),
//! sends outbox rows within the alarm window and deletes each on its PUBACK,
//! dead-letters a row the broker keeps closing the connection on,
//! re-publishes the retained state after every (re)connect, and drives the
//! clean stop. Packet-id bookkeeping is [`Delivery`]'s.
//!
//! Outbox rows are asked for from the outbox thread (one read at a time, the
//! answer arrives as an event of this task's loop): no SQLite on the network
//! runtime's worker.

use crate::base::report::chain;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing, QoS};
use tokio::sync::{mpsc, watch};

use super::handoff::{inc, CameraState, Leaf, Shared};
use super::link::Link;
use super::state::{Action, Delivery, Tag};
use crate::events::{ScoreEvent, StatsReport};
use crate::publish::discovery;
use crate::publish::outbox::RowsReply;

/// How long a clean stop waits for `offline` and in-flight alarms to be
/// acknowledged before it disconnects anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Retry tick for publishes refused because rumqttc's request queue was full.
const HOUSEKEEPING: Duration = Duration::from_millis(250);

pub(super) struct SendTask {
    shared: Arc<Shared>,
    /// The current connection's client; None while there is none.
    client: Option<AsyncClient>,
    delivery: Delivery,
    discovery: Option<String>,
    /// Cameras whose discovery config went out on this connection.
    discovered: HashSet<String>,
    /// Where the outbox thread answers reads; the receiver is taken by `run`.
    rows_tx: mpsc::UnboundedSender<RowsReply>,
    rows_rx: Option<mpsc::UnboundedReceiver<RowsReply>>,
    /// The read in flight (its number); None when none is, or when the
    /// connection changed since (its answer is then ignored).
    reading: Option<u64>,
    read_seq: u64,
    /// Alarms were stored while a read was in flight: read again after it.
    rescan: bool,
    /// The command topics are subscribed on the current connection.
    subscribed: bool,
}

impl SendTask {
    /// `alarm_window`: alarms awaiting their PUBACK at once; `max_closes`:
    /// lost connections after which a row is dead-lettered; `discovery`: the
    /// Home Assistant prefix, when discovery is on.
    pub(super) fn new(shared: Arc<Shared>, alarm_window: usize, max_closes: u32, discovery: Option<String>) -> Self {
        let (rows_tx, rows_rx) = mpsc::unbounded_channel();
        SendTask {
            shared,
            client: None,
            delivery: Delivery::new(alarm_window, max_closes),
            discovery,
            discovered: HashSet::new(),
            rows_tx,
            rows_rx: Some(rows_rx),
            reading: None,
            read_seq: 0,
            rescan: false,
            subscribed: false,
        }
    }

    pub(super) async fn run(
        mut self,
        mut scores: mpsc::Receiver<ScoreEvent>,
        mut link: mpsc::UnboundedReceiver<Link>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shared = self.shared.clone();
        let Some(mut rows) = self.rows_rx.take() else { return };
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                msg = link.recv() => match msg {
                    Some(msg) => self.on_link(msg),
                    None => return,
                },
                Some(reply) = rows.recv() => self.on_rows(reply),
                Some(ev) = scores.recv() => self.publish_score(&ev),
                _ = shared.wake.notified() => self.flush(),
                _ = housekeeping.tick() => self.flush(),
            }
        }
        self.stop_cleanly(&mut link, &mut rows).await;
    }

    async fn stop_cleanly(
        &mut self,
        link: &mut mpsc::UnboundedReceiver<Link>,
        rows: &mut mpsc::UnboundedReceiver<RowsReply>,
    ) {
        if self.client.is_none() {
            tracing::info!("MQTT publisher stopped (not connected)");
            return;
        }
        // What the pipeline said last (cameras going offline) goes out first.
        self.flush();
        self.publish(self.shared.topics.status(), QoS::AtLeastOnce, true, b"offline".to_vec(), Tag::Offline);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while !self.delivery.drained() || self.reading.is_some() {
            let next = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    msg = link.recv() => msg.map(Ok),
                    reply = rows.recv() => reply.map(Err),
                }
            });
            match next.await {
                Ok(Some(Ok(msg))) => self.on_link(msg),
                Ok(Some(Err(reply))) => self.on_rows(reply),
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
                tracing::info!(connects = n, pending_alarms = self.shared.outbox.pending(), "MQTT connected");
                self.shared.counters.link_fault.store(false, Ordering::Relaxed);
                self.client = Some(client);
                self.delivery.connected(gen);
                self.reading = None;
                self.subscribed = false;
                self.discovered.clear();
                self.republish_retained();
                self.flush();
            }
            Link::Down { gen, error, retry_in } => {
                let retry_in_ms = retry_in.as_millis() as u64;
                // An attempt was made: whatever kept it from starting is fixed.
                self.shared.counters.link_fault.store(false, Ordering::Relaxed);
                let lost = self.delivery.disconnected(gen);
                if lost.current {
                    self.client = None;
                    self.reading = None;
                    self.shared.counters.connected.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %chain(&error), retry_in_ms, "MQTT connection lost; alarms queue in the outbox");
                } else {
                    tracing::warn!(error = %chain(&error), retry_in_ms, "MQTT connect failed");
                }
                if let Some((row, closes)) = lost.dead_letter {
                    let reason = format!(
                        "the broker closed the connection {closes} times with this alarm the oldest in flight, \
                         the last time: {}",
                        chain(&error)
                    );
                    self.shared.outbox.dead_letter(row, reason);
                }
            }
            Link::Fault { error, retry_in } => {
                self.shared.counters.link_fault.store(true, Ordering::Relaxed);
                tracing::error!(
                    error = %chain(&*error), retry_in_ms = retry_in.as_millis() as u64,
                    "MQTT cannot connect until this is fixed; alarms queue in the outbox"
                );
            }
            Link::Event { gen, event } => {
                if let Event::Incoming(rumqttc::Packet::Publish(p)) = &event {
                    if self.delivery.is_current(gen) {
                        if let Some(intake) = self.shared.commands.get() {
                            intake.from_mqtt(self.shared.topics.base(), &p.topic, &p.payload, p.retain);
                        }
                    }
                }
                if let Action::DeleteRow(row) = self.delivery.on_event(gen, &event) {
                    inc(&self.shared.counters.alarms_acked);
                    self.shared.outbox.ack(row);
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

    /// Subscribes to the command topics once per connection, once the
    /// daemon accepts commands. The broker answers the SUBSCRIBE; a refusal
    /// (ACL) shows as a failed SUBACK in the broker's log, not here.
    fn subscribe_commands(&mut self) {
        if self.subscribed || self.shared.commands.get().is_none() {
            return;
        }
        let Some(client) = &self.client else { return };
        let filters = crate::commands::topic_filters(self.shared.topics.base());
        let subs = filters.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        match client.try_subscribe_many(subs) {
            Ok(()) => {
                self.subscribed = true;
                tracing::info!(filters = ?filters, "listening for commands");
            }
            Err(e) => tracing::debug!(error = %e, "command subscription not queued; retried"),
        }
    }

    fn event_topic(&self, camera: Option<&str>) -> String {
        match camera {
            Some(c) => self.shared.topics.camera(c, "events"),
            None => format!("{}/events", self.shared.topics.base()),
        }
    }

    /// Publishes whatever the pipeline left in the pending slots, then alarms.
    fn flush(&mut self) {
        if self.client.is_none() {
            return;
        }
        self.subscribe_commands();
        let (dirty, cameras, snapshots, stats, events) = {
            let mut p = self.shared.pending();
            let dirty = std::mem::take(&mut p.dirty);
            let cams: BTreeMap<String, CameraState> =
                dirty.iter().filter_map(|(c, _)| p.cameras.get(c).map(|s| (c.clone(), *s))).collect();
            (dirty, cams, std::mem::take(&mut p.snapshots), p.stats.take(), std::mem::take(&mut p.events))
        };
        let mut events_retry = std::collections::VecDeque::new();
        for ev in events {
            if !events_retry.is_empty() {
                events_retry.push_back(ev);
                continue;
            }
            let Ok(payload) = serde_json::to_vec(&ev) else { continue };
            let topic = self.event_topic(ev.camera.as_deref());
            if !self.publish(topic, QoS::AtLeastOnce, false, payload, Tag::Other) {
                events_retry.push_back(ev);
            }
        }
        if !events_retry.is_empty() {
            // In order, ahead of what arrived meanwhile.
            let mut p = self.shared.pending();
            while let Some(ev) = events_retry.pop_back() {
                p.events.push_front(ev);
            }
        }
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
        // Each report is published once; the pipeline sends the next one.
        let stats_retry = match stats {
            Some(report) if !self.publish_stats(&report) => Some(report),
            _ => None,
        };
        if !retry.is_empty() || !snap_retry.is_empty() || stats_retry.is_some() {
            let mut p = self.shared.pending();
            if let Some(report) = stats_retry {
                // Queue full: again at the next flush, unless a newer one came.
                p.stats.get_or_insert(report);
            }
            p.dirty.extend(retry);
            for (cam, snap) in snap_retry {
                p.snapshots.entry(cam).or_insert(snap);
            }
        }
        self.pump_alarms();
    }

    /// Asks the outbox for the next rows while the window has room (one read
    /// at a time; [`on_rows`](Self::on_rows) sends them).
    fn pump_alarms(&mut self) {
        if self.reading.is_some() {
            self.rescan = true;
            return;
        }
        let Some(next) = self.delivery.next_rows() else { return };
        self.read_seq += 1;
        self.reading = Some(self.read_seq);
        self.rescan = false;
        self.shared.outbox.read(next.after, next.limit, self.read_seq, self.rows_tx.clone());
    }

    /// Sends the rows read, in id order, as far as the window and rumqttc's
    /// queue let it; reads on if there may be more.
    fn on_rows(&mut self, reply: RowsReply) {
        if self.reading != Some(reply.seq) {
            return; // asked for on an earlier connection
        }
        self.reading = None;
        let more = reply.rows.len() >= reply.limit || self.rescan;
        for row in reply.rows {
            if !self.delivery.admit(row.id) {
                return; // behind a row that travels alone: after its PUBACK
            }
            let topic = self.shared.topics.camera(&row.camera, "alarm");
            if !self.publish(topic, QoS::AtLeastOnce, false, row.payload, Tag::Alarm(row.id)) {
                return; // rumqttc's queue is full: the housekeeping tick retries
            }
        }
        if more {
            self.pump_alarms();
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
    use crate::publish::outbox::{Outbox, OutboxSettings};
    use crate::publish::Topics;

    /// A task with a live-looking connection whose requests nobody sends: the
    /// events rumqttc would report are fed in by hand.
    fn task(dir: &std::path::Path, inflight: usize) -> (SendTask, rumqttc::EventLoop) {
        let (scores_tx, _) = mpsc::channel(4);
        let wake = Arc::new(Notify::new());
        let settings = OutboxSettings { path: dir.join("o.sqlite"), max_rows: 100, max_age: Duration::from_secs(3600) };
        let shared = Arc::new(Shared {
            topics: Topics::new("t", "n"),
            scores_tx,
            score_interval: None,
            last_score: Mutex::new(HashMap::new()),
            snapshots: true,
            pending: Mutex::new(Pending::default()),
            wake: wake.clone(),
            outbox: Outbox::spawn(settings, wake).unwrap(),
            counters: Counters::default(),
            commands: std::sync::OnceLock::new(),
        });
        let mut t = SendTask::new(shared, inflight, 5, None);
        let (client, el) = AsyncClient::new(MqttOptions::new("x", "127.0.0.1", 1), 100);
        t.on_link(Link::Up { gen: 1, client });
        settle(&mut t);
        (t, el)
    }

    fn ev(t: &mut SendTask, gen: u64, event: Event) {
        t.on_link(Link::Event { gen, event });
        settle(t);
    }

    fn puback(pkid: u16) -> Event {
        Event::Incoming(Packet::PubAck(PubAck::new(pkid)))
    }

    fn pending_ids(t: &SendTask) -> Vec<i64> {
        t.shared.outbox.call(|s| s.rows_after(0, 100).iter().map(|r| r.id).collect()).unwrap()
    }

    /// Queues `n` alarms; returns their row ids.
    fn push(t: &SendTask, n: usize) -> Vec<i64> {
        let before = pending_ids(t);
        for _ in 0..n {
            t.shared.outbox.push("cam", b"{}".to_vec());
        }
        pending_ids(t).into_iter().filter(|id| !before.contains(id)).collect()
    }

    /// Flushes and hands the task the outbox's answers until no read is in flight.
    fn flush(t: &mut SendTask) {
        t.flush();
        settle(t);
    }

    fn settle(t: &mut SendTask) {
        while t.reading.is_some() {
            let reply = t.rows_rx.as_mut().unwrap().blocking_recv().unwrap();
            t.on_rows(reply);
        }
    }

    #[test]
    fn rows_are_deleted_on_their_own_puback_even_across_a_pkid_collision() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, _el) = task(dir.path(), 10);
        let ids = push(&t, 3);
        flush(&mut t);
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
        let ids = push(&t, 5);
        flush(&mut t);
        assert_eq!((t.delivery.alarms_in_flight(), t.delivery.last_sent()), (2, ids[1]), "window of 2");
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(1))); // online
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(2))); // row 0
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(3))); // row 1
        ev(&mut t, 1, puback(2));
        assert_eq!(t.delivery.last_sent(), ids[2], "an ack opens the window");
        // Connection lost before row 1's ack; events of the dead connection are ignored.
        let eof = rumqttc::ConnectionError::Io(std::io::ErrorKind::UnexpectedEof.into());
        t.on_link(Link::Down { gen: 1, error: eof, retry_in: Duration::from_millis(1) });
        settle(&mut t);
        ev(&mut t, 1, puback(3));
        assert_eq!(pending_ids(&t), ids[1..]);
        let (client, _el2) = AsyncClient::new(MqttOptions::new("x", "127.0.0.1", 1), 100);
        t.on_link(Link::Up { gen: 2, client });
        settle(&mut t);
        assert_eq!(
            (t.delivery.alarms_in_flight(), t.delivery.last_sent()),
            (1, ids[1]),
            "resent from the oldest unacked row, alone: it was in flight when the connection was lost"
        );
        // New connection: online, camera states (none), then row 1.
        ev(&mut t, 2, Event::Outgoing(Outgoing::Publish(1)));
        ev(&mut t, 2, Event::Outgoing(Outgoing::Publish(2)));
        ev(&mut t, 2, puback(2));
        assert_eq!(pending_ids(&t), ids[2..]);
        assert_eq!((t.delivery.alarms_in_flight(), t.delivery.last_sent()), (2, ids[3]), "then the full window");
    }
}
