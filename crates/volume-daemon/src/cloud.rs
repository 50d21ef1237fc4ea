//! The cloud boundary: the CloudStack verbs the engine needs, as a small trait, and its implementation over
//! the `cloudstack` client. The engine never sees CloudStack's wire types.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use volume_api::ErrorCode;

/// A boxed future returned by [`Cloud`] methods.
pub type CloudFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, CloudError>> + Send + 'a>>;

/// What kind of cloud failure happened: stable, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudErrorKind {
    NotFound,
    InvalidParameter,
    InUse,
    LimitExceeded,
    Unauthorized,
    Unavailable,
    JobFailed,
    JobStillRunning,
    Other,
}

impl CloudErrorKind {
    /// The failure kind callers see.
    pub fn code(self) -> ErrorCode {
        match self {
            Self::NotFound => ErrorCode::CloudNotFound,
            Self::InvalidParameter => ErrorCode::CloudInvalidParameter,
            Self::InUse => ErrorCode::CloudInUse,
            Self::LimitExceeded => ErrorCode::CloudLimitExceeded,
            Self::Unauthorized => ErrorCode::CloudUnauthorized,
            Self::Unavailable => ErrorCode::CloudUnavailable,
            Self::JobFailed => ErrorCode::CloudJobFailed,
            Self::JobStillRunning => ErrorCode::CloudJobTimeout,
            Self::Other => ErrorCode::CloudError,
        }
    }
}

/// A failed cloud call.
#[derive(Debug, thiserror::Error)]
#[error("CloudStack {action} failed ({})", kind.code())]
pub struct CloudError {
    pub kind: CloudErrorKind,
    pub action: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl CloudError {
    /// The full message chain, for operation errors shown to callers.
    pub fn chain(&self) -> String {
        crate::error_chain(self)
    }

    /// Whether a CloudStack job ran and ended failed (jobstatus 2), whatever its error's kind.
    pub fn is_failed_job(&self) -> bool {
        self.source
            .downcast_ref::<cloudstack::Error>()
            .is_some_and(|e| e.kind() == cloudstack::ErrorKind::JobFailed)
    }
}

/// A volume as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudVolume {
    pub id: String,
    pub name: String,
    pub state: String,
    pub size: u64,
    pub vm_id: Option<String>,
    pub device_id: Option<u32>,
    pub volume_type: Option<String>,
    pub zone_id: Option<String>,
    pub disk_offering_id: Option<String>,
}

/// A VM as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudVm {
    pub id: String,
    pub name: String,
    pub state: String,
}

/// A zone as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudZone {
    pub id: String,
    pub name: String,
}

/// A disk offering as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudDiskOffering {
    pub id: String,
    pub name: String,
    /// The fixed size in bytes; `None` for an offering that takes a custom size.
    pub size_bytes: Option<u64>,
    pub display_text: Option<String>,
}

/// An asynchronous job the cloud started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudJob {
    pub job_id: String,
    /// The id of the resource the job creates, when the cloud names it at once (createVolume).
    pub resource_id: Option<String>,
}

/// What a job on a volume does, as far as the engine tells jobs apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeJobKind {
    /// attachVolume.
    Attach,
    /// detachVolume.
    Detach,
    /// Any other command on the volume (create, resize, snapshot, …).
    Other,
}

impl VolumeJobKind {
    /// The kind of a job from CloudStack's `cmd`, the command's Java class
    /// (`org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd`, or its admin variant
    /// `….admin.volume.AttachVolumeCmdByAdmin` when the key is an administrator's).
    fn of_cmd(cmd: &str) -> Self {
        let class = cmd.rsplit('.').next().unwrap_or(cmd);
        if class.starts_with("AttachVolumeCmd") {
            Self::Attach
        } else if class.starts_with("DetachVolumeCmd") {
            Self::Detach
        } else {
            Self::Other
        }
    }
}

/// A job of the account on a volume that CloudStack reports still pending (`jobstatus` 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingVolumeJob {
    pub job_id: String,
    pub kind: VolumeJobKind,
    /// When the job was created, as CloudStack spells it (ISO-8601), if it says.
    pub created: Option<String>,
}

