//! `[mqtt]` section of the daemon config: broker address, security, topics,
//! rates and the outbox bounds, with defaults and a validation that reports
//! every problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the daemon talks to the plant's broker.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Off: the daemon scores and raises alarms but publishes nothing.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Broker host name or address (ignored when `embedded`).
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// MQTT client id; empty means `ganomalyd-<node_id>`. Two daemons with the
    /// same id would kick each other off the broker in a loop.
    #[serde(default)]
    pub client_id: String,
    /// First topic level: `<topic_prefix>/<node_id>/...`.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// Second topic level; empty means the host name.
    #[serde(default)]
    pub node_id: String,
    /// Seconds between pings; also how long a killed daemon takes to go
    /// `offline` through its last will (the broker waits 1.5× this).
    /// Whole seconds: MQTT carries the keep-alive as an integer.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: f64,
    /// Give up a connection attempt (TCP + TLS + CONNACK) after this long.
    #[serde(default = "default_connect_timeout_s")]
    pub connect_timeout_s: f64,
    /// Reconnect backoff: first wait, doubled after each failure up to the max,
    /// with full jitter so a plant full of boxes does not reconnect in step.
    #[serde(default = "default_reconnect_min_s")]
    pub reconnect_min_s: f64,
    #[serde(default = "default_reconnect_max_s")]
    pub reconnect_max_s: f64,
    #[serde(default)]
    pub username: Option<String>,
    /// File whose first line is the password (keeps it out of the config).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// A user name and password sent without `[mqtt.tls]` to a broker that is
    /// not on this box cross the plant network in clear text: refused unless
    /// this says it is meant (a broker on an isolated cell network).
    #[serde(default)]
    pub allow_plaintext_credentials: bool,
    /// Most `score` messages per second and camera; scores in between are
    /// skipped (counted as throttled). 0 publishes no scores at all. Keeps a
    /// 30 fps camera from flooding a plant broker.
    #[serde(default = "default_score_max_rate_hz")]
    pub score_max_rate_hz: f64,
    /// Publish the alarm snapshot JPEG (retained) on `<camera>/snapshot`.
    #[serde(default = "default_snapshots")]
    pub snapshots: bool,
    /// Scores waiting for the network; beyond this they are dropped (counted)
    /// rather than ever holding up the frame path.
    #[serde(default = "default_score_queue")]
    pub score_queue: usize,
    /// SQLite file of the durable alarm outbox.
    #[serde(default = "default_outbox_path")]
    pub outbox_path: PathBuf,
    /// Oldest alarms are dropped (counted, logged) beyond this many rows, so a
    /// broker that never comes back cannot fill the disk.
    #[serde(default = "default_outbox_max_rows")]
    pub outbox_max_rows: u64,
    /// Alarms older than this are dropped (counted, logged) undelivered: after
    /// a week they are history, not news.
    #[serde(default = "default_outbox_max_age_s")]
    pub outbox_max_age_s: f64,
    /// Alarms published but not yet acknowledged at any time. Small keeps the
    /// re-sends after a reconnect few; 1 would make it strictly one at a time.
    #[serde(default = "default_alarm_inflight")]
    pub alarm_inflight: u16,
    /// A broker may close the connection on a publish it does not authorize
    /// (MQTT 3.1.1 §3.3.5); after this many lost connections with the same
    /// alarm the oldest in flight (sent alone after the first), that alarm is
    /// moved to the outbox's dead-letter table so that later ones flow.
    #[serde(default = "default_dead_letter_after_closes")]
    pub dead_letter_after_closes: u32,
    /// Home Assistant MQTT discovery (off by default).
    #[serde(default)]
    pub discovery: bool,
    #[serde(default = "default_discovery_prefix")]
    pub discovery_prefix: String,
    /// Start an MQTT broker (rumqttd) inside the daemon and publish to it: for
    /// the demo and boxes without a plant broker.
    #[serde(default)]
    pub embedded: bool,
    /// Where the embedded broker listens. Loopback by default: it has no
    /// authentication.
    #[serde(default = "default_embedded_listen")]
    pub embedded_listen: SocketAddr,
}

/// TLS to the broker. Without `ca_file` the connection is refused: there is
/// no built-in trust store on purpose (plant brokers use private CAs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate (chain) for mutual TLS; needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

