//! The front end: [`MqttPublisher`], the [`Publisher`] the pipeline's threads
//! call (it never blocks), [`PublisherHandle`] to stop it, and
//! [`PublisherCounters`]. `start` wires the link and sender tasks together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};

use super::handoff::{inc, Counters, Leaf, Pending, Shared, EVENT_QUEUE};
use super::link::{self, Link};
use super::sender::SendTask;
use crate::base::backoff::Backoff;
use crate::base::report::chain;
use crate::commands::{CommandEvent, Intake};
use crate::events::{AlarmEvent, Publisher, ScoreEvent, Snapshot, StatsReport, VerdictEvent};
use crate::publish::config::MqttConfig;
use crate::publish::outbox::{Outbox, OutboxSettings, LEAF_VERDICT};
use crate::publish::{EmbeddedBroker, PublishError, Topics};

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
    /// Verdicts written to the outbox (delivered like alarms; the outbox's
    /// pending, dropped and dead-letter counts include them).
    pub verdicts_queued: u64,
    /// Command answers and events dropped while the broker was down too long.
    pub events_dropped: u64,
    /// Alarms waiting in the outbox.
    pub alarms_pending: u64,
    /// Of those, held in memory because the outbox file failed.
    pub alarms_in_memory: u64,
    /// Alarms dropped undelivered by the outbox's size, age and memory bounds.
    pub alarms_dropped: u64,
    /// Alarms moved to the dead-letter table: the broker kept closing the
    /// connection on them.
    pub alarms_dead_lettered: u64,
    /// Alarms the outbox file could not store (disk trouble): held in memory.
    pub outbox_errors: u64,
    /// The outbox file could not be opened: alarms are held in memory only.
    pub outbox_fault: bool,
    /// No connection can be attempted: TLS or password files, or the
    /// embedded broker's port (retried with the backoff).
    pub link_fault: bool,
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
    broker: Option<Arc<OnceLock<EmbeddedBroker>>>,
    shared: Arc<Shared>,
}

/// How long a stop waits for the outbox thread to write what it was given.
const OUTBOX_CLOSE: Duration = Duration::from_secs(5);

