//! The operation engine: the only writer of state. Every mutation is journaled before anything is done, runs
//! in FIFO order per volume and one at a time per VM, records each step and CloudStack job id as soon as it is
//! known, and is written as an idempotent "converge" so that start-up resumes it from its last step (or finishes
//! its compensation). Guarantees 1–8 of `docs/architecture.md`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use volume_api::CreateVolumeRequest;

use crate::cloud::{Cloud, CloudError, CloudErrorKind, CloudVolume, NewCloudVolume};
use crate::devices::{DeviceError, Devices};
use crate::exports::{ExportError, Exports};
use crate::identity::{Identity, IdentityError};
use crate::locks::{KeyedMutex, Queues};
use crate::metrics::Metrics;
use crate::store::{
    AttachTarget, AttachmentFilter, AttachmentRecord, DiskRole, ExportRecord, Inserted,
    NewOperation, OpError, OpStatus, OpType, OperationRecord, Store, StoreError, VolumeRecord,
};

/// One GiB: volume sizes are rounded up to whole GiB.
pub const GIB: u64 = 1 << 30;

/// Journal steps. Stored as text; resumption looks only at the ones named here.
pub mod step {
    pub const ACCEPTED: &str = "accepted";
    pub const STARTED: &str = "started";
    pub const CREATE_SENT: &str = "cloud_create_sent";
    pub const CREATE_JOB: &str = "cloud_create_job";
    pub const ATTACH_JOB: &str = "cloud_attach_job";
    pub const CLOUD_ATTACHED: &str = "cloud_attached";
    pub const DEVICE_FOUND: &str = "device_found";
    pub const NAMED: &str = "named";
    pub const EXPORTED: &str = "exported";
    pub const COMPENSATING: &str = "compensating";
    pub const COMPENSATE_JOB: &str = "compensate_detach_job";
    pub const EXPORT_REMOVED: &str = "export_removed";
    pub const DETACH_JOB: &str = "cloud_detach_job";
    pub const CLOUD_DETACHED: &str = "cloud_detached";
    pub const DELETE_SENT: &str = "cloud_delete_sent";
}

/// A mutation request, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Create(CreateVolumeRequest),
    Attach {
        volume_id: Uuid,
        vm_id: String,
        root: bool,
    },
    Detach {
        volume_id: Uuid,
    },
    Delete {
        volume_id: Uuid,
    },
}

impl Request {
    fn op_type(&self) -> OpType {
        match self {
            Self::Create(_) => OpType::Create,
            Self::Attach { .. } => OpType::Attach,
            Self::Detach { .. } => OpType::Detach,
            Self::Delete { .. } => OpType::Delete,
        }
    }

    fn volume_id(&self) -> Option<Uuid> {
        match self {
            Self::Create(_) => None,
            Self::Attach { volume_id, .. }
            | Self::Detach { volume_id }
            | Self::Delete { volume_id } => Some(*volume_id),
        }
    }

    /// The request as journaled (and shown as the operation's `request`).
    fn to_json(&self) -> Value {
        match self {
            Self::Create(c) => serde_json::to_value(c).unwrap_or(Value::Null),
            Self::Attach {
                volume_id,
                vm_id,
                root: false,
            } => json!({ "volume_id": volume_id, "vm_id": vm_id }),
            Self::Attach {
                volume_id,
                vm_id,
                root: true,
            } => {
                json!({ "volume_id": volume_id, "vm_id": vm_id, "device_id": 0, "attach_as": "root" })
            }
            Self::Detach { volume_id } | Self::Delete { volume_id } => {
                json!({ "volume_id": volume_id })
            }
        }
    }

    fn from_record(op: &OperationRecord) -> Result<Self, EngineError> {
        let corrupt = |what: &str| {
            EngineError::Internal(format!(
                "journal entry {} has an unreadable request ({what})",
                op.id
            ))
        };
        let vol = || op.volume_id.ok_or_else(|| corrupt("no volume id"));
        Ok(match op.op_type {
            OpType::Create => Self::Create(
                serde_json::from_value(op.request.clone()).map_err(|_| corrupt("create"))?,
            ),
            OpType::Attach => Self::Attach {
                volume_id: vol()?,
                vm_id: op
                    .request
                    .get("vm_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| corrupt("vm_id"))?
                    .to_string(),
                root: op.request.get("attach_as").and_then(Value::as_str) == Some("root"),
            },
            OpType::Detach => Self::Detach { volume_id: vol()? },
            OpType::Delete => Self::Delete { volume_id: vol()? },
        })
    }
}

/// Engine failures: what the API maps to HTTP statuses and what failed operations record.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("the daemon is not accepting operations: {0}")]
    Unavailable(String),
    #[error("journal or database failure")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("{}; {outcome}", crate::error_chain(cause.as_ref()))]
    Compensated {
        cause: Box<EngineError>,
        outcome: String,
    },
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    /// Stable failure kind (the API's `code`, an operation's `error_code`).
    pub fn code(&self) -> String {
        match self {
            Self::Invalid { .. } => "invalid_request".into(),
            Self::NotFound(_) => "not_found".into(),
            Self::Conflict(_) => "conflict".into(),
            Self::Identity(_) => "appliance_identity_unknown".into(),
            Self::Unavailable(_) => "unavailable".into(),
            Self::Store(_) => "database_error".into(),
            Self::Cloud(e) => e.kind.as_str().into(),
            Self::Device(e) => e.code().into(),
            Self::Export(_) => "export_failed".into(),
            Self::Compensated { cause, .. } => cause.code(),
            Self::Internal(_) => "internal".into(),
        }
    }

