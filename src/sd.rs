//! systemd notification (`Type=notify`): READY=1 after the first successful sync,
//! WATCHDOG=1 from the main loop. Every call is a no-op outside systemd.

use std::time::Duration;

pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// How often the main loop should call `watchdog()`: half of `WatchdogSec`, or None.
fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

fn watchdog() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
}

/// The systemd watchdog, fed from a loop's `select!`: `tick()` completes at half of
/// `WatchdogSec` and pings; without a watchdog (not under systemd) it never completes.
pub struct Watchdog {
    interval: Option<tokio::time::Interval>,
}

impl Watchdog {
    pub fn new() -> Watchdog {
        Watchdog {
            interval: watchdog_interval().map(tokio::time::interval),
        }
    }

    /// Waits for the next ping time and pings. Pending forever without a watchdog.
    pub async fn tick(&mut self) {
        match &mut self.interval {
            Some(i) => {
                i.tick().await;
                watchdog();
            }
            None => std::future::pending().await,
        }
    }

    /// Pings at every tick until dropped: race it against a long call (connect, sync)
    /// so the watchdog stays fed while the loop waits on it.
    pub async fn feed(&mut self) {
        loop {
            self.tick().await;
        }
    }
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog::new()
    }
}