/// A volume snapshot as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudSnapshot {
    pub id: String,
    pub name: String,
    pub volume_id: String,
    /// CloudStack's spelling: `BackedUp`, `CreatedOnPrimary`, `Creating`, …
    pub state: String,
    pub created: Option<String>,
    /// Bytes of the volume it was taken of, when the cloud says.
    pub size: Option<u64>,
}

/// Parameters of a new volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCloudVolume {
    pub name: String,
    pub disk_offering_id: String,
    pub zone_id: String,
    /// Sent only for custom-size offerings; CloudStack refuses a size on a fixed offering.
    pub size_bytes: Option<u64>,
}

/// The cloud verbs the engine uses. Each call is one CloudStack request (retried inside for transient errors);
/// asynchronous verbs return the job at once so the caller can journal its id before waiting.
pub trait Cloud: Send + Sync + 'static {
    fn create_volume<'a>(&'a self, spec: &'a NewCloudVolume) -> CloudFuture<'a, CloudJob>;
    fn attach_volume<'a>(
        &'a self,
        volume_id: &'a str,
        vm_id: &'a str,
        device_id: Option<u32>,
    ) -> CloudFuture<'a, CloudJob>;
    fn detach_volume<'a>(&'a self, volume_id: &'a str) -> CloudFuture<'a, CloudJob>;
    /// Deletes a detached volume; `Ok(false)` when it did not exist.
    fn delete_volume<'a>(&'a self, volume_id: &'a str) -> CloudFuture<'a, bool>;
    /// Waits for a job; returns the volume in its result when it has one.
    fn wait_job<'a>(
        &'a self,
        job_id: &'a str,
        deadline: Duration,
    ) -> CloudFuture<'a, Option<CloudVolume>>;
    fn get_volume<'a>(&'a self, volume_id: &'a str) -> CloudFuture<'a, Option<CloudVolume>>;
    /// The account's jobs on the volume that have not finished (listAsyncJobs, `jobinstancetype` Volume and
    /// `jobinstanceid` the volume), in the order the cloud lists them: how a resumed operation finds a job
    /// it started before a crash but whose id it never journaled.
    fn pending_volume_jobs<'a>(
        &'a self,
        volume_id: &'a str,
    ) -> CloudFuture<'a, Vec<PendingVolumeJob>>;
    fn volumes_named<'a>(&'a self, name: &'a str) -> CloudFuture<'a, Vec<CloudVolume>>;
    /// The volumes CloudStack has attached to `vm_id`.
    fn volumes_of_vm<'a>(&'a self, vm_id: &'a str) -> CloudFuture<'a, Vec<CloudVolume>>;
    fn get_vm<'a>(&'a self, vm_id: &'a str) -> CloudFuture<'a, Option<CloudVm>>;
    /// stopVirtualMachine, forced (the guest is not asked to shut down).
    fn stop_vm<'a>(&'a self, vm_id: &'a str) -> CloudFuture<'a, CloudJob>;
    /// destroyVirtualMachine with expunge: the VM and its ROOT volume go, its data volumes are detached.
    fn destroy_vm<'a>(&'a self, vm_id: &'a str) -> CloudFuture<'a, CloudJob>;
    /// Waits for a job on a VM (stop, destroy); the VM as the job left it, when it reports one.
    fn wait_vm_job<'a>(
        &'a self,
        job_id: &'a str,
        deadline: Duration,
    ) -> CloudFuture<'a, Option<CloudVm>>;
    /// Every VM the credentials can see.
    fn vms(&self) -> CloudFuture<'_, Vec<CloudVm>>;
    fn zones(&self) -> CloudFuture<'_, Vec<CloudZone>>;
    fn disk_offerings(&self) -> CloudFuture<'_, Vec<CloudDiskOffering>>;
    /// A cheap authenticated call, for health checks.
    fn ping(&self) -> CloudFuture<'_, ()>;
    /// Starts a snapshot of the volume; the job's `resource_id` is the snapshot's id.
    fn create_snapshot<'a>(
        &'a self,
        volume_id: &'a str,
        name: Option<&'a str>,
    ) -> CloudFuture<'a, CloudJob>;
    /// Starts reverting the snapshot's volume to it.
    fn revert_snapshot<'a>(&'a self, snapshot_id: &'a str) -> CloudFuture<'a, CloudJob>;
    /// Starts deleting a snapshot.
    fn delete_snapshot<'a>(&'a self, snapshot_id: &'a str) -> CloudFuture<'a, CloudJob>;
    /// Waits for a snapshot job; returns the snapshot in its result when it has one.
    fn wait_snapshot_job<'a>(
        &'a self,
        job_id: &'a str,
        deadline: Duration,
    ) -> CloudFuture<'a, Option<CloudSnapshot>>;
    /// The snapshots of a volume.
    fn snapshots_of<'a>(&'a self, volume_id: &'a str) -> CloudFuture<'a, Vec<CloudSnapshot>>;
    /// One snapshot; `None` when the cloud does not know it.
    fn get_snapshot<'a>(&'a self, snapshot_id: &'a str) -> CloudFuture<'a, Option<CloudSnapshot>>;
}

