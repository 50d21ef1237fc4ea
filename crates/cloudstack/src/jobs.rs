//! Shared waiting for asynchronous jobs: one poller task per client serves every waiter, each job on
//! its own schedule, with learned job durations and a client-wide pause when the cloud throttles.
//!
//! The schedule of one job (all delays jittered by ±20 %):
//! - the first poll is immediate (a job may already be done when its id comes back);
//! - then every `initial` (default 50 ms), each delay 1.5× the previous, up to `max` (default 1 s);
//! - once jobs of the same command (`cmd` of the job) have been seen to finish, the poller also polls
//!   densely in a window around the learned duration (an average of the last durations, each taken as
//!   the middle between the last poll that found the job pending and the one that found it finished):
//!   from 20 ms (twice `dense`) before it to a quarter of it (at most 100 ms) plus 20 ms after it, every
//!   1/40 of it, at least every 2 ms and at most every `dense` (default 10 ms). A job that takes as long as the
//!   previous ones is noticed within 1/40 of its duration (5 ms for a 200 ms job), at a cost of at most
//!   about 30 polls per job;
//! - a poll whose answer does not say the job's state counts as "unknown, ask again": a throttled (429),
//!   failed (5xx), unreachable or unreadable (empty, cut off, not JSON) poll, and an error answer other than
//!   "no such job" (a 401, a 431). It pauses every poll of the client for the server's `Retry-After` or the
//!   retry policy's backoff, whichever is longer, growing while the failures go on, and the job is asked
//!   again until the waiter's deadline. Error answers of one job are tolerated up to the retry policy's
//!   `max_attempts` in a row; then (credentials refused for good, say) the waiter gets the error. A job
//!   CloudStack does not know, or a client that cannot reach it at all (TLS), ends the wait at once.
//!
//! Several waiters of one job share its polls. The task ends when no job is waited for and is started
//! again by the next waiter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{Attempt, Client, ClientInner, Method};
use crate::config::JobPollPolicy;
use crate::decode;
use crate::error::ErrorKind;
use crate::types::{JobError, JobStatus};

/// At most this many polls are in flight at once.
const MAX_IN_FLIGHT: usize = 16;
/// The shortest interval of dense polls.
const DENSEST: Duration = Duration::from_millis(2);
/// Dense polls come every this fraction of the learned duration (between [`DENSEST`] and `dense`).
const DENSE_FRACTION: u32 = 40;
/// Weight of the newest duration in the learned average.
const LEARN_WEIGHT: f64 = 0.3;

/// What the poller tells the waiters of a job.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Succeeded(Value),
    Failed(JobError),
    /// Polling ended with an error that retrying will not fix (the job is unknown, the credentials
    /// were refused `max_attempts` times in a row); each waiter asks once more itself to get the error.
    PollFailed,
}

/// The jobs being waited for, shared by a client and its poller task.
#[derive(Debug, Default)]
pub(crate) struct JobBoard {
    state: Mutex<BoardState>,
    /// Wakes the poller when a job is added (a permit is kept when it is not waiting).
    wake: Arc<Notify>,
}

#[derive(Debug, Default)]
struct BoardState {
    jobs: HashMap<String, Entry>,
    /// Learned duration per job command.
    learned: HashMap<String, Duration>,
    /// No poll is sent before this instant (throttling or an unreachable cloud).
    paused_until: Option<Instant>,
    /// Consecutive failed polls (grows the pause).
    failures: u32,
    /// Whether a poller task is running.
    running: bool,
}

#[derive(Debug)]
struct Entry {
    registered: Instant,
    /// When a poll last found the job still pending.
    last_pending: Option<Instant>,
    next_poll: Instant,
    delay: Duration,
    cmd: Option<String>,
    in_flight: bool,
    /// Consecutive error answers (not throttling, server or transport failures) to this job's polls.
    refusals: u32,
    waiters: usize,
    tx: watch::Sender<Option<Outcome>>,
}

impl JobBoard {
    fn lock(&self) -> MutexGuard<'_, BoardState> {
        // A panic while holding this lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The learned duration of jobs of `cmd`, if any finished yet.
    pub(crate) fn learned(&self, cmd: &str) -> Option<Duration> {
        self.lock().learned.get(cmd).copied()
    }
}

