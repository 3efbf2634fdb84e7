//! The web console (`[console]`): a few pages served by the daemon on their
//! own port, for plant engineers to look at the line: the picture with the
//! heat map, the score against the thresholds, alarms with their snapshots,
//! verdicts, the model, and buttons that send commands.
//!
//! # What it reads, and how (no lock on the frame path)
//! - **Counters** (`metrics::CameraCounters`, as `/metrics` reads them):
//!   online, alarm active, decided/dropped/broken, last score; atomics read
//!   at request time. The store thread turns `decided` into fps once a second.
//! - **History** ([`store`]): a [`ConsolePublisher`] beside the MQTT
//!   publisher (`publish::Tee`) gets scores (thinned with atomics to
//!   `score_rate_hz`), alarms, snapshots, verdicts and events, and hands them
//!   over one bounded channel with `try_send` (dropped and counted when full)
//!   to the store thread, which keeps them bounded in memory under a mutex
//!   that only it and the HTTP handlers take.
//! - **Live view** ([`live`]): the inference thread offers each decided frame
//!   to a tap that copies one per `live_fps` interval, only while a viewer is
//!   connected, and hands it over with `try_send` to a one-slot-per-camera
//!   channel (skipped and counted when full); the encoder thread draws the
//!   heat map with `snapshot::render` and encodes the JPEG off the frame path.
//! - **Model**: the metadata of each model file, read once at start (the
//!   same check the pipeline runs), and the PNG plots of its training report
//!   folder (`<stem>.report/` or `<stem>_report/` beside it) when there is one.
//! - **Commands**: the buttons POST to `/api/cmd/<camera>/<name>` on the
//!   console's port, answered by the command intake as on the metrics port.
//!
//! The HTTP side ([`server`]) runs on the daemon's network runtime through
//! the shared bounded accept loop (`base::http::serve`); every page and asset
//! is compiled into the binary (`assets/`), and nothing is loaded from
//! another host. A console bound beyond loopback needs a token or basic auth
//! (refused by check-config otherwise; see [`config`]).

pub mod config;
pub mod live;
pub mod server;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use config::{ConsoleConfig, ConsoleSettings};
pub use live::LiveTaps;
pub use store::ConsolePublisher;

