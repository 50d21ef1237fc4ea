//! The operation engine: the only writer of state. Every mutation is journaled before anything is done, runs
//! in FIFO order per volume and one at a time per VM, records each step and CloudStack job id as soon as it is
//! known, and is written as an idempotent "converge" so that start-up resumes it from its last step (or finishes
//! its compensation). Guarantees 1–8 of `docs/architecture.md`.
//!
//! Modules: [`journal`] (steps and requests as types, the cloud-job helper), [`validate`], one per workflow
//! ([`create`], [`attach`], [`detach`], [`delete`]), [`export`] (export lifecycle, the one teardown) and
//! [`recovery`] (start-up), [`repair`] (the reconciler's repairs, journaled as `repair` operations), [`orphans`] (the export
//! audit and orphan clean-up), [`snapshot`] (snapshot create, revert and delete), [`cleanup`] (the
//! test-failover clean-up: test VM to appliance), [`fence`]
//! (exports whose device vanished) and [`reads`] (records joined with live state for the API). This file holds
//! the handle, submission, queuing and the run loop.

mod attach;
mod cleanup;
mod create;
mod delete;
mod detach;
mod error;
mod export;
pub mod failpoints;
mod fence;
mod journal;
mod orphans;
mod persist;
mod reads;
mod recovery;
mod repair;
mod snapshot;
mod validate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

pub use error::EngineError;
pub(crate) use journal::{wire_kind, Request};
pub(crate) use reads::{DeviceCheck, DeviceView, ExportView, VolumeView};
pub(crate) use snapshot::{STATUS_NONE as SNAPSHOT_NONE, STATUS_READY as SNAPSHOT_READY};
pub(crate) use validate::{control_in_json, has_control};

use crate::cloud::{Cloud, CloudDiskOffering, CloudErrorKind, CloudVolume};
use crate::devices::Devices;
use crate::exports::Exports;
use crate::identity::Identity;
use crate::locks::{KeyedMutex, Queues};
use crate::metrics::Metrics;
use crate::store::{
    Inserted, NewOperation, OpStatus, OperationRecord, Store, VolumeRecord, INITIAL_STEP,
};
use journal::Parsed;

/// The first wait before an operation is run again while the cloud is unavailable; doubled up to
/// [`MAX_CLOUD_BACKOFF`].
const FIRST_CLOUD_BACKOFF: Duration = Duration::from_secs(1);
const MAX_CLOUD_BACKOFF: Duration = Duration::from_secs(15);

/// Timeouts and limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub job_timeout: Duration,
    /// Deadline for one CloudStack snapshot job.
    pub snapshot_timeout: Duration,
    pub device_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_concurrent: usize,
    /// The NBD client identities an appliance export admits when the attach names none (empty: anyone).
    pub nbd_default_clients: Vec<String>,
}

/// The parts the engine drives.
pub struct Parts {
    pub store: Store,
    pub cloud: Arc<dyn Cloud>,
    pub devices: Devices,
    pub exports: Exports,
    pub identity: Identity,
    pub metrics: Arc<Metrics>,
}

struct Inner {
    store: Store,
    cloud: Arc<dyn Cloud>,
    devices: Devices,
    exports: Exports,
    identity: Identity,
    metrics: Arc<Metrics>,
    cfg: EngineConfig,
    queues: Arc<Queues>,
    vm_locks: KeyedMutex,
    /// Held while an operation on the volume is numbered, journaled and queued.
    submit_locks: KeyedMutex,
    /// The next `queue_seq` (continues above the journal's highest at start-up).
    next_seq: AtomicI64,
    permits: Semaphore,
    changes: watch::Sender<u64>,
    tasks: TaskTracker,
    accepting: AtomicBool,
    /// Operations whose journal entry cannot be written (named by `/health`).
    stuck: persist::StuckOperations,
    /// Operations resumed at start-up that have not ended yet.
    recovering: AtomicUsize,
    /// Disk offerings by id, as the cloud listed them (offerings do not change under a running daemon).
    offerings: tokio::sync::Mutex<HashMap<String, CloudDiskOffering>>,
}

/// Handle to the engine (cheap to clone).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

/// What a submission produced.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub operation: OperationRecord,
    /// False when an earlier operation with the same idempotency key was returned.
    pub created: bool,
}

