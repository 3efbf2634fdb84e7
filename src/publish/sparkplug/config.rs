//! `[sparkplug]`: the Sparkplug B edge node's section (group and edge node
//! ids, its broker, whether the plain topics stay, its store-and-forward
//! file, the DDATA rate), checked with every problem at once and compiled into
//! [`SparkplugSettings`].
//!
//! The broker: `[sparkplug.broker]` when given (host, port, credentials, TLS,
//! keep-alive, reconnect), else the `[mqtt]` section's connection, whole. The
//! two are never mixed: `[mqtt]`'s credentials are not sent to a
//! `[sparkplug.broker]` host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::publish::config::{MqttConfig, TlsConfig};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparkplugConfig {
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Sparkplug group id (`spBv1.0/<group_id>/...`): required.
    #[serde(default)]
    pub group_id: String,
    /// Edge node id; empty means the `[mqtt]` node id (itself the host name
    /// when empty).
    #[serde(default)]
    pub edge_node_id: String,
    /// Client id of the edge node's own connection; empty means
    /// `ganomalyd-<edge_node_id>-spb` (never the plain publisher's: the two
    /// would knock each other off the broker).
    #[serde(default)]
    pub client_id: String,
    /// Also publish the plain topics (`[mqtt]`); false: Sparkplug only
    /// (`[mqtt]` then serves only as the broker's connection).
    #[serde(default = "default_plain_topics")]
    pub plain_topics: bool,
    /// SQLite file where verdicts wait for the Sparkplug connection (its own
    /// file: the plain outbox deletes rows on its own broker's PUBACK). The
    /// bdSeq state file lies beside it (`.bdseq`).
    #[serde(default = "default_outbox_path")]
    pub outbox_path: PathBuf,
    /// Most DDATA messages per second and camera for score changes: scores
    /// change on every frame; alarm state, camera state and verdicts go out
    /// at once.
    #[serde(default = "default_ddata_max_rate_hz")]
    pub ddata_max_rate_hz: f64,
    /// The primary host application's id (Sparkplug 3.0): births wait for
    /// its `spBv1.0/STATE/<id>` to say online, and its offline STATE ends
    /// the session (NDEATH, reconnect, wait again). Empty: no primary host.
    #[serde(default)]
    pub primary_host_id: String,
    /// Its own broker; absent: the `[mqtt]` one.
    #[serde(default)]
    pub broker: Option<BrokerTable>,
}

/// `[sparkplug.broker]`: the connection keys of `[mqtt]`, and only those.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTable {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub allow_plaintext_credentials: bool,
    #[serde(default)]
    pub keep_alive_s: Option<f64>,
    #[serde(default)]
    pub connect_timeout_s: Option<f64>,
    #[serde(default)]
    pub reconnect_min_s: Option<f64>,
    #[serde(default)]
    pub reconnect_max_s: Option<f64>,
}

fn default_enabled() -> bool {
    true
}
fn default_plain_topics() -> bool {
    true
}
fn default_port() -> u16 {
    1883
}
fn default_outbox_path() -> PathBuf {
    PathBuf::from("/var/lib/ganomalyd/sparkplug-outbox.sqlite")
}
fn default_ddata_max_rate_hz() -> f64 {
    1.0
}

/// Longest group and edge node id: both are topic levels of every message.
const MAX_ID_BYTES: usize = 256;
/// DDATA rate bounds: below one a quarter hour the interval is not a rate any
/// more; above 100 Hz a 4-camera box would flood a SCADA broker.
const MIN_RATE_HZ: f64 = 0.001;
const MAX_RATE_HZ: f64 = 100.0;

/// What the edge node runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct SparkplugSettings {
    pub group_id: String,
    pub edge_node_id: String,
    pub client_id: String,
    pub plain_topics: bool,
    /// The connection (host, port, credentials, TLS, keep-alive, backoff),
    /// as an `[mqtt]` section; its outbox keys are this edge node's.
    pub broker: MqttConfig,
    pub outbox_path: PathBuf,
    /// bdSeq of the last connection, kept across restarts.
    pub bdseq_path: PathBuf,
    /// Shortest time between two score DDATA of one camera.
    pub ddata_interval: Duration,
    pub primary_host_id: Option<String>,
}

/// A Sparkplug id (group, edge node, device): a topic level, so none of
/// `/ + #` (and no NUL), non-empty, bounded.
pub fn bad_id(s: &str) -> Option<String> {
    if s.is_empty() {
        Some("must not be empty".into())
    } else if s.contains(['/', '+', '#', '\0']) {
        Some(format!("{s:?} must not contain '/', '+' or '#' (Sparkplug ids are MQTT topic levels)"))
    } else if s.len() > MAX_ID_BYTES {
        Some(format!("must be at most {MAX_ID_BYTES} bytes (got {})", s.len()))
    } else {
        None
    }
}

