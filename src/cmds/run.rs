//! `ganomalyd run`: the daemon's lifetime around the pipeline — publisher
//! start, pipeline start, systemd READY/watchdog, SIGHUP reload, orderly
//! shutdown (sources stop, stages drain, the publisher flushes and goes
//! `offline`). [`run`] turns OS signals into [`Signal`]s and calls [`daemon`],
//! which tests drive in-process through its signal receiver.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::base::report::chain;
use crate::commands::{CommandEvent, CommandName, Intake, Status};
use crate::config::{self, Settings};
use crate::events::Publisher;
use crate::exporter::{self, Exporter, ExporterError};
use crate::pipeline::{Pipeline, PipelineError, StartOptions};
use crate::publish::mqtt::MqttPublisher;
use crate::publish::{NullPublisher, PublishError};
use crate::systemd;

/// `ganomalyd run --config FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long, short)]
    pub config: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("MQTT publisher")]
    Publish(#[source] PublishError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Exporter(#[from] ExporterError),
}

/// Loads the config (the same compile as `check-config`) and runs the daemon
/// until SIGTERM/SIGINT.
pub fn run(args: &Args) -> anyhow::Result<std::process::ExitCode> {
    let settings = config::load(&args.config)?;
    let signals = spawn_signal_thread()?;
    daemon(settings, args.config.clone(), signals)?;
    Ok(std::process::ExitCode::SUCCESS)
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
/// `config_path` is re-read on [`Signal::Reload`].
pub fn daemon(cfg: Settings, config_path: PathBuf, signals: Receiver<Signal>) -> Result<(), DaemonError> {
    // tokio is for network I/O only: one worker is plenty.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("net")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    // Bound and served first: a taken port fails start-up before any thread
    // runs, and probes get `starting` while the models load.
    let exporter = match &cfg.metrics {
        Some(m) => Some(Exporter::start(exporter::bind(m)?, m, rt.handle())?),
        None => None,
    };
    let stop_exporter = |e: Option<Exporter>| {
        if let Some(e) = e {
            e.shutdown(rt.handle(), Duration::from_secs(2));
        }
    };
    let (publisher, handle, mqtt): (Arc<dyn Publisher>, _, Option<Arc<MqttPublisher>>) = match cfg.mqtt.as_ref() {
        Some(m) => {
            let (p, h) = match MqttPublisher::start(m, rt.handle()) {
                Ok(started) => started,
                Err(e) => {
                    stop_exporter(exporter);
                    return Err(DaemonError::Publish(e));
                }
            };
            (p.clone(), Some(h), Some(p))
        }
        None => {
            tracing::warn!("no [mqtt] section (or enabled = false): alarms are only logged");
            (Arc::new(NullPublisher), None, None)
        }
    };
    let publisher_counters: Option<exporter::CountersFn> = mqtt.clone().map(|p| {
        let f: exporter::CountersFn = Arc::new(move || p.counters());
        f
    });
    // Commands: one intake for MQTT and HTTP; each command name's handler
    // registers its queue before the topics are subscribed.
    let camera_names: Vec<String> = cfg.cameras.iter().map(|c| c.name.clone()).collect();
    let intake = Intake::new(cfg.commands.clone(), publisher.clone(), &camera_names);
    let reload_commands = intake.register(CommandName::Reload);
    let record_commands = intake.register(CommandName::Record);
    let calibrate_commands = intake.register(CommandName::Calibrate);
    let feedback_commands = intake.register(CommandName::Feedback);
    // Open alarms are journaled beside the outbox: a restart after a crash ends them.
    let journal = cfg.mqtt.as_ref().map(|m| crate::alarm_state::path_beside(&m.outbox_path));
    let opts = StartOptions { alarm_journal: journal, ..StartOptions::default() };
    let pipeline = match Pipeline::start(&cfg, publisher.clone(), opts) {
        Ok(p) => p,
        Err(e) => {
            if let Some(h) = handle {
                h.shutdown_blocking(PUBLISHER_FLUSH);
            }
            stop_exporter(exporter);
            return Err(e.into());
        }
    };
    // Commissioning handlers: each on its own thread, ending with the process.
    let dir = cfg.commissioning.dir.clone();
    let hooks = pipeline.hooks();
    let spawned = crate::commission::spawn_record(record_commands, dir.clone(), hooks.clone())
        .and_then(|_| {
            crate::commission::spawn_calibrate(
                calibrate_commands,
                cfg.commissioning.calibration_file(),
                hooks.clone(),
                pipeline.calibrator(),
            )
        })
        .and_then(|_| crate::commission::spawn_feedback(feedback_commands, dir, hooks));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the commissioning command handlers: record, calibrate and feedback are not answered");
    }
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
    // Handlers are registered: from here on commands are taken.
    if let Some(p) = &mqtt {
        p.accept_commands(intake.clone());
    }
    if let Some(e) = &exporter {
        e.accept_commands(intake.clone());
    }
    tracing::info!(
        cameras = cfg.cameras.len(), models = %providers.join(", "), commands = cfg.commands.enabled,
        "ganomalyd running"
    );

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
            Ok(Signal::Reload) => {
                let outcome = reload(&pipeline, &config_path);
                publisher.event(&reload_event(None, outcome));
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        while let Ok(cmd) = reload_commands.try_recv() {
            match reload(&pipeline, &config_path) {
                Ok(detail) => cmd.done(detail),
                Err(reason) => cmd.fail(reason),
            }
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

/// SIGHUP or the `reload` command: re-reads the file; a file with problems
/// changes nothing. Ok: what was done (for the answer); Err: why not.
fn reload(pipeline: &Pipeline, path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match config::load(path) {
        Ok(settings) => {
            let not_applied = pipeline.reload_alarms(&settings);
            if !not_applied.is_empty() {
                tracing::warn!(cameras = ?not_applied, "cameras added or removed: restart to apply");
            }
            tracing::info!("alarm settings reloaded (other changes need a restart)");
            let mut detail = serde_json::Map::new();
            detail.insert("applied".into(), serde_json::json!(["alarm settings"]));
            detail.insert("not_applied_cameras".into(), serde_json::json!(not_applied));
            Ok(detail)
        }
        Err(e) => {
            let reason = chain(&e);
            tracing::error!(error = %reason, "reload refused: keeping the running settings");
            Err(format!("reload refused, the running settings are kept: {reason}"))
        }
    }
}

/// The `events` message of a SIGHUP reload (a `reload` command is answered on its own).
fn reload_event(
    camera: Option<&str>,
    outcome: Result<serde_json::Map<String, serde_json::Value>, String>,
) -> CommandEvent {
    match outcome {
        Ok(detail) => CommandEvent { detail, ..CommandEvent::spontaneous("reload", camera, Status::Done) },
        Err(reason) => {
            CommandEvent { reason: Some(reason), ..CommandEvent::spontaneous("reload", camera, Status::Failed) }
        }
    }
}

/// SIGTERM/SIGINT → Stop (a second one exits at once), SIGHUP → Reload.
fn spawn_signal_thread() -> anyhow::Result<Receiver<Signal>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = crossbeam_channel::unbounded();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("signal runtime")?;
    let (mut term, mut int, mut hup) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        rt.block_on(async move {
            let mut stops = 0;
            loop {
                let sig = tokio::select! {
                    _ = term.recv() => Signal::Stop,
                    _ = int.recv() => Signal::Stop,
                    _ = hup.recv() => Signal::Reload,
                };
                if sig == Signal::Stop {
                    stops += 1;
                    if stops > 1 {
                        eprintln!("second stop signal: exiting without draining");
                        std::process::exit(130);
                    }
                }
                let _ = tx.send(sig);
            }
        })
    })?;
    Ok(rx)
}