impl Engine {
    pub fn new(parts: Parts, cfg: EngineConfig) -> Self {
        let (changes, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                permits: Semaphore::new(cfg.max_concurrent.max(1)),
                store: parts.store,
                cloud: parts.cloud,
                devices: parts.devices,
                exports: parts.exports,
                identity: parts.identity,
                metrics: parts.metrics,
                cfg,
                queues: Arc::new(Queues::default()),
                vm_locks: KeyedMutex::default(),
                submit_locks: KeyedMutex::default(),
                next_seq: AtomicI64::new(1),
                changes,
                tasks: TaskTracker::new(),
                accepting: AtomicBool::new(false),
                stuck: Default::default(),
                recovering: AtomicUsize::new(0),
                offerings: Default::default(),
            }),
        }
    }

    /// Whether new operations are accepted (after start-up recovery, before shutdown).
    pub fn is_accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::SeqCst)
    }

    pub fn set_accepting(&self, on: bool) {
        self.inner.accepting.store(on, Ordering::SeqCst);
    }

    /// Validates, journals and starts a mutation. Returns once the journal row exists.
    pub(crate) async fn submit(
        &self,
        req: Request,
        idempotency_key: Option<String>,
    ) -> Result<Submitted, EngineError> {
        if !self.is_accepting() {
            return Err(EngineError::NotAccepting);
        }
        // The key first: a replay answers as the first request did, whatever has happened since.
        if let Some(key) = &idempotency_key {
            if let Some(first) = self.inner.store.operation_by_idempotency_key(key).await? {
                return replay(first, &req, key);
            }
        }
        let as_journaled = req.to_json();
        validate::refuse_control(&as_journaled)?;
        validate::refuse_long_ids(&as_journaled)?;
        if let Some(v) = req.volume_id() {
            self.inner.refuse_foreign(v).await?;
        }
        if let Err(e) = self.inner.precheck(&req).await {
            // A concurrent request with the same key may have been journaled, and even run, while this one
            // was checked, and the check saw its effect (an attach seeing the volume attached): the replay
            // of that request is the answer, not the refusal.
            if let Some(key) = &idempotency_key {
                if let Some(first) = self.inner.store.operation_by_idempotency_key(key).await? {
                    return replay(first, &req, key);
                }
            }
            return Err(e);
        }
        // An operation journaled and not queued would wait, unseen, for the next start and then run out of
        // its volume's order.
        self.to_the_end(move |engine| async move { engine.journal(req, idempotency_key).await })
            .await
    }

    /// Runs `work` on a task of its own to the end, even when the request that asked for it goes away meanwhile
    /// (its client disconnected, the request timed out): work cut short part-way would leave the volume half
    /// changed. A panic in it is passed on.
    pub(crate) async fn to_the_end<T, F>(
        &self,
        work: impl FnOnce(Engine) -> F,
    ) -> Result<T, EngineError>
    where
        F: std::future::Future<Output = Result<T, EngineError>> + Send + 'static,
        T: Send + 'static,
    {
        match tokio::spawn(work(self.clone())).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(EngineError::NotAccepting),
        }
    }

    /// Numbers, journals and queues a checked request.
    async fn journal(
        &self,
        req: Request,
        idempotency_key: Option<String>,
    ) -> Result<Submitted, EngineError> {
        // Numbering, journaling and queuing happen under the volume's submission lock, so the journal's order
        // (`queue_seq`) is the order of the volume's queue, which recovery re-creates.
        let _queuing = match req.volume_id() {
            Some(v) => Some(self.inner.submit_locks.lock(&v.to_string()).await),
            None => None,
        };
        let new = NewOperation {
            id: Uuid::new_v4(),
            op_type: req.op_type(),
            volume_id: req.volume_id(),
            vm_id: req.vm_id().map(str::to_string),
            request: req.to_json(),
            idempotency_key,
            queue_seq: Some(self.inner.next_seq.fetch_add(1, Ordering::SeqCst)),
        };
        let insert = self.inner.store.insert_operation(&new);
        let operation = match failpoints::around(new.op_type, INITIAL_STEP, insert).await? {
            Inserted::Created(op) => op,
            // The same key, journaled by a concurrent request since the look-up above.
            Inserted::Existing(first) => {
                return replay(
                    first,
                    &req,
                    new.idempotency_key.as_deref().unwrap_or_default(),
                )
            }
        };
        self.inner.metrics.op_submitted(operation.op_type.as_str());
        drop(self.spawn(operation.clone()));
        Ok(Submitted {
            operation,
            created: true,
        })
    }

    /// Queues `op` in its volume's turn; the handle ends when it has run.
    fn spawn(&self, op: OperationRecord) -> tokio::task::JoinHandle<()> {
        let key = op
            .volume_id
            .map(|v| v.to_string())
            .unwrap_or_else(|| format!("op:{}", op.id));
        let mut turn = self.inner.queues.enqueue(&key);
        let inner = Arc::clone(&self.inner);
        self.inner.tasks.spawn(async move {
            turn.wait().await;
            let _permit = inner.permits.acquire().await;
            inner.run_guarded(op.id).await;
            drop(turn);
        })
    }

    /// Operations whose journal entry could not be written in this run, with why: they stay unfinished in
    /// the journal and are resumed at the next start.
    pub fn stuck_operations(&self) -> Vec<(Uuid, String)> {
        self.inner.stuck.list()
    }

    /// Stops accepting operations and waits up to `grace` for running ones; the rest resume at next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.set_accepting(false);
        self.inner.tasks.close();
        if tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "operations still running at shutdown; they resume from their last journaled step at next start"
            );
        }
    }

    /// The operation, waiting up to `wait` for it to become terminal.
    pub async fn operation(
        &self,
        id: Uuid,
        wait: Duration,
    ) -> Result<Option<OperationRecord>, EngineError> {
        let deadline = Instant::now() + wait;
        loop {
            let mut rx = self.inner.changes.subscribe();
            let op = self.inner.store.get_operation(id).await?;
            match &op {
                Some(o) if !o.status.is_terminal() && Instant::now() < deadline => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let _ = tokio::time::timeout(left, rx.changed()).await;
                }
                _ => return Ok(op),
            }
        }
    }

    /// Runs `f` in the volume's FIFO turn, so that it never interleaves with an operation on that volume.
    pub(crate) async fn in_turn<T>(
        &self,
        volume_id: Uuid,
        f: impl std::future::Future<Output = T>,
    ) -> T {
        let mut turn = self.inner.queues.enqueue(&volume_id.to_string());
        turn.wait().await;
        let out = f.await;
        drop(turn);
        out
    }
}

