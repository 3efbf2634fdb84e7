//! [`MqttPublisher`]: the pipeline's [`Publisher`] on rumqttc.
//!
//! Two tokio tasks. The *link* task owns rumqttc's event loop: it connects,
//! forwards every event, and after an error waits out the [`Backoff`] before a
//! fresh connection (a new client and event loop each time, so nothing queued
//! for a dead connection leaks into the next one). The *publisher* task owns
//! everything else: it turns the pipeline's calls into publishes, maps packet
//! ids to outbox rows, deletes a row on its PUBACK, and re-publishes the
//! retained state and every unacknowledged alarm after each (re)connect.
//!
//! The pipeline's threads never wait: scores go through a bounded channel
//! (`try_send`, drops counted), camera/alarm state and snapshots are
//! last-value slots, and alarms are a SQLite insert (the outbox) and a wake-up.
//!
//! Alarm delivery is at least once: a row is deleted only on its PUBACK, so an
//! alarm whose PUBACK was lost to a disconnect is sent again. Consumers
//! de-duplicate on (`id`, `type`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport};
use tokio::sync::{mpsc, watch, Notify};

use super::config::MqttConfig;
use super::outbox::Outbox;
use super::{discovery, EmbeddedBroker, PublishError, Topics};
use crate::base::backoff::Backoff;
use crate::events::{now_ms, AlarmEvent, Publisher, ScoreEvent, Snapshot, StatsReport};

/// How long a clean stop waits for `offline` and in-flight alarms to be
/// acknowledged before it disconnects anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Retry tick for publishes refused because rumqttc's request queue was full,
/// and for the outbox age bound.
const HOUSEKEEPING: Duration = Duration::from_millis(250);
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Counters of what the publisher did, for logs, `stats` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublisherCounters {
    pub connected: bool,
    /// Successful connections (the first one included).
    pub connects: u64,
    pub scores_published: u64,
    /// Skipped by the per-camera rate limit (by design, not a fault).
    pub scores_throttled: u64,
    /// Lost to a full queue or a broker that was down.
    pub scores_dropped: u64,
    /// Alarm events written to the outbox.
    pub alarms_queued: u64,
    /// Alarm events acknowledged by the broker (re-sends counted once each).
    pub alarms_acked: u64,
    /// Alarms waiting in the outbox.
    pub alarms_pending: u64,
    /// Alarms dropped undelivered by the outbox's size and age bounds.
    pub alarms_dropped: u64,
    /// Alarms the outbox could not store (disk trouble): sent from memory.
    pub outbox_errors: u64,
}

