//! `ganomalyd run`: the daemon's lifetime around the pipeline — publisher
//! start, pipeline start, systemd READY/watchdog, reload (SIGHUP or the
//! `reload` command: the file compiled as `check-config` does, its models
//! loaded in the background while this loop goes on, then applied by the
//! pipeline between batches; each answered on the `events` topic), orderly
//! shutdown (sources stop, stages drain, the publisher flushes and goes
//! `offline`). [`run`] turns OS signals into [`Signal`]s and calls [`daemon`],
//! which tests drive in-process through its signal receiver.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::base::report::chain;
use crate::commands::{Command, CommandEvent, CommandName, Intake, Status};
use crate::config::{self, Settings};
use crate::console::{Console, ConsoleError};
use crate::events::Publisher;
use crate::exporter::{self, Exporter, ExporterError};
use crate::pipeline::{Loaded, PendingReload, Pipeline, PipelineError, StartOptions};
use crate::publish::mqtt::MqttPublisher;
use crate::publish::sparkplug::{self, SparkplugHandle, SparkplugPublisher};
use crate::publish::{NullPublisher, PublishError, Tee};
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
    #[error(transparent)]
    Console(#[from] ConsoleError),
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
    /// SIGHUP: re-read the whole config and apply what changed (`reload.rs`).
    Reload,
}

/// Longest wait for the first decided frame before READY is sent anyway: a
/// camera that is offline at boot must not make systemd kill the daemon.
const READY_AT_LATEST: Duration = Duration::from_secs(10);