    fn to_op_error(&self) -> OpError {
        OpError {
            code: self.code(),
            message: crate::error_chain(self),
        }
    }
}

/// Timeouts and limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub job_timeout: Duration,
    pub device_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_concurrent: usize,
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
    permits: Semaphore,
    changes: watch::Sender<u64>,
    tasks: TaskTracker,
    accepting: AtomicBool,
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
                changes,
                tasks: TaskTracker::new(),
                accepting: AtomicBool::new(false),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }
    pub fn cloud(&self) -> &Arc<dyn Cloud> {
        &self.inner.cloud
    }
    pub fn devices(&self) -> &Devices {
        &self.inner.devices
    }
    pub fn exports(&self) -> &Exports {
        &self.inner.exports
    }
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }
    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// Whether new operations are accepted (after start-up recovery, before shutdown).
    pub fn is_accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::SeqCst)
    }

    pub fn set_accepting(&self, on: bool) {
        self.inner.accepting.store(on, Ordering::SeqCst);
    }

    /// Validates, journals and starts a mutation. Returns once the journal row exists.
    pub async fn submit(
        &self,
        req: Request,
        idempotency_key: Option<String>,
    ) -> Result<Submitted, EngineError> {
        if !self.is_accepting() {
            return Err(EngineError::Unavailable(
                "it is starting up or shutting down; retry shortly".into(),
            ));
        }
        self.precheck(&req).await?;
        let new = NewOperation {
            id: Uuid::new_v4(),
            op_type: req.op_type(),
            volume_id: req.volume_id(),
            vm_id: match &req {
                Request::Attach { vm_id, .. } => Some(vm_id.clone()),
                _ => None,
            },
            request: req.to_json(),
            idempotency_key,
        };
        let inserted = self.inner.store.insert_operation(&new).await?;
        let (operation, created) = match inserted {
            Inserted::Created(op) => (op, true),
            Inserted::Existing(op) => (op, false),
        };
        if created {
            self.inner.metrics.op_submitted(operation.op_type.as_str());
            self.spawn(operation.clone());
        }
        Ok(Submitted { operation, created })
    }

    /// Synchronous checks that make a request a 4xx instead of a failed operation.
    async fn precheck(&self, req: &Request) -> Result<(), EngineError> {
        match req {
            Request::Create(c) => validate_create(c),
            Request::Attach {
                volume_id,
                vm_id,
                root,
            } => {
                if vm_id.trim().is_empty() {
                    return Err(EngineError::Invalid {
                        field: "vm_id",
                        message: "vm_id must not be empty".into(),
                    });
                }
                let appliance = self.inner.identity.require().await?;
                if *root && *vm_id == appliance {
                    return Err(EngineError::Invalid {
                        field: "vm_id",
                        message: "a volume cannot be attached as the root disk of the appliance"
                            .into(),
                    });
                }
                self.require_volume(*volume_id).await?;
                if !self.has_unfinished(*volume_id).await? {
                    if let Some(a) = self.inner.store.get_attachment(*volume_id).await? {
                        return Err(EngineError::Conflict(format!(
                            "volume {volume_id} is already attached to VM {}; detach it first",
                            a.vm_id
                        )));
                    }
                }
                Ok(())
            }
            Request::Detach { volume_id } | Request::Delete { volume_id } => {
                self.require_volume(*volume_id).await
            }
        }
    }

    async fn has_unfinished(&self, volume_id: Uuid) -> Result<bool, EngineError> {
        Ok(self
            .inner
            .store
            .unfinished_operations()
            .await?
            .iter()
            .any(|o| o.volume_id == Some(volume_id)))
    }

    /// 404 unless the volume is known to the store or to the cloud.
    async fn require_volume(&self, volume_id: Uuid) -> Result<(), EngineError> {
        if let Some(v) = self.inner.store.get_volume(volume_id).await? {
            if v.deleted_at.is_none() {
                return Ok(());
            }
            return Err(EngineError::NotFound(format!(
                "volume {volume_id} was deleted"
            )));
        }
        match self.inner.cloud.get_volume(&volume_id.to_string()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(EngineError::NotFound(format!(
                "volume {volume_id} is not known to the daemon or to CloudStack"
            ))),
            Err(e) if e.kind == CloudErrorKind::NotFound => Err(EngineError::NotFound(format!(
                "volume {volume_id} is not known to the daemon or to CloudStack"
            ))),
            // The cloud will be asked again when the operation runs.
            Err(_) => Ok(()),
        }
    }

    fn spawn(&self, op: OperationRecord) {
        let key = op
            .volume_id
            .map(|v| v.to_string())
            .unwrap_or_else(|| format!("op:{}", op.id));
        let mut turn = self.inner.queues.enqueue(&key);
        let inner = Arc::clone(&self.inner);
        self.inner.tasks.spawn(async move {
            turn.wait().await;
            let _permit = inner.permits.acquire().await;
            inner.run(op.id).await;
            drop(turn);
        });
    }

    /// Resumes every unfinished operation (oldest first) and waits until each is terminal.
    pub async fn resume_all(&self) -> Result<usize, EngineError> {
        let ops = self.inner.store.unfinished_operations().await?;
        let n = ops.len();
        for op in ops {
            tracing::info!(op = %op.id, kind = op.op_type.as_str(), step = %op.step, "resuming operation");
            self.inner.metrics.resumed();
            self.spawn(op);
        }
        self.wait_idle().await;
        Ok(n)
    }

    /// Waits until no operation is running.
    pub async fn wait_idle(&self) {
        loop {
            let mut rx = self.inner.changes.subscribe();
            if self
                .inner
                .store
                .unfinished_operations()
                .await
                .map(|v| v.is_empty())
                .unwrap_or(true)
                && self.inner.permits.available_permits() == self.inner.cfg.max_concurrent.max(1)
            {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
        }
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
}

impl Engine {
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

    /// `POST /exports`: makes sure an appliance-attached volume is exported (re-opening it after a
    /// `DELETE /exports`). A device path that is not the volume's own device is refused.
    pub async fn ensure_export(
        &self,
        volume_id: Uuid,
        device_path: Option<&str>,
    ) -> Result<ExportRecord, EngineError> {
        self.in_turn(volume_id, async {
            let inner = &self.inner;
            let att = inner
                .store
                .get_attachment(volume_id)
                .await?
                .filter(|a| a.target == AttachTarget::Appliance)
                .ok_or_else(|| {
                    EngineError::Conflict(format!(
                        "volume {volume_id} is not attached to the appliance; attach it first \
                         (POST /api/v1/volumes/{volume_id}/attach)"
                    ))
                })?;
            if let Some(p) = device_path.filter(|p| !p.is_empty()) {
                let own = [att.by_id_path.as_deref(), att.kernel_device.as_deref(), att.stable_name.as_deref()];
                if !own.contains(&Some(p)) {
                    return Err(EngineError::Conflict(format!(
                        "device_path {p} is not the device of volume {volume_id} ({}); leave device_path out",
                        att.by_id_path.as_deref().or(att.kernel_device.as_deref()).unwrap_or("unknown")
                    )));
                }
            }
            if let Some(rec) = inner.store.get_export(volume_id).await? {
                if inner.exports.get(volume_id).is_some_and(|s| s.generation == rec.generation) {
                    return Ok(rec);
                }
            }
            inner.reexport(&att).await
        })
        .await
    }

    /// Re-verifies an appliance attachment's device and serves it again under a new generation.
    pub(crate) async fn reexport(
        &self,
        att: &AttachmentRecord,
    ) -> Result<ExportRecord, EngineError> {
        self.inner.reexport(att).await
    }

    /// `DELETE /exports/{volume_id}`: stops serving the volume (drained); the attachment stays.
    pub async fn remove_export(&self, volume_id: Uuid) -> Result<bool, EngineError> {
        self.in_turn(volume_id, async {
            let inner = &self.inner;
            let closed = inner
                .exports
                .close(volume_id, inner.cfg.drain_timeout)
                .await?;
            let had_record = inner.store.get_export(volume_id).await?.is_some();
            inner.store.delete_export(volume_id).await?;
            Ok(closed.is_some() || had_record)
        })
        .await
    }

    /// Start-up: re-verifies the device of every appliance attachment and re-creates its stable name and
    /// export (guarantee 6). Returns the volumes that could not be restored and why.
    pub async fn restore_appliance_volumes(&self) -> Result<Vec<(Uuid, String)>, EngineError> {
        let inner = &self.inner;
        let atts = inner
            .store
            .list_attachments(&AttachmentFilter {
                vm_id: None,
                target: Some(AttachTarget::Appliance),
            })
            .await?;
        let mut problems = Vec::new();
        for att in atts {
            if let Some(name) = &att.stable_name {
                inner
                    .devices
                    .remember(att.volume_id, std::path::Path::new(name))?;
            }
            match inner.reexport(&att).await {
                Ok(rec) => {
                    tracing::info!(volume = %att.volume_id, export = %rec.export_name, generation = rec.generation, "export restored")
                }
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    tracing::error!(volume = %att.volume_id, error = %msg, "cannot restore the export of an appliance volume");
                    problems.push((att.volume_id, msg));
                }
            }
        }
        Ok(problems)
    }
}