#[derive(Default)]
struct Counters {
    connected: AtomicBool,
    connects: AtomicU64,
    scores_published: AtomicU64,
    scores_throttled: AtomicU64,
    scores_dropped: AtomicU64,
    alarms_queued: AtomicU64,
    alarms_acked: AtomicU64,
    outbox_errors: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Retained per-camera state: the last value the pipeline set.
#[derive(Debug, Clone, Copy, Default)]
struct CameraState {
    online: Option<bool>,
    alarm: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Leaf {
    Camera,
    State,
}

/// What the pipeline handed over since the publisher task last looked.
#[derive(Default)]
struct Pending {
    cameras: BTreeMap<String, CameraState>,
    dirty: BTreeSet<(String, Leaf)>,
    /// Latest snapshot per camera (older ones are superseded: the topic is retained).
    snapshots: HashMap<String, Snapshot>,
    stats: Option<StatsReport>,
    /// Alarms the outbox failed to store: published from memory, best effort.
    direct: VecDeque<(String, Vec<u8>)>,
}

struct Shared {
    topics: Topics,
    scores_tx: mpsc::Sender<ScoreEvent>,
    /// None: scores are not published at all.
    score_interval: Option<Duration>,
    last_score: Mutex<HashMap<String, Instant>>,
    snapshots: bool,
    pending: Mutex<Pending>,
    wake: Notify,
    outbox: Outbox,
    counters: Counters,
}

/// The MQTT implementation of [`Publisher`]. Create with [`MqttPublisher::start`].
pub struct MqttPublisher {
    shared: Arc<Shared>,
}

/// Stops the publisher cleanly; dropping it leaves the task running until the
/// runtime ends (and the broker then fires the last will).
pub struct PublisherHandle {
    stop: watch::Sender<bool>,
    done: std::sync::mpsc::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
    broker: Option<EmbeddedBroker>,
    shared: Arc<Shared>,
}

impl MqttPublisher {
    /// Opens the outbox, starts the embedded broker when `cfg.embedded`, and
    /// spawns the publisher on `rt`. Never waits for the broker: a daemon whose
    /// broker is down starts, queues alarms and connects when it can.
    ///
    /// Fails only on what retrying cannot fix: the outbox file, TLS files, the
    /// password source, or the embedded broker's address.
    pub fn start(
        cfg: &MqttConfig,
        rt: &tokio::runtime::Handle,
    ) -> Result<(Arc<MqttPublisher>, PublisherHandle), PublishError> {
        let mut problems = Vec::new();
        cfg.validate("mqtt", &mut problems);
        if !problems.is_empty() {
            return Err(PublishError::Config(problems.join("; ")));
        }
        let node = cfg.resolved_node_id();
        let topics = Topics::new(&cfg.topic_prefix, &node);
        let outbox = Outbox::open(&cfg.outbox_path, cfg.outbox_max_rows, cfg.outbox_max_age())?;

        let broker = if cfg.embedded { Some(EmbeddedBroker::start(cfg.embedded_listen)?) } else { None };
        let (host, port) = match &broker {
            Some(b) => (b.addr().ip().to_string(), b.addr().port()),
            None => (cfg.host.clone(), cfg.port),
        };
        let client_id = cfg.resolved_client_id(&node);
        let mut opts = MqttOptions::new(client_id.clone(), host.clone(), port);
        opts.set_keep_alive(cfg.keep_alive())
            .set_clean_session(true)
            .set_last_will(LastWill::new(topics.status(), "offline", QoS::AtLeastOnce, true))
            // Snapshots are JPEGs of a few hundred kB; rumqttc's default is 10 kB.
            .set_max_packet_size(1 << 20, 16 << 20)
            // Room for the alarm window plus retained-state publishes.
            .set_inflight(cfg.alarm_inflight.saturating_add(64))
            .set_request_channel_capacity(cfg.score_queue + 256);
        if let Some(user) = &cfg.username {
            let pw = cfg.password()?;
            opts.set_credentials(user.clone(), pw.as_ref().map(|p| p.expose().to_string()).unwrap_or_default());
        }
        if let (Some(tls), false) = (&cfg.tls, cfg.embedded) {
            opts.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                super::tls::client_config(tls)?,
            )));
        }

        let (scores_tx, scores_rx) = mpsc::channel(cfg.score_queue);
        let score_interval =
            (cfg.score_max_rate_hz > 0.0).then(|| Duration::from_secs_f64(1.0 / cfg.score_max_rate_hz));
        let shared = Arc::new(Shared {
            topics: topics.clone(),
            scores_tx,
            score_interval,
            last_score: Mutex::new(HashMap::new()),
            snapshots: cfg.snapshots,
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            outbox,
            counters: Counters::default(),
        });
        let pending_alarms = shared.outbox.len().unwrap_or(0);
        tracing::info!(
            broker = %format!("{host}:{port}"),
            client_id,
            topics = topics.base(),
            tls = cfg.tls.is_some() && !cfg.embedded,
            user = cfg.username.as_deref().unwrap_or(""),
            pending_alarms,
            "MQTT publisher starting"
        );

        let (stop_tx, stop_rx) = watch::channel(false);
        let (link_tx, link_rx) = mpsc::unbounded_channel();
        let (reconnect_min, reconnect_max) = cfg.reconnect();
        let backoff = Backoff::new(reconnect_min, reconnect_max);
        let cap = cfg.score_queue + 256;
        let connect_timeout = cfg.connect_timeout_secs();
        rt.spawn(link_task(opts, cap, connect_timeout, backoff, link_tx, stop_rx.clone()));