/// The first operation of an idempotency key, when `req` is the request it was journaled for.
/// Where the cloud reports a volume, for messages: "not attached", "attached to VM …", "no longer listed".
fn whereabouts(v: Option<&CloudVolume>) -> String {
    match v {
        None => "no longer listed".to_owned(),
        Some(CloudVolume { vm_id: None, .. }) => "not attached".to_owned(),
        Some(CloudVolume {
            vm_id: Some(vm), ..
        }) => format!("attached to VM {vm}"),
    }
}

fn replay(first: OperationRecord, req: &Request, key: &str) -> Result<Submitted, EngineError> {
    if first.op_type == req.op_type() && first.request == req.to_json() {
        return Ok(Submitted {
            operation: first,
            created: false,
        });
    }
    Err(EngineError::IdempotencyKeyReused(format!(
        "Idempotency-Key {key:?} was used for operation {} ({} of a different request); \
         use a new key for a new request",
        first.id,
        first.op_type.as_str()
    )))
}

impl Inner {
    /// `OwnedElsewhere` when the volume is recorded for another appliance sharing the database.
    pub(crate) async fn refuse_foreign(&self, volume_id: Uuid) -> Result<(), EngineError> {
        match self.store.foreign_owner(volume_id).await? {
            Some(owner) => Err(EngineError::OwnedElsewhere { volume_id, owner }),
            None => Ok(()),
        }
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Runs the operation. A panic in its workflow (a defect) is taken like a crash of the daemon while it
    /// ran: the operation runs again from its journaled step, once; a second panic fails it, so that no
    /// operation stays executing with nothing running it.
    async fn run_guarded(&self, id: Uuid) {
        use futures::FutureExt as _;
        for attempt in 1..=2 {
            let Err(panic) = std::panic::AssertUnwindSafe(self.run(id))
                .catch_unwind()
                .await
            else {
                return;
            };
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            tracing::error!(op = %id, attempt, panic = %what, "an operation's run panicked");
            if attempt == 2 {
                self.journal_failure(id, &EngineError::Panicked(what)).await;
                self.notify();
            }
        }
    }

    async fn run(&self, id: Uuid) {
        let started = Instant::now();
        let op = match self
            .journal_write("reading an operation", || self.store.get_operation(id))
            .await
        {
            Ok(Some(op)) if !op.status.is_terminal() => op,
            Ok(_) => return,
            Err(e) => {
                let why = format!("cannot be read: {}", crate::error_chain(&e));
                tracing::error!(op = %id, error = %why, "operation stuck; it resumes at next start");
                self.stuck.insert(id, why);
                return;
            }
        };
        let step = journal::resume_step(&op.step);
        let start = self
            .journal_step(
                op.op_type,
                step,
                "journaling the start of an operation",
                || self.store.set_operation_step(id, OpStatus::Executing, step),
            )
            .await;
        self.notify();
        let result = match start {
            Err(e) => Err(EngineError::Store(e)),
            Ok(()) => self.converge(op.clone()).await,
        };
        let status = match result {
            Ok(()) => "completed",
            Err(e) => {
                let err = e.to_op_error();
                tracing::warn!(op = %id, kind = op.op_type.as_str(), code = %err.code, error = %err.message, "operation failed");
                self.journal_failure(id, &e).await;
                "failed"
            }
        };
        self.metrics
            .op_finished(op.op_type.as_str(), status, started.elapsed());
        self.notify();
    }

    /// Runs the operation's workflow from its journaled step. While the cloud is unavailable (unreachable,
    /// throttling, server errors) the workflow is run again from its then journaled step, with backoff, until
    /// `job_timeout` after the operation first found it so: an outage shorter than that delays an operation,
    /// it does not fail it, however long the operation waited on the cloud before (a snapshot job may take
    /// hours).
    async fn converge(&self, mut op: OperationRecord) -> Result<(), EngineError> {
        let mut outage_began: Option<Instant> = None;
        let mut backoff = FIRST_CLOUD_BACKOFF;
        loop {
            // A request an earlier version journaled with text no database can store fails before it acts.
            let result = match validate::refuse_control(&op.request)
                .and_then(|()| Parsed::from_record(&op))
            {
                Ok(Parsed::Create(e)) => self.create(&e).await,
                Ok(Parsed::Attach(e)) => self.attach(&e).await,
                Ok(Parsed::Detach(e)) => self.detach(&e).await,
                Ok(Parsed::Delete(e)) => self.delete(&e).await,
                Ok(Parsed::Repair(e)) => self.repair(&e).await,
                Ok(Parsed::SnapshotCreate(e)) => self.snapshot_create(&e).await,
                Ok(Parsed::SnapshotRevert(e)) => self.snapshot_revert(&e).await,
                Ok(Parsed::SnapshotDelete(e)) => self.snapshot_delete(&e).await,
                Ok(Parsed::TestFailoverCleanup(e)) => self.test_failover_cleanup(&e).await,
                Err(e) => Err(e),
            };
            match result {
                Err(EngineError::Cloud(e)) if e.kind == CloudErrorKind::Unavailable => {
                    let Some(now) = self.unfinished(op.id).await? else {
                        return Ok(());
                    };
                    // A step journaled by this attempt: an earlier outage ended, and this one begins now.
                    if (&now.step, &now.cloud_job_id) != (&op.step, &op.cloud_job_id) {
                        outage_began = None;
                        backoff = FIRST_CLOUD_BACKOFF;
                    }
                    let began = *outage_began.get_or_insert_with(Instant::now);
                    if Instant::now() + backoff >= began + self.cfg.job_timeout {
                        return Err(EngineError::Cloud(e));
                    }
                    tracing::warn!(op = %op.id, error = %e.chain(), retry_in = ?backoff, "CloudStack unavailable; the operation goes on when it answers");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_CLOUD_BACKOFF);
                    op = match self.unfinished(op.id).await? {
                        Some(again) => again,
                        None => return Ok(()),
                    };
                }
                other => return other,
            }
        }
    }

