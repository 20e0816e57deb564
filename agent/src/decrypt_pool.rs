//! The pool that runs RSA work: one thread per core, fed from one queue.
//!
//! A semaphore in front of tokio's `spawn_blocking` leaves a core idle between two decrypts
//! (the permit is only released when a reactor thread polls the finished task, and the next
//! waiter then has to be woken to hand its job over). Here a worker that finishes a job takes the
//! next one from the queue at once, so under load every core stays on RSA work, and the reactor
//! never runs any.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of worker threads sharing one job queue.
pub(crate) struct DecryptPool {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
}

impl DecryptPool {
    /// Start `threads` workers (at least one).
    pub(crate) fn new(threads: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nodeseal-rsa-{i}"))
                .spawn(move || loop {
                    // Hold the lock only to take a job, never while running it.
                    let job = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return, // queue closed: the agent is stopping
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a decrypt thread");
            }
        }
        Self {
            queue: Mutex::new(Some(tx)),
        }
    }

    /// Run `f` on a worker and wait for its result; `None` if the pool is shut down or the job
    /// panicked.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        {
            let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.as_ref()?.send(job).ok()?;
        }
        result.await.ok()
    }

    /// Stop taking jobs; workers exit once the queue is drained.
    pub(crate) fn shutdown(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_refuses_after_shutdown() {
        let pool = DecryptPool::new(2);
        let results: Vec<u64> = futures_join(&pool).await;
        assert_eq!(results, (0..16).map(|i| i * i).collect::<Vec<_>>());
        pool.shutdown();
        assert_eq!(pool.run(|| 1).await, None);
    }

    async fn futures_join(pool: &DecryptPool) -> Vec<u64> {
        let mut out = Vec::new();
        for i in 0..16u64 {
            out.push(pool.run(move || i * i).await.unwrap());
        }
        out
    }
}
