//! ganomalyd: cameras → preprocessing → GANomaly on ONNX Runtime → alarms → MQTT.
//!
//! # Layout
//! Stages, named as they stand in the data flow:
//! - [`capture`]: `FrameSource`, one thread per camera, and the source kinds, each owning its config
//!   (`v4l2`, `http_mjpeg`, `replay`, `synthetic`; `source.rs` dispatches on `kind`).
//! - [`preprocess`]: the preprocessing thread pool (uses `ganomaly_core::preprocess`).
//! - [`infer`]: the inference thread that owns the ORT session; batching; execution providers.
//! - [`decide`]: what a scored frame means, as a pure function (normalise, NaN guard, alarm machine →
//!   actions); [`alarm`] is its per-camera state machine; [`alarm_state`] journals open alarms so that a
//!   restart after a crash ends them, and keeps alarm ids unique across restarts.
//! - [`trigger`]: triggered cameras: ring buffer, pending triggers, de-duplication, deadlines, on its own
//!   thread; [`verdict`] is the pure "scores of a part's frames → ok/ng/error" step.
//! - [`record`]: the inspection record (every verdict and alarm in SQLite, with retention).
//! - [`tiles`]: a camera's ROI scored as a grid of model-sized tiles (one batch per frame, max over tiles, maps stitched).
//! - [`snapshot`]: JPEG snapshots with the anomaly map as a heat overlay.
//! - [`recording`]: good frames of a camera, through its ROI, into `DIR/train/good/` (near-duplicates skipped).
//! - [`events`]: score/alarm/status payloads and the `Publisher` trait.
//! - [`publish`]: MQTT publisher (rumqttc), durable alarm outbox (SQLite), embedded broker.
//! - [`pipeline`]: wires the stages together from the compiled settings, rewires them on a reload, and owns
//!   shutdown; [`reload`] says what a new config changes (a pure plan); [`shadow`] compares a camera's
//!   candidate model with its model on the same frames.
//! - [`metrics`], [`exporter`]: per-camera counters and latency histograms; Prometheus `/metrics`, `/healthz`.
//! - [`systemd`]: READY/STOPPING/watchdog notifications. [`runtime`]: finding and loading ONNX Runtime.
//!
//! - [`drift`]: rolling statistics of alarm-free scores against the calibration's (pure).
//! - [`commission`]: the `record`, `calibrate` and `feedback` command handlers and the live-calibration state file.
//!
//! Around them:
//! - [`commands`]: commands from MQTT and HTTP (`trigger`, `reload`, `record`, `calibrate`, `feedback`),
//!   checked against `[commands]` and routed to their handlers; answers on the `events` topics.
//! - [`console`]: the web console (live view with heat maps, scores, history, model, command buttons).
//! - [`config`]: the TOML file parsed, checked (every problem at once) and compiled into typed settings.
//! - [`cmds`]: the subcommands (`run`, `check-config`, `cameras`, `score`, `bench`, `watch`).
//! - [`base`]: what stages share without importing each other (backoff, stop-aware sleep, heartbeat).

// `unwrap` on outside data is a crash on a plant floor (STYLE.md); tests may unwrap.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod alarm;
pub mod alarm_state;
pub mod base;
pub mod capture;
pub mod cmds;
pub mod commands;
pub mod commission;
pub mod config;
pub mod console;
pub mod decide;
pub mod drift;
pub mod events;
pub mod exporter;
pub mod infer;
pub mod metrics;
pub mod pipeline;
pub mod preprocess;
pub mod publish;
pub mod record;
pub mod recording;
pub mod reload;
pub mod runtime;
pub mod shadow;
pub mod snapshot;
pub mod systemd;
pub mod tiles;
pub mod trigger;
pub mod verdict;
