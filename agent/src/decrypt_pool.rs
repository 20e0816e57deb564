//! The pool that runs RSA work: one thread per core, fed from per-uid queues served round robin.
//!
//! Every job is one RSA private-key operation, charged to the uid that asked before it is
//! queued: a uid over its RSA rate (`limits.rsa_ops_per_sec_per_uid`) waits for its turn before
//! anything is queued (`crate::rate`; `busy` when the turn is further off than
//! `limits.max_rate_wait_ms`), and a uid with a full queue (`limits.max_queued_decrypts_per_uid`,
//! `limits.max_queued_decrypts`) is answered `busy` at once. A worker takes the next job from the next uid in turn, so however many
//! jobs one uid has queued, another uid's job waits for at most one job per thread ahead of it.
//!
//! Threads rather than tokio's `spawn_blocking` behind a semaphore: there a core idles between
//! two decrypts (the permit is only released when a reactor thread polls the finished task); here
//! a worker that finishes a job takes the next one at once, and the reactor never runs RSA work.

use crate::config::Limits;
use crate::rate::{Rate, RateTable, Turn};
use crate::refusal::Refusal;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// What the workers share: the queues and the bell that wakes an idle worker.
struct Shared {
    queues: Mutex<Queues>,
    ready: Condvar,
}

#[derive(Default)]
struct Queues {
    /// Each uid's waiting jobs, oldest first.
    by_uid: HashMap<u32, VecDeque<Job>>,
    /// The uids with waiting jobs, in the order they get their next turn.
    turns: VecDeque<u32>,
    /// Jobs waiting over all uids.
    queued: usize,
    /// False once the agent stops: no new jobs; workers leave when the queues are empty.
    closed: bool,
}

impl Queues {
    /// The next job in round-robin order: the first uid in line gives up its oldest job and, if
    /// it has more, goes to the back of the line.
    fn pick(&mut self) -> Option<Job> {
        let uid = self.turns.pop_front()?;
        let queue = self.by_uid.get_mut(&uid)?;
        let job = queue.pop_front();
        if queue.is_empty() {
            self.by_uid.remove(&uid);
        } else {
            self.turns.push_back(uid);
        }
        if job.is_some() {
            self.queued -= 1;
        }
        job
    }

    fn push(&mut self, uid: u32, job: Job, limits: &Limits) -> Result<(), Refusal> {
        if self.closed {
            return Err(Refusal::ShuttingDown);
        }
        let mine = self.by_uid.get(&uid).map_or(0, VecDeque::len);
        if mine >= limits.max_queued_decrypts_per_uid || self.queued >= limits.max_queued_decrypts {
            return Err(Refusal::DecryptQueueFull);
        }
        let queue = self.by_uid.entry(uid).or_default();
        if queue.is_empty() {
            self.turns.push_back(uid);
        }
        queue.push_back(job);
        self.queued += 1;
        Ok(())
    }
}

/// A fixed set of worker threads sharing fair per-uid job queues.
pub(crate) struct DecryptPool {
    shared: Arc<Shared>,
    /// Per-uid budgets of RSA operations.
    budgets: RateTable<u32>,
}