/// Reloads that may wait while one loads its models: more means a sender
/// that does not wait for answers, and is refused (`busy`).
const RELOADS_QUEUED: usize = 8;

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
    let console = match &cfg.console {
        Some(c) => match Console::start(c, &cfg, rt.handle()) {
            Ok(c) => Some(c),
            Err(e) => {
                stop_exporter(exporter);
                return Err(e.into());
            }
        },
        None => None,
    };
    let stop_console = |c: Option<Console>| {
        if let Some(c) = c {
            c.shutdown(rt.handle(), Duration::from_secs(2));
        }
    };
    // `[sparkplug] plain_topics = false`: the plain publisher stays off,
    // `[mqtt]` only lends the Sparkplug connection its broker.
    let plain = cfg.mqtt.as_ref().filter(|_| cfg.sparkplug.as_ref().is_none_or(|s| s.plain_topics));
    let (publisher, handle, mqtt): (Arc<dyn Publisher>, _, Option<Arc<MqttPublisher>>) = match plain {
        Some(m) => {
            let (p, h) = match MqttPublisher::start(m, rt.handle()) {
                Ok(started) => started,
                Err(e) => {
                    stop_console(console);
                    stop_exporter(exporter);
                    return Err(DaemonError::Publish(e));
                }
            };
            (p.clone(), Some(h), Some(p))
        }
        None if cfg.sparkplug.is_some() => (Arc::new(NullPublisher), None, None),
        None => {
            tracing::warn!("no [mqtt] section (or enabled = false): alarms are only logged");
            (Arc::new(NullPublisher), None, None)
        }
    };
    let (publisher, sparkplug): (Arc<dyn Publisher>, Option<SparkplugHandle>) = match cfg.sparkplug.as_ref() {
        Some(s) => {
            let cameras = cfg.cameras.iter().map(|c| (c.name.clone(), sparkplug::model_info(&c.model))).collect();
            let (p, h) = match SparkplugPublisher::start(s, cameras, rt.handle()) {
                Ok(started) => started,
                Err(e) => {
                    if let Some(h) = handle {
                        h.shutdown_blocking(PUBLISHER_FLUSH);
                    }
                    stop_console(console);
                    stop_exporter(exporter);
                    return Err(DaemonError::Publish(e));
                }
            };
            let p: Arc<dyn Publisher> = p;
            let both: Arc<dyn Publisher> = if mqtt.is_some() { Arc::new(Tee(vec![publisher, p])) } else { p };
            (both, Some(h))
        }
        None => (publisher, None),
    };
    // The console sees what MQTT is given (scores, alarms, snapshots, verdicts, events).
    let publisher: Arc<dyn Publisher> = match &console {
        Some(c) => Arc::new(Tee(vec![publisher, c.publisher()])),
        None => publisher,
    };
    // Every verdict and alarm is also kept in the inspection record.
    let (publisher, record) = match &cfg.record {
        Some(r) => match crate::record::start(r, publisher.clone()) {
            Ok((p, h)) => (p, Some(h)),
            Err(e) => {
                tracing::error!(error = %chain(&e), "inspection record not started: verdicts and alarms are not recorded");
                (publisher, None)
            }
        },
        None => (publisher, None),
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
    let trigger_commands = intake.register(CommandName::Trigger);
    let record_commands = intake.register(CommandName::Record);
    let calibrate_commands = intake.register(CommandName::Calibrate);
    let feedback_commands = intake.register(CommandName::Feedback);
    // Open alarms are journaled beside the outbox: a restart after a crash ends them.
    let journal = cfg.mqtt.as_ref().map(|m| crate::alarm_state::path_beside(&m.outbox_path));
    let live = console.as_ref().map(Console::live);
    let opts =
        StartOptions { alarm_journal: journal, triggers: Some(trigger_commands), live, ..StartOptions::default() };
    let mut pipeline = match Pipeline::start(&cfg, publisher.clone(), opts) {
        Ok(p) => p,
        Err(e) => {
            if let Some(r) = record {
                r.close(PUBLISHER_FLUSH);
            }
            if let Some(h) = handle {
                h.shutdown_blocking(PUBLISHER_FLUSH);
            }
            if let Some(h) = sparkplug {
                h.shutdown_blocking(PUBLISHER_FLUSH);
            }
            stop_console(console);
            stop_exporter(exporter);
            return Err(e.into());
        }
    };
    // Commissioning handlers: each on its own thread, ending with the process.
    let dir = cfg.commissioning.dir.clone();
    let hooks = pipeline.hooks();
    let spawned = crate::commission::spawn_record(record_commands, dir.clone(), hooks.clone())
        .and_then(|_| {
            crate::commission::spawn_calibrate(calibrate_commands, cfg.commissioning.calibration_file(), hooks.clone())
        })
        .and_then(|_| crate::commission::spawn_feedback(feedback_commands, dir, hooks));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the commissioning command handlers: record, calibrate and feedback are not answered");
    }
    let providers: Vec<String> =
        pipeline.providers().iter().map(|(p, prov)| format!("{} on {}", p.display(), prov.as_str())).collect();
    // Attached again after every reload: the cameras and models change.
    let attach = |pipeline: &Pipeline| {
        if let Some(e) = &exporter {
            e.attach(exporter::Sources {
                cameras: pipeline.counters(),
                publisher: publisher_counters.clone(),
                liveness: pipeline.liveness(),
                models: pipeline
                    .providers()
                    .iter()
                    .map(|(p, prov)| (p.display().to_string(), prov.as_str().to_string()))
                    .collect(),
                commands: Some(intake.clone()),
            });
        }
    };
    attach(&pipeline);
    // Handlers are registered: from here on commands are taken.
    if let Some(p) = &mqtt {
        p.accept_commands(intake.clone());
    }
    if let Some(e) = &exporter {
        e.accept_commands(intake.clone());
    }
    if let Some(c) = &console {
        c.attach(pipeline.counters(), intake.clone());
    }
    tracing::info!(
        cameras = cfg.cameras.len(), models = %providers.join(", "), commands = cfg.commands.enabled,
        "ganomalyd running"
    );

    let started = Instant::now();
    let mut ready = false;
    let watchdog = systemd::watchdog_interval();
    let mut last_ping = Instant::now();
    // A reload whose models load in the background, and the command that
    // asked for it (`None`: SIGHUP); the reloads asked for meanwhile.
    let mut pending: Option<(PendingReload, Option<Command>)> = None;
    let mut queued: VecDeque<Option<Command>> = VecDeque::new();
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
            // SIGHUPs while one waits are one reload: it reads the file when it starts.
            Ok(Signal::Reload) if queued.iter().any(Option::is_none) => {}
            Ok(Signal::Reload) => queued.push_back(None),
            Err(RecvTimeoutError::Timeout) => {}
        }
        while let Ok(cmd) = reload_commands.try_recv() {
            if queued.len() >= RELOADS_QUEUED {
                cmd.refuse(format!(
                    "busy: {RELOADS_QUEUED} reloads are already waiting; send it again once they are answered"
                ));
            } else {
                queued.push_back(Some(cmd));
            }
        }
        // One reload at a time: each reads the file when it starts.
        if pending.is_none() {
            if let Some(next) = queued.pop_front() {
                start_reload(&pipeline, &config_path, next, &mut pending, publisher.as_ref());
            }
        }
        let done = pending.as_mut().and_then(|(p, _)| p.try_take());
        if let Some((result, (_, cmd))) = done.and_then(|r| pending.take().map(|p| (r, p))) {
            let answer = finish_reload(&mut pipeline, result);
            if answer.is_ok() {
                let names: Vec<String> = pipeline.settings().cameras.iter().map(|c| c.name.clone()).collect();
                intake.set_cameras(&names);
                intake.set_settings(pipeline.settings().commands.clone());
                attach(&pipeline);
                if let Some(c) = &console {
                    c.follow(pipeline.settings(), pipeline.counters());
                }
            }
            match (cmd, answer) {
                (Some(cmd), Ok(detail)) => cmd.done(detail),
                (Some(cmd), Err(reason)) => cmd.fail(reason),
                (None, outcome) => publisher.event(&reload_event(None, outcome)),
            }
        }
    }
    abandon_reloads(pending, queued, reload_commands);

    tracing::info!("shutting down: stopping sources, draining the pipeline");
    systemd::stopping();
    let report = pipeline.shutdown();
    for c in &report.cameras {
        tracing::info!(
            camera = %c.name, captured = c.captured, decided = c.decided, dropped = c.dropped, broken = c.broken,
            "camera totals"
        );
    }
    // Last: /healthz and /metrics (and the console) answer while the pipeline drains.
    stop_console(console);
    stop_exporter(exporter);
    if let Some(r) = record {
        r.close(PUBLISHER_FLUSH);
    }
    if let Some(h) = handle {
        h.shutdown_blocking(PUBLISHER_FLUSH);
    }
    // Last: its NDEATH tells SCADA the node is gone.
    if let Some(h) = sparkplug {
        h.shutdown_blocking(PUBLISHER_FLUSH);
    }
    drop(rt);
    tracing::info!("stopped");
    Ok(())
}