impl Inner {
    /// Verifies the attachment's device, re-creates its stable name and opens a new export generation.
    async fn reexport(&self, att: &AttachmentRecord) -> Result<ExportRecord, EngineError> {
        let volume_id = att.volume_id;
        let size = self
            .store
            .get_volume(volume_id)
            .await?
            .map(|v| v.size_bytes)
            .ok_or_else(|| EngineError::NotFound(format!("volume {volume_id} has no record")))?;
        let dev = self.devices.resolve(volume_id, size)?;
        let link_target = dev
            .by_id_path
            .clone()
            .unwrap_or_else(|| dev.dev_path.clone());
        self.devices.name(volume_id, &link_target)?;
        let snap = self
            .exports
            .open(volume_id, &dev.dev_path, self.cfg.drain_timeout)
            .await?;
        let now = Utc::now();
        let rec = ExportRecord {
            volume_id,
            export_name: snap.name.clone(),
            device_path: link_target.display().to_string(),
            generation: snap.generation,
            read_only: false,
            created_at: now,
            updated_at: now,
        };
        self.store.upsert_export(&rec).await?;
        Ok(rec)
    }
}

/// Validation of `POST /volumes`.
pub fn validate_create(c: &CreateVolumeRequest) -> Result<(), EngineError> {
    let invalid = |field, message: &str| {
        Err(EngineError::Invalid {
            field,
            message: message.to_string(),
        })
    };
    if c.name.trim().is_empty() {
        return invalid("name", "name must not be empty");
    }
    if c.name.len() > 255 {
        return invalid("name", "name must be at most 255 bytes");
    }
    if c.size == 0 {
        return invalid("size", "size must be a positive number of bytes");
    }
    if c.size > 64 * 1024 * GIB {
        return invalid("size", "size must be at most 64 TiB");
    }
    if c.disk_offering_id.trim().is_empty() {
        return invalid("disk_offering_id", "disk_offering_id must not be empty");
    }
    if c.zone_id.trim().is_empty() {
        return invalid("zone_id", "zone_id must not be empty");
    }
    Ok(())
}

