//! `[console]`: the table as written, its checks, and the compiled settings.
//!
//! The console listens on loopback unless told otherwise; bound anywhere
//! else it must have a credential (a bearer token, or a basic-auth user and
//! password), or check-config refuses the file: the console shows camera
//! pictures and sends commands. Credentials never sit in the config: they
//! come from a file or an environment variable, are read (and so checked)
//! at compile time when the world is probed, and are never printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::base::check::{between, count_between};
use crate::publish::config::Secret;

/// `[console]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Off unless asked for: an edge box opens no port nobody uses.
    pub enabled: bool,
    /// `host:port`; loopback by default. Anything else needs a credential.
    pub listen: String,
    /// File whose first line is the bearer token (also accepted as the
    /// basic-auth password with any user name, so that a browser can log in).
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the token.
    pub token_env: Option<String>,
    /// Basic-auth user name; its password comes from `password_file` or `password_env`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    /// Most live-view frames per second and camera encoded for the console:
    /// each is a copy of the frame and a JPEG encode off the frame path.
    pub live_fps: f64,
    /// Score samples per second and camera kept for the charts (each the
    /// highest score of its interval and the last frame's).
    pub score_rate_hz: f64,
    /// Seconds of score samples kept per camera.
    pub history_s: f64,
    /// Alarms (and, separately, verdicts) kept in memory for the history page.
    pub alarms_kept: usize,
    /// Alarm snapshot JPEGs kept in memory (older ones are read from the snapshot folder).
    pub snapshots_kept: usize,
    /// Connections served at once (a live view holds one for as long as it is open).
    pub max_connections: usize,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: false,
            listen: "127.0.0.1:8090".into(),
            token_file: None,
            token_env: None,
            user: None,
            password_file: None,
            password_env: None,
            live_fps: 5.0,
            score_rate_hz: 10.0,
            history_s: 600.0,
            alarms_kept: 500,
            snapshots_kept: 50,
            max_connections: 32,
        }
    }
}

/// Where a credential comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// How requests are authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Loopback only: whoever can reach the port is on the box.
    None,
    Token(SecretSource),
    Basic {
        user: String,
        password: SecretSource,
    },
}

/// `[console]`, compiled (only while enabled).
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleSettings {
    pub listen: SocketAddr,
    pub auth: Auth,
    /// Shortest interval between two live frames of a camera.
    pub live_interval: Duration,
    pub score_interval: Duration,
    /// Score samples kept per camera (`history_s · score_rate_hz`).
    pub score_samples: usize,
    pub alarms_kept: usize,
    pub snapshots_kept: usize,
    pub max_connections: usize,
}

/// Longest credential accepted: a token or password, not a file's worth.
const MAX_SECRET_BYTES: usize = 4096;

/// Why a credential could not be read. Never holds the credential.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{key} {}: {source}", path.display())]
    File {
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key} {}: the first line is empty", path.display())]
    EmptyFile { key: String, path: PathBuf },
    #[error("{key} {var}: not set, empty or not valid UTF-8")]
    Env { key: String, var: String },
    #[error("{key}: longer than {MAX_SECRET_BYTES} bytes")]
    TooLong { key: String },
}

impl SecretSource {
    /// Reads the credential. `key` is the dotted config key, for errors.
    pub fn read(&self, key_file: &str, key_env: &str) -> Result<Secret, SecretError> {
        let s = match self {
            SecretSource::File(path) => {
                let key = key_file.to_string();
                let text = std::fs::read_to_string(path).map_err(|source| SecretError::File {
                    key: key.clone(),
                    path: path.clone(),
                    source,
                })?;
                let line = text.lines().next().unwrap_or("").trim_end_matches('\r').to_string();
                if line.is_empty() {
                    return Err(SecretError::EmptyFile { key, path: path.clone() });
                }
                if line.len() > MAX_SECRET_BYTES {
                    return Err(SecretError::TooLong { key });
                }
                line
            }
            SecretSource::Env(var) => {
                // Not `VarError` itself: its NotUnicode holds (and prints) the value.
                let v = std::env::var(var)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| SecretError::Env { key: key_env.to_string(), var: var.clone() })?;
                if v.len() > MAX_SECRET_BYTES {
                    return Err(SecretError::TooLong { key: key_env.to_string() });
                }
                v
            }
        };
        Ok(Secret::new(s))
    }
}