/// [`Cloud`] over the real CloudStack client (also used against the simulator).
#[derive(Debug, Clone)]
pub struct CloudStack {
    client: cloudstack::Client,
}

impl CloudStack {
    pub fn new(client: cloudstack::Client) -> Self {
        Self { client }
    }

    /// Waits for a job and decodes the object its result carries under `key` (`None` when it carries none).
    async fn job_result<T: serde::de::DeserializeOwned>(
        &self,
        job_id: &str,
        deadline: Duration,
        key: &str,
    ) -> Result<Option<T>, CloudError> {
        let result = self
            .client
            .wait_job(job_id, deadline)
            .await
            .map_err(wrap("queryAsyncJobResult"))?;
        Ok(result
            .get(key)
            .cloned()
            .and_then(|v| serde_json::from_value::<T>(v).ok()))
    }

    /// Every page of `listVolumes` for `q`, keeping the volumes `keep` accepts.
    async fn volumes_where(
        &self,
        q: cloudstack::ListVolumes,
        keep: impl Fn(&CloudVolume) -> bool,
    ) -> Result<Vec<CloudVolume>, CloudError> {
        Ok(self
            .client
            .list_volumes(&q)
            .await
            .map_err(wrap("listVolumes"))?
            .into_iter()
            .map(CloudVolume::from)
            .filter(|v| keep(v))
            .collect())
    }
}

fn kind_of(e: &cloudstack::Error) -> CloudErrorKind {
    use cloudstack::ErrorKind as K;
    match e.kind() {
        K::NotFound => CloudErrorKind::NotFound,
        K::InvalidParameter => CloudErrorKind::InvalidParameter,
        K::InUse => CloudErrorKind::InUse,
        K::LimitExceeded => CloudErrorKind::LimitExceeded,
        K::Unauthorized => CloudErrorKind::Unauthorized,
        K::Transient => CloudErrorKind::Unavailable,
        // A failed job keeps the kind of its error where that says more (limit, in use, not found…).
        K::JobFailed => match e.job_error().map(|j| j.kind()) {
            Some(K::NotFound) => CloudErrorKind::NotFound,
            Some(K::InvalidParameter) => CloudErrorKind::InvalidParameter,
            Some(K::InUse) => CloudErrorKind::InUse,
            Some(K::LimitExceeded) => CloudErrorKind::LimitExceeded,
            _ => CloudErrorKind::JobFailed,
        },
        K::JobStillRunning => CloudErrorKind::JobStillRunning,
        K::Decode | K::Config | K::Other => CloudErrorKind::Other,
    }
}

fn wrap(action: &'static str) -> impl Fn(cloudstack::Error) -> CloudError {
    move |e| CloudError {
        kind: kind_of(&e),
        action,
        source: Box::new(e),
    }
}

impl From<cloudstack::Volume> for CloudVolume {
    fn from(v: cloudstack::Volume) -> Self {
        Self {
            id: v.id,
            name: v.name,
            state: v.state,
            size: v.size,
            vm_id: v.virtualmachine_id,
            device_id: v.device_id,
            volume_type: v.volume_type,
            zone_id: v.zone_id,
            disk_offering_id: v.disk_offering_id,
        }
    }
}

