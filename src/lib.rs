//! ganomalyd: cameras → preprocessing → GANomaly on ONNX Runtime → alarms → MQTT.
//!
//! # Layout (files named after pipeline stages)
//! - [`config`]: the TOML config, defaults, validation that reports every problem.
//! - [`capture`]: `FrameSource` and its implementations (V4L2, replay, synthetic), one thread per camera.
//! - [`preprocess`]: the preprocessing thread pool (uses `ganomaly_core::preprocess`).
//! - [`runtime`]: finding and loading the ONNX Runtime library.
//! - [`infer`]: the inference thread that owns the ORT session; batching; execution providers.
//! - [`alarm`]: per-camera alarm state machine.
//! - [`snapshot`]: JPEG snapshots with the anomaly map as a heat overlay.
//! - [`events`]: score/alarm/status payloads and the `Publisher` trait.
//! - [`publish`]: MQTT publisher (rumqttc), durable alarm outbox (SQLite), embedded broker.
//! - [`pipeline`]: wires the stages together and owns shutdown.
//! - [`daemon`]: `ganomalyd run` around the pipeline: publisher, systemd, SIGHUP, shutdown.
//! - [`metrics`]: per-camera counters and latency histograms.
//! - [`exporter`]: the `[metrics]` HTTP endpoint, Prometheus `/metrics` and `/healthz`.
//! - [`systemd`]: READY/STOPPING/watchdog notifications.
//! - [`score`], [`bench`]: the `score` and `bench` commands.

pub mod alarm;
pub mod bench;
pub mod capture;
pub mod config;
pub mod daemon;
pub mod events;
pub mod exporter;
pub mod infer;
pub mod metrics;
pub mod pipeline;
pub mod preprocess;
pub mod publish;
pub mod runtime;
pub mod score;
pub mod snapshot;
pub mod systemd;
pub mod watch;
