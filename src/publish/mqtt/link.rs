//! The link task: owns rumqttc's event loop, connects, forwards every event to
//! the sender task, and after an error waits out the [`Backoff`] before a
//! fresh connection (a new client and event loop each time, so nothing queued
//! for a dead connection leaks into the next one).
//!
//! The client options are built afresh for every attempt: a TLS or password
//! file that is missing or broken at start (removed after `check-config`
//! passed) is a fault reported to the sender task and retried with the
//! backoff, not an end of the daemon; likewise an embedded broker whose port
//! is taken is started again until it gets its port.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport};
use tokio::sync::{mpsc, watch};

use crate::base::backoff::Backoff;
use crate::publish::broker::BrokerError;
use crate::publish::config::MqttConfig;
use crate::publish::{EmbeddedBroker, PublishError, Topics};

/// What the link task tells the sender task. `gen` numbers connections so
/// that events of a dead one are never taken for the current one's.
pub(super) enum Link {
    Up {
        gen: u64,
        client: AsyncClient,
    },
    Event {
        gen: u64,
        event: Event,
    },
    Down {
        gen: u64,
        error: ConnectionError,
        retry_in: Duration,
    },
    /// No connection could even be attempted (TLS or password files, the
    /// embedded broker's port); tried again after `retry_in`.
    Fault {
        error: Box<PublishError>,
        retry_in: Duration,
    },
}

/// Where and how to connect; [`Target::options`] builds the client options
/// for one attempt.
pub(super) struct Target {
    pub cfg: MqttConfig,
    pub client_id: String,
    pub topics: Topics,
    /// With `embedded`: the broker once it runs (shared with the handle).
    pub embedded: Option<Arc<OnceLock<EmbeddedBroker>>>,
}

impl Target {
    /// The options of the next attempt; starts the embedded broker first if
    /// it is not running yet (on the blocking pool: it binds and waits).
    async fn options(&self) -> Result<MqttOptions, PublishError> {
        let (host, port) = match &self.embedded {
            None => (self.cfg.host.clone(), self.cfg.port),
            Some(slot) => {
                if slot.get().is_none() {
                    let listen: SocketAddr = self.cfg.embedded_listen;
                    let started = tokio::task::spawn_blocking(move || EmbeddedBroker::start(listen))
                        .await
                        .map_err(|e| BrokerError::Start(e.to_string()))??;
                    tracing::info!(addr = %started.addr(), "embedded MQTT broker started");
                    let _ = slot.set(started);
                }
                let addr = slot.get().map(|b| b.addr()).unwrap_or(self.cfg.embedded_listen);
                (addr.ip().to_string(), addr.port())
            }
        };
        options(&self.cfg, &self.client_id, &host, port, &self.topics)
    }
}

/// rumqttc's request queue: room for a full score queue plus the retained
/// state, discovery and alarms a reconnect sends at once.
pub(super) fn request_capacity(cfg: &MqttConfig) -> usize {
    cfg.score_queue + 256
}

/// The client options of every connection: broker, keep-alive, the last will,
/// credentials and TLS.
pub(super) fn options(
    cfg: &MqttConfig,
    client_id: &str,
    host: &str,
    port: u16,
    topics: &Topics,
) -> Result<MqttOptions, PublishError> {
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(cfg.keep_alive())
        .set_clean_session(true)
        .set_last_will(LastWill::new(topics.status(), "offline", QoS::AtLeastOnce, true))
        // Snapshots are JPEGs of a few hundred kB; rumqttc's default is 10 kB.
        .set_max_packet_size(1 << 20, 16 << 20)
        // Room for the alarm window plus retained-state publishes.
        .set_inflight(cfg.alarm_inflight.saturating_add(64))
        .set_request_channel_capacity(request_capacity(cfg));
    secure(&mut opts, cfg)?;
    Ok(opts)
}

/// The broker's credentials and TLS as `[mqtt]` gives them: the daemon and
/// `ganomalyd watch` connect alike.
pub fn secure(opts: &mut MqttOptions, cfg: &MqttConfig) -> Result<(), PublishError> {
    if let Some(user) = &cfg.username {
        let pw = cfg.password()?;
        opts.set_credentials(user.clone(), pw.as_ref().map(|p| p.expose().to_string()).unwrap_or_default());
    }
    if let (Some(tls), false) = (&cfg.tls, cfg.embedded) {
        opts.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            crate::publish::tls::client_config(tls)?,
        )));
    }
    Ok(())
}

/// Connect, forward events, back off on errors; until `stop`, or until the
/// sender task is gone or has disconnected.
pub(super) async fn run(
    target: Target,
    cap: usize,
    connect_timeout_s: u64,
    mut backoff: Backoff,
    tx: mpsc::UnboundedSender<Link>,
    mut stop: watch::Receiver<bool>,
) {
    let mut gen = 0u64;
    loop {
        let opts = match target.options().await {
            Ok(opts) => opts,
            Err(error) => {
                let retry_in = backoff.next_delay();
                if tx.send(Link::Fault { error: Box::new(error), retry_in }).is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry_in) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        gen += 1;
        let (client, mut eventloop) = AsyncClient::new(opts, cap);
        eventloop.network_options.set_connection_timeout(connect_timeout_s);
        let mut client = Some(client);
        let error = loop {
            let polled = tokio::select! {
                r = eventloop.poll() => r,
                // The sender task is gone (stopped, or timed out stopping).
                _ = tx.closed() => return,
                // Stop before the connection is up: nothing to say goodbye on.
                // Once it is up, the sender task drives the clean stop and
                // this task ends on the DISCONNECT it sends.
                _ = stop.wait_for(|s| *s), if client.is_some() => return,
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    if let Some(c) = client.take() {
                        if tx.send(Link::Up { gen, client: c }).is_err() {
                            return;
                        }
                    }
                }
                Ok(event) => {
                    let disconnected = matches!(event, Event::Outgoing(Outgoing::Disconnect));
                    if tx.send(Link::Event { gen, event }).is_err() || disconnected {
                        return;
                    }
                }
                Err(e) => break e,
            }
        };
        let retry_in = backoff.next_delay();
        if tx.send(Link::Down { gen, error, retry_in }).is_err() {
            return;
        }
        drop(eventloop);
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