use crate::base::http::{serve, ConnLimits};
use crate::commands::Intake;
use crate::config::Settings;
use crate::events::Publisher;
use crate::metrics::CameraCounters;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console.listen {addr}: cannot listen: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Secret(#[from] config::SecretError),
    #[error("console: cannot start thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// A head sent within this long, or the connection closes (idle keep-alives too).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The running console; [`Console::shutdown`] stops it.
pub struct Console {
    pub addr: SocketAddr,
    shared: Arc<server::Shared>,
    stop_http: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stop_threads: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Cameras added by reloads that the console does not show (warned once).
    unshown: Mutex<Vec<String>>,
}

impl Console {
    /// Binds `cfg.listen`, reads the credential, starts the store and
    /// encoder threads and serves on `rt`. The pipeline's counters and the
    /// command intake come later ([`attach`](Self::attach)).
    pub fn start(
        cfg: &ConsoleSettings,
        settings: &Settings,
        rt: &tokio::runtime::Handle,
    ) -> Result<Console, ConsoleError> {
        let credential = cfg.auth.read()?;
        let bind_err = |source| ConsoleError::Bind { addr: cfg.listen.to_string(), source };
        let std_listener = std::net::TcpListener::bind(cfg.listen).map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = std_listener.local_addr().map_err(bind_err)?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?
        };

        let names: Vec<String> = settings.cameras.iter().map(|c| c.name.clone()).collect();
        let (publisher, items) = ConsolePublisher::new(&names, cfg.score_interval);
        let publisher = Arc::new(publisher);
        let store = Arc::new(Mutex::new(store::Store::new(
            names.len(),
            cfg.score_samples,
            cfg.alarms_kept,
            cfg.snapshots_kept,
        )));
        let counters: store::Counters = Arc::default();
        let stop_threads = Arc::new(AtomicBool::new(false));
        let (live, encoder, latest) =
            live::taps(settings.cameras.iter().map(|c| (c.name.clone(), c.roi)).collect(), cfg.live_interval);
        let threads = vec![
            store::spawn_store_thread(items, store.clone(), counters.clone(), stop_threads.clone())
                .map_err(ConsoleError::Spawn)?,
            encoder.spawn(stop_threads.clone()).map_err(ConsoleError::Spawn)?,
        ];
        let cameras = std::sync::RwLock::new(settings.cameras.iter().map(camera_info).collect());
        let (stop_http, stopping) = tokio::sync::watch::channel(false);
        let shared = Arc::new(server::Shared {
            credential,
            cameras,
            counters,
            store,
            live,
            latest,
            models: models(settings),
            snapshot_dir: settings.snapshots.as_ref().map(|s| s.dir.clone()),
            intake: OnceLock::new(),
            publisher,
            stopping: stopping.clone(),
        });
        let app = server::router(shared.clone());
        let limits = ConnLimits { max_connections: cfg.max_connections, header_timeout: HEADER_TIMEOUT };
        let mut until = stopping;
        let task = rt.spawn(async move {
            let until = async move {
                let _ = until.wait_for(|s| *s).await;
            };
            serve(listener, app, limits, until).await;
        });
        tracing::info!(%addr, auth = auth_name(&cfg.auth), "console on http://{addr}/");
        Ok(Console { addr, shared, stop_http, task, stop_threads, threads, unshown: Mutex::new(Vec::new()) })
    }

    /// The publisher to combine with the MQTT one.
    pub fn publisher(&self) -> Arc<dyn Publisher> {
        self.shared.publisher.clone()
    }

    /// The live-frame taps, for the inference threads.
    pub fn live(&self) -> Arc<LiveTaps> {
        self.shared.live.clone()
    }

    /// The pipeline runs: its cameras' counters (by name) and the intake.
    pub fn attach(&self, counters: Vec<(String, Arc<CameraCounters>)>, intake: Arc<Intake>) {
        self.set_counters(counters);
        let _ = self.shared.intake.set(intake);
    }

    /// A reload was applied: the console's cameras (those of the start) show
    /// their new thresholds and model, and the counters the pipeline now has
    /// for them (a restarted camera keeps its counters, but one a reload
    /// removed and a later one added back has new ones); a removed camera
    /// keeps its last counters, offline. A camera the reload added is not
    /// shown until a restart (the console's history and live views are laid
    /// out at start): said once per camera.
    pub fn follow(&self, settings: &Settings, counters: Vec<(String, Arc<CameraCounters>)>) {
        {
            let infos = self.shared.cameras.read().unwrap_or_else(|e| e.into_inner());
            let mut warned = self.unshown.lock().unwrap_or_else(|e| e.into_inner());
            let added: Vec<String> = settings
                .cameras
                .iter()
                .map(|c| c.name.clone())
                .filter(|n| !infos.iter().any(|i| i.name == *n) && !warned.contains(n))
                .collect();
            if !added.is_empty() {
                tracing::warn!(cameras = ?added, "the console shows cameras added by a reload after a restart");
                warned.extend(added);
            }
        }
        {
            let mut infos = self.shared.cameras.write().unwrap_or_else(|e| e.into_inner());
            for info in infos.iter_mut() {
                if let Some(c) = settings.cameras.iter().find(|c| c.name == info.name) {
                    *info = camera_info(c);
                }
            }
        }
        self.set_counters(counters);
    }

    /// The console's cameras' counters by name; a camera the pipeline no
    /// longer runs keeps the ones it had (its totals, offline).
    fn set_counters(&self, counters: Vec<(String, Arc<CameraCounters>)>) {
        let infos = self.shared.cameras.read().unwrap_or_else(|e| e.into_inner());
        let mut held = self.shared.counters.write().unwrap_or_else(|e| e.into_inner());
        let by_order = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                let now = counters.iter().find(|(n, _)| *n == info.name).map(|(_, c)| c.clone());
                now.or_else(|| held.get(i).cloned().flatten())
            })
            .collect();
        *held = by_order;
    }

    /// Stops serving (live streams end) and the threads; waits up to `timeout`.
    pub fn shutdown(self, rt: &tokio::runtime::Handle, timeout: Duration) {
        let _ = self.stop_http.send(true);
        let task = self.task;
        let _ = rt.block_on(async move { tokio::time::timeout(timeout, task).await });
        self.stop_threads.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn camera_info(c: &crate::config::CameraPlan) -> server::CameraInfo {
    server::CameraInfo {
        name: c.name.clone(),
        threshold: c.alarm.threshold,
        clear_threshold: c.alarm.clear_threshold,
        min_frames: c.alarm.min_frames,
        clear_frames: c.alarm.clear_frames,
        model: c.model.display().to_string(),
    }
}

fn auth_name(a: &config::Auth) -> &'static str {
    match a {
        config::Auth::None => "none (loopback)",
        config::Auth::Token(_) => "token",
        config::Auth::Basic { .. } => "basic",
    }
}

/// Each distinct model file's metadata as the Model page shows it, and its
/// training report folder. A model that cannot be read here (it was checked
/// at compile and is loaded by the pipeline) shows its error instead.
fn models(settings: &Settings) -> Vec<(serde_json::Value, Option<PathBuf>)> {
    let mut paths: Vec<&Path> = Vec::new();
    for c in &settings.cameras {
        if !paths.contains(&c.model.as_path()) {
            paths.push(&c.model);
        }
    }
    paths
        .into_iter()
        .map(|p| {
            let cameras: Vec<&str> =
                settings.cameras.iter().filter(|c| c.model == p).map(|c| c.name.as_str()).collect();
            let read =
                ganomaly_core::onnx::check::read_file(p).and_then(|b| ganomaly_core::onnx::check::check_model(&b));
            let v = match read {
                Ok(m) => serde_json::json!({
                    "path": p.display().to_string(),
                    "cameras": cameras,
                    "arch": m.arch,
                    "preprocess": m.preprocess,
                    "default_score": m.default_score,
                    "scores": m.scores,
                    "provenance": m.provenance,
                }),
                Err(e) => {
                    serde_json::json!({ "path": p.display().to_string(), "cameras": cameras, "error": e.to_string() })
                }
            };
            (v, report_dir(p))
        })
        .collect()
}

/// `<stem>.report/` (what `ganomaly-train train` writes) or `<stem>_report/` beside the model.
fn report_dir(model: &Path) -> Option<PathBuf> {
    let stem = model.file_stem()?.to_string_lossy().into_owned();
    [format!("{stem}.report"), format!("{stem}_report")]
        .into_iter()
        .map(|n| model.with_file_name(n))
        .find(|d| d.is_dir())
}