/// A waiter's registration; dropping it forgets the job when no one else waits for it.
pub(crate) struct Watch {
    board: Weak<ClientInner>,
    job_id: String,
    pub(crate) rx: watch::Receiver<Option<Outcome>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(inner) = self.board.upgrade() {
            let mut st = inner.jobs.lock();
            if let Some(e) = st.jobs.get_mut(&self.job_id) {
                e.waiters -= 1;
                if e.waiters == 0 {
                    st.jobs.remove(&self.job_id);
                }
            }
        }
    }
}

/// Registers a waiter for `job_id` and makes sure the poller runs.
pub(crate) fn watch(client: &Client, job_id: &str) -> Watch {
    let inner = client.inner();
    let mut st = inner.jobs.lock();
    let rx = match st.jobs.get_mut(job_id) {
        Some(e) => {
            e.waiters += 1;
            e.tx.subscribe()
        }
        None => {
            let now = Instant::now();
            let (tx, rx) = watch::channel(None);
            st.jobs.insert(
                job_id.to_owned(),
                Entry {
                    registered: now,
                    last_pending: None,
                    next_poll: now,
                    delay: inner.job_poll.initial,
                    cmd: None,
                    in_flight: false,
                    refusals: 0,
                    waiters: 1,
                    tx,
                },
            );
            rx
        }
    };
    if !st.running {
        st.running = true;
        tokio::spawn(run(Arc::downgrade(inner)));
    }
    drop(st);
    inner.jobs.wake.notify_one();
    Watch {
        board: Arc::downgrade(inner),
        job_id: job_id.to_owned(),
        rx,
    }
}

/// Marks the poller stopped when its task is dropped before it ended by itself (its runtime shut down).
struct RunningGuard {
    inner: Weak<ClientInner>,
    armed: bool,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(inner) = self.inner.upgrade() {
            let mut st = inner.jobs.lock();
            st.running = false;
            for e in st.jobs.values_mut() {
                e.in_flight = false;
            }
        }
    }
}

/// The result of one poll of one job.
struct Polled {
    job_id: String,
    cmd: Option<String>,
    result: PollResult,
}

enum PollResult {
    Status(JobStatus),
    /// The answer did not say the job's state; ask again after a pause (at least `retry_after`).
    /// `refused`: CloudStack answered with an error (counted against the job), rather than failing to
    /// answer at all.
    Unknown {
        retry_after: Option<Duration>,
        refused: bool,
    },
    /// The job is unknown to CloudStack, or the client cannot talk to it: asking again cannot help.
    Fatal,
}

