//! The `[metrics]` HTTP endpoint: Prometheus `/metrics` and a `/healthz` for
//! load balancers, container probes and monitoring.
//!
//! It only *reads* what the stages count already (`metrics::CameraCounters`,
//! the publisher's counters, the inference heartbeat): atomics (the outbox's
//! counts too: no SQLite here), plus one short lock, the latency histogram's.
//! Scrapes run on tokio's blocking pool, so they never hold up the MQTT
//! connection that shares the network runtime; no frame ever waits on them.
//!
//! `/healthz` answers 200 while the inference threads show life and 503 once
//! they have been silent for `stale_after_s`: the judgement the systemd
//! watchdog makes, with its own limit. Life means *decided frames*, or nothing
//! to decide (see `base::liveness`): batches that fail count against it, so a
//! model that fails every batch turns the daemon unhealthy, while an idle
//! pipeline (every camera offline) does not. The heartbeat is shared by all
//! models' inference threads, so with several models one wedged model is not
//! seen while another decides. Cameras that are offline (a wedged one
//! included, reported by `capture::watch`) or a broker that is down do not
//! make the daemon unhealthy (a restart would not fix them, and alarms wait in
//! the outbox); the JSON body says which. A fault a restart would not fix
//! either but that puts alarms at risk (the outbox file failed, no
//! connection can even be attempted) makes it `degraded`: still 200, with
//! the reasons under `degraded`.
//!
//! What a client controls is bounded: at most `max_connections` connections
//! are served at once (one more is answered `503` and closed at once, so a
//! thousand idle sockets cost no file descriptors beyond the cap), and a
//! connection that has not sent a whole request head within
//! `header_timeout_s` (an idle socket, a slow-loris client, an idle
//! keep-alive) is closed. hyper's own settings, through a small accept loop:
//! `axum::serve` exposes neither.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;

use crate::base::http::{self, serve, ConnLimits, COMMAND_BODY_LIMIT};
use crate::base::Liveness;
use crate::commands::Intake;
use crate::config::MetricsSettings;
use crate::metrics::CameraCounters;
use crate::publish::mqtt::PublisherCounters;

#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error("metrics.listen {addr}: cannot listen: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// Reads the publisher's counters.
pub type CountersFn = Arc<dyn Fn() -> PublisherCounters + Send + Sync>;

/// What a scrape reads. Cheap to clone; every part is shared with its stage.
#[derive(Clone)]
pub struct Sources {
    pub cameras: Vec<(String, Arc<CameraCounters>)>,
    /// The MQTT publisher's counters; `None` without `[mqtt]`.
    pub publisher: Option<CountersFn>,
    pub liveness: Liveness,
    /// (model path, execution provider in use) of each loaded model.
    pub models: Vec<(String, String)>,
    /// The command intake (its received/refused counts); `None` in tests.
    pub commands: Option<Arc<Intake>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("cameras", &self.cameras.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .field("publisher", &self.publisher.is_some())
            .field("models", &self.models)
            .finish()
    }
}

/// A listening socket, bound before the pipeline starts so that a taken port
/// fails start-up with a clear error instead of a half-started daemon.
pub struct Bound {
    listener: std::net::TcpListener,
    pub addr: SocketAddr,
}

/// Binds `cfg.listen`.
pub fn bind(cfg: &MetricsSettings) -> Result<Bound, ExporterError> {
    let err = |source| ExporterError::Bind { addr: cfg.listen.to_string(), source };
    let listener = std::net::TcpListener::bind(cfg.listen).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    Ok(Bound { listener, addr })
}

/// The sources, once the pipeline is up. Until then (models loading, which
/// takes minutes when TensorRT builds engines) `/healthz` answers 503
/// `starting` and `/metrics` only the build info, instead of leaving probes
/// hanging on a socket nobody serves. A reload attaches the new cameras and models.
type Attached = Arc<std::sync::RwLock<Option<Sources>>>;

/// The sources attached now (a clone: a few `Arc`s).
fn attached(a: &Attached) -> Option<Sources> {
    a.read().ok().and_then(|s| s.clone())
}

