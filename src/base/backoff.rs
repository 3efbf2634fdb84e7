//! Exponential reconnect backoff with full jitter (rumqttc has none: its
//! event loop retries as fast as it is polled).

use std::time::Duration;

use rand::Rng;

/// Waits grow `min, 2·min, 4·min, ...` up to `max`; each wait actually taken
/// is uniform in `[cap/2, cap]` so that a plant full of boxes that lost the
/// same broker does not hammer it in step when it returns.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max: max.max(min), attempt: 0 }
    }

    /// The ceiling of the next wait, without jitter.
    fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min.checked_mul(factor).unwrap_or(self.max).min(self.max)
    }

    /// The next wait; each call doubles the ceiling until `max`.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        let lo = cap / 2;
        let span = (cap - lo).as_micros() as u64;
        lo + Duration::from_micros(if span == 0 { 0 } else { rand::rng().random_range(0..=span) })
    }

    /// After a connection that worked: start again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut caps = Vec::new();
        for _ in 0..10 {
            let cap = b.cap();
            let d = b.next_delay();
            assert!(d >= cap / 2 && d <= cap, "{d:?} outside [{:?}, {cap:?}]", cap / 2);
            caps.push(cap.as_millis());
        }
        assert_eq!(caps, [100, 200, 400, 800, 1600, 2000, 2000, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.cap(), Duration::from_millis(100));
        // Jitter really varies (20 draws from a 1 s span all equal: a broken RNG).
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(2));
        let draws: std::collections::HashSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(draws.len() > 1);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_secs(30));
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
    }
}
