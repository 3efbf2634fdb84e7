//! The edge node's connection: its own MQTT connection (own client id, the
//! NDEATH as its will, a fresh bdSeq per CONNECT), births after each
//! CONNACK and on a rebirth NCMD, DDATA/DBIRTH/DDEATH as the
//! [`EdgeNode`](super::node::EdgeNode) says, verdicts from the outbox within
//! a window and deleted on their PUBACK, and the clean stop (NDEATH, then
//! DISCONNECT).
//!
//! Two tasks, as the plain publisher has: the *link* task owns rumqttc's
//! event loop (a new client per connection, since the will changes with the
//! bdSeq) and forwards every event; its poll is never cancelled while a
//! connection is being made. The *edge* task owns everything else and
//! reacts to the link's events, the pipeline's wake-ups, a tick for
//! rate-limited DDATA and the outbox's answers. Packet-id ↔ outbox-row
//! bookkeeping is the plain publisher's [`Delivery`], fed every publish in
//! order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};

use super::bdseq::BdSeqFile;
use super::node::{wants_rebirth, EdgeNode, HostAction, HostState, HostWatch, Kind, Out, Qos, Stored};
use super::{Shared, SparkplugSettings};
use crate::base::backoff::Backoff;
use crate::base::report::chain;
use crate::events::now_ms;
use crate::publish::mqtt::state::{Action, Delivery, Tag};
use crate::publish::outbox::RowsReply;

/// Verdicts awaiting their PUBACK at once.
const WINDOW: usize = 10;
/// Verdicts read from the outbox and held in memory at most (those of a
/// camera that is offline wait here for its DBIRTH; past this many the
/// reading pauses until some are delivered).
const READ_AHEAD: usize = 256;
/// How often due DDATA (rate-limited scores) are looked for, at most: the
/// tick is the DDATA interval when that is shorter.
const TICK: Duration = Duration::from_millis(100);
/// How long a clean stop waits for the NDEATH's and in-flight verdicts' PUBACKs.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// rumqttc's request queue: births of many cameras plus the verdict window.
const REQUESTS: usize = 1024;

pub(super) struct EdgeTask {
    shared: Arc<Shared>,
    settings: SparkplugSettings,
    /// Handed to the link task when it starts.
    bdseq: Option<BdSeqFile>,
    client: Option<AsyncClient>,
    gen: u64,
    delivery: Delivery,
    /// Verdicts and alarm events read from the outbox, not yet
    /// acknowledged, by row.
    held: BTreeMap<i64, Stored>,
    /// Of those, handed to rumqttc on this connection.
    sent: BTreeSet<i64>,
    read_after: i64,
    reading: Option<u64>,
    read_seq: u64,
    /// The outbox stored verdicts while a read was in flight, or the last
    /// read was full: read again.
    unread: bool,
    /// A held item could not be handed to rumqttc (queue full): try again
    /// at the next tick.
    retry: bool,
    /// With `primary_host_id`: its STATE topic and what it said last.
    host: Option<(String, HostWatch)>,
    rows_tx: mpsc::UnboundedSender<RowsReply>,
}

impl EdgeTask {
    pub(super) fn new(
        shared: Arc<Shared>,
        settings: SparkplugSettings,
        bdseq: BdSeqFile,
        rows_tx: mpsc::UnboundedSender<RowsReply>,
    ) -> EdgeTask {
        let host = settings.primary_host_id.as_deref().map(|h| (EdgeNode::state_topic(h), HostWatch::default()));
        EdgeTask {
            shared,
            settings,
            bdseq: Some(bdseq),
            client: None,
            gen: 0,
            delivery: Delivery::new(WINDOW, 5),
            held: BTreeMap::new(),
            sent: BTreeSet::new(),
            read_after: 0,
            reading: None,
            read_seq: 0,
            unread: true,
            retry: false,
            host,
            rows_tx,
        }
    }

    pub(super) async fn run(mut self, mut rows: mpsc::UnboundedReceiver<RowsReply>, mut stop: watch::Receiver<bool>) {
        let (link_tx, mut link) = mpsc::unbounded_channel();
        let (min, max) = self.settings.broker.reconnect();
        let Some(bdseq) = self.bdseq.take() else { return };
        tokio::spawn(link_task(
            self.shared.clone(),
            self.settings.clone(),
            bdseq,
            Backoff::new(min, max),
            link_tx,
            stop.clone(),
        ));
        let wake = self.shared.wake.clone();
        let stored = self.shared.stored.clone();
        let mut tick = tokio::time::interval(TICK.min(self.settings.ddata_interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = link.recv() => match msg {
                    Some(msg) => self.on_link(msg),
                    None => return,
                },
                // Out of the select first: its watch guard must not live
                // across the clean stop's awaits.
                _ = stop.wait_for(|s| *s) => break,
                Some(reply) = rows.recv() => self.on_rows(reply),
                _ = stored.notified() => {
                    self.unread = true;
                    self.pump();
                }
                _ = wake.notified() => self.flush(),
                _ = tick.tick() => self.flush(),
            }
        }
        self.stop_cleanly(&mut link).await;
    }