        let task = Task {
            shared: shared.clone(),
            alarm_inflight: cfg.alarm_inflight.max(1) as usize,
            discovery: cfg.discovery.then(|| cfg.discovery_prefix.clone()),
            stats_interval: Duration::from_secs(10),
            conn: None,
            discovered: HashSet::new(),
        };
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let join = rt.spawn(async move {
            task.run(scores_rx, link_rx, stop_rx).await;
            let _ = done_tx.send(());
        });
        let handle = PublisherHandle { stop: stop_tx, done: done_rx, task: join, broker, shared: shared.clone() };
        Ok((Arc::new(MqttPublisher { shared }), handle))
    }

    pub fn counters(&self) -> PublisherCounters {
        self.shared.counters()
    }

    pub fn topics(&self) -> &Topics {
        &self.shared.topics
    }
}

impl Shared {
    fn counters(&self) -> PublisherCounters {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PublisherCounters {
            connected: c.connected.load(Ordering::Relaxed),
            connects: get(&c.connects),
            scores_published: get(&c.scores_published),
            scores_throttled: get(&c.scores_throttled),
            scores_dropped: get(&c.scores_dropped),
            alarms_queued: get(&c.alarms_queued),
            alarms_acked: get(&c.alarms_acked),
            alarms_pending: self.outbox.len().unwrap_or(0),
            alarms_dropped: self.outbox.dropped(),
            outbox_errors: get(&c.outbox_errors),
        }
    }

    fn with_pending(&self, f: impl FnOnce(&mut Pending)) {
        // A poisoned lock means a panic elsewhere; keep publishing what we can.
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p);
        drop(p);
        self.wake.notify_one();
    }
}

impl PublisherHandle {
    /// Clean stop: publishes what is pending, `offline` (retained), waits up to
    /// 3 s for the broker to acknowledge it and the alarms in flight, then
    /// disconnects (so the broker discards the last will). Unacknowledged
    /// alarms stay in the outbox for the next start.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// [`shutdown`](Self::shutdown) for a plain thread (not a runtime worker):
    /// blocks until the publisher has stopped or `timeout` has passed.
    pub fn shutdown_blocking(self, timeout: Duration) {
        let _ = self.stop.send(true);
        if self.done.recv_timeout(timeout).is_err() {
            tracing::warn!("MQTT publisher did not stop in time");
            self.task.abort();
        }
    }

    /// The embedded broker's address, when `embedded = true`.
    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().map(|b| b.addr())
    }

    pub fn counters(&self) -> PublisherCounters {
        self.shared.counters()
    }
}

impl Publisher for MqttPublisher {
    fn score(&self, ev: &ScoreEvent) {
        let s = &self.shared;
        let Some(interval) = s.score_interval else { return };
        {
            let mut last = s.last_score.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            match last.get_mut(ev.camera.as_str()) {
                Some(t) if now.duration_since(*t) < interval => {
                    inc(&s.counters.scores_throttled);
                    return;
                }
                Some(t) => *t = now,
                None => {
                    last.insert(ev.camera.clone(), now);
                }
            }
        }
        if s.scores_tx.try_send(ev.clone()).is_err() {
            inc(&s.counters.scores_dropped);
        }
    }