/// The daemon stops: the reload loading its models, those waiting, and the
/// `reload` commands not yet taken (the stop may arrive with them, and more
/// may come while the pipeline drains) are answered `failed`; the queue is
/// closed, so later ones are refused at once instead of never answered.
fn abandon_reloads(
    pending: Option<(PendingReload, Option<Command>)>,
    mut queued: VecDeque<Option<Command>>,
    reload_commands: Receiver<Command>,
) {
    queued.extend(reload_commands.try_iter().map(Some));
    drop(reload_commands);
    if pending.is_some() || !queued.is_empty() {
        tracing::info!("stopping with a reload still loading its models or waiting: abandoned");
    }
    for cmd in queued.into_iter().flatten() {
        cmd.fail("the daemon is stopping");
    }
    if let Some((_, Some(cmd))) = pending {
        cmd.fail("the daemon is stopping");
    }
}

/// SIGHUP or the `reload` command: re-reads the file with the same
/// `config::load` as `check-config` and starts loading the models it needs in
/// the background (one at a time: the loop queues the others). A file with
/// problems is answered `failed` at once (published; the running pipeline is
/// untouched).
fn start_reload(
    pipeline: &Pipeline,
    path: &Path,
    cmd: Option<Command>,
    pending: &mut Option<(PendingReload, Option<Command>)>,
    publisher: &dyn Publisher,
) {
    // `failed`, like a reload whose model does not load: the command was
    // taken and could not be carried out.
    let refuse = |cmd: Option<Command>, reason: String| {
        tracing::error!(reason = %reason, "reload refused: keeping the running settings");
        match cmd {
            Some(c) => c.fail(reason),
            None => publisher.event(&reload_event(None, Err(reason))),
        }
    };
    let settings = match config::load(path) {
        Ok(s) => s,
        Err(e) => return refuse(cmd, format!("reload refused, the running settings are kept: {}", chain(&e))),
    };
    match pipeline.prepare_reload(settings) {
        Ok(p) => {
            // No `accepted` first: an HTTP caller gets the outcome as its
            // response (within its 10 s; it is published either way).
            tracing::info!(config = %path.display(), "reload: the new file compiles; loading its models in the background");
            *pending = Some((p, cmd));
        }
        Err(e) => refuse(cmd, format!("reload refused, the running settings are kept: {}", chain(&e))),
    }
}

