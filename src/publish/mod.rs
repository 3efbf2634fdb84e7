//! The publish stage: what the pipeline's [`Publisher`]
//! calls turn into MQTT messages.
//!
//! # Layout
//! - [`config`]: the `[mqtt]` config section and its validation.
//! - [`mqtt`]: [`MqttPublisher`] on rumqttc: the front end the pipeline calls,
//!   a link task owning the event loop, a sender task, and the I/O-free
//!   packet-id ↔ outbox-row bookkeeping (`mqtt/state.rs`).
//! - [`outbox`]: the durable SQLite alarm queue (deleted on PUBACK only).
//! - [`tls`]: the rustls client config (ring provider).
//! - [`discovery`]: Home Assistant discovery messages.
//! - [`broker`]: the embedded rumqttd broker.
//! - [`sparkplug`]: the Sparkplug B edge node (its own connection).
//! - [`tee`]: one publisher feeding several (plain topics, Sparkplug, the console).
//!
//! Topics and payloads are documented in `docs/mqtt.md`.

pub mod broker;
pub mod config;
pub mod discovery;
pub mod mqtt;
pub mod outbox;
pub mod sparkplug;
pub mod tee;
pub mod tls;

pub use broker::EmbeddedBroker;
pub use config::{MqttConfig, TlsConfig};
pub use mqtt::{MqttPublisher, PublisherCounters, PublisherHandle};
pub use sparkplug::{SparkplugPublisher, SparkplugSettings};
pub use tee::Tee;

use std::path::PathBuf;

use crate::events::{AlarmEvent, Publisher, ScoreEvent, Snapshot, StatsReport};

/// Errors starting the publisher (a running one retries, it never fails).
/// Each keeps its cause; none prints a password.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    /// `password_file` cannot be read (the error names the file, never its content).
    #[error("mqtt.password_file {}: {source}", path.display())]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `password_env` names a variable that is not set.
    #[error("mqtt.password_env {var}: not set")]
    PasswordEnvUnset { var: String },
    /// `password_env` holds something that is not UTF-8. Not kept as
    /// `std::env::VarError`: its `NotUnicode` holds, and prints, the value.
    #[error("mqtt.password_env {var}: not valid UTF-8")]
    PasswordEnvNotUnicode { var: String },
    /// The `[mqtt]` section's problems, each naming its field.
    #[error("mqtt: {}", .0.join("; "))]
    Config(Vec<String>),
}

impl PublishError {
    /// `password_env`'s variable could not be read; drops the value that
    /// `VarError::NotUnicode` carries.
    pub fn password_env(var: &str, e: std::env::VarError) -> PublishError {
        let var = var.to_string();
        match e {
            std::env::VarError::NotPresent => PublishError::PasswordEnvUnset { var },
            std::env::VarError::NotUnicode(_) => PublishError::PasswordEnvNotUnicode { var },
        }
    }
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

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::os::unix::ffi::OsStringExt;

    use super::*;

    /// The whole chain, as `{:#}` at the top of the binary prints it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            s += &format!(": {c}");
            cause = c.source();
        }
        s
    }

    #[test]
    fn password_errors_keep_their_cause_and_never_print_the_password() {
        let e = PublishError::PasswordFile {
            path: "/etc/ganomalyd/pw".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let io = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()).map(|e| e.kind());
        assert_eq!(io, Some(std::io::ErrorKind::PermissionDenied));
        assert!(e.to_string().starts_with("mqtt.password_file /etc/ganomalyd/pw: "), "{e}");

        let e = PublishError::password_env("PW", std::env::VarError::NotPresent);
        assert_eq!(e.to_string(), "mqtt.password_env PW: not set");
        // A Latin-1 password: not UTF-8, and VarError would print it.
        let value = std::ffi::OsString::from_vec(b"hunter2\xe9".to_vec());
        let e = PublishError::password_env("PW", std::env::VarError::NotUnicode(value));
        assert_eq!(e.to_string(), "mqtt.password_env PW: not valid UTF-8");
        assert!(!format!("{} {e:?}", chain(&e)).contains("hunter2"), "{e:?}");
    }
}
