//! The cloud boundary: the CloudStack verbs the engine needs, as a small trait, and its implementation over
//! the `cloudstack` client. The engine never sees CloudStack's wire types.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

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
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "cloud_not_found",
            Self::InvalidParameter => "cloud_invalid_parameter",
            Self::InUse => "cloud_in_use",
            Self::LimitExceeded => "cloud_limit_exceeded",
            Self::Unauthorized => "cloud_unauthorized",
            Self::Unavailable => "cloud_unavailable",
            Self::JobFailed => "cloud_job_failed",
            Self::JobStillRunning => "cloud_job_timeout",
            Self::Other => "cloud_error",
        }
    }
}

/// A failed cloud call.
#[derive(Debug, thiserror::Error)]
#[error("CloudStack {action} failed ({})", kind.as_str())]
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

/// An asynchronous job the cloud started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudJob {
    pub job_id: String,
    /// The id of the resource the job creates, when the cloud names it at once (createVolume).
    pub resource_id: Option<String>,
}

/// Parameters of a new volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCloudVolume {
    pub name: String,
    pub disk_offering_id: String,
    pub zone_id: String,
    pub size_bytes: u64,
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
    fn volumes_named<'a>(&'a self, name: &'a str) -> CloudFuture<'a, Vec<CloudVolume>>;
    fn get_vm<'a>(&'a self, vm_id: &'a str) -> CloudFuture<'a, Option<CloudVm>>;
    /// A cheap authenticated call, for health checks.
    fn ping(&self) -> CloudFuture<'_, ()>;
}