impl SparkplugConfig {
    /// Checks the section against `[mqtt]` (as written, `None` without one)
    /// and compiles it; every problem names its key under `sparkplug.`.
    /// `[mqtt]`'s own problems are reported by its section, not again here.
    /// Files (passwords, TLS) are resolved against `base`, not read.
    pub fn compile(
        &self,
        mqtt: Option<&MqttConfig>,
        base: &Path,
        problems: &mut Vec<String>,
    ) -> Option<SparkplugSettings> {
        let before = problems.len();
        let mut bad = |field: &str, msg: String| problems.push(format!("sparkplug.{field}: {msg}"));
        if let Some(e) = bad_id(&self.group_id) {
            bad("group_id", e);
        }
        let mqtt_on = mqtt.filter(|m| m.enabled);
        let edge_node_id = if self.edge_node_id.is_empty() {
            mqtt.map(MqttConfig::resolved_node_id).unwrap_or_else(|| MqttConfig::default().resolved_node_id())
        } else {
            self.edge_node_id.clone()
        };
        if let Some(e) = bad_id(&edge_node_id) {
            bad("edge_node_id", e);
        }
        if !self.primary_host_id.is_empty() {
            if let Some(e) = bad_id(&self.primary_host_id) {
                bad("primary_host_id", e);
            }
        }
        if self.client_id.len() > 65535 || self.client_id.contains('\0') {
            bad("client_id", "must be at most 65535 bytes without NUL characters".into());
        }
        let client_id =
            if self.client_id.is_empty() { format!("ganomalyd-{edge_node_id}-spb") } else { self.client_id.clone() };
        if let Some(m) = mqtt_on {
            if self.plain_topics && m.resolved_client_id(&m.resolved_node_id()) == client_id {
                bad(
                    "client_id",
                    format!("{client_id:?} is the plain publisher's client id too: the two connections would knock each other off"),
                );
            }
        }
        if self.outbox_path.as_os_str().is_empty() {
            bad("outbox_path", "must not be empty".into());
        }
        if let Some(m) = mqtt {
            if base.join(&m.outbox_path) == base.join(&self.outbox_path) {
                bad("outbox_path", "must not be [mqtt]'s outbox_path: each connection deletes its own rows".into());
            }
        }
        let hz = self.ddata_max_rate_hz;
        if !(hz.is_finite() && (MIN_RATE_HZ..=MAX_RATE_HZ).contains(&hz)) {
            bad("ddata_max_rate_hz", format!("{hz} must be between {MIN_RATE_HZ} and {MAX_RATE_HZ}"));
        }
        let broker = match (&self.broker, mqtt) {
            (Some(b), _) => {
                let m = b.as_mqtt(&self.outbox_path);
                let mut p = Vec::new();
                m.validate("sparkplug.broker", &mut p);
                problems.extend(p);
                m
            }
            (None, Some(m)) => {
                if m.embedded && !(self.plain_topics && m.enabled) {
                    problems.push(
                        "sparkplug.plain_topics: the embedded broker ([mqtt] embedded = true) runs with the plain \
                         publisher: keep plain_topics = true and [mqtt] enabled, or give [sparkplug.broker]"
                            .into(),
                    );
                }
                if m.embedded && m.embedded_listen.port() == 0 {
                    problems.push(
                        "sparkplug.broker: [mqtt] embedded_listen has port 0, which the Sparkplug connection cannot \
                         know: give the embedded broker a port"
                            .into(),
                    );
                }
                let mut m = m.clone();
                // The embedded broker is the plain publisher's to start; this
                // connection is an ordinary client of it.
                if m.embedded {
                    m.host = m.embedded_listen.ip().to_string();
                    m.port = m.embedded_listen.port();
                    m.embedded = false;
                }
                m.enabled = true;
                m.outbox_path = self.outbox_path.clone();
                m
            }
            (None, None) => MqttConfig { outbox_path: self.outbox_path.clone(), ..MqttConfig::default() },
        };
        if problems.len() != before {
            return None;
        }
        let broker = broker.resolved(base);
        let outbox_path = broker.outbox_path.clone();
        Some(SparkplugSettings {
            group_id: self.group_id.clone(),
            edge_node_id,
            client_id,
            plain_topics: self.plain_topics,
            bdseq_path: outbox_path.with_extension("bdseq"),
            outbox_path,
            broker,
            ddata_interval: Duration::from_secs_f64(1.0 / hz),
            primary_host_id: (!self.primary_host_id.is_empty()).then(|| self.primary_host_id.clone()),
        })
    }
}