impl DecryptPool {
    /// Start `threads` workers (at least one).
    pub(crate) fn new(threads: usize) -> Self {
        let pool = Self::without_workers();
        for i in 0..threads.max(1) {
            let shared = pool.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nodeseal-rsa-{i}"))
                .spawn(move || {
                    // Hold the lock only to take a job, never while running it.
                    while let Some(job) = next_job(&shared) {
                        job();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a decrypt thread");
            }
        }
        pool
    }

    fn without_workers() -> Self {
        Self {
            shared: Arc::new(Shared {
                queues: Mutex::new(Queues::default()),
                ready: Condvar::new(),
            }),
            budgets: RateTable::default(),
        }
    }

    /// Run one RSA operation `f` for `uid` on a worker and wait for its result. Over its RSA
    /// rate the uid waits for its turn first; refused (before any work) when that turn is
    /// further off than the longest wait, when its queue or the whole queue is full, or when the
    /// pool is shut down; `ShuttingDown` too if the job panicked.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        uid: u32,
        limits: &Limits,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Refusal> {
        self.charge_operation(uid, limits).await?;
        let (done, result) = oneshot::channel();
        self.submit(
            uid,
            limits,
            Box::new(move || {
                // The request went away while this waited (the client hung up, or a sibling
                // value of its `env` failed): skip the RSA work nobody will read.
                if !done.is_closed() {
                    let _ = done.send(f());
                }
            }),
        )?;
        result.await.map_err(|_| Refusal::ShuttingDown)
    }

    /// Charge one private-key operation to `uid`'s RSA budget, waiting for its turn; also for
    /// one done elsewhere (a Key Vault unwrap).
    pub(crate) async fn charge_operation(&self, uid: u32, limits: &Limits) -> Result<(), Refusal> {
        let rate = rsa_rate(limits);
        let turn = self.turn(uid, limits, Instant::now());
        crate::rate::wait_for(turn, &rate)
            .await
            .map_err(|()| Refusal::DecryptRateLimited {
                per_sec: limits.rsa_ops_per_sec_per_uid,
            })
    }

    fn submit(&self, uid: u32, limits: &Limits, job: Job) -> Result<(), Refusal> {
        lock(&self.shared.queues).push(uid, job, limits)?;
        self.shared.ready.notify_one();
        Ok(())
    }

    /// `uid`'s turn for one RSA operation at `now`.
    fn turn(&self, uid: u32, limits: &Limits, now: Instant) -> Turn {
        self.budgets.reserve(uid, 1.0, &rsa_rate(limits), now)
    }

    /// Stop taking jobs; workers exit once the queues are drained.
    pub(crate) fn shutdown(&self) {
        lock(&self.shared.queues).closed = true;
        self.shared.ready.notify_all();
    }
}

/// The per-uid RSA rate in force.
fn rsa_rate(limits: &Limits) -> Rate {
    Rate {
        per_sec: limits.rsa_ops_per_sec_per_uid,
        burst: limits.rsa_burst_per_uid,
        max_wait: Duration::from_millis(limits.max_rate_wait_ms),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Block until there is a job (`None`: the pool is closed and drained).
fn next_job(shared: &Shared) -> Option<Job> {
    let mut queues = lock(&shared.queues);
    loop {
        if let Some(job) = queues.pick() {
            return Some(job);
        }
        if queues.closed {
            return None;
        }
        queues = shared.ready.wait(queues).unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_uid: usize) -> Limits {
        Limits {
            max_queued_decrypts: total,
            max_queued_decrypts_per_uid: per_uid,
            ..Limits::default()
        }
    }

    /// A job that records which uid it ran for.
    fn tagged(ran: &Arc<Mutex<Vec<u32>>>, uid: u32) -> Job {
        let ran = ran.clone();
        Box::new(move || lock(&ran).push(uid))
    }

    #[tokio::test]
    async fn runs_jobs_and_refuses_after_shutdown() {
        let pool = DecryptPool::new(2);
        let l = Limits::default();
        let mut results = Vec::new();
        for i in 0..16u64 {
            results.push(pool.run(7, &l, move || i * i).await.unwrap());
        }
        assert_eq!(results, (0..16).map(|i| i * i).collect::<Vec<_>>());
        pool.shutdown();
        assert!(matches!(
            pool.run(7, &l, || 1).await,
            Err(Refusal::ShuttingDown)
        ));
    }

    #[test]
    fn a_flooding_uid_delays_another_by_at_most_one_job_per_thread() {
        // No workers: the test takes jobs itself, as `threads` workers would, in pick order.
        let pool = DecryptPool::without_workers();
        let l = limits(1000, 500);
        let ran = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..100 {
            pool.submit(1000, &l, tagged(&ran, 1000)).unwrap();
        }
        // Two workers are already busy with the flood's first two jobs when the victim asks.
        let threads = 2;
        let mut queues = lock(&pool.shared.queues);
        for _ in 0..threads {
            queues.pick().unwrap()();
        }
        drop(queues);
        pool.submit(2000, &l, tagged(&ran, 2000)).unwrap();
        let mut queues = lock(&pool.shared.queues);
        for _ in 0..threads {
            queues.pick().unwrap()();
        }
        let ran = lock(&ran).clone();
        assert!(
            ran[threads..].contains(&2000),
            "the victim's job was not among the next {threads} picks: {ran:?}"
        );
        assert_eq!(queues.queued, 100 - threads - 1);
    }

    #[test]
    fn uids_take_turns_one_job_each() {
        let pool = DecryptPool::without_workers();
        let l = limits(1000, 500);
        let ran = Arc::new(Mutex::new(Vec::new()));
        for uid in [1, 1, 1, 2, 2, 3] {
            pool.submit(uid, &l, tagged(&ran, uid)).unwrap();
        }
        let mut queues = lock(&pool.shared.queues);
        while let Some(job) = queues.pick() {
            job();
        }
        assert_eq!(*lock(&ran), vec![1, 2, 3, 1, 2, 1]);
        assert_eq!(queues.queued, 0);
        assert!(queues.by_uid.is_empty() && queues.turns.is_empty());
    }

    #[test]
    fn a_full_queue_refuses_at_once_per_uid_and_in_total() {
        let pool = DecryptPool::without_workers();
        let l = limits(3, 2);
        let noop = || -> Job { Box::new(|| {}) };
        pool.submit(1, &l, noop()).unwrap();
        pool.submit(1, &l, noop()).unwrap();
        assert!(matches!(
            pool.submit(1, &l, noop()),
            Err(Refusal::DecryptQueueFull)
        ));
        pool.submit(2, &l, noop()).unwrap();
        assert!(
            matches!(pool.submit(3, &l, noop()), Err(Refusal::DecryptQueueFull)),
            "the total bound holds across uids"
        );
        assert_eq!(Refusal::DecryptQueueFull.code().as_str(), "busy");
        lock(&pool.shared.queues).pick().unwrap()();
        pool.submit(3, &l, noop()).unwrap();
    }

    #[test]
    fn rsa_operations_are_charged_per_uid_at_the_configured_rate() {
        let pool = DecryptPool::without_workers();
        let l = Limits {
            rsa_ops_per_sec_per_uid: 10,
            rsa_burst_per_uid: 3,
            max_rate_wait_ms: 150,
            ..Limits::default()
        };
        let t0 = Instant::now();
        let now = Turn::After(Duration::ZERO);
        for _ in 0..3 {
            assert_eq!(pool.turn(5, &l, t0), now);
        }
        // Past the burst, turns come at the rate, until one would wait longer than 150 ms.
        assert_eq!(
            pool.turn(5, &l, t0),
            Turn::After(Duration::from_millis(100))
        );
        assert_eq!(pool.turn(5, &l, t0), Turn::Refused);
        assert_eq!(pool.turn(6, &l, t0), now, "another uid has its own budget");
        assert_eq!(
            pool.turn(5, &l, t0 + Duration::from_millis(150)),
            Turn::After(Duration::from_millis(50))
        );
    }

    #[tokio::test]
    async fn a_uid_over_its_rsa_rate_is_refused_before_its_job_runs() {
        let pool = DecryptPool::new(1);
        let l = Limits {
            rsa_ops_per_sec_per_uid: 1,
            rsa_burst_per_uid: 1,
            max_rate_wait_ms: 0,
            ..Limits::default()
        };
        let ran = Arc::new(Mutex::new(0));
        let count = |ran: &Arc<Mutex<i32>>| {
            let ran = ran.clone();
            move || *lock(&ran) += 1
        };
        pool.run(9, &l, count(&ran)).await.unwrap();
        let second = pool.run(9, &l, count(&ran)).await;
        assert!(matches!(second, Err(Refusal::DecryptRateLimited { .. })));
        assert_eq!(*lock(&ran), 1, "the refused operation never ran");
    }

    #[tokio::test(start_paused = true)]
    async fn a_uid_over_its_rsa_rate_waits_for_its_turn_and_is_served() {
        let pool = DecryptPool::new(1);
        let l = Limits {
            rsa_ops_per_sec_per_uid: 10,
            rsa_burst_per_uid: 1,
            max_rate_wait_ms: 1000,
            ..Limits::default()
        };
        let t = tokio::time::Instant::now();
        // Three at once with a burst of one: the second waits 100 ms, the third 200 ms.
        let (a, b, c) = tokio::join!(
            pool.run(9, &l, || 1),
            pool.run(9, &l, || 2),
            pool.run(9, &l, || 3)
        );
        assert_eq!((a.unwrap(), b.unwrap(), c.unwrap()), (1, 2, 3));
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(190) && waited < Duration::from_millis(300),
            "{waited:?}"
        );
    }
}