    fn alarm(&self, ev: &AlarmEvent) {
        let s = &self.shared;
        let payload = match serde_json::to_vec(ev) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, id = %ev.id, "alarm event does not serialize");
                return;
            }
        };
        inc(&s.counters.alarms_queued);
        match s.outbox.push(&ev.camera, &payload, now_ms()) {
            Ok(_) => s.wake.notify_one(),
            Err(e) => {
                inc(&s.counters.outbox_errors);
                tracing::error!(error = %e, id = %ev.id, camera = %ev.camera, "alarm outbox write failed: sending from memory, lost if the broker is down");
                s.with_pending(|p| p.direct.push_back((ev.camera.clone(), payload)));
            }
        }
    }

    fn camera_online(&self, camera: &str, online: bool) {
        self.shared.with_pending(|p| {
            p.cameras.entry(camera.to_string()).or_default().online = Some(online);
            p.dirty.insert((camera.to_string(), Leaf::Camera));
        });
    }

    fn alarm_state(&self, camera: &str, active: bool) {
        self.shared.with_pending(|p| {
            p.cameras.entry(camera.to_string()).or_default().alarm = Some(active);
            p.dirty.insert((camera.to_string(), Leaf::State));
        });
    }

    fn snapshot(&self, snap: &Snapshot) {
        if self.shared.snapshots {
            self.shared.with_pending(|p| {
                p.snapshots.insert(snap.camera.clone(), snap.clone());
            });
        }
    }

    /// Keeps the latest report; one is published every `stats_interval_s`.
    /// Call it about once a second or less (it clones the report).
    fn stats(&self, report: &StatsReport) {
        let mut p = self.shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.stats = Some(report.clone());
    }
}

/// What the link task tells the publisher task. `gen` numbers connections so
/// that events of a dead one are never taken for the current one's.
enum Link {
    Up { gen: u64, client: AsyncClient },
    Event { gen: u64, event: Event },
    Down { gen: u64, error: String, retry_in: Duration },
}

/// Owns rumqttc's event loop: connect, forward events, back off on errors.
async fn link_task(
    opts: MqttOptions,
    cap: usize,
    connect_timeout_s: u64,
    mut backoff: Backoff,
    tx: mpsc::UnboundedSender<Link>,
    mut stop: watch::Receiver<bool>,
) {
    let mut gen = 0u64;
    loop {
        gen += 1;
        let (client, mut eventloop) = AsyncClient::new(opts.clone(), cap);
        eventloop.network_options.set_connection_timeout(connect_timeout_s);
        let mut client = Some(client);
        let error = loop {
            let polled = tokio::select! {
                r = eventloop.poll() => r,
                // The publisher task is gone (stopped, or timed out stopping).
                _ = tx.closed() => return,
                // Stop before the connection is up: nothing to say goodbye on.
                // Once it is up, the publisher task drives the clean stop and
                // this task ends on the DISCONNECT it sends.
                _ = stop.wait_for(|s| *s), if client.is_some() => return,
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    if let Some(c) = client.take() {
                        if tx.send(Link::Up { gen, client: c }).is_err() {
                            return;
                        }
                    }
                }
                Ok(event) => {
                    let disconnected = matches!(event, Event::Outgoing(Outgoing::Disconnect));
                    if tx.send(Link::Event { gen, event }).is_err() || disconnected {
                        return;
                    }
                }
                Err(e) => break e,
            }
        };
        let retry_in = backoff.next_delay();
        if tx.send(Link::Down { gen, error: error.to_string(), retry_in }).is_err() {
            return;
        }
        drop(eventloop);
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Tag of each publish handed to rumqttc, in order, so that its
/// `Outgoing::Publish(pkid)` event can be matched to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Alarm(i64),
    Offline,
    Other,
}

/// One live connection's bookkeeping.
struct Conn {
    gen: u64,
    client: AsyncClient,
    /// Publishes handed to rumqttc whose packet id we have not seen yet.
    unnumbered: VecDeque<Tag>,
    /// A publish rumqttc parked on a packet-id collision (its id still held by
    /// an unacknowledged one); rumqttc sends it when that id's PUBACK comes.
    collided: Option<(u16, Tag)>,
    /// The parked publish, now sent. rumqttc reports it *before* the PUBACK
    /// that freed its id, so it is mapped only after that PUBACK is handled.
    resent: Option<(u16, Tag)>,
    /// Packet id → outbox row, for alarms awaiting their PUBACK.
    awaiting_ack: HashMap<u16, i64>,
    alarms_in_flight: usize,
    /// Highest outbox row sent on this connection.
    last_sent: i64,
    offline_pkid: Option<u16>,
    offline_acked: bool,
}