impl From<cloudstack::VirtualMachine> for CloudVm {
    fn from(vm: cloudstack::VirtualMachine) -> Self {
        Self {
            id: vm.id,
            name: vm.name,
            state: vm.state,
        }
    }
}

impl From<cloudstack::Snapshot> for CloudSnapshot {
    fn from(s: cloudstack::Snapshot) -> Self {
        Self {
            id: s.id,
            name: s.name,
            volume_id: s.volume_id,
            state: s.state,
            created: s.created,
            size: s.virtual_size,
        }
    }
}

/// Whether a listed job is still pending (`jobstatus` 0) and works on the volume `volume_id`.
fn pending_on_volume(j: &cloudstack::AsyncJobInfo, volume_id: &str) -> bool {
    j.job_status == Some(0)
        && j.instance_type
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("Volume"))
        && j.instance_id.as_deref() == Some(volume_id)
}

fn job_of(job: cloudstack::AsyncJob) -> CloudJob {
    CloudJob {
        job_id: job.job_id,
        resource_id: job.resource_id,
    }
}

impl Cloud for CloudStack {
    fn create_volume<'a>(&'a self, spec: &'a NewCloudVolume) -> CloudFuture<'a, CloudJob> {
        Box::pin(async move {
            let job = self
                .client
                .create_volume(&cloudstack::CreateVolume {
                    name: spec.name.clone(),
                    zone_id: spec.zone_id.clone(),
                    disk_offering_id: spec.disk_offering_id.clone(),
                    size_bytes: spec.size_bytes,
                })
                .await
                .map_err(wrap("createVolume"))?;
            Ok(CloudJob {
                job_id: job.job_id,
                resource_id: job.resource_id,
            })
        })
    }