    fn on_link(&mut self, msg: Link) {
        match msg {
            Link::Up { gen, client, bd } => {
                self.gen = gen;
                self.up(client, bd);
            }
            Link::Event { gen, event } if gen == self.gen => self.on_event(&event),
            Link::Event { .. } => {}
            Link::Down { gen, error, retry_in } => {
                let was_up = gen == self.gen && self.client.take().is_some();
                let _ = self.delivery.disconnected(gen);
                let retry_in_ms = retry_in.as_millis() as u64;
                if was_up {
                    self.shared.node().lost();
                    self.shared.counters.connected.store(false, Ordering::Relaxed);
                    self.reading = None;
                    self.sent.clear();
                }
                match (error, was_up) {
                    (None, _) => {
                        tracing::info!(retry_in_ms, "Sparkplug session ended (primary host offline); connecting again")
                    }
                    (Some(e), true) => {
                        tracing::warn!(error = %chain(&e), retry_in_ms, "Sparkplug connection lost; verdicts wait in its outbox")
                    }
                    (Some(e), false) => tracing::warn!(error = %chain(&e), retry_in_ms, "Sparkplug connect failed"),
                }
            }
            Link::Fault { error, retry_in } => {
                tracing::error!(error = %chain(&*error), retry_in_ms = retry_in.as_millis() as u64, "Sparkplug: cannot connect until this is fixed");
            }
        }
    }

    /// CONNACK: subscribe to NCMD, births, then whatever waits.
    fn up(&mut self, client: AsyncClient, bd: u8) {
        let c = &self.shared.counters;
        c.connected.store(true, Ordering::Relaxed);
        let n = c.connects.fetch_add(1, Ordering::Relaxed) + 1;
        let ncmd = self.shared.node().ncmd_topic();
        if let Err(e) = client.try_subscribe(&ncmd, QoS::AtLeastOnce) {
            tracing::warn!(error = %e, "Sparkplug NCMD subscription not queued: rebirth requests are not heard");
        }
        // The host's STATE is retained: it arrives right after the SUBACK.
        if let Some((state, _)) = &self.host {
            if let Err(e) = client.try_subscribe(state, QoS::AtLeastOnce) {
                tracing::warn!(error = %e, "Sparkplug STATE subscription not queued: no births until it is");
            }
        }
        self.client = Some(client);
        self.delivery.connected(self.gen);
        // Everything unacknowledged is sent again on this connection, oldest first.
        self.held.clear();
        self.sent.clear();
        self.read_after = 0;
        self.reading = None;
        self.unread = true;
        tracing::info!(
            connects = n,
            bd_seq = bd,
            pending_verdicts = self.shared.outbox.pending(),
            "Sparkplug connected"
        );
        // With a primary host, births wait for its online STATE.
        if self.host.is_none() {
            self.births();
        }
        self.pump();
    }

    fn births(&mut self) {
        let out = self.shared.node().birth(Instant::now(), now_ms());
        self.shared.counters.births.fetch_add(1, Ordering::Relaxed);
        for o in out {
            self.publish(o);
        }
    }