/// The running endpoint; [`Exporter::shutdown`] stops it.
pub struct Exporter {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    sources: Attached,
    pub addr: SocketAddr,
    commands: Arc<std::sync::OnceLock<Arc<Intake>>>,
}

impl Exporter {
    /// Serves `bound` on `rt` until [`shutdown`](Self::shutdown); the figures
    /// come once [`attach`](Self::attach) hands over the pipeline's sources.
    pub fn start(bound: Bound, cfg: &MetricsSettings, rt: &tokio::runtime::Handle) -> Result<Exporter, ExporterError> {
        let stale_after = cfg.stale_after;
        let limits = ConnLimits { max_connections: cfg.max_connections, header_timeout: cfg.header_timeout };
        let addr = bound.addr;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(bound.listener)
                .map_err(|source| ExporterError::Bind { addr: addr.to_string(), source })?
        };
        let sources: Attached = Arc::default();
        let mut registry = Registry::with_prefix("ganomalyd");
        registry.register_collector(Box::new(DaemonCollector(sources.clone())));
        let commands: Arc<std::sync::OnceLock<Arc<Intake>>> = Arc::default();
        let state = Arc::new(AppState { registry, sources: sources.clone(), stale_after, commands: commands.clone() });
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/api/cmd/:camera/:name", post(command))
            .layer(axum::extract::DefaultBodyLimit::max(COMMAND_BODY_LIMIT))
            .with_state(state);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = rt.spawn(async move {
            let until = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            serve(listener, app, limits, until).await;
        });
        tracing::info!(%addr, "metrics on http://{addr}/metrics, health on http://{addr}/healthz");
        Ok(Exporter { stop, task, sources, addr, commands })
    }

    /// Serves `POST /api/cmd/<camera>/<name>` through `intake` from now on
    /// (until then such requests are answered 503). Set once.
    pub fn accept_commands(&self, intake: Arc<Intake>) {
        let _ = self.commands.set(intake);
    }

    /// Starts reporting the running pipeline; a reload calls it again with
    /// the cameras and models running after it.
    pub fn attach(&self, sources: Sources) {
        if let Ok(mut s) = self.sources.write() {
            *s = Some(sources);
        }
    }

    /// Stops serving (in-flight requests finish) and waits up to `timeout`.
    pub fn shutdown(self, rt: &tokio::runtime::Handle, timeout: Duration) {
        let _ = self.stop.send(true);
        let task = self.task;
        let _ = rt.block_on(async move { tokio::time::timeout(timeout, task).await });
    }
}

struct AppState {
    registry: Registry,
    sources: Attached,
    stale_after: Duration,
    commands: Arc<std::sync::OnceLock<Arc<Intake>>>,
}

/// `POST /api/cmd/<camera>/<name>` (`-` for node commands): the intake's
/// answer (see [`http::command_answer`]).
async fn command(
    State(s): State<Arc<AppState>>,
    axum::extract::Path((camera, name)): axum::extract::Path<(String, String)>,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    http::command_answer(s.commands.get().cloned(), camera, name, body).await
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    let encoded = tokio::task::spawn_blocking(move || {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &s.registry).map(|()| body)
    })
    .await;
    match encoded {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Ok(Err(_)) | Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "metrics encoding failed\n".to_string(),
        ),
    }
}

/// The `/healthz` body.
#[derive(Debug, Serialize)]
pub struct Health {
    pub status: &'static str,
    /// Why it is unhealthy, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Milliseconds since a frame was decided (or, idle, since there was
    /// nothing to decide).
    pub inference_silent_ms: u64,
    /// The last batch failed and none was decided since.
    pub inference_failing: bool,
    /// Camera name → online.
    pub cameras: std::collections::BTreeMap<String, bool>,
    /// `None` without `[mqtt]`.
    pub mqtt_connected: Option<bool>,
    pub alarms_pending: Option<u64>,
    /// Faults that put alarms at risk while detection goes on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
}

impl Health {
    /// Before the pipeline is up.
    fn starting() -> Health {
        Health {
            status: "starting",
            reason: Some("loading models, starting the pipeline".into()),
            inference_silent_ms: 0,
            inference_failing: false,
            cameras: Default::default(),
            mqtt_connected: None,
            alarms_pending: None,
            degraded: Vec::new(),
        }
    }
}

