//! systemd integration (`Type=notify`): READY once the model is loaded and
//! the first frame has been decided, watchdog pings only while frames are
//! decided or none wait to be (`base::liveness`), STOPPING on shutdown. All calls are no-ops when the
//! daemon is not run by systemd (no `NOTIFY_SOCKET`).

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd start-up is complete.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}

/// The watchdog interval systemd expects pings within, if it set one.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "systemd notification failed");
    }
}

/// Whether to ping: inference must have shown life within the watchdog
/// interval, or systemd should restart a daemon whose model is wedged.
pub fn inference_alive(silent_ms: u64, interval: Duration) -> bool {
    (silent_ms as u128) < interval.as_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wedged_inference_stops_the_pings() {
        let iv = Duration::from_secs(10);
        assert!(inference_alive(1_000, iv));
        assert!(!inference_alive(10_000, iv));
    }
}