    /// Hands one message to rumqttc; false without a connection or with its
    /// queue full.
    fn publish(&mut self, out: Out) -> bool {
        let Some(client) = &self.client else { return false };
        let qos = match out.qos {
            Qos::AtMostOnce => QoS::AtMostOnce,
            Qos::AtLeastOnce => QoS::AtLeastOnce,
        };
        match client.try_publish(out.topic, qos, false, out.payload.encode()) {
            Ok(()) => {
                self.delivery.queued(match out.kind {
                    Kind::Stored(row) => Tag::Alarm(row),
                    Kind::NDeath => Tag::Offline,
                    _ => Tag::Other,
                });
                true
            }
            Err(e) => {
                self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "Sparkplug publish not queued");
                false
            }
        }
    }

    /// The primary host's STATE: births once it is online, the end of the
    /// session when it goes offline (NDEATH, then DISCONNECT: the link task
    /// connects again, and births wait for the next online STATE).
    fn on_host_state(&mut self, payload: &[u8]) {
        let state = match HostState::parse(payload) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Sparkplug STATE payload is not {{\"online\": bool, \"timestamp\": ms}}: ignored");
                return;
            }
        };
        let live = self.shared.node().is_live();
        let Some((_, watch)) = self.host.as_mut() else { return };
        match watch.on_state(state, live) {
            HostAction::Birth => {
                tracing::info!("Sparkplug primary host online: births");
                self.births();
                self.pump();
            }
            HostAction::EndSession => {
                tracing::warn!("Sparkplug primary host offline: ending this session (NDEATH, disconnect)");
                let death = self.shared.node().death(now_ms());
                self.publish(death);
                // Nothing more on this session: data waits for the next births.
                self.shared.node().lost();
                if let Some(c) = &self.client {
                    let _ = c.try_disconnect();
                }
            }
            HostAction::Nothing => {}
        }
    }

    fn on_event(&mut self, ev: &Event) {
        if let Event::Incoming(Packet::Publish(p)) = ev {
            if self.host.as_ref().is_some_and(|(t, _)| *t == p.topic) {
                let payload = p.payload.clone();
                self.on_host_state(&payload);
            }
            let ncmd = self.shared.node().ncmd_topic();
            if p.topic == ncmd {
                match wants_rebirth(&p.payload) {
                    Ok(true) if !self.shared.node().is_live() => {
                        tracing::info!("Sparkplug rebirth requested (NCMD) before the births: they come with the host's online STATE");
                    }
                    Ok(true) => {
                        tracing::info!("Sparkplug rebirth requested (NCMD)");
                        self.shared.counters.rebirths.fetch_add(1, Ordering::Relaxed);
                        self.births();
                    }
                    Ok(false) => tracing::debug!("Sparkplug NCMD without a rebirth request: ignored"),
                    Err(e) => {
                        tracing::warn!(error = %e, "Sparkplug NCMD payload is not a Sparkplug B payload: ignored")
                    }
                }
            }
        }
        if let Action::DeleteRow(row) = self.delivery.on_event(self.gen, ev) {
            self.held.remove(&row);
            self.sent.remove(&row);
            self.shared.outbox.ack(row);
            self.shared.counters.verdicts_acked.fetch_add(1, Ordering::Relaxed);
            self.pump();
        }
    }

    /// Due device messages, then verdicts.
    fn flush(&mut self) {
        if self.client.is_none() {
            return;
        }
        let out = self.shared.node().due(Instant::now(), now_ms());
        // Held items wait for a DBIRTH (or for room in rumqttc's queue):
        // not looked at on every tick.
        let born = out.iter().any(|o| o.kind == Kind::DBirth);
        for o in out {
            self.publish(o);
        }
        if born || self.retry {
            self.pump();
        }
    }

    /// Sends held verdicts whose device is born, in row order, within the
    /// window; asks the outbox for more when there may be some.
    fn pump(&mut self) {
        if self.client.is_none() {
            return;
        }
        self.retry = false;
        let rows: Vec<i64> = self.held.keys().copied().filter(|r| !self.sent.contains(r)).collect();
        for row in rows {
            if self.sent.len() >= WINDOW || !self.delivery.admit(row) {
                break;
            }
            let Some(ev) = self.held.get(&row) else { continue };
            let out = self.shared.node().stored(row, ev, now_ms());
            // None: its camera is offline; it waits for the DBIRTH.
            if let Some(out) = out {
                if !self.publish(out) {
                    self.retry = true;
                    break;
                }
                self.sent.insert(row);
            }
        }
        if self.reading.is_none() && self.unread && self.held.len() < READ_AHEAD {
            self.read_seq += 1;
            self.reading = Some(self.read_seq);
            self.unread = false;
            let limit = READ_AHEAD - self.held.len();
            self.shared.outbox.read(self.read_after, limit, self.read_seq, self.rows_tx.clone());
        }
    }

    fn on_rows(&mut self, reply: RowsReply) {
        if self.reading != Some(reply.seq) {
            return; // asked for on an earlier connection
        }
        self.reading = None;
        if reply.rows.len() >= reply.limit {
            self.unread = true;
        }
        for row in reply.rows {
            self.read_after = self.read_after.max(row.id);
            match serde_json::from_slice::<Stored>(&row.payload) {
                Ok(ev) => {
                    self.held.insert(row.id, ev);
                }
                Err(e) => {
                    // Only this daemon writes the file; a row it cannot read
                    // would block nothing but is dropped loudly.
                    tracing::error!(row = row.id, error = %e, "Sparkplug outbox row is neither a verdict nor an alarm event: dropped");
                    self.shared.outbox.ack(row.id);
                }
            }
        }
        self.pump();
    }

    /// NDEATH (QoS 1), waits for its PUBACK and the verdicts in flight, then
    /// DISCONNECT, so the broker discards the will.
    async fn stop_cleanly(&mut self, link: &mut mpsc::UnboundedReceiver<Link>) {
        if self.client.is_none() {
            tracing::info!("Sparkplug edge node stopped (not connected)");
            return;
        }
        // What the pipeline said last (cameras going offline) goes out first.
        self.flush();
        let death = self.shared.node().death(now_ms());
        self.publish(death);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while !self.delivery.drained() {
            match tokio::time::timeout_at(deadline, link.recv()).await {
                Ok(Some(msg)) => self.on_link(msg),
                _ => break,
            }
        }
        let Some(client) = &self.client else {
            tracing::warn!("Sparkplug connection lost while stopping");
            return;
        };
        let _ = client.try_disconnect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, link.recv()).await {
            if let Link::Event { event: Event::Outgoing(Outgoing::Disconnect), .. } = msg {
                break;
            }
        }
        self.shared.counters.connected.store(false, Ordering::Relaxed);
        tracing::info!(
            pending_verdicts = self.shared.outbox.pending(),
            "Sparkplug edge node stopped: NDEATH published, disconnected"
        );
    }
}