    fn attach_volume<'a>(
        &'a self,
        volume_id: &'a str,
        vm_id: &'a str,
        device_id: Option<u32>,
    ) -> CloudFuture<'a, CloudJob> {
        Box::pin(async move {
            let job = self
                .client
                .attach_volume(volume_id, vm_id, device_id)
                .await
                .map_err(wrap("attachVolume"))?;
            Ok(CloudJob {
                job_id: job.job_id,
                resource_id: job.resource_id,
            })
        })
    }

    fn detach_volume<'a>(&'a self, volume_id: &'a str) -> CloudFuture<'a, CloudJob> {
        Box::pin(async move {
            let job = self
                .client
                .detach_volume(volume_id)
                .await
                .map_err(wrap("detachVolume"))?;
            Ok(CloudJob {
                job_id: job.job_id,
                resource_id: job.resource_id,
            })
        })
    }

    fn delete_volume<'a>(&'a self, volume_id: &'a str) -> CloudFuture<'a, bool> {
        Box::pin(async move {
            match self.client.delete_volume(volume_id).await {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == cloudstack::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(wrap("deleteVolume")(e)),
            }
        })
    }

    fn wait_job<'a>(
        &'a self,
        job_id: &'a str,
        deadline: Duration,
    ) -> CloudFuture<'a, Option<CloudVolume>> {
        Box::pin(async move {
            Ok(self
                .job_result::<cloudstack::Volume>(job_id, deadline, "volume")
                .await?
                .map(Into::into))
        })
    }

    fn get_volume<'a>(&'a self, volume_id: &'a str) -> CloudFuture<'a, Option<CloudVolume>> {
        Box::pin(async move {
            Ok(self
                .client
                .get_volume(volume_id)
                .await
                .map_err(wrap("listVolumes"))?
                .map(Into::into))
        })
    }

    fn pending_volume_jobs<'a>(
        &'a self,
        volume_id: &'a str,
    ) -> CloudFuture<'a, Vec<PendingVolumeJob>> {
        Box::pin(async move {
            Ok(self
                .client
                .list_async_jobs()
                .await
                .map_err(wrap("listAsyncJobs"))?
                .into_iter()
                .filter(|j| pending_on_volume(j, volume_id))
                .map(|j| PendingVolumeJob {
                    kind: j
                        .cmd
                        .as_deref()
                        .map_or(VolumeJobKind::Other, VolumeJobKind::of_cmd),
                    job_id: j.job_id,
                    created: j.created,
                })
                .collect())
        })
    }

    fn volumes_named<'a>(&'a self, name: &'a str) -> CloudFuture<'a, Vec<CloudVolume>> {
        let q = cloudstack::ListVolumes {
            name: Some(name.to_string()),
            ..Default::default()
        };
        // CloudStack's name filter also matches other names; keep exact ones.
        Box::pin(self.volumes_where(q, move |v| v.name == name))
    }

    fn volumes_of_vm<'a>(&'a self, vm_id: &'a str) -> CloudFuture<'a, Vec<CloudVolume>> {
        let q = cloudstack::ListVolumes {
            virtualmachine_id: Some(vm_id.to_string()),
            ..Default::default()
        };
        Box::pin(self.volumes_where(q, move |v| v.vm_id.as_deref() == Some(vm_id)))
    }

    fn get_vm<'a>(&'a self, vm_id: &'a str) -> CloudFuture<'a, Option<CloudVm>> {
        Box::pin(async move {
            Ok(self
                .client
                .get_virtual_machine(vm_id)
                .await
                .map_err(wrap("listVirtualMachines"))?
                .map(Into::into))
        })
    }

    fn stop_vm<'a>(&'a self, vm_id: &'a str) -> CloudFuture<'a, CloudJob> {
        Box::pin(async move {
            self.client
                .stop_virtual_machine(vm_id, true)
                .await
                .map(job_of)
                .map_err(wrap("stopVirtualMachine"))
        })
    }

    fn destroy_vm<'a>(&'a self, vm_id: &'a str) -> CloudFuture<'a, CloudJob> {
        Box::pin(async move {
            self.client
                .destroy_virtual_machine(vm_id, true)
                .await
                .map(job_of)
                .map_err(wrap("destroyVirtualMachine"))
        })
    }

    fn wait_vm_job<'a>(
        &'a self,
        job_id: &'a str,
        deadline: Duration,
    ) -> CloudFuture<'a, Option<CloudVm>> {
        Box::pin(async move {
            Ok(self
                .job_result::<cloudstack::VirtualMachine>(job_id, deadline, "virtualmachine")
                .await?
                .map(Into::into))
        })
    }

    fn vms(&self) -> CloudFuture<'_, Vec<CloudVm>> {
        Box::pin(async move {
            let q = cloudstack::ListVms {
                list_all: true,
                ..Default::default()
            };
            Ok(self
                .client
                .list_virtual_machines(&q)
                .await
                .map_err(wrap("listVirtualMachines"))?
                .into_iter()
                .map(Into::into)
                .collect())
        })
    }

    fn zones(&self) -> CloudFuture<'_, Vec<CloudZone>> {
        Box::pin(async move {
            Ok(self
                .client
                .list_zones()
                .await
                .map_err(wrap("listZones"))?
                .into_iter()
                .map(|z| CloudZone {
                    id: z.id,
                    name: z.name,
                })
                .collect())
        })
    }

    fn disk_offerings(&self) -> CloudFuture<'_, Vec<CloudDiskOffering>> {
        Box::pin(async move {
            Ok(self
                .client
                .list_disk_offerings()
                .await
                .map_err(wrap("listDiskOfferings"))?
                .into_iter()
                .map(|o| CloudDiskOffering {
                    id: o.id,
                    name: o.name,
                    size_bytes: (!o.custom).then_some(o.disk_size_gb * cloudstack::GIB),
                    display_text: o.display_text,
                })
                .collect())
        })
    }

    fn ping(&self) -> CloudFuture<'_, ()> {
        Box::pin(async move {
            self.client.list_zones().await.map_err(wrap("listZones"))?;
            Ok(())
        })
    }

    fn create_snapshot<'a>(
        &'a self,
        volume_id: &'a str,
        name: Option<&'a str>,
    ) -> CloudFuture<'a, CloudJob> {
        Box::pin(async move {
            self.client
                .create_snapshot(volume_id, name)
                .await
                .map(job_of)
                .map_err(wrap("createSnapshot"))
        })
    }

    fn revert_snapshot<'a>(&'a self, snapshot_id: &'a str) -> CloudFuture<'a, CloudJob> {
        Box::pin(async move {
            self.client
                .revert_snapshot(snapshot_id)
                .await
                .map(job_of)
                .map_err(wrap("revertSnapshot"))
        })
    }

    fn delete_snapshot<'a>(&'a self, snapshot_id: &'a str) -> CloudFuture<'a, CloudJob> {
        Box::pin(async move {
            self.client
                .delete_snapshot(snapshot_id)
                .await
                .map(job_of)
                .map_err(wrap("deleteSnapshot"))
        })
    }

    fn wait_snapshot_job<'a>(
        &'a self,
        job_id: &'a str,
        deadline: Duration,
    ) -> CloudFuture<'a, Option<CloudSnapshot>> {
        Box::pin(async move {
            Ok(self
                .job_result::<cloudstack::Snapshot>(job_id, deadline, "snapshot")
                .await?
                .map(Into::into))
        })
    }

    fn snapshots_of<'a>(&'a self, volume_id: &'a str) -> CloudFuture<'a, Vec<CloudSnapshot>> {
        Box::pin(async move {
            let q = cloudstack::ListSnapshots {
                volume_id: Some(volume_id.to_string()),
                list_all: true,
                ..Default::default()
            };
            Ok(self
                .client
                .list_snapshots(&q)
                .await
                .map_err(wrap("listSnapshots"))?
                .into_iter()
                .map(CloudSnapshot::from)
                .filter(|s| s.volume_id == volume_id)
                .collect())
        })
    }

    fn get_snapshot<'a>(&'a self, snapshot_id: &'a str) -> CloudFuture<'a, Option<CloudSnapshot>> {
        Box::pin(async move {
            let q = cloudstack::ListSnapshots {
                id: Some(snapshot_id.to_string()),
                list_all: true,
                ..Default::default()
            };
            match self.client.list_snapshots(&q).await {
                Ok(list) => Ok(list
                    .into_iter()
                    .map(CloudSnapshot::from)
                    .find(|s| s.id == snapshot_id)),
                Err(e) if e.kind() == cloudstack::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(wrap("listSnapshots")(e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: i64, kind: &str, instance: &str, cmd: &str) -> cloudstack::AsyncJobInfo {
        cloudstack::AsyncJobInfo {
            job_id: "job-1".into(),
            cmd: Some(cmd.into()),
            job_status: Some(status),
            instance_type: Some(kind.into()),
            instance_id: Some(instance.into()),
            result_code: Some(0),
            created: None,
        }
    }

    #[test]
    fn the_command_class_names_the_kind_of_a_volume_job() {
        let of = VolumeJobKind::of_cmd;
        assert_eq!(
            of("org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd"),
            VolumeJobKind::Attach
        );
        assert_eq!(
            of("org.apache.cloudstack.api.command.admin.volume.AttachVolumeCmdByAdmin"),
            VolumeJobKind::Attach
        );
        assert_eq!(
            of("org.apache.cloudstack.api.command.user.volume.DetachVolumeCmd"),
            VolumeJobKind::Detach
        );
        assert_eq!(
            of("org.apache.cloudstack.api.command.admin.volume.DetachVolumeCmdByAdmin"),
            VolumeJobKind::Detach
        );
        assert_eq!(
            of("org.apache.cloudstack.api.command.user.volume.ResizeVolumeCmd"),
            VolumeJobKind::Other
        );
    }

    #[test]
    fn only_pending_jobs_on_that_volume_count() {
        let attach = "org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd";
        assert!(pending_on_volume(&job(0, "Volume", "v1", attach), "v1"));
        assert!(!pending_on_volume(&job(1, "Volume", "v1", attach), "v1"));
        assert!(!pending_on_volume(&job(2, "Volume", "v1", attach), "v1"));
        assert!(!pending_on_volume(&job(0, "Volume", "v2", attach), "v1"));
        assert!(!pending_on_volume(
            &job(0, "VirtualMachine", "v1", attach),
            "v1"
        ));
        let mut unknown = job(0, "Volume", "v1", attach);
        unknown.instance_id = None;
        assert!(!pending_on_volume(&unknown, "v1"));
    }
}