/// What in the publisher's counters degrades health.
fn degraded(p: &PublisherCounters) -> Vec<String> {
    let mut why = Vec::new();
    if p.outbox_fault {
        why.push(format!(
            "alarm outbox file unavailable: {} alarm(s) held in memory only (see the log)",
            p.alarms_in_memory
        ));
    } else if p.alarms_in_memory > 0 {
        why.push(format!("alarm outbox writes failing: {} alarm(s) held in memory (see the log)", p.alarms_in_memory));
    }
    if p.link_fault {
        why.push("MQTT cannot connect: TLS or password file, or the embedded broker's port (see the log)".into());
    }
    why
}

/// Judges health from the sources (see the module doc).
pub fn health(sources: &Sources, stale_after: Duration) -> Health {
    let silent = sources.liveness.silent_ms();
    let stale = u128::from(silent) >= stale_after.as_millis();
    let publisher = sources.publisher.as_ref().map(|p| p());
    let failing = sources.liveness.failing();
    let degraded = publisher.as_ref().map(degraded).unwrap_or_default();
    Health {
        status: if stale {
            "unhealthy"
        } else if !degraded.is_empty() {
            "degraded"
        } else {
            "ok"
        },
        reason: stale.then(|| {
            let why = if failing { ": every batch since failed" } else { "" };
            format!("no frame decided for {:.1} s (limit {:.1} s){why}", silent as f64 / 1e3, stale_after.as_secs_f64())
        }),
        inference_silent_ms: silent,
        inference_failing: failing,
        cameras: sources
            .cameras
            .iter()
            .map(|(n, c)| (n.clone(), c.online.load(std::sync::atomic::Ordering::Relaxed)))
            .collect(),
        mqtt_connected: publisher.map(|p| p.connected),
        alarms_pending: publisher.map(|p| p.alarms_pending),
        degraded,
    }
}

async fn healthz(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    let judged = tokio::task::spawn_blocking(move || match attached(&s.sources) {
        Some(sources) => health(&sources, s.stale_after),
        None => Health::starting(),
    });
    match judged.await {
        Ok(h) => {
            let code = if h.reason.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (code, [(header::CONTENT_TYPE, "application/json")], serde_json::to_string(&h).unwrap_or_default())
        }
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"status":"unhealthy","reason":"health check failed"}"#.to_string(),
        ),
    }
}

/// A label value the text format carries as is: prometheus-client does not
/// escape, so a quote, backslash or line end (a model path can hold them)
/// would break the whole scrape.
fn label_value(v: &str) -> String {
    v.chars().map(|c| if matches!(c, '"' | '\\' | '\n' | '\r') { '_' } else { c }).collect()
}

/// Reads the counters at scrape time.
#[derive(Debug)]
struct DaemonCollector(Attached);

/// One metric without labels.
fn single<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    metric: M,
) -> Result<(), std::fmt::Error> {
    metric.encode(enc.encode_descriptor(name, help, unit, kind)?)
}