fn default_enabled() -> bool {
    true
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}
fn default_topic_prefix() -> String {
    "ganomalyd".into()
}
fn default_keep_alive_s() -> f64 {
    30.0
}
fn default_connect_timeout_s() -> f64 {
    10.0
}
fn default_reconnect_min_s() -> f64 {
    0.5
}
fn default_reconnect_max_s() -> f64 {
    30.0
}
fn default_score_max_rate_hz() -> f64 {
    2.0
}
fn default_snapshots() -> bool {
    true
}
fn default_score_queue() -> usize {
    256
}
fn default_outbox_path() -> PathBuf {
    PathBuf::from("/var/lib/ganomalyd/outbox.sqlite")
}
fn default_outbox_max_rows() -> u64 {
    10_000
}
fn default_outbox_max_age_s() -> f64 {
    7.0 * 24.0 * 3600.0
}
fn default_alarm_inflight() -> u16 {
    10
}
fn default_dead_letter_after_closes() -> u32 {
    5
}
fn default_discovery_prefix() -> String {
    "homeassistant".into()
}
fn default_embedded_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: default_enabled(),
            host: default_host(),
            port: default_port(),
            client_id: String::new(),
            topic_prefix: default_topic_prefix(),
            node_id: String::new(),
            keep_alive_s: default_keep_alive_s(),
            connect_timeout_s: default_connect_timeout_s(),
            reconnect_min_s: default_reconnect_min_s(),
            reconnect_max_s: default_reconnect_max_s(),
            username: None,
            password_file: None,
            password_env: None,
            tls: None,
            allow_plaintext_credentials: false,
            score_max_rate_hz: default_score_max_rate_hz(),
            snapshots: default_snapshots(),
            score_queue: default_score_queue(),
            outbox_path: default_outbox_path(),
            outbox_max_rows: default_outbox_max_rows(),
            outbox_max_age_s: default_outbox_max_age_s(),
            alarm_inflight: default_alarm_inflight(),
            dead_letter_after_closes: default_dead_letter_after_closes(),
            discovery: false,
            discovery_prefix: default_discovery_prefix(),
            embedded: false,
            embedded_listen: default_embedded_listen(),
        }
    }
}

/// Debug without anything secret-adjacent: the password's file and variable
/// names are shown, never a password (the config holds none).
impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("enabled", &self.enabled)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("node_id", &self.node_id)
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env)
            .field("tls", &self.tls)
            .field("allow_plaintext_credentials", &self.allow_plaintext_credentials)
            .field("embedded", &self.embedded)
            .field("embedded_listen", &self.embedded_listen)
            .field("outbox_path", &self.outbox_path)
            .finish_non_exhaustive()
    }
}

/// A password read from a file or the environment. Debug and Display never
/// show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Topic levels may not contain these (MQTT wildcards and the separator).
fn bad_topic_level(s: &str) -> bool {
    s.is_empty() || s.contains(['/', '+', '#', '\0'])
}

/// Longest `topic_prefix` and `discovery_prefix`: with a node id and a camera
/// name ([`MAX_NODE_ID_BYTES`], 64) and the longest suffix, every topic stays
/// far inside MQTT's 65,535 bytes.
const MAX_PREFIX_BYTES: usize = 1024;
/// Longest `node_id`.
const MAX_NODE_ID_BYTES: usize = 256;
/// Most score messages queued for the network: a few minutes of a 2 Hz
/// camera fleet; tokio's channel would take up to 2^61 and panic above, and
/// rumqttc's request queue is sized from it.
const MAX_SCORE_QUEUE: usize = 100_000;
/// Most outbox rows: SQLite counts rows as i64, and 10 million alarms of a
/// few hundred bytes are gigabytes of disk.
const MAX_OUTBOX_ROWS: u64 = 10_000_000;
/// Shortest first reconnect wait: a plant full of boxes reconnecting every
/// millisecond to a broker that refuses them is a denial of service.
const MIN_RECONNECT_S: f64 = 0.05;

/// A topic prefix: levels without wildcards, not a `$` topic (`$SYS/...` is
/// the broker's own; MQTT §4.7.2), short enough for every topic under it.
fn topic_prefix(field: &str, s: &str, bad: &mut impl FnMut(&str, String)) {
    if s.is_empty() || s.split('/').any(bad_topic_level) {
        bad(field, format!("{s:?} must be non-empty topic levels without '+', '#' or empty levels"));
    } else if s.starts_with('$') {
        bad(field, format!("{s:?} must not start with '$' (topics starting with '$' are the broker's own)"));
    } else if s.len() > MAX_PREFIX_BYTES {
        bad(field, format!("must be at most {MAX_PREFIX_BYTES} bytes (got {})", s.len()));
    }
}

