//! Graceful stop, mini-redis style: one trigger flips a watch channel every listener,
//! connection and background task listens to; each of them also holds a sender of an mpsc
//! channel whose receiver the trigger keeps, so "every sender dropped" means "all stopped".

use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Held by everything that must stop: tells it when, and by being dropped tells the trigger it
/// has.
#[derive(Clone)]
pub(crate) struct Shutdown {
    stop: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

/// Kept by `run()`: signals the stop and waits for the rest to finish.
pub(crate) struct Trigger {
    stop: watch::Sender<bool>,
    alive: mpsc::Receiver<()>,
}

/// A trigger and the first listener (clone it for the others).
pub(crate) fn channel() -> (Trigger, Shutdown) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (alive_tx, alive_rx) = mpsc::channel(1);
    (
        Trigger {
            stop: stop_tx,
            alive: alive_rx,
        },
        Shutdown {
            stop: stop_rx,
            _alive: alive_tx,
        },
    )
}

impl Shutdown {
    /// Resolves once the stop is signalled (or the trigger is gone).
    pub(crate) async fn stopped(&mut self) {
        let _ = self.stop.wait_for(|stop| *stop).await;
    }
}

impl Trigger {
    /// Tell every listener to stop.
    pub(crate) fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Wait until every listener is gone, at most `limit`; false when the limit was reached.
    pub(crate) async fn drained(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.alive.recv()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_every_listener_and_no_longer_than_the_limit() {
        let (mut trigger, shutdown) = channel();
        let mut held = shutdown.clone();
        drop(shutdown);
        let worker = tokio::spawn(async move {
            held.stopped().await;
        });
        trigger.stop();
        worker.await.unwrap();
        assert!(trigger.drained(Duration::from_secs(1)).await);

        let (mut trigger, stuck) = channel();
        trigger.stop();
        assert!(!trigger.drained(Duration::from_secs(5)).await);
        drop(stuck);
    }
}