impl BrokerTable {
    /// As an `[mqtt]` section: these keys, the rest defaults.
    fn as_mqtt(&self, outbox: &Path) -> MqttConfig {
        let d = MqttConfig::default();
        MqttConfig {
            host: self.host.clone(),
            port: self.port,
            username: self.username.clone(),
            password_file: self.password_file.clone(),
            password_env: self.password_env.clone(),
            tls: self.tls.clone(),
            allow_plaintext_credentials: self.allow_plaintext_credentials,
            keep_alive_s: self.keep_alive_s.unwrap_or(d.keep_alive_s),
            connect_timeout_s: self.connect_timeout_s.unwrap_or(d.connect_timeout_s),
            reconnect_min_s: self.reconnect_min_s.unwrap_or(d.reconnect_min_s),
            reconnect_max_s: self.reconnect_max_s.unwrap_or(d.reconnect_max_s),
            outbox_path: outbox.to_path_buf(),
            ..d
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(text: &str, mqtt: Option<&MqttConfig>) -> Result<SparkplugSettings, Vec<String>> {
        let c: SparkplugConfig = toml::from_str(text).expect("parses");
        let mut p = Vec::new();
        c.compile(mqtt, Path::new("/etc/g"), &mut p).ok_or(p)
    }

    #[test]
    fn defaults_follow_the_mqtt_section() {
        let mqtt =
            MqttConfig { host: "broker.plant".into(), port: 8883, node_id: "box7".into(), ..MqttConfig::default() };
        let s = compile("group_id = \"plant-a\"", Some(&mqtt)).unwrap();
        assert_eq!((s.group_id.as_str(), s.edge_node_id.as_str()), ("plant-a", "box7"));
        assert_eq!(s.client_id, "ganomalyd-box7-spb");
        assert_eq!((s.broker.host.as_str(), s.broker.port), ("broker.plant", 8883));
        assert_eq!(s.outbox_path, Path::new("/var/lib/ganomalyd/sparkplug-outbox.sqlite"));
        assert_eq!(s.bdseq_path, Path::new("/var/lib/ganomalyd/sparkplug-outbox.bdseq"));
        assert!(s.plain_topics);
        assert_eq!(s.ddata_interval, Duration::from_secs(1));
        assert_eq!(s.primary_host_id, None);
    }

    #[test]
    fn its_own_broker_takes_nothing_from_mqtt() {
        let mqtt = MqttConfig {
            host: "127.0.0.1".into(),
            username: Some("plain-user".into()),
            password_env: Some("PW".into()),
            ..MqttConfig::default()
        };
        let s = compile(
            "group_id = \"g\"\nedge_node_id = \"e\"\noutbox_path = \"spb.sqlite\"\n[broker]\nhost = \"127.0.0.2\"\nport = 1884\n",
            Some(&mqtt),
        )
        .unwrap();
        assert_eq!((s.broker.host.as_str(), s.broker.port, s.broker.username.as_ref()), ("127.0.0.2", 1884, None));
        assert_eq!(s.broker.password_env, None, "[mqtt]'s password is not sent to another broker");
        assert_eq!(s.outbox_path, Path::new("/etc/g/spb.sqlite"), "relative to the config file");
    }

    #[test]
    fn every_problem_names_its_key() {
        let mqtt = MqttConfig { outbox_path: "o.sqlite".into(), node_id: "n".into(), ..MqttConfig::default() };
        let p = compile(
            "group_id = \"a/b\"\nedge_node_id = \"x#\"\nddata_max_rate_hz = 0\noutbox_path = \"o.sqlite\"\nprimary_host_id = \"h/1\"\n\
             [broker]\nhost = \"\"\nkeep_alive_s = 0.5\n",
            Some(&mqtt),
        )
        .unwrap_err();
        for key in [
            "sparkplug.group_id:",
            "sparkplug.edge_node_id:",
            "sparkplug.ddata_max_rate_hz:",
            "sparkplug.outbox_path:",
            "sparkplug.primary_host_id:",
            "sparkplug.broker.host:",
            "sparkplug.broker.keep_alive_s:",
        ] {
            assert!(p.iter().any(|s| s.starts_with(key)), "{key} missing from {p:#?}");
        }
        assert_eq!(p.len(), 7, "{p:#?}");
        let p = compile("", None).unwrap_err();
        assert!(p.len() == 1 && p[0].starts_with("sparkplug.group_id: must not be empty"), "{p:?}");
        let e = toml::from_str::<SparkplugConfig>("group_id = \"g\"\n[broker]\nhost = \"h\"\ntopic_prefix = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("topic_prefix"), "only connection keys in [sparkplug.broker]: {e}");
    }

    #[test]
    fn the_plain_client_id_and_the_embedded_broker_without_plain_topics_are_refused() {
        let mqtt = MqttConfig { node_id: "n".into(), client_id: "same".into(), ..MqttConfig::default() };
        let p = compile("group_id = \"g\"\nclient_id = \"same\"", Some(&mqtt)).unwrap_err();
        assert!(p.len() == 1 && p[0].starts_with("sparkplug.client_id:"), "{p:?}");
        let embedded = MqttConfig { embedded: true, node_id: "n".into(), ..MqttConfig::default() };
        let p = compile("group_id = \"g\"\nplain_topics = false", Some(&embedded)).unwrap_err();
        assert!(p.len() == 1 && p[0].starts_with("sparkplug.plain_topics:"), "{p:?}");
        let s = compile("group_id = \"g\"", Some(&embedded)).unwrap();
        assert_eq!((s.broker.host.as_str(), s.broker.port, s.broker.embedded), ("127.0.0.1", 1883, false));
    }
}