impl MqttConfig {
    /// Pushes every problem, each naming its field under `prefix` (`mqtt.port: ...`).
    pub fn validate(&self, prefix: &str, problems: &mut Vec<String>) {
        let mut bad = |field: &str, msg: String| problems.push(format!("{prefix}.{field}: {msg}"));
        if !self.embedded && self.host.trim().is_empty() {
            bad("host", "must not be empty".into());
        } else if !self.embedded && crate::base::check::parse_host(&self.host).is_none() {
            bad(
                "host",
                format!(
                    "`{}` is not a host name or IP address (the port goes in `port`, credentials in `username`)",
                    crate::base::redact::url(&self.host)
                ),
            );
        }
        if !self.embedded && self.port == 0 {
            bad("port", "must be 1..=65535".into());
        }
        topic_prefix("topic_prefix", &self.topic_prefix, &mut bad);
        if !self.node_id.is_empty() && bad_topic_level(&self.node_id) {
            bad("node_id", format!("{:?} must be one topic level: no '/', '+' or '#'", self.node_id));
        } else if self.node_id.len() > MAX_NODE_ID_BYTES {
            bad("node_id", format!("must be at most {MAX_NODE_ID_BYTES} bytes (got {})", self.node_id.len()));
        }
        if self.client_id.len() > 65535 || self.client_id.contains('\0') {
            bad("client_id", "must be at most 65535 bytes without NUL characters".into());
        }
        if let Some(user) = &self.username {
            // Not quoted: a user name is half a credential.
            if user.len() > 65535 || user.contains('\0') {
                bad(
                    "username",
                    format!("must be at most 65535 bytes without NUL characters (got {} bytes)", user.len()),
                );
            }
            let plain = self.tls.is_none() && !self.embedded;
            if plain && !self.allow_plaintext_credentials && !crate::base::check::is_loopback_host(&self.host) {
                bad(
                    "username",
                    format!(
                        "credentials would cross the network to {} in clear text: add [mqtt.tls], \
                         or set allow_plaintext_credentials = true if that network is trusted",
                        crate::base::redact::url(&self.host)
                    ),
                );
            }
        }
        // rumqttd has no authentication here: anyone who reaches the port
        // could read every alarm and publish commands.
        if self.embedded && !self.embedded_listen.ip().is_loopback() {
            bad(
                "embedded_listen",
                format!(
                    "{} is not a loopback address: the embedded broker has no authentication; \
                     serve other hosts from a plant broker (e.g. Mosquitto with passwords and TLS)",
                    self.embedded_listen
                ),
            );
        }
        // rumqttc refuses keep-alives under a second (0 = none, and then a
        // killed daemon would never go offline); MQTT carries whole seconds.
        let ka = self.keep_alive_s;
        if !(ka.is_finite() && ka.fract() == 0.0 && (1.0..=65535.0).contains(&ka)) {
            bad("keep_alive_s", format!("{ka} must be whole seconds 1..=65535 (the last will depends on it)"));
        }
        // rumqttc takes the connect timeout in whole seconds too.
        let ct = self.connect_timeout_s;
        if !(ct.is_finite() && ct.fract() == 0.0 && (1.0..=300.0).contains(&ct)) {
            bad("connect_timeout_s", format!("{ct} must be whole seconds between 1 and 300"));
        }
        // Bounded so the backoff's Duration arithmetic cannot overflow, and so a
        // broker that comes back is found within the hour.
        if !(self.reconnect_min_s.is_finite() && (MIN_RECONNECT_S..=3600.0).contains(&self.reconnect_min_s)) {
            bad("reconnect_min_s", format!("{} must be between {MIN_RECONNECT_S} and 3600", self.reconnect_min_s));
        }
        if !(self.reconnect_max_s.is_finite() && self.reconnect_max_s <= 3600.0) {
            bad("reconnect_max_s", format!("{} must be at most 3600", self.reconnect_max_s));
        } else if self.reconnect_max_s < self.reconnect_min_s {
            bad(
                "reconnect_max_s",
                format!("{} is below reconnect_min_s ({})", self.reconnect_max_s, self.reconnect_min_s),
            );
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            bad("password_file", "set either password_file or password_env, not both".into());
        }
        if (self.password_file.is_some() || self.password_env.is_some()) && self.username.is_none() {
            bad("username", "a password is configured but no username".into());
        }
        if let Some(v) = &self.password_env {
            if v.is_empty() || v.contains('=') || v.contains('\0') {
                bad("password_env", format!("{v:?} is not an environment variable name"));
            }
        }
        if self.embedded && self.tls.is_some() {
            bad("tls", "the embedded broker speaks plain MQTT on loopback; drop [mqtt.tls] or embedded".into());
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                bad("tls.cert_file", "cert_file and key_file go together (mutual TLS needs both)".into());
            }
        }
        // Below 0.001 Hz (one score in 17 minutes) the interval would overflow a Duration.
        let hz = self.score_max_rate_hz;
        if !hz.is_finite() || !(hz == 0.0 || (0.001..=1000.0).contains(&hz)) {
            bad("score_max_rate_hz", format!("{hz} must be 0 (scores off) or between 0.001 and 1000"));
        }
        if !(1..=MAX_SCORE_QUEUE).contains(&self.score_queue) {
            bad("score_queue", format!("{} must be between 1 and {MAX_SCORE_QUEUE}", self.score_queue));
        }
        if self.outbox_path.as_os_str().is_empty() {
            bad("outbox_path", "must not be empty".into());
        }
        if !(1..=MAX_OUTBOX_ROWS).contains(&self.outbox_max_rows) {
            bad("outbox_max_rows", format!("{} must be between 1 and {MAX_OUTBOX_ROWS}", self.outbox_max_rows));
        }
        // A year at most: the age is compared in milliseconds.
        if !(self.outbox_max_age_s.is_finite() && (1.0..=366.0 * 86_400.0).contains(&self.outbox_max_age_s)) {
            bad("outbox_max_age_s", format!("{} must be between 1 and 31622400 (a year)", self.outbox_max_age_s));
        }
        // rumqttc's packet ids run 1..inflight; the window must fit in them.
        if self.alarm_inflight == 0 || self.alarm_inflight > 1000 {
            bad("alarm_inflight", format!("{} must be 1..=1000", self.alarm_inflight));
        }
        // 1 would dead-letter an alarm on one unlucky outage; past 100 a
        // refused alarm would hold up the rest for hours of backoff.
        if !(2..=100).contains(&self.dead_letter_after_closes) {
            bad("dead_letter_after_closes", format!("{} must be 2..=100", self.dead_letter_after_closes));
        }
        if self.discovery {
            topic_prefix("discovery_prefix", &self.discovery_prefix, &mut bad);
        }
    }

    /// The same settings with relative paths resolved against `base` (the
    /// config file's directory), as every other path of the config is.
    pub fn resolved(&self, base: &Path) -> MqttConfig {
        let mut m = self.clone();
        m.outbox_path = base.join(&m.outbox_path);
        m.password_file = m.password_file.map(|p| base.join(p));
        if let Some(t) = m.tls.as_mut() {
            t.ca_file = base.join(&t.ca_file);
            t.cert_file = t.cert_file.as_ref().map(|p| base.join(p));
            t.key_file = t.key_file.as_ref().map(|p| base.join(p));
        }
        m
    }

    /// Keep-alive as rumqttc takes it (validated: whole seconds).
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.keep_alive_s as u64)
    }

    /// Connect timeout in the whole seconds rumqttc takes (validated).
    pub fn connect_timeout_secs(&self) -> u64 {
        self.connect_timeout_s as u64
    }

    /// First and longest reconnect wait.
    pub fn reconnect(&self) -> (Duration, Duration) {
        (Duration::from_secs_f64(self.reconnect_min_s), Duration::from_secs_f64(self.reconnect_max_s))
    }

    pub fn outbox_max_age(&self) -> Duration {
        Duration::from_secs_f64(self.outbox_max_age_s)
    }

    /// Node id in force: the configured one, else the host name.
    pub fn resolved_node_id(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "ganomalyd".into());
        // A host name may carry dots but never MQTT wildcards; be safe anyway.
        host.chars().map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c }).collect()
    }

    /// Client id in force: the configured one, else `ganomalyd-<node>`.
    pub fn resolved_client_id(&self, node_id: &str) -> String {
        if self.client_id.is_empty() {
            format!("ganomalyd-{node_id}")
        } else {
            self.client_id.clone()
        }
    }

    /// Reads the password from `password_file` or `password_env`, if set.
    pub fn password(&self) -> Result<Option<Secret>, super::PublishError> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| super::PublishError::PasswordFile { path: path.clone(), source })?;
            let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
            return Ok(Some(Secret::new(line)));
        }
        if let Some(var) = &self.password_env {
            return match std::env::var(var) {
                Ok(v) => Ok(Some(Secret::new(v))),
                // Not `VarError` itself: its NotUnicode holds (and prints) the password.
                Err(e) => Err(super::PublishError::password_env(var, e)),
            };
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_equals_default() {
        let c: MqttConfig = toml::from_str("").unwrap();
        assert_eq!(c, MqttConfig::default());
        let mut problems = Vec::new();
        c.validate("mqtt", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = toml::from_str::<MqttConfig>("prot = 1883").unwrap_err().to_string();
        assert!(e.contains("prot"), "{e}");
        let e = toml::from_str::<MqttConfig>("[tls]\nca_file = 'a'\ncafile = 'b'").unwrap_err().to_string();
        assert!(e.contains("cafile"), "{e}");
    }

    #[test]
    fn validate_reports_every_problem_with_its_path() {
        let c = MqttConfig {
            port: 0,
            topic_prefix: "a/#".into(),
            node_id: "x/y".into(),
            keep_alive_s: 0.0,
            reconnect_min_s: 0.1,
            reconnect_max_s: 0.01,
            password_env: Some("PW".into()),
            tls: Some(TlsConfig { ca_file: "ca.pem".into(), cert_file: Some("c.pem".into()), key_file: None }),
            score_max_rate_hz: -1.0,
            alarm_inflight: 0,
            ..MqttConfig::default()
        };
        let mut p = Vec::new();
        c.validate("mqtt", &mut p);
        for field in [
            "mqtt.port:",
            "mqtt.topic_prefix:",
            "mqtt.node_id:",
            "mqtt.keep_alive_s:",
            "mqtt.reconnect_max_s:",
            "mqtt.username:",
            "mqtt.tls.cert_file:",
            "mqtt.score_max_rate_hz:",
            "mqtt.alarm_inflight:",
        ] {
            assert!(p.iter().any(|s| s.starts_with(field)), "missing {field} in {p:?}");
        }
        assert_eq!(p.len(), 9, "{p:?}");
    }

    #[test]
    fn clear_text_credentials_go_only_to_this_box_unless_allowed() {
        let problems = |c: &MqttConfig| {
            let mut p = Vec::new();
            c.validate("mqtt", &mut p);
            p
        };
        let remote = MqttConfig {
            host: "broker.plant.local".into(),
            username: Some("u".into()),
            password_env: Some("PW".into()),
            ..MqttConfig::default()
        };
        let p = problems(&remote);
        assert!(p.len() == 1 && p[0].starts_with("mqtt.username: credentials would cross"), "{p:?}");
        assert!(problems(&MqttConfig { allow_plaintext_credentials: true, ..remote.clone() }).is_empty());
        let tls = Some(TlsConfig { ca_file: "ca.pem".into(), cert_file: None, key_file: None });
        assert!(problems(&MqttConfig { tls, ..remote.clone() }).is_empty());
        for local in ["localhost", "127.0.0.1", "::1"] {
            assert!(problems(&MqttConfig { host: local.into(), ..remote.clone() }).is_empty(), "{local}");
        }
        let allowed: MqttConfig = toml::from_str("allow_plaintext_credentials = true").unwrap();
        assert!(allowed.allow_plaintext_credentials, "the key is spelt as documented");
    }

    #[test]
    fn password_comes_from_file_or_env_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "hunter2\n").unwrap();
        let c = MqttConfig { username: Some("u".into()), password_file: Some(f), ..MqttConfig::default() };
        let pw = c.password().unwrap().unwrap();
        assert_eq!(pw.expose(), "hunter2");
        assert!(!format!("{pw:?} {pw}").contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));

        let var = "GANOMALYD_TEST_MQTT_PW_7731";
        std::env::set_var(var, "s3cret");
        let c = MqttConfig { username: Some("u".into()), password_env: Some(var.into()), ..MqttConfig::default() };
        assert_eq!(c.password().unwrap().unwrap().expose(), "s3cret");
        let c = MqttConfig {
            username: Some("u".into()),
            password_env: Some("GANOMALYD_TEST_UNSET_9".into()),
            ..MqttConfig::default()
        };
        assert!(c.password().is_err());
    }
}