impl MqttPublisher {
    /// Opens the outbox, starts the embedded broker when `cfg.embedded`, and
    /// spawns the publisher on `rt`. Never waits for the broker: a daemon whose
    /// broker is down starts, queues alarms and connects when it can.
    ///
    /// Fails only on a config that `check-config` refuses too (and if no
    /// thread can be started). What the world does wrong at start is a fault,
    /// logged, counted and shown by `/healthz`, and detection goes on: an
    /// outbox file that does not open (alarms are then held in memory), a TLS
    /// or password file that is missing, an embedded broker's port that is
    /// taken (both retried with the reconnect backoff).
    pub fn start(
        cfg: &MqttConfig,
        rt: &tokio::runtime::Handle,
    ) -> Result<(Arc<MqttPublisher>, PublisherHandle), PublishError> {
        let mut problems = Vec::new();
        cfg.validate("mqtt", &mut problems);
        if !problems.is_empty() {
            return Err(PublishError::Config(problems));
        }
        let node = cfg.resolved_node_id();
        let topics = Topics::new(&cfg.topic_prefix, &node);
        let wake = Arc::new(Notify::new());
        let outbox = Outbox::spawn(
            OutboxSettings {
                path: cfg.outbox_path.clone(),
                max_rows: cfg.outbox_max_rows,
                max_age: cfg.outbox_max_age(),
            },
            wake.clone(),
        )?;

        let counters = Counters::default();
        let broker = cfg.embedded.then(|| {
            let slot = Arc::new(OnceLock::new());
            match EmbeddedBroker::start(cfg.embedded_listen) {
                Ok(b) => {
                    let _ = slot.set(b);
                }
                Err(e) => {
                    counters.link_fault.store(true, Ordering::Relaxed);
                    tracing::error!(error = %chain(&e), "embedded MQTT broker not started: detection goes on, alarms queue in the outbox; retrying");
                }
            }
            slot
        });
        let (host, port) = match broker.as_ref().and_then(|b| b.get()) {
            Some(b) => (b.addr().ip().to_string(), b.addr().port()),
            None if cfg.embedded => (cfg.embedded_listen.ip().to_string(), cfg.embedded_listen.port()),
            None => (cfg.host.clone(), cfg.port),
        };
        let client_id = cfg.resolved_client_id(&node);
        let target = link::Target {
            cfg: cfg.clone(),
            client_id: client_id.clone(),
            topics: topics.clone(),
            embedded: broker.clone(),
        };

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
            wake,
            outbox,
            counters,
            commands: OnceLock::new(),
        });
        let pending_alarms = shared.outbox.pending();
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
        let (link_tx, link_rx) = mpsc::unbounded_channel::<Link>();
        let (reconnect_min, reconnect_max) = cfg.reconnect();
        let backoff = Backoff::new(reconnect_min, reconnect_max);
        rt.spawn(link::run(
            target,
            link::request_capacity(cfg),
            cfg.connect_timeout_secs(),
            backoff,
            link_tx,
            stop_rx.clone(),
        ));

        let task = SendTask::new(
            shared.clone(),
            cfg.alarm_inflight.max(1) as usize,
            cfg.dead_letter_after_closes,
            cfg.discovery.then(|| cfg.discovery_prefix.clone()),
        );
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

    /// Hands incoming command messages (`<base>/cmd/+`, `<base>/+/cmd/+`)
    /// to `intake` from now on: the topics are subscribed on this and every
    /// later connection. Set once; later calls are ignored.
    pub fn accept_commands(&self, intake: Arc<Intake>) {
        let _ = self.shared.commands.set(intake);
        self.shared.wake.notify_one();
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
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.outbox.close(OUTBOX_CLOSE)).await;
    }

    /// [`shutdown`](Self::shutdown) for a plain thread (not a runtime worker):
    /// blocks until the publisher has stopped or `timeout` has passed.
    pub fn shutdown_blocking(self, timeout: Duration) {
        let _ = self.stop.send(true);
        if self.done.recv_timeout(timeout).is_err() {
            tracing::warn!("MQTT publisher did not stop in time");
            self.task.abort();
        }
        self.shared.outbox.close(OUTBOX_CLOSE);
    }

    /// The embedded broker's address, when `embedded = true` and it runs.
    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().and_then(|b| b.get()).map(|b| b.addr())
    }

    /// The outbox (its counters; [`Outbox::call`] to look inside).
    pub fn outbox(&self) -> &Outbox {
        &self.shared.outbox
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
        // The outbox thread stores it and wakes the sender task.
        s.outbox.push(&ev.camera, payload);
    }

    fn alarm_durable(&self, ev: &AlarmEvent, timeout: Duration) -> bool {
        let s = &self.shared;
        let Ok(payload) = serde_json::to_vec(ev) else {
            tracing::error!(id = %ev.id, "alarm event does not serialize");
            return false;
        };
        inc(&s.counters.alarms_queued);
        s.outbox.push_durable(&ev.camera, payload, timeout)
    }

    /// Through the outbox like an alarm: stored before it is sent, deleted
    /// on PUBACK, in the order decided (one outbox, ids in order).
    fn verdict(&self, ev: &VerdictEvent) {
        let s = &self.shared;
        let payload = match serde_json::to_vec(ev) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, camera = %ev.camera, part_id = %ev.part_id, "verdict does not serialize");
                return;
            }
        };
        inc(&s.counters.verdicts_queued);
        s.outbox.push_to(&ev.camera, LEAF_VERDICT, payload);
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

    /// Publishes `report` once, with the publisher's counters, at once when
    /// connected, else as soon as there is a connection; a newer report
    /// replaces one not yet sent. The
    /// pipeline calls this every `pipeline.stats_interval_s` (it clones the
    /// report: keep it to about once a second or less).
    fn stats(&self, report: &StatsReport) {
        self.shared.with_pending(|p| p.stats = Some(report.clone()));
    }

    fn event(&self, ev: &CommandEvent) {
        let s = &self.shared;
        s.with_pending(|p| {
            if p.events.len() >= EVENT_QUEUE {
                p.events.pop_front();
                inc(&s.counters.events_dropped);
            }
            p.events.push_back(ev.clone());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_bad_section_is_refused_with_every_problem_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("o.sqlite");
        let cfg = MqttConfig {
            host: " ".into(),
            port: 0,
            connect_timeout_s: 0.0,
            outbox_path: outbox.clone(),
            ..MqttConfig::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let Err(PublishError::Config(problems)) = MqttPublisher::start(&cfg, rt.handle()) else {
            panic!("a bad [mqtt] section started");
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
        for field in ["mqtt.host", "mqtt.port", "mqtt.connect_timeout_s"] {
            assert!(problems.iter().any(|p| p.starts_with(field)), "{field} missing: {problems:?}");
        }
        assert!(!outbox.exists(), "the outbox was opened for a config that cannot run");
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
            reconnect_min_s: 0.05,
            reconnect_max_s: 0.05,
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
}