impl Conn {
    /// `tag`'s publish went out with packet id `pkid`.
    fn number(&mut self, pkid: u16, tag: Tag) {
        match tag {
            Tag::Alarm(row) => {
                self.awaiting_ack.insert(pkid, row);
            }
            Tag::Offline => self.offline_pkid = Some(pkid),
            Tag::Other => {}
        }
    }
}

struct Task {
    shared: Arc<Shared>,
    alarm_inflight: usize,
    discovery: Option<String>,
    stats_interval: Duration,
    conn: Option<Conn>,
    /// Cameras whose discovery config went out on this connection.
    discovered: HashSet<String>,
}

impl Task {
    async fn run(
        mut self,
        mut scores: mpsc::Receiver<ScoreEvent>,
        mut link: mpsc::UnboundedReceiver<Link>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut stats_tick = tokio::time::interval(self.stats_interval);
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        stats_tick.reset();
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
                _ = stats_tick.tick() => self.publish_stats(),
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
        if self.conn.is_none() {
            tracing::info!("MQTT publisher stopped (not connected)");
            return;
        }
        // What the pipeline said last (cameras going offline) goes out first.
        self.flush();
        self.publish(self.shared.topics.status(), QoS::AtLeastOnce, true, b"offline".to_vec(), Tag::Offline);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while let Some(c) = &self.conn {
            if c.offline_acked && c.alarms_in_flight == 0 {
                break;
            }
            match tokio::time::timeout_at(deadline, link.recv()).await {
                Ok(Some(msg)) => self.on_link(msg),
                _ => break,
            }
        }
        let Some(c) = &self.conn else {
            tracing::warn!("MQTT connection lost while stopping");
            return;
        };
        let _ = c.client.try_disconnect();
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
                self.conn = Some(Conn {
                    gen,
                    client,
                    unnumbered: VecDeque::new(),
                    collided: None,
                    resent: None,
                    awaiting_ack: HashMap::new(),
                    alarms_in_flight: 0,
                    last_sent: 0,
                    offline_pkid: None,
                    offline_acked: false,
                });
                self.discovered.clear();
                self.republish_retained();
                self.flush();
            }
            Link::Down { gen, error, retry_in } => {
                let was_up = self.conn.as_ref().is_some_and(|c| c.gen == gen);
                if was_up {
                    self.conn = None;
                    self.shared.counters.connected.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        error,
                        retry_in_ms = retry_in.as_millis() as u64,
                        "MQTT connection lost; alarms queue in the outbox"
                    );
                } else {
                    tracing::warn!(error, retry_in_ms = retry_in.as_millis() as u64, "MQTT connect failed");
                }
            }
            Link::Event { gen, event } => {
                let Some(c) = self.conn.as_mut().filter(|c| c.gen == gen) else { return };
                match event {
                    Event::Outgoing(Outgoing::Publish(pkid)) => match c.collided.take() {
                        Some((p, tag)) if p == pkid => c.resent = Some((pkid, tag)),
                        other => {
                            c.collided = other;
                            match c.unnumbered.pop_front() {
                                Some(tag) => c.number(pkid, tag),
                                None => tracing::debug!(pkid, "publish event without a matching request"),
                            }
                        }
                    },
                    Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                        if let Some(tag) = c.unnumbered.pop_front() {
                            c.collided = Some((pkid, tag));
                        }
                    }
                    Event::Incoming(Packet::PubAck(ack)) => {
                        if c.offline_pkid == Some(ack.pkid) {
                            c.offline_acked = true;
                        }
                        let acked = c.awaiting_ack.remove(&ack.pkid);
                        if let Some((pkid, tag)) = c.resent.take_if(|(p, _)| *p == ack.pkid) {
                            c.number(pkid, tag);
                        }
                        if let Some(row) = acked {
                            c.alarms_in_flight = c.alarms_in_flight.saturating_sub(1);
                            inc(&self.shared.counters.alarms_acked);
                            if let Err(e) = self.shared.outbox.ack(row) {
                                tracing::error!(error = %e, row, "alarm outbox delete failed: it will be sent again");
                            }
                            self.pump_alarms();
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Hands one publish to rumqttc; false if there is no connection or its
    /// request queue is full.
    fn publish(&mut self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>, tag: Tag) -> bool {
        let Some(c) = self.conn.as_mut() else { return false };
        match c.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                c.unnumbered.push_back(tag);
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
        if self.conn.is_none() {
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

    fn publish_stats(&mut self) {
        let report = self.shared.pending.lock().unwrap_or_else(|e| e.into_inner()).stats.clone();
        let counters = self.shared.counters();
        tracing::debug!(?counters, "publisher counters");
        let Some(report) = report else { return };
        if self.conn.is_none() {
            return;
        }
        // The pipeline's report plus the publisher's own counters under `mqtt`.
        let mut v = match serde_json::to_value(&report) {
            Ok(v) => v,
            Err(_) => return,
        };
        if let (Some(obj), Ok(c)) = (v.as_object_mut(), serde_json::to_value(counters)) {
            obj.insert("mqtt".into(), c);
        }
        let topic = self.shared.topics.stats();
        self.publish(topic, QoS::AtMostOnce, false, v.to_string().into_bytes(), Tag::Other);
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
        let cameras = self.shared.pending.lock().unwrap_or_else(|e| e.into_inner()).cameras.clone();
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
        if self.conn.is_none() || self.discovered.contains(camera) {
            return;
        }
        self.discovered.insert(camera.to_string());
        for (topic, payload) in discovery::camera_configs(&prefix, &self.shared.topics, camera) {
            self.publish(topic, QoS::AtLeastOnce, true, payload, Tag::Other);
        }
    }

    /// Publishes whatever the pipeline left in the pending slots, then alarms.
    fn flush(&mut self) {
        if self.conn.is_none() {
            return;
        }
        let (dirty, cameras, snapshots, direct) = {
            let mut p = self.shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            let dirty = std::mem::take(&mut p.dirty);
            let cams: BTreeMap<String, CameraState> =
                dirty.iter().filter_map(|(c, _)| p.cameras.get(c).map(|s| (c.clone(), *s))).collect();
            (dirty, cams, std::mem::take(&mut p.snapshots), std::mem::take(&mut p.direct))
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
        if !retry.is_empty() || !snap_retry.is_empty() || !direct_retry.is_empty() {
            let mut p = self.shared.pending.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Sends outbox rows in id order while fewer than `alarm_inflight` await
    /// their PUBACK.
    fn pump_alarms(&mut self) {
        loop {
            let Some(c) = self.conn.as_ref() else { return };
            let room = self.alarm_inflight.saturating_sub(c.alarms_in_flight);
            if room == 0 {
                return;
            }
            let rows = match self.shared.outbox.next_after(c.last_sent, room) {
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
                if let Some(c) = self.conn.as_mut() {
                    c.last_sent = row.id;
                    c.alarms_in_flight += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::PubAck;

    /// A task with a live-looking connection whose requests nobody sends: the
    /// events rumqttc would report are fed in by hand.
    fn task(dir: &std::path::Path, inflight: usize) -> (Task, rumqttc::EventLoop) {
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
        let mut t = Task {
            shared,
            alarm_inflight: inflight,
            discovery: None,
            stats_interval: Duration::from_secs(10),
            conn: None,
            discovered: HashSet::new(),
        };
        let (client, el) = AsyncClient::new(MqttOptions::new("x", "127.0.0.1", 1), 100);
        t.on_link(Link::Up { gen: 1, client });
        (t, el)
    }

    fn ev(t: &mut Task, gen: u64, event: Event) {
        t.on_link(Link::Event { gen, event });
    }

    fn puback(pkid: u16) -> Event {
        Event::Incoming(Packet::PubAck(PubAck::new(pkid)))
    }

    fn pending_ids(t: &Task) -> Vec<i64> {
        t.shared.outbox.next_after(0, 100).unwrap().iter().map(|r| r.id).collect()
    }

    /// A log sink for one test.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_password_never_reaches_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let var = "GANOMALYD_TEST_MQTT_LOG_PW";
        std::env::set_var(var, "pa55-w0rd-xyz");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg = MqttConfig {
            port, // nobody listens: connect failures get logged too
            username: Some("box".into()),
            password_env: Some(var.into()),
            reconnect_min_s: 0.01,
            reconnect_max_s: 0.02,
            outbox_path: dir.path().join("o.sqlite"),
            ..MqttConfig::default()
        };
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (p, h) = MqttPublisher::start(&cfg, &tokio::runtime::Handle::current()).unwrap();
                tracing::info!(?cfg, "config");
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert!(!p.counters().connected);
                h.shutdown().await;
            });
        });
        let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(log.contains("MQTT publisher starting") && log.contains("MQTT connect failed"), "{log}");
        assert!(!log.contains("pa55-w0rd-xyz"), "password in the log:\n{log}");
    }

    #[test]
    fn rows_are_deleted_on_their_own_puback_even_across_a_pkid_collision() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, _el) = task(dir.path(), 10);
        let ids: Vec<i64> = (0..3).map(|_| t.shared.outbox.push("cam", b"{}", now_ms()).unwrap()).collect();
        t.flush();
        assert_eq!(t.conn.as_ref().unwrap().alarms_in_flight, 3);
        // `online` went first (republish on connect), untagged.
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(1)));
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(2))); // row 0
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(3))); // row 1
                                                              // Row 2 collides on id 2 (the broker acked out of order).
        ev(&mut t, 1, Event::Outgoing(Outgoing::AwaitAck(2)));
        ev(&mut t, 1, puback(3));
        assert_eq!(pending_ids(&t), [ids[0], ids[2]]);
        // rumqttc reports the parked publish before the PUBACK that freed id 2...
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(2)));
        ev(&mut t, 1, puback(2));
        assert_eq!(pending_ids(&t), [ids[2]], "that PUBACK was row 0's, not row 2's");
        ev(&mut t, 1, puback(2));
        assert!(pending_ids(&t).is_empty());
        ev(&mut t, 1, puback(1)); // `online`
        assert_eq!(t.shared.counters().alarms_acked, 3);
        assert_eq!(t.conn.as_ref().unwrap().alarms_in_flight, 0);
    }

    #[test]
    fn window_limits_in_flight_and_a_reconnect_resends_unacked_rows_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, _el) = task(dir.path(), 2);
        let ids: Vec<i64> = (0..5).map(|_| t.shared.outbox.push("cam", b"{}", now_ms()).unwrap()).collect();
        t.flush();
        let c = t.conn.as_ref().unwrap();
        assert_eq!((c.alarms_in_flight, c.last_sent), (2, ids[1]), "window of 2");
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(1))); // online
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(2))); // row 0
        ev(&mut t, 1, Event::Outgoing(Outgoing::Publish(3))); // row 1
        ev(&mut t, 1, puback(2));
        assert_eq!(t.conn.as_ref().unwrap().last_sent, ids[2], "an ack opens the window");
        // Connection lost before row 1's ack; events of the dead connection are ignored.
        t.on_link(Link::Down { gen: 1, error: "eof".into(), retry_in: Duration::from_millis(1) });
        ev(&mut t, 1, puback(3));
        assert_eq!(pending_ids(&t), ids[1..]);
        let (client, _el2) = AsyncClient::new(MqttOptions::new("x", "127.0.0.1", 1), 100);
        t.on_link(Link::Up { gen: 2, client });
        let c = t.conn.as_ref().unwrap();
        assert_eq!((c.alarms_in_flight, c.last_sent), (2, ids[2]), "resent from the oldest unacked row");
        // New connection: online, camera states (none), then rows 1 and 2.
        ev(&mut t, 2, Event::Outgoing(Outgoing::Publish(1)));
        ev(&mut t, 2, Event::Outgoing(Outgoing::Publish(2)));
        ev(&mut t, 2, puback(2));
        assert_eq!(pending_ids(&t), ids[2..]);
    }
}