/// One metric family: a descriptor, then one sample per label set.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    for (labels, metric) in samples {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let info = Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_string())]);
        info.encode(enc.encode_descriptor("build", "ganomalyd build.", None, MetricType::Info)?)?;
        let Some(s) = attached(&self.0) else { return Ok(()) };
        let s = &s;
        let cam = |name: &String| vec![("camera", name.clone())];
        let per_camera = |f: fn(&CameraCounters) -> u64| {
            s.cameras.iter().map(move |(n, c)| (cam(n), ConstCounter::new(f(c)))).collect::<Vec<_>>()
        };
        type Count = fn(&CameraCounters) -> u64;
        let frames: [(&str, &str, Count); 5] = [
            ("frames_captured", "Frames the camera source delivered.", |c| CameraCounters::get(&c.captured)),
            ("frames_dropped", "Frames dropped because preprocessing was behind (drop-oldest, by design).", |c| {
                CameraCounters::get(&c.dropped)
            }),
            (
                "frames_broken",
                "Frames skipped: unreadable, undecodable, failed inference or a non-finite score.",
                |c| CameraCounters::get(&c.broken),
            ),
            ("frames_decided", "Frames scored and passed through the alarm state machine.", |c| {
                CameraCounters::get(&c.decided)
            }),
            ("tiles_scored", "Tiles scored by a tiled camera (each of its frames is one or more tiles).", |c| {
                CameraCounters::get(&c.tiles)
            }),
        ];
        for (name, help, f) in frames {
            family(&mut enc, name, help, None, MetricType::Counter, per_camera(f))?;
        }
        let flag = |f: fn(&CameraCounters) -> bool| {
            s.cameras.iter().map(move |(n, c)| (cam(n), ConstGauge::new(i64::from(f(c))))).collect::<Vec<_>>()
        };
        let online = flag(|c| c.online.load(std::sync::atomic::Ordering::Relaxed));
        family(
            &mut enc,
            "camera_online",
            "1 while the camera delivers frames (0 as well while a read of it has not returned within read_timeout_s).",
            None,
            MetricType::Gauge,
            online,
        )?;
        let active = flag(|c| c.alarm_active.load(std::sync::atomic::Ordering::Relaxed));
        family(&mut enc, "alarm_active", "1 while the camera's alarm is on.", None, MetricType::Gauge, active)?;
        let raised = per_camera(|c| CameraCounters::get(&c.alarms_raised));
        family(&mut enc, "alarms_raised", "Alarms started (alarm `start` events).", None, MetricType::Counter, raised)?;
        let mut verdicts = Vec::new();
        for (n, c) in s.cameras.iter().filter(|(_, c)| c.triggered.load(std::sync::atomic::Ordering::Relaxed)) {
            let by = [
                ("ok", &c.verdicts_ok),
                ("ng", &c.verdicts_ng),
                ("error", &c.verdicts_error),
                ("timeout", &c.verdicts_timeout),
            ];
            for (v, counter) in by {
                verdicts.push((
                    vec![("camera", n.clone()), ("verdict", v.to_string())],
                    ConstCounter::new(CameraCounters::get(counter)),
                ));
            }
        }
        family(
            &mut enc,
            "verdicts",
            "Verdicts of triggered cameras, by outcome.",
            None,
            MetricType::Counter,
            verdicts,
        )?;
        let triggered = |f: fn(&CameraCounters) -> u64| {
            s.cameras
                .iter()
                .filter(|(_, c)| c.triggered.load(std::sync::atomic::Ordering::Relaxed))
                .map(move |(n, c)| (cam(n), ConstCounter::new(f(c))))
                .collect::<Vec<_>>()
        };
        let dup = triggered(|c| CameraCounters::get(&c.triggers_duplicate));
        family(
            &mut enc,
            "triggers_duplicate",
            "Triggers refused because their part id was answered already (answered once).",
            None,
            MetricType::Counter,
            dup,
        )?;
        let bad = triggered(|c| CameraCounters::get(&c.triggers_refused));
        family(
            &mut enc,
            "triggers_refused",
            "Triggers refused for their payload (no part id, bad ts).",
            None,
            MetricType::Counter,
            bad,
        )?;
        if let Some(intake) = &s.commands {
            let names = crate::commands::CommandName::ALL;
            let counts: Vec<(String, (u64, u64))> =
                names.iter().map(|n| (n.as_str().to_string(), intake.counters(*n))).collect();
            let received = counts.iter().map(|(n, c)| (vec![("command", n.clone())], ConstCounter::new(c.0)));
            family(
                &mut enc,
                "commands_received",
                "Commands received, by name (MQTT and HTTP).",
                None,
                MetricType::Counter,
                received,
            )?;
            let refused = counts.iter().map(|(n, c)| (vec![("command", n.clone())], ConstCounter::new(c.1)));
            family(
                &mut enc,
                "commands_refused",
                "Commands the intake refused (disabled, not allowed, unknown camera, bad JSON, retained, busy).",
                None,
                MetricType::Counter,
                refused,
            )?;
        }
        let drift = s.cameras.iter().map(|(n, c)| (cam(n), ConstGauge::new(c.drift_shift())));
        family(
            &mut enc,
            "score_drift",
            "Median of the latest alarm-free raw scores minus the calibration's normal median, in its p95 - p50 spreads (NaN until judged; README \"Drift\").",
            None,
            MetricType::Gauge,
            drift,
        )?;
        let fb = per_camera(|c| CameraCounters::get(&c.feedback_false_alarms));
        family(
            &mut enc,
            "feedback_false_alarms",
            "Alarms the operator confirmed false (feedback `ok`).",
            None,
            MetricType::Counter,
            fb,
        )?;
        let fb = per_camera(|c| CameraCounters::get(&c.feedback_defects));
        family(
            &mut enc,
            "feedback_defects",
            "Alarms the operator confirmed as defects (feedback `defect`).",
            None,
            MetricType::Counter,
            fb,
        )?;
        // NaN until the camera's first decided frame: 0 would read as "all good".
        let scores = s.cameras.iter().map(|(n, c)| {
            let decided = CameraCounters::get(&c.decided) > 0;
            (cam(n), ConstGauge::new(if decided { c.last_score() } else { f64::NAN }))
        });
        family(
            &mut enc,
            "score",
            "The latest normalised anomaly score (0.5 = the calibrated threshold).",
            None,
            MetricType::Gauge,
            scores,
        )?;
        // Tiled cameras only, once a frame was scored: which tile scored the latest frame.
        let hot: Vec<_> =
            s.cameras.iter().filter_map(|(n, c)| c.hot_tile().map(|t| (cam(n), ConstGauge::new(t as i64)))).collect();
        if !hot.is_empty() {
            family(
                &mut enc,
                "hot_tile",
                "A tiled camera's tile (row-major index in its grid) that had the latest frame's score.",
                None,
                MetricType::Gauge,
                hot,
            )?;
        }
        let mut latency = Vec::new();
        for (n, c) in &s.cameras {
            let (p50, p99) = c.latency.lock().map(|h| (h.quantile(0.5), h.quantile(0.99))).unwrap_or((0.0, 0.0));
            for (q, ms) in [("0.5", p50), ("0.99", p99)] {
                latency.push((vec![("camera", n.clone()), ("quantile", q.to_string())], ConstGauge::new(ms / 1e3)));
            }
        }
        family(
            &mut enc,
            "decision_latency",
            "Capture to alarm decision, quantiles since start.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
            latency,
        )?;
        let silent = ConstGauge::new(s.liveness.silent_ms() as f64 / 1e3);
        single(
            &mut enc,
            "inference_silent",
            "Time since a frame was decided (or, with nothing to decide, since the inference threads last waited).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
            silent,
        )?;
        let failing = ConstGauge::new(i64::from(s.liveness.failing()));
        single(
            &mut enc,
            "inference_failing",
            "1 while the last batch failed and none has been decided since.",
            None,
            MetricType::Gauge,
            failing,
        )?;
        let models = s
            .models
            .iter()
            .map(|(m, p)| (vec![("model", label_value(m)), ("provider", label_value(p))], ConstGauge::new(1i64)));
        family(
            &mut enc,
            "model",
            "Loaded models and the execution provider each runs on.",
            None,
            MetricType::Gauge,
            models,
        )?;
        shadow_families(&mut enc, s)?;
        if let Some(p) = s.publisher.as_ref().map(|p| p()) {
            let connected = ConstGauge::new(i64::from(p.connected));
            single(&mut enc, "mqtt_connected", "1 while connected to the broker.", None, MetricType::Gauge, connected)?;
            let counters: [(&str, &str, u64); 10] = [
                ("mqtt_connects", "Successful broker connections, the first one included.", p.connects),
                ("scores_published", "Score messages published.", p.scores_published),
                (
                    "scores_throttled",
                    "Score messages skipped by the per-camera rate limit (by design).",
                    p.scores_throttled,
                ),
                ("scores_dropped", "Score messages lost to a full queue or a broker that was down.", p.scores_dropped),
                ("alarms_queued", "Alarm events written to the outbox.", p.alarms_queued),
                ("alarms_acked", "Alarm events the broker acknowledged.", p.alarms_acked),
                ("verdicts_queued", "Verdicts written to the outbox (delivered like alarms).", p.verdicts_queued),
                (
                    "alarms_dropped",
                    "Alarm events dropped undelivered by the outbox's size, age and memory bounds.",
                    p.alarms_dropped,
                ),
                (
                    "alarms_dead_lettered",
                    "Alarm events moved to the dead-letter table: the broker kept closing the connection on them.",
                    p.alarms_dead_lettered,
                ),
                (
                    "outbox_errors",
                    "Alarm events the outbox file could not store (disk trouble), held in memory.",
                    p.outbox_errors,
                ),
            ];
            for (name, help, v) in counters {
                single(&mut enc, name, help, None, MetricType::Counter, ConstCounter::new(v))?;
            }
            let pending = ConstGauge::new(p.alarms_pending as i64);
            single(
                &mut enc,
                "alarms_pending",
                "Alarm events waiting in the outbox for the broker.",
                None,
                MetricType::Gauge,
                pending,
            )?;
            let gauges: [(&str, &str, i64); 3] = [
                (
                    "alarms_in_memory",
                    "Of those, held in memory because the outbox file failed.",
                    p.alarms_in_memory as i64,
                ),
                ("outbox_fault", "1 when the outbox file could not be opened.", i64::from(p.outbox_fault)),
                (
                    "mqtt_link_fault",
                    "1 while no connection can be attempted (TLS or password file, embedded broker's port).",
                    i64::from(p.link_fault),
                ),
            ];
            for (name, help, v) in gauges {
                single(&mut enc, name, help, None, MetricType::Gauge, ConstGauge::new(v))?;
            }
        }
        Ok(())
    }
}

