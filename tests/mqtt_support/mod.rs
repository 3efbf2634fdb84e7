//! Shared pieces of the MQTT integration tests: a recording subscriber, a TCP
//! proxy that can cut the daemon off its broker, a Mosquitto process the test
//! starts and stops, and config/event builders.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ganomalyd::events::{AlarmEvent, AlarmKind, PAYLOAD_SCHEMA};
use ganomalyd::publish::{EmbeddedBroker, MqttConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Unique topic prefix / node per test so parallel tests and earlier runs on
/// a shared broker never see each other's (retained) messages.
pub fn unique(name: &str) -> String {
    format!("gt{}{}-{name}", std::process::id(), rand::random::<u16>())
}

pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if StdStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `MQTT_TEST_URL` (e.g. `mqtt://127.0.0.1:1883`) as host and port, if set.
pub fn external_broker() -> Option<(String, u16)> {
    let url = std::env::var("MQTT_TEST_URL").ok().filter(|s| !s.is_empty())?;
    let rest = url.split("://").nth(1).unwrap_or(&url);
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
    Some((host.to_string(), port.parse().expect("MQTT_TEST_URL port")))
}

/// Config for a test publisher: fast reconnects, short keep-alive, its own outbox.
pub fn test_config(host: &str, port: u16, prefix: &str, node: &str, outbox: &Path) -> MqttConfig {
    MqttConfig {
        host: host.into(),
        port,
        topic_prefix: prefix.into(),
        node_id: node.into(),
        keep_alive_s: 2.0,
        connect_timeout_s: 2.0,
        reconnect_min_s: 0.05,
        reconnect_max_s: 0.4,
        score_max_rate_hz: 1000.0,
        outbox_path: outbox.to_path_buf(),
        ..MqttConfig::default()
    }
}

pub fn alarm(i: u64, camera: &str) -> AlarmEvent {
    let start = i % 2 == 0;
    AlarmEvent {
        schema: PAYLOAD_SCHEMA,
        id: format!("{camera}-{}", i / 2),
        camera: camera.into(),
        kind: if start { AlarmKind::Start } else { AlarmKind::End },
        ts: 1_700_000_000_000 + i,
        start_ts: 1_700_000_000_000 + i - i % 2,
        end_ts: (!start).then_some(1_700_000_000_000 + i),
        peak: 0.9,
        peak_raw: 1.5,
        frames: 3 + i,
        first_seq: 10 * i,
        seq: 10 * i + 3,
        snapshot: None,
        reason: (!start).then_some(ganomalyd::events::EndReason::Cleared),
    }
}

/// What a subscriber received.
#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A rumqttc subscriber recording every message on `filter` (QoS 1, so the
/// QoS it reports is the publisher's for QoS 0/1). With `persistent`, its
/// session (and messages queued for it) outlives a broker restart when the
/// broker persists sessions.
pub struct Sub {
    pub msgs: Arc<Mutex<Vec<Msg>>>,
    pub client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Sub {
    pub async fn start(host: &str, port: u16, filter: &str, persistent: bool) -> Sub {
        Sub::start_with(host, port, filter, persistent, |_| {}).await
    }

    /// [`start`](Self::start) with extra client options (TLS, credentials).
    pub async fn start_with(
        host: &str,
        port: u16,
        filter: &str,
        persistent: bool,
        configure: impl FnOnce(&mut MqttOptions),
    ) -> Sub {
        let id = format!("sub-{}", rand::random::<u64>());
        let mut opts = MqttOptions::new(id, host, port);
        opts.set_keep_alive(Duration::from_secs(5))
            .set_clean_session(!persistent)
            .set_max_packet_size(16 << 20, 1 << 20);
        configure(&mut opts);
        let (client, mut el) = AsyncClient::new(opts, 100);
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let m = msgs.clone();
        let c = client.clone();
        let filter = filter.to_string();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if !ack.session_present {
                            let _ = c.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                        } else if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        m.lock().unwrap().push(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            qos: p.qos,
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("subscriber did not get its SUBACK")
            .unwrap();
        Sub { msgs, client, task }
    }

    pub fn all(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    pub fn on(&self, topic: &str) -> Vec<Msg> {
        self.all().into_iter().filter(|m| m.topic == topic).collect()
    }

    /// Waits until `pred` holds for the messages so far; returns them.
    pub async fn wait<F: Fn(&[Msg]) -> bool>(&self, timeout: Duration, what: &str, pred: F) -> Vec<Msg> {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.all();
            if pred(&all) {
                return all;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; got {} messages: {:#?}",
                    all.len(),
                    all.iter().map(|m| (&m.topic, m.text())).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// Clears retained messages a test left on a shared broker.
pub async fn clear_retained(host: &str, port: u16, topics: &[String]) {
    let mut opts = MqttOptions::new(format!("clean-{}", rand::random::<u64>()), host, port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(opts, 100);
    for t in topics {
        let _ = client.publish(t.clone(), QoS::AtLeastOnce, true, Vec::new()).await;
    }
    let mut acks = 0;
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while acks < topics.len() {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acks += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
}

/// A TCP proxy between the daemon and its broker: `cut` closes the listener
/// and every connection (to the daemon, the broker is gone), `restore` opens
/// the same port again.
pub struct Proxy {
    pub port: u16,
    upstream: SocketAddr,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let p = Proxy { port: free_port(), upstream, tasks: Arc::new(Mutex::new(Vec::new())) };
        p.restore().await;
        p
    }

    pub async fn restore(&self) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_reuseaddr(true).unwrap();
        sock.bind(SocketAddr::from(([127, 0, 0, 1], self.port))).unwrap();
        let listener = sock.listen(64).unwrap();
        let upstream = self.upstream;
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else { continue };
                let conn = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    pub fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// The Mosquitto binary, if this machine has one (`MOSQUITTO_BIN` overrides).
pub fn mosquitto_bin() -> Option<PathBuf> {
    let p =
        std::env::var_os("MOSQUITTO_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/sbin/mosquitto"));
    p.exists().then_some(p)
}

/// A Mosquitto process on a port of its own, with a config the test writes.
pub struct Mosquitto {
    pub port: u16,
    conf: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// `extra` is appended to the listener's config (TLS, auth...).
    pub fn start(dir: &Path, extra: &str) -> Option<Mosquitto> {
        let bin = mosquitto_bin()?;
        let port = free_port();
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let text = format!(
            "listener {port} 127.0.0.1\npersistence true\npersistence_location {}/\nautosave_interval 1\nlog_dest none\n{extra}\n",
            dir.display()
        );
        let text = if extra.contains("allow_anonymous") { text } else { text + "allow_anonymous true\n" };
        // As root, mosquitto drops to the `mosquitto` user, which cannot write
        // its persistence file into our root-owned temp dir: a restart would
        // then forget the subscriber's session and its queued alarms.
        let text = text + keep_root_user();
        std::fs::write(&conf, text).unwrap();
        let mut m = Mosquitto { port, conf, bin, child: None };
        m.resume();
        Some(m)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Stops the broker (SIGTERM: it saves sessions, as a service restart would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    pub fn resume(&mut self) {
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        assert!(wait_listening(self.addr(), Duration::from_secs(10)), "mosquitto did not listen on {}", self.port);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Alarm payloads received, parsed, in arrival order.
pub fn alarms_of(msgs: &[Msg]) -> Vec<AlarmEvent> {
    msgs.iter()
        .filter(|m| m.topic.ends_with("/alarm"))
        .map(|m| serde_json::from_slice(&m.payload).expect("alarm payload"))
        .collect()
}

/// `(id, type)`: what a consumer de-duplicates on.
pub fn key(a: &AlarmEvent) -> (String, String) {
    (a.id.clone(), if a.kind == AlarmKind::Start { "start".into() } else { "end".into() })
}

/// (first-arrival order of distinct (id, type), duplicate count).
pub fn dedupe(alarms: &[AlarmEvent]) -> (Vec<(String, String)>, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut order = Vec::new();
    for a in alarms {
        if seen.insert(key(a)) {
            order.push(key(a));
        }
    }
    let dups = alarms.len() - order.len();
    (order, dups)
}

/// Mosquitto config for a box-local broker bridged to `remote`: the global
/// queue limit first, then one `connection` block forwarding `topic` out at
/// QoS 1 with a persistent session, reconnecting within seconds, and the
/// bridge's state (`1` / `0`, retained, the remote sets `0` as the bridge's
/// last will) on `notification_topic` at both ends. Pass it as `extra` to
/// [`Mosquitto::start`]; docs/fleet.md shows the production version.
pub fn bridge_config(name: &str, remote: SocketAddr, topic: &str, notification_topic: &str) -> String {
    format!(
        "allow_anonymous true\n\
         max_queued_messages 100000\n\
         connection {name}\n\
         address {remote}\n\
         remote_clientid {name}\n\
         cleansession false\n\
         bridge_attempt_unsubscribe false\n\
         restart_timeout 1 2\n\
         keepalive_interval 5\n\
         notifications true\n\
         notification_topic {notification_topic}\n\
         topic {topic} out 1\n"
    )
}

/// The node level of `<prefix>/<node>/...` (`prefix` without its trailing `/`).
pub fn node_of<'a>(topic: &'a str, prefix: &str) -> Option<&'a str> {
    topic.strip_prefix(prefix)?.strip_prefix('/')?.split('/').next()
}

/// Config line that keeps a Mosquitto started by root running as root. Without
/// it, a root-started broker switches to the user `mosquitto`, which cannot
/// write its persistence file into the test's temp dir: the broker then runs,
/// but a restart forgets its sessions and queues. Empty when not root.
pub fn keep_root_user() -> &'static str {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false) {
        "user root\n"
    } else {
        ""
    }
}

/// A TCP proxy that behaves as EMQX, HiveMQ or AWS IoT do on a publish the
/// client is not authorized for (MQTT 3.1.1 §3.3.5 allows it): it closes the
/// connection, without forwarding the publish, when the client publishes to
/// `topic`. Everything else passes. Mosquitto itself does not do this (2.0
/// acknowledges an unauthorized QoS 1 publish and drops it), hence the proxy.
pub struct ClosingProxy {
    pub port: u16,
    /// Connections closed on a publish to the topic.
    pub closes: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// The length of an MQTT packet at the start of `buf` (fixed header
/// included), once its fixed header is complete.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(1 + i + 1 + len);
        }
    }
    None
}

/// The topic of a PUBLISH packet (its fixed header first), if it is one.
fn publish_topic(packet: &[u8]) -> Option<&[u8]> {
    if packet.first()? >> 4 != 3 {
        return None;
    }
    let mut i = 1;
    while packet.get(i)? & 0x80 != 0 {
        i += 1;
    }
    let start = i + 1;
    let n = usize::from(u16::from_be_bytes([*packet.get(start)?, *packet.get(start + 1)?]));
    packet.get(start + 2..start + 2 + n)
}

impl ClosingProxy {
    pub async fn start(upstream: SocketAddr, topic: &str) -> ClosingProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let closes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (c, topic) = (closes.clone(), topic.as_bytes().to_vec());
        let task = tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else { continue };
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else { continue };
                let (mut down_r, mut down_w) = down.into_split();
                let (mut up_r, mut up_w) = up.into_split();
                let back = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut up_r, &mut down_w).await;
                });
                let (c, topic) = (c.clone(), topic.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    'conn: loop {
                        match down_r.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(len) = packet_len(&buf).filter(|l| *l <= buf.len()) {
                            if publish_topic(&buf[..len]) == Some(&topic[..]) {
                                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                break 'conn;
                            }
                            if up_w.write_all(&buf[..len]).await.is_err() {
                                break 'conn;
                            }
                            buf.drain(..len);
                        }
                    }
                    // As a broker does: the PUBACKs of what came before still
                    // reach the client, then both directions end.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    back.abort();
                });
            }
        });
        ClosingProxy { port, closes, task }
    }

    pub fn closes(&self) -> u64 {
        self.closes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for ClosingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A directory nothing can be written to, root included: a read-only tmpfs
/// when the test runs as root (permissions do not stop root), else a 0555
/// directory. Unmounted on drop.
pub struct ReadOnlyDir {
    pub path: PathBuf,
    mounted: bool,
    _parent: tempfile::TempDir,
}

impl ReadOnlyDir {
    pub fn new() -> ReadOnlyDir {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("ro");
        std::fs::create_dir(&path).unwrap();
        let mounted = !keep_root_user().is_empty();
        if mounted {
            let ok = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
                .arg(&path)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "cannot mount a read-only tmpfs on {}", path.display());
        } else {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        assert!(std::fs::write(path.join("probe"), b"x").is_err(), "{} is writable", path.display());
        ReadOnlyDir { path, mounted, _parent: parent }
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.path).status();
        }
    }
}

/// The broker of a daemon test: `MQTT_TEST_URL` (Mosquitto under `make
/// test`), else a Mosquitto of the test's own, else the embedded rumqttd.
pub struct Broker {
    pub host: String,
    pub port: u16,
    _mosquitto: Option<Mosquitto>,
    _embedded: Option<EmbeddedBroker>,
}

pub fn broker(dir: &Path) -> Broker {
    if let Some((host, port)) = external_broker() {
        return Broker { host, port, _mosquitto: None, _embedded: None };
    }
    if let Some(m) = Mosquitto::start(dir, "") {
        return Broker { host: "127.0.0.1".into(), port: m.port, _mosquitto: Some(m), _embedded: None };
    }
    // `make test` sets GANOMALY_REQUIRE_MOSQUITTO: CI must not pass on a lesser broker.
    assert!(
        std::env::var_os("GANOMALY_REQUIRE_MOSQUITTO").is_none(),
        "no Mosquitto (MQTT_TEST_URL or /usr/sbin/mosquitto)"
    );
    let b = EmbeddedBroker::start("127.0.0.1:0".parse().expect("addr")).expect("embedded broker");
    Broker { host: b.addr().ip().to_string(), port: b.addr().port(), _mosquitto: None, _embedded: Some(b) }
}