    /// The operation as journaled now; `None` once it has ended (cancelled while it waited).
    async fn unfinished(&self, id: Uuid) -> Result<Option<OperationRecord>, EngineError> {
        Ok(self
            .journal_write("reading an operation", || self.store.get_operation(id))
            .await?
            .filter(|op| !op.status.is_terminal()))
    }

    async fn cloud_volume(&self, volume_id: Uuid) -> Result<Option<CloudVolume>, EngineError> {
        match self.cloud.get_volume(&volume_id.to_string()).await {
            Ok(v) => Ok(v),
            Err(e) if e.kind == CloudErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for a job whose id was journaled, falling back to the volume's state when the cloud forgot it.
    async fn finish_job(
        &self,
        job_id: &str,
        volume_id: Uuid,
    ) -> Result<Option<CloudVolume>, EngineError> {
        match self.cloud.wait_job(job_id, self.cfg.job_timeout).await {
            Ok(Some(v)) => Ok(Some(v)),
            Ok(None) => self.cloud_volume(volume_id).await,
            Err(e) if e.kind == CloudErrorKind::NotFound => self.cloud_volume(volume_id).await,
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for an attach or detach job; when the job fails, or CloudStack does not know it, but the cloud
    /// already reports the volume as the job was to leave it (`reached`), answers that state instead of the
    /// failure (an unknown job otherwise fails with [`EngineError::CloudJobUnknown`]). An attachVolume or
    /// detachVolume sent just before a crash, whose job id was never journaled, goes on in the cloud; the
    /// resumed operation adopts it while the cloud lists it pending (`start_or_adopt_volume_job`), but sends
    /// the call again when it ended in between (or the cloud could not list its jobs): then the second job
    /// fails ("not attached", "already attached") though the volume is where the operation wanted it.
    async fn finish_job_or_reached(
        &self,
        job_id: &str,
        volume_id: Uuid,
        reached: impl Fn(Option<&CloudVolume>) -> bool,
    ) -> Result<Option<CloudVolume>, EngineError> {
        let cause = match self.cloud.wait_job(job_id, self.cfg.job_timeout).await {
            Ok(Some(v)) => return Ok(Some(v)),
            Ok(None) => return self.cloud_volume(volume_id).await,
            Err(cause) => cause,
        };
        match self.cloud_volume(volume_id).await {
            Ok(now) if reached(now.as_ref()) => {
                tracing::warn!(
                    volume = %volume_id,
                    job = job_id,
                    error = %cause.chain(),
                    "the job failed or is unknown to CloudStack, but CloudStack already reports the volume as \
                     it was to leave it (an earlier request whose job id was lost did it); going on"
                );
                Ok(now)
            }
            Ok(now) if cause.kind == CloudErrorKind::NotFound => {
                Err(EngineError::CloudJobUnknown {
                    job_id: job_id.to_owned(),
                    volume_id,
                    now: whereabouts(now.as_ref()),
                    source: cause,
                })
            }
            _ => Err(cause.into()),
        }
    }

    /// The volume's record, adopting a volume the daemon did not create from the cloud.
    async fn volume_record(&self, volume_id: Uuid) -> Result<VolumeRecord, EngineError> {
        if let Some(v) = self.store.get_volume(volume_id).await? {
            if v.deleted_at.is_some() {
                return Err(EngineError::NotFound(format!(
                    "volume {volume_id} was deleted"
                )));
            }
            return Ok(v);
        }
        let cv = self.cloud_volume(volume_id).await?.ok_or_else(|| {
            EngineError::NotFound(format!("volume {volume_id} does not exist in CloudStack"))
        })?;
        let now = Utc::now();
        let rec = VolumeRecord {
            id: volume_id,
            name: cv.name.clone(),
            size_bytes: cv.size,
            disk_offering_id: cv.disk_offering_id.clone().unwrap_or_default(),
            zone_id: cv.zone_id.clone().unwrap_or_default(),
            metadata: json!({ "adopted_from_cloud": true }),
            cloud_state: Some(cv.state.clone()),
            snapshot: Default::default(),
            created_at: now,
            updated_at: now,
            deleted_at: None,
        };
        self.store.upsert_volume(&rec).await?;
        Ok(rec)
    }
}