/// `size` rounded up to whole GiB.
pub fn round_up_gib(size: u64) -> u64 {
    size.div_ceil(GIB) * GIB
}

impl Inner {
    fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    async fn run(&self, id: Uuid) {
        let started = Instant::now();
        let op = match self.store.get_operation(id).await {
            Ok(Some(op)) if !op.status.is_terminal() => op,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(op = %id, error = %crate::error_chain(&e), "cannot read operation; it resumes at next start");
                return;
            }
        };
        if let Err(e) = self
            .store
            .set_operation_step(id, OpStatus::Executing, &resume_step(&op))
            .await
        {
            tracing::error!(op = %id, error = %crate::error_chain(&e), "cannot journal operation start");
            return;
        }
        self.notify();
        let result = match Request::from_record(&op) {
            Ok(req) => self.execute(&op, req).await,
            Err(e) => Err(e),
        };
        let status = match result {
            Ok(()) => "completed",
            Err(e) => {
                let err = e.to_op_error();
                tracing::warn!(op = %id, kind = op.op_type.as_str(), code = %err.code, error = %err.message, "operation failed");
                if let Err(se) = self
                    .store
                    .finish_operation(id, OpStatus::Failed, None, Some(&err))
                    .await
                {
                    tracing::error!(op = %id, error = %crate::error_chain(&se), "cannot journal failure; it resumes at next start");
                }
                "failed"
            }
        };
        self.metrics
            .op_finished(op.op_type.as_str(), status, started.elapsed());
        self.notify();
    }

    async fn execute(&self, op: &OperationRecord, req: Request) -> Result<(), EngineError> {
        match req {
            Request::Create(c) => self.create(op, &c).await,
            Request::Attach {
                volume_id,
                vm_id,
                root,
            } => self.attach(op, volume_id, &vm_id, root).await,
            Request::Detach { volume_id } => {
                let out = self.detach_steps(op, volume_id).await?;
                let response = json!({
                    "volume_id": volume_id,
                    "device_path": out.previous_device_path.clone().unwrap_or_default(),
                    "vm_id": out.vm_id,
                    "message": if out.was_attached { "volume detached" } else { "volume was not attached" },
                });
                self.store
                    .commit_detach(op.id, volume_id, &response)
                    .await?;
                Ok(())
            }
            Request::Delete { volume_id } => self.delete(op, volume_id).await,
        }
    }

    async fn step(&self, op: &OperationRecord, step: &str) -> Result<(), EngineError> {
        self.store
            .set_operation_step(op.id, OpStatus::Executing, step)
            .await?;
        self.notify();
        Ok(())
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

    // ---- create -------------------------------------------------------------------------------------------

    async fn create(
        &self,
        op: &OperationRecord,
        c: &CreateVolumeRequest,
    ) -> Result<(), EngineError> {
        validate_create(c)?;
        let size = round_up_gib(c.size);
        let mut volume_id = op.volume_id;
        let mut job_id = op.cloud_job_id.clone();
        if volume_id.is_none() && job_id.is_none() && op.step == step::CREATE_SENT {
            // Interrupted between sending createVolume and journaling its answer: adopt the volume if the
            // cloud has exactly one by that name that the daemon does not know.
            let mut unknown = Vec::new();
            for v in self.cloud.volumes_named(&c.name).await? {
                if let Ok(id) = Uuid::parse_str(&v.id) {
                    if self.store.get_volume(id).await?.is_none() {
                        unknown.push(id);
                    }
                }
            }
            match unknown.as_slice() {
                [one] => {
                    volume_id = Some(*one);
                    self.store.set_operation_volume(op.id, *one).await?;
                }
                [] => {} // never reached the cloud: send it now
                _ => {
                    return Err(EngineError::Conflict(format!(
                        "interrupted while createVolume was in flight and CloudStack now has {} unknown volumes named {:?}; \
                         delete the extra ones and create again",
                        unknown.len(),
                        c.name
                    )))
                }
            }
        }
        if volume_id.is_none() && job_id.is_none() {
            self.step(op, step::CREATE_SENT).await?;
            let job = self
                .cloud
                .create_volume(&NewCloudVolume {
                    name: c.name.clone(),
                    disk_offering_id: c.disk_offering_id.clone(),
                    zone_id: c.zone_id.clone(),
                    size_bytes: size,
                })
                .await?;
            if let Some(rid) = &job.resource_id {
                let id = Uuid::parse_str(rid).map_err(|_| {
                    EngineError::Internal(format!(
                        "CloudStack named the new volume {rid:?}, which is not a UUID"
                    ))
                })?;
                self.store.set_operation_volume(op.id, id).await?;
                volume_id = Some(id);
            }
            self.store
                .set_operation_job(op.id, step::CREATE_JOB, &job.job_id)
                .await?;
            job_id = Some(job.job_id);
        }
        let cv = match (&job_id, volume_id) {
            (Some(j), Some(v)) => self.finish_job(j, v).await?,
            (Some(j), None) => self.cloud.wait_job(j, self.cfg.job_timeout).await?,
            (None, Some(v)) => self.cloud_volume(v).await?,
            (None, None) => None,
        };
        let cv = cv.ok_or_else(|| {
            EngineError::Internal("CloudStack finished createVolume without a volume".into())
        })?;
        let id = Uuid::parse_str(&cv.id).map_err(|_| {
            EngineError::Internal(format!(
                "CloudStack named the new volume {:?}, which is not a UUID",
                cv.id
            ))
        })?;
        let now = Utc::now();
        let rec = VolumeRecord {
            id,
            name: c.name.clone(),
            size_bytes: if cv.size > 0 { cv.size } else { size },
            disk_offering_id: c.disk_offering_id.clone(),
            zone_id: c.zone_id.clone(),
            metadata: c
                .metadata
                .as_ref()
                .map(|m| serde_json::to_value(m).unwrap_or(Value::Null))
                .unwrap_or_else(|| json!({})),
            cloud_state: Some(cv.state.clone()),
            snapshot: Default::default(),
            created_at: now,
            updated_at: now,
            deleted_at: None,
        };
        let response = json!({
            "volume_id": id,
            "size": rec.size_bytes,
            "cloudstack_state": cv.state,
            "message": "volume created",
        });
        self.store.commit_create(op.id, &rec, &response).await?;
        Ok(())
    }

    // ---- attach -------------------------------------------------------------------------------------------

    async fn attach(
        &self,
        op: &OperationRecord,
        volume_id: Uuid,
        vm_id: &str,
        root: bool,
    ) -> Result<(), EngineError> {
        let appliance = self.identity.require().await?;
        let local = vm_id == appliance;
        let _vm = self.vm_locks.lock(vm_id).await;
        if op.step.starts_with(step::COMPENSATING) || op.step == step::COMPENSATE_JOB {
            // Interrupted while undoing a failed attach: finish undoing it.
            let outcome = self.compensate_attach(op, volume_id, vm_id).await;
            return Err(EngineError::Compensated {
                cause: Box::new(EngineError::Internal(
                    "the attach failed and was interrupted while being undone".into(),
                )),
                outcome,
            });
        }
        let volume = self.volume_record(volume_id).await?;
        if let Some(a) = self.store.get_attachment(volume_id).await? {
            if a.vm_id != vm_id {
                return Err(EngineError::Conflict(format!(
                    "volume {volume_id} is attached to VM {}; detach it first",
                    a.vm_id
                )));
            }
        }
        let cv = self.cloud_volume(volume_id).await?.ok_or_else(|| {
            EngineError::NotFound(format!("volume {volume_id} does not exist in CloudStack"))
        })?;
        let cv = match cv.vm_id.as_deref() {
            Some(v) if v == vm_id => cv,
            Some(other) => {
                return Err(EngineError::Conflict(format!(
                    "CloudStack reports volume {volume_id} attached to VM {other}; detach it first"
                )))
            }
            None => {
                let job_id = match (&op.cloud_job_id, op.step.as_str()) {
                    (Some(j), step::ATTACH_JOB) => j.clone(),
                    _ => {
                        let job = self
                            .cloud
                            .attach_volume(&volume_id.to_string(), vm_id, root.then_some(0))
                            .await?;
                        self.store
                            .set_operation_job(op.id, step::ATTACH_JOB, &job.job_id)
                            .await?;
                        job.job_id
                    }
                };
                let v = self.finish_job(&job_id, volume_id).await?.ok_or_else(|| {
                    EngineError::NotFound(format!(
                        "volume {volume_id} disappeared from CloudStack during attach"
                    ))
                })?;
                if v.vm_id.as_deref() != Some(vm_id) {
                    return Err(EngineError::Internal(format!(
                        "CloudStack finished the attach job {job_id} but reports volume {volume_id} attached to {:?}",
                        v.vm_id
                    )));
                }
                v
            }
        };
        self.step(op, step::CLOUD_ATTACHED).await?;
        let now = Utc::now();
        let role = if root { DiskRole::Root } else { DiskRole::Data };
        if !local {
            let att = AttachmentRecord {
                volume_id,
                vm_id: vm_id.to_string(),
                target: AttachTarget::Remote,
                role,
                device_id: cv.device_id,
                by_id_path: None,
                kernel_device: None,
                stable_name: None,
                export_generation: None,
                created_at: now,
                updated_at: now,
            };
            let mut response = json!({
                "volume_id": volume_id,
                "vm_id": vm_id,
                "device_path": Value::Null,
                "device_id": cv.device_id,
                "message": "volume attached",
            });
            if root {
                response["attach_as"] = json!("root");
            }
            self.store
                .commit_attach(op.id, &att, None, &response)
                .await?;
            return Ok(());
        }
        match self.attach_local(op, &volume, &cv, vm_id).await {
            Ok(()) => Ok(()),
            Err(cause) => {
                self.metrics.compensated();
                let outcome = self.compensate_attach(op, volume_id, vm_id).await;
                Err(EngineError::Compensated {
                    cause: Box::new(cause),
                    outcome,
                })
            }
        }
    }

    /// Device by identity → verify → stable name → export → commit.
    async fn attach_local(
        &self,
        op: &OperationRecord,
        volume: &VolumeRecord,
        cv: &CloudVolume,
        vm_id: &str,
    ) -> Result<(), EngineError> {
        let volume_id = volume.id;
        let size = if cv.size > 0 {
            cv.size
        } else {
            volume.size_bytes
        };
        let (dev, took) = self
            .devices
            .wait_for(volume_id, size, self.cfg.device_timeout)
            .await?;
        self.metrics.device_appeared(took);
        tracing::info!(volume = %volume_id, device = %dev.dev_path.display(), took_ms = took.as_millis() as u64, "device found");
        self.step(op, step::DEVICE_FOUND).await?;
        let link_target = dev
            .by_id_path
            .clone()
            .unwrap_or_else(|| dev.dev_path.clone());
        let name = self.devices.name(volume_id, &link_target)?;
        self.step(op, step::NAMED).await?;
        let snap = self
            .exports
            .open(volume_id, &dev.dev_path, self.cfg.drain_timeout)
            .await?;
        self.step(op, step::EXPORTED).await?;
        let now = Utc::now();
        let device_path = link_target.display().to_string();
        let att = AttachmentRecord {
            volume_id,
            vm_id: vm_id.to_string(),
            target: AttachTarget::Appliance,
            role: DiskRole::Data,
            device_id: cv.device_id,
            by_id_path: dev.by_id_path.as_ref().map(|p| p.display().to_string()),
            kernel_device: Some(dev.dev_path.display().to_string()),
            stable_name: Some(name.display().to_string()),
            export_generation: Some(snap.generation),
            created_at: now,
            updated_at: now,
        };
        let export = ExportRecord {
            volume_id,
            export_name: snap.name.clone(),
            device_path: device_path.clone(),
            generation: snap.generation,
            read_only: false,
            created_at: now,
            updated_at: now,
        };
        let response = json!({
            "volume_id": volume_id,
            "vm_id": vm_id,
            "device_path": device_path,
            "device_id": cv.device_id,
            "kernel_device": dev.dev_path.display().to_string(),
            "persistent_device_name": name.file_name().map(|n| n.to_string_lossy().to_string()),
            "symlink_path": name.display().to_string(),
            "export_name": snap.name,
            "nbd_port": self.exports.port(),
            "export_generation": snap.generation,
            "device_appeared_ms": took.as_millis() as u64,
            "message": "volume attached to the appliance and exported",
        });
        self.store
            .commit_attach(op.id, &att, Some(&export), &response)
            .await?;
        Ok(())
    }

    /// Undoes an appliance attach whose later step failed; returns what happened, for the operation's error.
    async fn compensate_attach(
        &self,
        op: &OperationRecord,
        volume_id: Uuid,
        vm_id: &str,
    ) -> String {
        let _ = self.step(op, step::COMPENSATING).await;
        let mut problems = Vec::new();
        if let Err(e) = self.exports.close(volume_id, self.cfg.drain_timeout).await {
            problems.push(format!(
                "removing the export failed: {}",
                crate::error_chain(&e)
            ));
        }
        if let Err(e) = self.devices.unname(volume_id) {
            problems.push(format!(
                "removing the stable name failed: {}",
                crate::error_chain(&e)
            ));
        }
        let detached = async {
            let cv = self.cloud_volume(volume_id).await?;
            if cv.as_ref().and_then(|v| v.vm_id.as_deref()) != Some(vm_id) {
                return Ok::<bool, EngineError>(false);
            }
            let job_id = match (&op.cloud_job_id, op.step.as_str()) {
                (Some(j), step::COMPENSATE_JOB) => j.clone(),
                _ => {
                    let job = self.cloud.detach_volume(&volume_id.to_string()).await?;
                    self.store
                        .set_operation_job(op.id, step::COMPENSATE_JOB, &job.job_id)
                        .await?;
                    job.job_id
                }
            };
            self.finish_job(&job_id, volume_id).await?;
            Ok(true)
        }
        .await;
        match detached {
            Ok(_) => {
                if let Err(e) = self
                    .devices
                    .wait_gone(volume_id, self.cfg.device_timeout)
                    .await
                {
                    problems.push(format!(
                        "the device did not go away: {}",
                        crate::error_chain(&e)
                    ));
                }
            }
            Err(e) => problems.push(format!(
                "detaching it again failed: {}; run POST /api/v1/reconcile",
                crate::error_chain(&e)
            )),
        }
        if let Err(e) = self.store.clear_attachment(volume_id).await {
            problems.push(format!(
                "clearing the attachment record failed: {}; run POST /api/v1/reconcile",
                crate::error_chain(&e)
            ));
        }
        if problems.is_empty() {
            format!("the volume was detached from the appliance {vm_id} again")
        } else {
            format!("undoing the attach was incomplete: {}", problems.join("; "))
        }
    }

    // ---- detach and delete --------------------------------------------------------------------------------

    async fn detach_steps(
        &self,
        op: &OperationRecord,
        volume_id: Uuid,
    ) -> Result<DetachOutcome, EngineError> {
        let att = self.store.get_attachment(volume_id).await?;
        let cv = self.cloud_volume(volume_id).await?;
        let cloud_vm = cv.as_ref().and_then(|v| v.vm_id.clone());
        let vm = match (&att, &cloud_vm) {
            (_, Some(vm)) => vm.clone(),
            (Some(a), None) => a.vm_id.clone(),
            (None, None) => {
                return Ok(DetachOutcome {
                    was_attached: false,
                    vm_id: None,
                    previous_device_path: None,
                })
            }
        };
        let appliance = self.identity.current().await.vm_id;
        let local = att
            .as_ref()
            .map(|a| a.target == AttachTarget::Appliance)
            .unwrap_or(false)
            || appliance.as_deref() == Some(vm.as_str());
        let _vm = self.vm_locks.lock(&vm).await;
        if local {
            // Stop new connections, drain in-flight requests, flush, close sessions.
            if let Some(c) = self
                .exports
                .close(volume_id, self.cfg.drain_timeout)
                .await?
            {
                if !c.drained_in_time {
                    tracing::warn!(volume = %volume_id, "in-flight NBD requests did not finish before the drain deadline");
                }
            }
            self.devices.unname(volume_id)?;
            self.step(op, step::EXPORT_REMOVED).await?;
        }
        if cloud_vm.is_some() {
            let job_id = match (&op.cloud_job_id, op.step.as_str()) {
                (Some(j), step::DETACH_JOB) => j.clone(),
                _ => {
                    let job = self.cloud.detach_volume(&volume_id.to_string()).await?;
                    self.store
                        .set_operation_job(op.id, step::DETACH_JOB, &job.job_id)
                        .await?;
                    job.job_id
                }
            };
            let after = self.finish_job(&job_id, volume_id).await?;
            if let Some(still) = after.and_then(|v| v.vm_id) {
                return Err(EngineError::Internal(format!(
                    "CloudStack finished detach job {job_id} but still reports volume {volume_id} attached to {still}"
                )));
            }
        }
        self.step(op, step::CLOUD_DETACHED).await?;
        if local {
            if let Err(e) = self
                .devices
                .wait_gone(volume_id, self.cfg.device_timeout)
                .await
            {
                // The cloud no longer attaches it: the records go, and the operation says what is left.
                self.store.clear_attachment(volume_id).await?;
                return Err(e.into());
            }
        }
        Ok(DetachOutcome {
            was_attached: true,
            vm_id: Some(vm),
            previous_device_path: att.and_then(|a| a.by_id_path.or(a.kernel_device)),
        })
    }

    async fn delete(&self, op: &OperationRecord, volume_id: Uuid) -> Result<(), EngineError> {
        let out = if op.step == step::DELETE_SENT {
            DetachOutcome {
                was_attached: false,
                vm_id: None,
                previous_device_path: None,
            }
        } else {
            self.detach_steps(op, volume_id).await?
        };
        self.step(op, step::DELETE_SENT).await?;
        let existed = match self.cloud.delete_volume(&volume_id.to_string()).await {
            Ok(b) => b,
            Err(e) if e.kind == CloudErrorKind::NotFound => false,
            Err(e) => return Err(e.into()),
        };
        if self.store.get_volume(volume_id).await?.is_none() {
            // Never recorded (a foreign volume): keep a tombstone so that the id stays known as deleted.
            let _ = self.volume_record_tombstone(volume_id).await;
        }
        let response = json!({
            "volume_id": volume_id,
            "detached_from": out.vm_id,
            "message": if existed { "volume deleted" } else { "volume was already gone from CloudStack" },
        });
        self.store
            .commit_delete(op.id, volume_id, &response)
            .await?;
        Ok(())
    }

    async fn volume_record_tombstone(&self, volume_id: Uuid) -> Result<(), EngineError> {
        let now = Utc::now();
        self.store
            .upsert_volume(&VolumeRecord {
                id: volume_id,
                name: String::new(),
                size_bytes: 0,
                disk_offering_id: String::new(),
                zone_id: String::new(),
                metadata: json!({}),
                cloud_state: None,
                snapshot: Default::default(),
                created_at: now,
                updated_at: now,
                deleted_at: None,
            })
            .await?;
        Ok(())
    }
}

