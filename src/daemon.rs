//! `ganomalyd run`: the daemon's lifetime around the pipeline — publisher
//! start, pipeline start, systemd READY/watchdog, SIGHUP reload, orderly
//! shutdown (sources stop, stages drain, the publisher flushes and goes
//! `offline`). `main` only turns OS signals into [`Signal`]s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::config::{Config, ConfigError};
use crate::events::Publisher;
use crate::exporter::{self, Exporter, ExporterError};
use crate::pipeline::{Pipeline, PipelineError, StartOptions};
use crate::publish::mqtt::MqttPublisher;
use crate::publish::NullPublisher;
use crate::systemd;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("MQTT publisher: {0}")]
    Publish(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Exporter(#[from] ExporterError),
}

/// What the signal handler asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM / SIGINT.
    Stop,
    /// SIGHUP: re-read alarm settings.
    Reload,
}

/// Longest wait for the first decided frame before READY is sent anyway: a
/// camera that is offline at boot must not make systemd kill the daemon.
const READY_AT_LATEST: Duration = Duration::from_secs(10);

/// How long the publisher may take to flush on the way down.
const PUBLISHER_FLUSH: Duration = Duration::from_secs(5);

/// Runs until a [`Signal::Stop`] arrives (or the channel closes).
pub fn run(cfg: Config, config_path: PathBuf, signals: Receiver<Signal>) -> Result<(), DaemonError> {
    // tokio is for network I/O only: one worker is plenty.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("net")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    // Bound and served first: a taken port fails start-up before any thread
    // runs, and probes get `starting` while the models load.
    let exporter = match cfg.metrics.enabled.then(|| exporter::bind(&cfg.metrics)).transpose()? {
        Some(socket) => Some(Exporter::start(socket, Duration::from_secs_f64(cfg.metrics.stale_after_s), rt.handle())?),
        None => None,
    };
    let stop_exporter = |e: Option<Exporter>| {
        if let Some(e) = e {
            e.shutdown(rt.handle(), Duration::from_secs(2));
        }
    };
    let (publisher, handle, publisher_counters): (Arc<dyn Publisher>, _, Option<exporter::CountersFn>) =
        match cfg.mqtt.as_ref().filter(|m| m.enabled) {
            Some(m) => {
                let (p, h) = match MqttPublisher::start(m, rt.handle()) {
                    Ok(started) => started,
                    Err(e) => {
                        stop_exporter(exporter);
                        return Err(DaemonError::Publish(e.to_string()));
                    }
                };
                let counters = p.clone();
                (p, Some(h), Some(Arc::new(move || counters.counters())))
            }
            None => {
                tracing::warn!("no [mqtt] section (or enabled = false): alarms are only logged");
                (Arc::new(NullPublisher), None, None)
            }
        };
    let pipeline = match Pipeline::start(&cfg, publisher, StartOptions::default()) {
        Ok(p) => p,
        Err(e) => {
            if let Some(h) = handle {
                h.shutdown_blocking(PUBLISHER_FLUSH);
            }
            stop_exporter(exporter);
            return Err(e.into());
        }
    };
    let providers: Vec<String> =
        pipeline.providers.iter().map(|(p, prov)| format!("{} on {}", p.display(), prov.as_str())).collect();
    if let Some(e) = &exporter {
        e.attach(exporter::Sources {
            cameras: pipeline.counters().to_vec(),
            publisher: publisher_counters,
            liveness: pipeline.liveness(),
            models: pipeline
                .providers
                .iter()
                .map(|(p, prov)| (p.display().to_string(), prov.as_str().to_string()))
                .collect(),
        });
    }
    tracing::info!(cameras = cfg.cameras.len(), models = %providers.join(", "), "ganomalyd running");

    let started = Instant::now();
    let mut ready = false;
    let watchdog = systemd::watchdog_interval();
    let mut last_ping = Instant::now();
    loop {
        if !ready && (pipeline.decided() > 0 || started.elapsed() >= READY_AT_LATEST) {
            ready = true;
            systemd::ready(&format!("{} camera(s), {}", cfg.cameras.len(), providers.join(", ")));
        }
        if let Some(iv) = watchdog {
            if last_ping.elapsed() >= iv / 2 && systemd::inference_alive(pipeline.inference_silent_ms(), iv) {
                systemd::watchdog_ping();
                last_ping = Instant::now();
            }
        }
        match signals.recv_timeout(Duration::from_millis(250)) {
            Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Ok(Signal::Reload) => reload(&pipeline, &config_path),
            Err(RecvTimeoutError::Timeout) => {}
        }
    }

    tracing::info!("shutting down: stopping sources, draining the pipeline");
    systemd::stopping();
    let report = pipeline.shutdown();
    for c in &report.cameras {
        tracing::info!(
            camera = %c.name, captured = c.captured, decided = c.decided, dropped = c.dropped, broken = c.broken,
            "camera totals"
        );
    }
    // Last: /healthz and /metrics answer while the pipeline drains.
    stop_exporter(exporter);
    if let Some(h) = handle {
        h.shutdown_blocking(PUBLISHER_FLUSH);
    }
    drop(rt);
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: re-reads the file; a file with problems changes nothing.
fn reload(pipeline: &Pipeline, path: &std::path::Path) {
    match Config::load(path) {
        Ok(cfg) => {
            let not_applied = pipeline.reload_alarms(&cfg);
            if !not_applied.is_empty() {
                tracing::warn!(cameras = ?not_applied, "cameras added or removed: restart to apply");
            }
            tracing::info!("alarm settings reloaded (other changes need a restart)");
        }
        Err(e @ ConfigError::Invalid { .. }) | Err(e @ ConfigError::Parse { .. }) | Err(e @ ConfigError::Io { .. }) => {
            tracing::error!(error = %e, "reload refused: keeping the running settings");
        }
    }
}
