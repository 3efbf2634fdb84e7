//! The publish stage: what the pipeline's [`Publisher`](crate::events::Publisher)
//! calls turn into MQTT messages.
//!
//! # Layout
//! - [`config`]: the `[mqtt]` config section and its validation.
//! - [`mqtt`]: [`MqttPublisher`] on rumqttc: the front end the pipeline calls,
//!   a link task owning the event loop, a sender task, and the I/O-free
//!   packet-id ↔ outbox-row bookkeeping (`mqtt/state.rs`).
//! - [`outbox`]: the durable SQLite alarm queue (deleted on PUBACK only).
//! - [`backoff`]: exponential reconnect backoff with jitter.
//! - [`tls`]: the rustls client config (ring provider).
//! - [`discovery`]: Home Assistant discovery messages.
//! - [`broker`]: the embedded rumqttd broker.
//!
//! Topics and payloads are documented in `docs/mqtt.md`.

pub mod backoff;
pub mod broker;
pub mod config;
pub mod discovery;
pub mod mqtt;
pub mod outbox;
pub mod tls;

pub use broker::EmbeddedBroker;
pub use config::{MqttConfig, TlsConfig};
pub use mqtt::{MqttPublisher, PublisherCounters, PublisherHandle};

use crate::events::{AlarmEvent, Publisher, ScoreEvent, Snapshot, StatsReport};

/// Errors starting the publisher (a running one retries, it never fails).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("{0}")]
    Secret(String),
    #[error("mqtt: {0}")]
    Config(String),
}

/// The topic tree of one daemon: `<prefix>/<node>/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    node: String,
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, node: &str) -> Self {
        Topics { node: node.to_string(), base: format!("{}/{node}", prefix.trim_end_matches('/')) }
    }
    pub fn node(&self) -> &str {
        &self.node
    }
    /// `<prefix>/<node>`; subscribe to `<base>/#` for everything.
    pub fn base(&self) -> &str {
        &self.base
    }
    /// `online` / `offline` (retained; `offline` is also the last will).
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }
    pub fn stats(&self) -> String {
        format!("{}/stats", self.base)
    }
    /// `<base>/<camera>/<leaf>` with leaf one of `score`, `alarm`, `state`,
    /// `camera`, `snapshot`.
    pub fn camera(&self, camera: &str, leaf: &str) -> String {
        format!("{}/{camera}/{leaf}", self.base)
    }
}

/// Publishes nothing: for `[mqtt] enabled = false`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullPublisher;

impl Publisher for NullPublisher {
    fn score(&self, _: &ScoreEvent) {}
    fn alarm(&self, ev: &AlarmEvent) {
        tracing::info!(camera = %ev.camera, id = %ev.id, kind = ?ev.kind, "alarm (MQTT disabled)");
    }
    fn camera_online(&self, _: &str, _: bool) {}
    fn alarm_state(&self, _: &str, _: bool) {}
    fn snapshot(&self, _: &Snapshot) {}
    fn stats(&self, _: &StatsReport) {}
}