struct DetachOutcome {
    was_attached: bool,
    vm_id: Option<String>,
    previous_device_path: Option<String>,
}

/// The step recorded when an operation (re)starts: a fresh one says `started`, a resumed one keeps its step.
fn resume_step(op: &OperationRecord) -> String {
    if op.step == step::ACCEPTED {
        step::STARTED.to_string()
    } else {
        op.step.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_whole_gib() {
        assert_eq!(round_up_gib(1), GIB);
        assert_eq!(round_up_gib(GIB), GIB);
        assert_eq!(round_up_gib(GIB + 1), 2 * GIB);
        assert_eq!(round_up_gib(5 * GIB + 4096), 6 * GIB);
    }

    #[test]
    fn create_validation_names_the_field() {
        let ok = CreateVolumeRequest {
            name: "disk-0".into(),
            size: 1,
            disk_offering_id: "o".into(),
            zone_id: "z".into(),
            metadata: None,
        };
        validate_create(&ok).unwrap();
        for (bad, field) in [
            (
                CreateVolumeRequest {
                    name: " ".into(),
                    ..ok.clone()
                },
                "name",
            ),
            (
                CreateVolumeRequest {
                    size: 0,
                    ..ok.clone()
                },
                "size",
            ),
            (
                CreateVolumeRequest {
                    disk_offering_id: "".into(),
                    ..ok.clone()
                },
                "disk_offering_id",
            ),
            (
                CreateVolumeRequest {
                    zone_id: "".into(),
                    ..ok.clone()
                },
                "zone_id",
            ),
        ] {
            match validate_create(&bad) {
                Err(EngineError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected invalid {field}, got {other:?}"),
            }
        }
    }
}
