//! Exponential backoff with half jitter, reset after a healthy period. Shared by every
//! reconnect loop (Docker, etcd, watch streams), with the timer helpers those loops use.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Sleeps for `delay` unless `shutdown` comes first. Returns false when it did: the
/// caller's loop should end.
pub async fn sleep_or_stop(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Sleeps until `at`, or forever when there is no deadline: a `select!` arm for an
/// optional retry time.
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    /// When the last failure happened; a long enough healthy spell resets `attempt`.
    last_failure: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
            last_failure: None,
        }
    }

    /// The delay before the next retry: random in [cap/2, cap], cap = base·2^attempt ≤ max.
    /// Half-jitter rather than full jitter so a retry never fires immediately in a loop.
    pub fn next_delay(&mut self) -> Duration {
        let now = Instant::now();
        if let Some(last) = self.last_failure {
            if now.duration_since(last) > self.max * 3 {
                self.attempt = 0;
            }
        }
        self.last_failure = Some(now);
        let cap = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Call after a success that proves the connection healthy.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.last_failure = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[7] >= Duration::from_millis(500) && d[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