/// What the link task tells the edge task; `gen` numbers connections so that
/// events of a dead one are never taken for the current one's.
enum Link {
    Up {
        gen: u64,
        client: AsyncClient,
        bd: u8,
    },
    Event {
        gen: u64,
        event: Event,
    },
    /// `error` None: the edge task ended the session itself (its DISCONNECT).
    Down {
        gen: u64,
        error: Option<rumqttc::ConnectionError>,
        retry_in: Duration,
    },
    Fault {
        error: Box<crate::publish::PublishError>,
        retry_in: Duration,
    },
}

/// The options of one connection: its will is the NDEATH with this
/// connection's bdSeq.
fn options(s: &SparkplugSettings, will: &Out) -> Result<MqttOptions, crate::publish::PublishError> {
    let b = &s.broker;
    let mut opts = MqttOptions::new(&s.client_id, &b.host, b.port);
    opts.set_keep_alive(b.keep_alive())
        // Sparkplug 3.0: clean session true for an edge node on MQTT 3.1.1.
        .set_clean_session(true)
        // NDEATH: QoS 1, not retained, as the specification says.
        .set_last_will(LastWill::new(&will.topic, will.payload.encode(), QoS::AtLeastOnce, false))
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight((WINDOW as u16).saturating_add(64))
        .set_request_channel_capacity(REQUESTS);
    crate::publish::mqtt::secure(&mut opts, b)?;
    Ok(opts)
}

/// Owns rumqttc's event loop: a new client per connection (the will changes
/// with the bdSeq, drawn before each CONNECT), every event forwarded. Its
/// poll is never cancelled mid-connection (a cancelled connect closes the
/// half-made connection, and the broker then publishes its will); only a
/// stop before the connection is up, or the edge task's end, ends it.
async fn link_task(
    shared: Arc<Shared>,
    settings: SparkplugSettings,
    mut bdseq: BdSeqFile,
    mut backoff: Backoff,
    tx: mpsc::UnboundedSender<Link>,
    mut stop: watch::Receiver<bool>,
) {
    let mut gen = 0u64;
    loop {
        if *stop.borrow() {
            return;
        }
        let bd = bdseq.next_connect();
        let will = {
            let mut node = shared.node();
            node.connecting(bd);
            node.death(now_ms())
        };
        let opts = match options(&settings, &will) {
            Ok(o) => o,
            Err(error) => {
                let retry_in = backoff.next_delay();
                if tx.send(Link::Fault { error: Box::new(error), retry_in }).is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry_in) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        gen += 1;
        let (client, mut el) = AsyncClient::new(opts, REQUESTS);
        el.network_options.set_connection_timeout(settings.broker.connect_timeout_secs());
        let mut fresh = Some(client);
        let error = loop {
            let polled = tokio::select! {
                r = el.poll() => r,
                _ = tx.closed() => return,
                // Before the CONNACK there is nothing to say goodbye on; once
                // up, the edge task drives the clean stop and this task ends
                // on the DISCONNECT it sends.
                _ = stop.wait_for(|s| *s), if fresh.is_some() => return,
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    if let Some(client) = fresh.take() {
                        if tx.send(Link::Up { gen, client, bd }).is_err() {
                            return;
                        }
                    }
                }
                Ok(event) => {
                    let disconnected = matches!(event, Event::Outgoing(Outgoing::Disconnect));
                    if tx.send(Link::Event { gen, event }).is_err() {
                        return;
                    }
                    if disconnected {
                        // A clean stop ends here; otherwise the primary host
                        // went offline and a new session is wanted.
                        if *stop.borrow() {
                            return;
                        }
                        break None;
                    }
                }
                Err(error) => break Some(error),
            }
        };
        let retry_in = backoff.next_delay();
        if tx.send(Link::Down { gen, error, retry_in }).is_err() {
            return;
        }
        drop(el);
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