async fn run(weak: Weak<ClientInner>) {
    let mut guard = RunningGuard {
        inner: weak.clone(),
        armed: true,
    };
    let mut polls: JoinSet<Polled> = JoinSet::new();
    loop {
        let next_wake = {
            let Some(inner) = weak.upgrade() else { return };
            let now = Instant::now();
            let mut st = inner.jobs.lock();
            if st.jobs.is_empty() && polls.is_empty() {
                st.running = false;
                guard.armed = false;
                return;
            }
            let paused = st.paused_until.filter(|t| *t > now);
            let mut next: Option<Instant> = paused;
            if paused.is_none() {
                let in_flight = st.jobs.values().filter(|e| e.in_flight).count();
                let mut room = MAX_IN_FLIGHT.saturating_sub(in_flight);
                for (id, e) in st.jobs.iter_mut() {
                    if e.in_flight {
                        continue;
                    }
                    if e.next_poll <= now && room > 0 {
                        room -= 1;
                        e.in_flight = true;
                        let client = Client::from_inner(inner.clone());
                        let job_id = id.clone();
                        polls.spawn(async move { poll_once(&client, job_id).await });
                    } else {
                        next = Some(next.map_or(e.next_poll, |n| n.min(e.next_poll)));
                    }
                }
            }
            next
        };
        // Hold no strong reference while sleeping, so a dropped client ends the task.
        let Some(wake) = weak.upgrade().map(|inner| Arc::clone(&inner.jobs.wake)) else {
            return;
        };
        let inner_weak = weak.clone();
        let notified = wake.notified();
        tokio::pin!(notified);
        tokio::select! {
            Some(done) = polls.join_next(), if !polls.is_empty() => {
                if let (Ok(polled), Some(inner)) = (done, inner_weak.upgrade()) {
                    settle(&inner, polled);
                }
            }
            () = sleep_until(next_wake) => {}
            () = &mut notified => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn poll_once(client: &Client, job_id: String) -> Polled {
    let command = "queryAsyncJobResult";
    let params = [("jobid", job_id.clone())];
    let unreadable = PollResult::Unknown {
        retry_after: None,
        refused: false,
    };
    let (cmd, result) = match client.attempt(Method::Get, command, &params, 1).await {
        Attempt::Done(Ok(inner)) => {
            let cmd = inner.get("cmd").and_then(Value::as_str).map(str::to_owned);
            match decode::job_status(command, &inner) {
                Ok(status) => (cmd, PollResult::Status(status)),
                Err(_) => (cmd, unreadable),
            }
        }
        Attempt::Done(Err(e)) => match e.kind() {
            ErrorKind::NotFound | ErrorKind::Config => (None, PollResult::Fatal),
            ErrorKind::Decode | ErrorKind::Transient => (None, unreadable),
            ErrorKind::InvalidParameter
            | ErrorKind::InUse
            | ErrorKind::LimitExceeded
            | ErrorKind::Unauthorized
            | ErrorKind::JobFailed
            | ErrorKind::JobStillRunning
            | ErrorKind::Other => (
                None,
                PollResult::Unknown {
                    retry_after: None,
                    refused: true,
                },
            ),
        },
        Attempt::Retry(_, after) => (
            None,
            PollResult::Unknown {
                retry_after: after,
                refused: false,
            },
        ),
    };
    Polled {
        job_id,
        cmd,
        result,
    }
}

/// Applies one poll's result: tells the waiters, or schedules the next poll.
fn settle(inner: &ClientInner, polled: Polled) {
    let policy = &inner.job_poll;
    let now = Instant::now();
    let mut st = inner.jobs.lock();
    let st = &mut *st;
    if let PollResult::Unknown { retry_after, .. } = &polled.result {
        st.failures = st.failures.saturating_add(1);
        let mut pause = inner.retry.backoff(st.failures);
        if let Some(after) = retry_after {
            pause = pause.max((*after).min(inner.retry.max_backoff));
        }
        st.paused_until = Some(now + pause);
        tracing::warn!(
            job_id = %polled.job_id,
            pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
            "polling CloudStack jobs failed, was throttled or got an unreadable answer; pausing all polls"
        );
    } else {
        st.failures = 0;
        st.paused_until = None;
    }
    let Some(entry) = st.jobs.get_mut(&polled.job_id) else {
        return;
    };
    entry.in_flight = false;
    if entry.cmd.is_none() {
        entry.cmd = polled.cmd;
    }
    match &polled.result {
        PollResult::Unknown { refused: true, .. } => {
            entry.refusals = entry.refusals.saturating_add(1);
        }
        PollResult::Status(_) => entry.refusals = 0,
        PollResult::Unknown { refused: false, .. } | PollResult::Fatal => {}
    }
    let outcome = match polled.result {
        PollResult::Status(JobStatus::Succeeded(v)) => Some(Outcome::Succeeded(v)),
        PollResult::Status(JobStatus::Failed(e)) => Some(Outcome::Failed(e)),
        PollResult::Fatal => Some(Outcome::PollFailed),
        PollResult::Unknown { refused: true, .. }
            if entry.refusals >= inner.retry.max_attempts.max(1) =>
        {
            Some(Outcome::PollFailed)
        }
        PollResult::Status(JobStatus::Pending) | PollResult::Unknown { .. } => None,
    };
    match outcome {
        Some(outcome) => {
            let Some(entry) = st.jobs.remove(&polled.job_id) else {
                return;
            };
            if let (Some(cmd), Outcome::Succeeded(_) | Outcome::Failed(_)) = (&entry.cmd, &outcome)
            {
                let took = duration_estimate(entry.registered, entry.last_pending, now);
                let learned = match st.learned.get(cmd) {
                    Some(prev) => prev.mul_f64(1.0 - LEARN_WEIGHT) + took.mul_f64(LEARN_WEIGHT),
                    None => took,
                };
                st.learned.insert(cmd.clone(), learned);
            }
            // Waiters that left meanwhile are fine: nobody to tell.
            let _ = entry.tx.send(Some(outcome));
        }
        None => {
            entry.last_pending = Some(now);
            let learned = entry.cmd.as_ref().and_then(|c| st.learned.get(c)).copied();
            entry.next_poll = next_poll(policy, entry.registered, entry.delay, learned, now);
            entry.delay = entry.delay.mul_f64(1.5).min(policy.max);
        }
    }
}

/// How long a job took, as learned: it finished between the last poll that found it pending (or its
/// registration) and `done`, the poll that found it finished; the middle of that gap. Taking `done` itself
/// would learn every duration late by the gap, and a dense window placed by a late average only finds the
/// next job finished at its start, so the average would come down by a few milliseconds per job.
fn duration_estimate(
    registered: Instant,
    last_pending: Option<Instant>,
    done: Instant,
) -> Duration {
    let since = last_pending.unwrap_or(registered);
    (since - registered) + done.saturating_duration_since(since) / 2
}

/// When to poll a pending job next: the growing schedule, or sooner inside the window around the
/// learned duration.
fn next_poll(
    policy: &JobPollPolicy,
    registered: Instant,
    delay: Duration,
    learned: Option<Duration>,
    now: Instant,
) -> Instant {
    let regular = now + spread(delay);
    let Some(expected) = learned else {
        return regular;
    };
    let age = now - registered;
    let lead = policy.dense * 2;
    let start = expected.saturating_sub(lead);
    let end = expected + (expected / 4).min(Duration::from_millis(100)) + lead;
    if age >= end {
        return regular;
    }
    let dense = if age >= start {
        now + (expected / DENSE_FRACTION).clamp(DENSEST, policy.dense.max(DENSEST))
    } else {
        registered + start
    };
    regular.min(dense)
}

/// `d` scaled by a random factor in [0.8, 1.2].
fn spread(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.8..=1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> JobPollPolicy {
        JobPollPolicy::default()
    }

    #[test]
    fn without_a_learned_duration_the_schedule_grows_from_initial() {
        let p = policy();
        let t0 = Instant::now();
        let next = next_poll(&p, t0, p.initial, None, t0);
        let d = next - t0;
        assert!(
            d >= p.initial.mul_f64(0.79) && d <= p.initial.mul_f64(1.21),
            "{d:?}"
        );
    }

    #[test]
    fn polls_are_dense_around_the_learned_duration() {
        let p = policy();
        let t0 = Instant::now();
        let expected = Duration::from_millis(200);
        // Long before the window: the regular schedule, or the window's start, whichever is first.
        let next = next_poll(&p, t0, Duration::from_millis(500), Some(expected), t0);
        assert_eq!(next - t0, expected - p.dense * 2);
        // Inside the window: every 1/40 of the expected duration.
        let now = t0 + Duration::from_millis(195);
        let next = next_poll(&p, t0, Duration::from_millis(500), Some(expected), now);
        assert_eq!(next - now, Duration::from_millis(5));
        // ... at least every 2 ms for short jobs, at most every `dense` for long ones.
        let next = next_poll(&p, t0, p.max, Some(Duration::from_millis(20)), t0);
        assert_eq!(next - t0, DENSEST);
        let long = Duration::from_secs(30);
        let now = t0 + long;
        let next = next_poll(&p, t0, p.max, Some(long), now);
        assert_eq!(next - now, p.dense);
        // After the window: back to the regular schedule.
        let now = t0 + Duration::from_millis(400);
        let next = next_poll(&p, t0, Duration::from_millis(500), Some(expected), now);
        assert!(next - now >= Duration::from_millis(399), "{:?}", next - now);
    }

    #[test]
    fn a_duration_is_learned_as_the_middle_of_the_last_gap_between_polls() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Pending at 125 ms, finished at 237 ms: it ended somewhere in between.
        assert_eq!(
            duration_estimate(t0, Some(t0 + ms(125)), t0 + ms(237)),
            ms(181)
        );
        // Finished at the first poll: somewhere since registration.
        assert_eq!(duration_estimate(t0, None, t0 + ms(8)), ms(4));
        // Dense polls 5 ms apart pin it within 2.5 ms.
        assert_eq!(
            duration_estimate(t0, Some(t0 + ms(198)), t0 + ms(203)),
            ms(200) + ms(1) / 2
        );
    }

    #[test]
    fn the_window_is_bounded_for_long_jobs() {
        let p = policy();
        let t0 = Instant::now();
        let expected = Duration::from_secs(60);
        let now = t0 + Duration::from_secs(60) + Duration::from_millis(150);
        let next = next_poll(&p, t0, p.max, Some(expected), now);
        assert!(next - now >= p.max.mul_f64(0.79));
    }
}