impl Auth {
    /// The credential the console checks, read now.
    pub fn read(&self) -> Result<Credential, SecretError> {
        Ok(match self {
            Auth::None => Credential::None,
            Auth::Token(src) => Credential::Token(src.read("console.token_file", "console.token_env")?),
            Auth::Basic { user, password } => Credential::Basic {
                user: user.clone(),
                password: password.read("console.password_file", "console.password_env")?,
            },
        })
    }
}

/// The credential in force while the console runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    None,
    Token(Secret),
    Basic { user: String, password: Secret },
}

fn source(
    p: &str,
    file: &Option<PathBuf>,
    env: &Option<String>,
    names: (&str, &str),
    base: &Path,
    problems: &mut Vec<String>,
) -> Option<SecretSource> {
    match (file, env) {
        (Some(_), Some(_)) => {
            problems.push(format!("{p}.{}: set either {} or {}, not both", names.0, names.0, names.1));
            None
        }
        (Some(f), None) => Some(SecretSource::File(base.join(f))),
        (None, Some(v)) => {
            let ok = !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                problems.push(format!("{p}.{}: {v:?} is not an environment variable name", names.1));
                return None;
            }
            Some(SecretSource::Env(v.clone()))
        }
        (None, None) => None,
    }
}

/// Checks `[console]` (whether enabled or not: enabling it later holds no
/// surprise) and compiles it while enabled. With `probe`, the credential is
/// read, so that `run` cannot fail on it after check-config said ok.
pub fn compile(c: &ConsoleConfig, base: &Path, probe: bool, problems: &mut Vec<String>) -> Option<ConsoleSettings> {
    let p = "console";
    let before = problems.len();
    let listen = c.listen.parse::<SocketAddr>().ok();
    if listen.is_none() {
        problems.push(format!("{p}.listen: `{}` is not an address and port like 127.0.0.1:8090", c.listen));
    }
    // A frame copy and a JPEG encode each; 15 a second is more than a screen
    // needs and bounds the console's share of the box.
    between(problems, &format!("{p}.live_fps"), c.live_fps, 0.2, 15.0, "");
    between(problems, &format!("{p}.score_rate_hz"), c.score_rate_hz, 0.5, 50.0, "");
    // An hour at 50 Hz is 180,000 samples of 32 bytes a camera: 6 MB.
    between(problems, &format!("{p}.history_s"), c.history_s, 30.0, 3600.0, "");
    count_between(problems, &format!("{p}.alarms_kept"), c.alarms_kept as u64, 10, 100_000);
    // A snapshot is 20 to 200 kB: 1000 of them at most 200 MB.
    count_between(problems, &format!("{p}.snapshots_kept"), c.snapshots_kept as u64, 1, 1000);
    count_between(problems, &format!("{p}.max_connections"), c.max_connections as u64, 4, 1024);
    let token = source(p, &c.token_file, &c.token_env, ("token_file", "token_env"), base, problems);
    let password = source(p, &c.password_file, &c.password_env, ("password_file", "password_env"), base, problems);
    if let Some(u) = &c.user {
        if u.is_empty() || u.len() > 256 || u.contains([':', '\0']) {
            problems.push(format!("{p}.user: 1 to 256 bytes without `:` (basic auth separates it from the password)"));
        }
    }
    let auth = match (token, &c.user, password) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            problems.push(format!("{p}.token_file: set a token or a user and password, not both"));
            None
        }
        (Some(t), None, None) => Some(Auth::Token(t)),
        (None, Some(user), Some(pw)) => Some(Auth::Basic { user: user.clone(), password: pw }),
        (None, Some(_), None) => {
            problems.push(format!("{p}.user: a user needs a password (password_file or password_env)"));
            None
        }
        (None, None, Some(_)) => {
            problems.push(format!("{p}.user: a password is configured but no user"));
            None
        }
        (None, None, None) => Some(Auth::None),
    };
    if let (Some(addr), Some(Auth::None)) = (listen, &auth) {
        if !addr.ip().is_loopback() {
            problems.push(format!(
                "{p}.listen: {addr} is not loopback, so anyone who reaches it would see the cameras and could send \
                 commands; set token_file/token_env or user with password_file/password_env, or listen on 127.0.0.1"
            ));
        }
    }
    if c.enabled && probe && problems.len() == before {
        if let Some(Err(e)) = auth.as_ref().map(Auth::read) {
            problems.push(e.to_string());
        }
    }
    match (c.enabled && problems.len() == before, listen, auth) {
        (true, Some(listen), Some(auth)) => Some(ConsoleSettings {
            listen,
            auth,
            live_interval: Duration::from_secs_f64(1.0 / c.live_fps),
            score_interval: Duration::from_secs_f64(1.0 / c.score_rate_hz),
            score_samples: (c.history_s * c.score_rate_hz).ceil() as usize,
            alarms_kept: c.alarms_kept,
            snapshots_kept: c.snapshots_kept,
            max_connections: c.max_connections,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(c: &ConsoleConfig) -> (Option<ConsoleSettings>, Vec<String>) {
        let mut problems = Vec::new();
        let s = compile(c, Path::new("/"), true, &mut problems);
        (s, problems)
    }

    #[test]
    fn defaults_compile_to_a_loopback_console_without_auth() {
        let (s, problems) = problems_of(&ConsoleConfig { enabled: true, ..ConsoleConfig::default() });
        assert!(problems.is_empty(), "{problems:?}");
        let s = s.expect("settings");
        assert!(s.listen.ip().is_loopback());
        assert_eq!(s.auth, Auth::None);
        assert_eq!(s.score_samples, 6000);
        assert_eq!(s.live_interval, Duration::from_millis(200));
    }

    #[test]
    fn a_public_listen_without_credential_is_refused_and_with_one_accepted() {
        let public = ConsoleConfig { enabled: true, listen: "0.0.0.0:8090".into(), ..ConsoleConfig::default() };
        let (s, problems) = problems_of(&public);
        assert!(s.is_none());
        assert!(problems.iter().any(|p| p.starts_with("console.listen") && p.contains("not loopback")), "{problems:?}");

        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("token");
        std::fs::write(&f, "tok-SECRET\n").expect("write");
        let (s, problems) = problems_of(&ConsoleConfig { token_file: Some(f.clone()), ..public.clone() });
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s.expect("settings").auth, Auth::Token(SecretSource::File(f)));
    }

    #[test]
    fn credential_errors_name_the_key_and_never_the_secret() {
        let var = "GANOMALYD_CONSOLE_TEST_UNSET_7";
        let c = ConsoleConfig { enabled: true, token_env: Some(var.into()), ..ConsoleConfig::default() };
        let (_, problems) = problems_of(&c);
        assert_eq!(problems, [format!("console.token_env {var}: not set, empty or not valid UTF-8")]);

        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pw");
        std::fs::write(&f, "hunter2-SECRET").expect("write");
        let both = ConsoleConfig {
            enabled: true,
            user: Some("op".into()),
            password_file: Some(f.clone()),
            token_file: Some(f.clone()),
            ..ConsoleConfig::default()
        };
        let (_, problems) = problems_of(&both);
        assert!(problems.iter().any(|p| p.starts_with("console.token_file")), "{problems:?}");
        let no_user = ConsoleConfig { enabled: true, password_file: Some(f.clone()), ..ConsoleConfig::default() };
        let (_, problems) = problems_of(&no_user);
        assert!(problems.iter().any(|p| p.starts_with("console.user")), "{problems:?}");
        let basic = ConsoleConfig {
            enabled: true,
            user: Some("op".into()),
            password_file: Some(f),
            ..ConsoleConfig::default()
        };
        let (s, problems) = problems_of(&basic);
        assert!(problems.is_empty(), "{problems:?}");
        let cred = s.expect("settings").auth.read().expect("read");
        assert!(!format!("{cred:?}").contains("hunter2"), "{cred:?}");
    }

    #[test]
    fn out_of_range_keys_are_named() {
        let c = ConsoleConfig {
            live_fps: 100.0,
            score_rate_hz: 0.0,
            history_s: 1e9,
            alarms_kept: 0,
            snapshots_kept: 5000,
            max_connections: 0,
            listen: "nowhere".into(),
            ..ConsoleConfig::default()
        };
        let (_, problems) = problems_of(&c);
        for key in
            ["live_fps", "score_rate_hz", "history_s", "alarms_kept", "snapshots_kept", "max_connections", "listen"]
        {
            assert!(problems.iter().any(|p| p.starts_with(&format!("console.{key}"))), "{key}: {problems:?}");
        }
    }
}
