//! The embedded MQTT broker (rumqttd, in-process) for the demo and for boxes
//! without a plant broker: `[mqtt] embedded = true`.
//!
//! rumqttd runs its router and listener on threads of its own and offers no
//! way to stop them, so an embedded broker lives as long as the process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("embedded broker did not start listening on {0} within 5 s")]
    NotListening(SocketAddr),
    /// rumqttd's own start-up error, as its thread reported it.
    #[error("embedded broker: {0}")]
    Start(String),
    #[error("embedded broker: cannot start its thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("embedded broker: {0} is not a loopback address, and the embedded broker has no authentication")]
    NotLoopback(SocketAddr),
}

/// After the port answers, how long a failure of rumqttd's own bind is
/// waited for: rumqttd binds on its thread right after it starts, so an
/// answer within this window may come from whoever took the port between the
/// probe and that bind, and the failure shows here instead of a silent
/// connection to someone else's listener.
const BIND_GRACE: Duration = Duration::from_millis(200);

/// A running in-process broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

/// Largest message the embedded broker accepts: snapshots are JPEGs of a few
/// hundred kB; rumqttd's own default (20 kB) would refuse them.
const MAX_PAYLOAD: usize = 8 << 20;

impl EmbeddedBroker {
    /// Starts rumqttd on `listen` (MQTT 3.1.1, no authentication: keep it on
    /// loopback unless the network is trusted). Port 0 picks a free port.
    /// Returns once the broker accepts connections.
    pub fn start(listen: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
        // `check-config` refuses it too; here so that no caller can forget.
        if !listen.ip().is_loopback() {
            return Err(BrokerError::NotLoopback(listen));
        }
        // rumqttd binds on its own thread and only logs a failure there, and
        // cannot report the port it got for port 0: bind here first to learn
        // the port and to turn "address in use" into an error.
        let addr = {
            let probe = TcpListener::bind(listen).map_err(|source| BrokerError::Bind { addr: listen, source })?;
            probe.local_addr().map_err(|source| BrokerError::Bind { addr: listen, source })?
        };
        let server = ServerSettings {
            name: "ganomalyd-embedded".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: MAX_PAYLOAD,
                max_inflight_count: 1000,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 1000,
                max_outgoing_packet_count: 200,
                max_segment_size: 100 << 20,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v4: Some(HashMap::from([("1".to_string(), server)])),
            ..Default::default()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                let mut broker = Broker::new(config);
                // start() blocks for the broker's life: it returns, even with
                // Ok, only when its listener thread ended, which happens when
                // that thread could not bind (rumqttd only logs why).
                let msg = match broker.start() {
                    Err(e) => e.to_string(),
                    Ok(()) => format!("its listener on {addr} ended: the port was taken after it was probed"),
                };
                let _ = tx.send(msg);
            })
            .map_err(BrokerError::Thread)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(msg) = rx.try_recv() {
                return Err(BrokerError::Start(msg));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return match rx.recv_timeout(BIND_GRACE) {
                    Ok(msg) => Err(BrokerError::Start(msg)),
                    Err(_) => {
                        tracing::info!(%addr, "embedded MQTT broker listening");
                        Ok(EmbeddedBroker { addr })
                    }
                };
            }
            if Instant::now() > deadline {
                return Err(BrokerError::NotListening(addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_loopback_address_is_refused() {
        let e = EmbeddedBroker::start("0.0.0.0:0".parse().expect("addr")).expect_err("no authentication");
        assert!(matches!(e, BrokerError::NotLoopback(_)), "{e}");
    }

    #[test]
    fn a_taken_port_is_an_error_not_someone_elses_broker() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let e = EmbeddedBroker::start(addr).expect_err("the port is taken");
        assert!(matches!(e, BrokerError::Bind { .. }), "{e}");
    }
}