/// The comparison of each camera that has a shadow model (see `shadow.rs`).
fn shadow_families(enc: &mut DescriptorEncoder, s: &Sources) -> Result<(), std::fmt::Error> {
    let shadows: Vec<(String, crate::shadow::ShadowStats)> =
        s.cameras.iter().filter_map(|(n, c)| c.shadow().map(|sh| (n.clone(), sh.stats()))).collect();
    if shadows.is_empty() {
        return Ok(());
    }
    let mut frames = Vec::new();
    let mut quantiles = Vec::new();
    for (n, st) in &shadows {
        for (agreement, v) in
            [("both", st.both), ("real_only", st.real_only), ("shadow_only", st.shadow_only), ("neither", st.neither)]
        {
            frames.push((vec![("camera", n.clone()), ("agreement", agreement.to_string())], ConstCounter::new(v)));
        }
        for (model, q) in [("real", st.real), ("shadow", st.shadow)] {
            for (quantile, v) in [("0.5", q.p50), ("0.9", q.p90), ("0.99", q.p99)] {
                let labels =
                    vec![("camera", n.clone()), ("model", model.to_string()), ("quantile", quantile.to_string())];
                quantiles.push((labels, ConstGauge::new(v)));
            }
        }
    }
    family(
        enc,
        "shadow_frames",
        "Frames both the camera's model and its shadow scored, by whether each was at or above the alarm threshold.",
        None,
        MetricType::Counter,
        frames,
    )?;
    family(
        enc,
        "shadow_score",
        "Normalised score quantiles of the camera's model and its shadow over the frames both scored.",
        None,
        MetricType::Gauge,
        quantiles,
    )?;
    let dropped = shadows.iter().map(|(n, st)| (vec![("camera", n.clone())], ConstCounter::new(st.dropped)));
    family(
        enc,
        "shadow_frames_dropped",
        "Frames the shadow model did not score because it was behind (dropped first, by design).",
        None,
        MetricType::Counter,
        dropped,
    )?;
    let alarms = shadows.iter().map(|(n, st)| (vec![("camera", n.clone())], ConstCounter::new(st.shadow_alarms)));
    family(
        enc,
        "shadow_alarms_raised",
        "Alarms the shadow model raised (on <camera>/shadow/alarm; never the camera's alarm).",
        None,
        MetricType::Counter,
        alarms,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::CameraCounters;

    fn sources(publisher: bool) -> Sources {
        let c = Arc::new(CameraCounters::default());
        CameraCounters::add(&c.captured, 12);
        CameraCounters::add(&c.dropped, 2);
        CameraCounters::add(&c.decided, 9);
        c.online.store(true, std::sync::atomic::Ordering::Relaxed);
        c.alarm_active.store(true, std::sync::atomic::Ordering::Relaxed);
        CameraCounters::add(&c.alarms_raised, 4);
        c.set_last_score(0.75);
        c.record_latency(20.0, None);
        let p = PublisherCounters { connected: true, alarms_pending: 3, alarms_queued: 5, ..Default::default() };
        Sources {
            cameras: vec![("line-1".into(), c), ("line-2".into(), Arc::new(CameraCounters::default()))],
            publisher: publisher.then(|| Arc::new(move || p) as CountersFn),
            liveness: Liveness::new_for_test(250),
            models: vec![("models/demo.onnx".into(), "cpu".into())],
            commands: None,
        }
    }

    fn scrape(s: Sources) -> String {
        let attached: Attached = Arc::new(std::sync::RwLock::new(Some(s)));
        scrape_attached(attached)
    }

    fn scrape_attached(attached: Attached) -> String {
        let mut registry = Registry::with_prefix("ganomalyd");
        registry.register_collector(Box::new(DaemonCollector(attached)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn a_camera_with_a_shadow_reports_the_comparison_and_one_without_nothing() {
        use crate::shadow::{ShadowCompare, Side};
        let s = sources(false);
        let compare = Arc::new(ShadowCompare::new("cand.onnx", Arc::default()));
        for seq in 0..4 {
            compare.record(Side::Real, seq, 0.2, false);
            compare.record(Side::Shadow, seq, 0.9, seq < 3);
        }
        compare.drop_frame();
        assert!(!scrape(s.clone()).contains("shadow"), "no shadow, no shadow families");
        s.cameras[0].1.set_shadow(Some(compare));
        let text = scrape(s);
        for line in [
            "ganomalyd_shadow_frames_total{camera=\"line-1\",agreement=\"shadow_only\"} 3",
            "ganomalyd_shadow_frames_total{camera=\"line-1\",agreement=\"neither\"} 1",
            "ganomalyd_shadow_frames_total{camera=\"line-1\",agreement=\"both\"} 0",
            "ganomalyd_shadow_score{camera=\"line-1\",model=\"shadow\",quantile=\"0.5\"} 0.901",
            "ganomalyd_shadow_frames_dropped_total{camera=\"line-1\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert!(!text.contains("camera=\"line-2\",agreement"), "line-2 has no shadow");
    }

    #[test]
    fn scrape_reports_every_counter_by_camera() {
        let text = scrape(sources(true));
        for line in [
            "# TYPE ganomalyd_frames_captured counter",
            "ganomalyd_frames_captured_total{camera=\"line-1\"} 12",
            "ganomalyd_frames_captured_total{camera=\"line-2\"} 0",
            "ganomalyd_frames_dropped_total{camera=\"line-1\"} 2",
            "ganomalyd_frames_decided_total{camera=\"line-1\"} 9",
            "ganomalyd_camera_online{camera=\"line-1\"} 1",
            "ganomalyd_camera_online{camera=\"line-2\"} 0",
            "ganomalyd_alarm_active{camera=\"line-1\"} 1",
            "ganomalyd_alarm_active{camera=\"line-2\"} 0",
            "ganomalyd_alarms_raised_total{camera=\"line-1\"} 4",
            "ganomalyd_score{camera=\"line-1\"} 0.75",
            "ganomalyd_score{camera=\"line-2\"} NaN",
            "ganomalyd_model{model=\"models/demo.onnx\",provider=\"cpu\"} 1",
            "ganomalyd_inference_failing 0",
            "ganomalyd_mqtt_connected 1",
            "ganomalyd_alarms_queued_total 5",
            "ganomalyd_alarms_pending 3",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        let p50 = text
            .lines()
            .find_map(|l| l.strip_prefix("ganomalyd_decision_latency_seconds{camera=\"line-1\",quantile=\"0.5\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("latency p50");
        // 20 ms recorded; the histogram's resolution is about 2 %.
        assert!((p50 - 0.020).abs() < 0.001, "{p50}");
        assert!(text.contains("ganomalyd_build_info{version=\""), "{text}");
        let silent = text
            .lines()
            .find_map(|l| l.strip_prefix("ganomalyd_inference_silent_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("inference_silent_seconds, without labels");
        assert!((0.25..5.0).contains(&silent), "{silent}");
    }

    #[test]
    fn label_values_cannot_break_the_exposition() {
        let mut s = sources(false);
        s.models = vec![("models/a \"b\"\\c\n.onnx".into(), "cpu".into())];
        let text = scrape(s);
        assert!(
            text.lines().any(|l| l == "ganomalyd_model{model=\"models/a _b__c_.onnx\",provider=\"cpu\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn before_the_pipeline_is_up_only_the_build_is_reported() {
        let text = scrape_attached(Arc::default());
        assert!(text.contains("ganomalyd_build_info{version=\"") && !text.contains("camera"), "{text}");
        let h = Health::starting();
        assert_eq!(h.status, "starting");
        assert!(h.reason.is_some(), "a reason makes it a 503");
    }

    #[test]
    fn without_mqtt_there_are_no_publisher_metrics() {
        let text = scrape(sources(false));
        for publisher_only in ["mqtt", "alarms_queued", "alarms_pending", "scores_published", "outbox"] {
            assert!(!text.contains(publisher_only), "{publisher_only} in {text}");
        }
        assert!(text.contains("ganomalyd_frames_captured_total"), "{text}");
    }

    #[test]
    fn health_turns_unhealthy_only_when_inference_is_silent() {
        let s = sources(true);
        let h = health(&s, Duration::from_secs(10));
        assert_eq!((h.status, h.reason.as_deref()), ("ok", None));
        assert!(!h.cameras["line-2"] && h.cameras["line-1"]);
        assert_eq!((h.mqtt_connected, h.alarms_pending), (Some(true), Some(3)));
        let h = health(&s, Duration::from_millis(100));
        assert_eq!(h.status, "unhealthy");
        assert!(h.reason.as_deref().is_some_and(|r| r.contains("no frame decided for")), "{h:?}");
    }

    #[test]
    fn failing_batches_make_it_unhealthy_an_idle_pipeline_does_not() {
        use crate::base::liveness::Beat;
        let s = sources(true);
        // Idle for 250 ms (no camera delivers): healthy within a 10 s limit,
        // and an idle beat keeps it so.
        s.liveness.beat(Beat::Idle);
        assert_eq!(health(&s, Duration::from_secs(10)).status, "ok");
        let mut s = sources(true);
        s.liveness = Liveness::new_for_test(20_000);
        s.liveness.beat(Beat::Failed);
        s.liveness.beat(Beat::Idle);
        let h = health(&s, Duration::from_secs(10));
        assert_eq!(h.status, "unhealthy", "{h:?}");
        assert!(h.inference_failing && h.reason.as_deref().is_some_and(|r| r.contains("every batch since failed")));
        s.liveness.beat(Beat::Decided);
        assert_eq!(health(&s, Duration::from_secs(10)).status, "ok");
    }

    #[test]
    fn an_outbox_or_link_fault_degrades_health_without_failing_it() {
        let mut s = sources(true);
        let p = PublisherCounters { outbox_fault: true, alarms_in_memory: 4, link_fault: true, ..Default::default() };
        s.publisher = Some(Arc::new(move || p) as CountersFn);
        let h = health(&s, Duration::from_secs(10));
        assert_eq!((h.status, h.reason.as_deref()), ("degraded", None), "degraded is still a 200");
        assert_eq!(h.degraded.len(), 2, "{h:?}");
        assert!(h.degraded[0].contains("4 alarm(s) held in memory"), "{h:?}");
        let text = scrape(s);
        for line in ["ganomalyd_outbox_fault 1", "ganomalyd_mqtt_link_fault 1", "ganomalyd_alarms_in_memory 4"] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert_eq!(health(&sources(true), Duration::from_secs(10)).status, "ok");
    }
}