/// Applies a reload whose models are loaded. Ok: what was done (the answer's
/// detail); Err: why nothing was (or, for a failure part-way, not all).
fn finish_reload(
    pipeline: &mut Pipeline,
    loaded: Result<Loaded, String>,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let loaded = loaded.map_err(|reason| {
        tracing::error!(%reason, "reload refused: a model does not load or fit; keeping the running settings");
        format!("reload refused, the running settings are kept: {reason}")
    })?;
    match pipeline.apply_reload(loaded) {
        Ok(plan) => {
            for (camera, change) in &plan.cameras {
                tracing::info!(%camera, change = %crate::reload::describe(change), "reload");
            }
            for r in &plan.needs_restart {
                tracing::warn!(section = r.section, why = r.why, "changed, but applies only after a restart");
            }
            Ok(plan.summary())
        }
        Err(e) => {
            let reason = chain(&e);
            tracing::error!(error = %reason, "reload failed part-way");
            Err(format!("reload failed part-way (restart to apply the file): {reason}"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::CommandSettings;
    use crate::events::{Recorded, Recorder};

    fn failed(rec: &Recorder) -> Vec<CommandEvent> {
        let evs = rec.events().into_iter();
        evs.filter_map(|e| if let Recorded::Event(e) = e { Some(e) } else { None })
            .filter(|e| e.status == Status::Failed)
            .collect()
    }

    #[test]
    fn reload_commands_left_in_the_queue_at_a_stop_are_answered() {
        let rec = Recorder::default();
        let settings = CommandSettings { enabled: true, ..CommandSettings::default() };
        let intake = Intake::new(settings, Arc::new(rec.clone()), &[]);
        let rx = intake.register(CommandName::Reload);
        // Sent in the last wait of the loop, not yet taken from the queue.
        intake.from_mqtt("g/n", "g/n/cmd/reload", b"", false);
        abandon_reloads(None, VecDeque::new(), rx);
        let answers = failed(&rec);
        assert_eq!(answers.len(), 1, "{:?}", rec.events());
        assert_eq!(answers[0].reason.as_deref(), Some("the daemon is stopping"));
        // One sent while the pipeline drains is refused at once, not left unanswered.
        intake.from_mqtt("g/n", "g/n/cmd/reload", b"", false);
        let evs = rec.events();
        assert!(matches!(evs.last(), Some(Recorded::Event(e)) if e.status == Status::Refused), "{evs:?}");
    }
}
