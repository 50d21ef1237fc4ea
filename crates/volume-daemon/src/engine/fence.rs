//! Fencing: an appliance volume whose device vanished behind the daemon's back (a detach done directly in
//! CloudStack, a hot-unplug) or no longer verifies stops being served at once, in the volume's turn, so no
//! writer keeps writing to a device that is gone or that the kernel may hand to another volume. The records
//! stay as they are: the reconciler reports the drift and repairs it when that is safe.

use uuid::Uuid;

use super::export::Teardown;
use super::{DeviceCheck, Engine, EngineError};
use crate::store::AttachTarget;

/// Why an export was fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fenced {
    pub volume_id: Uuid,
    pub export_name: String,
    pub reason: String,
}

/// Whether a device check calls for fencing: the device is gone or is not the volume's any more. A check
/// that could not run (a failed blocking task) fences nothing.
fn fence_reason(check: &DeviceCheck) -> Option<String> {
    use volume_api::ErrorCode;
    match check {
        DeviceCheck::Present => None,
        DeviceCheck::Missing => Some("no device has the volume's identity any more".into()),
        DeviceCheck::Unverified(e) => match e.code() {
            ErrorCode::DeviceMismatch | ErrorCode::DeviceNotBlockDevice => {
                Some(crate::error_chain(e))
            }
            _ => None,
        },
    }
}

impl Engine {
    /// Checks the device of every served appliance volume without an unfinished operation and stops serving
    /// each one whose device vanished or fails verification. Returns what was fenced.
    pub(crate) async fn fence_vanished(&self) -> Result<Vec<Fenced>, EngineError> {
        let inner = &self.inner;
        let live: Vec<Uuid> = inner
            .exports
            .list()
            .iter()
            .filter_map(|s| volume_api::volume_of_export(&s.name))
            .collect();
        if live.is_empty() {
            return Ok(Vec::new());
        }
        let busy = self.busy_volumes().await?;
        let mut wanted = Vec::new();
        for volume_id in live.into_iter().filter(|v| !busy.contains(v)) {
            if let Some(v) = inner.store.get_volume(volume_id).await? {
                wanted.push((volume_id, v.size_bytes));
            }
        }
        let checks = inner.devices.verify_all(wanted.clone()).await;
        let mut fenced = Vec::new();
        for ((volume_id, size), check) in wanted.into_iter().zip(checks) {
            if fence_reason(&DeviceCheck::from(check)).is_none() {
                continue;
            }
            // In the volume's turn nothing else acts on it: look again before fencing.
            let done = self
                .in_turn(volume_id, async {
                    let attached = inner
                        .store
                        .get_attachment(volume_id)
                        .await?
                        .is_some_and(|a| a.target == AttachTarget::Appliance);
                    let Some(snap) = inner.exports.get(volume_id) else {
                        return Ok::<_, EngineError>(None);
                    };
                    let check =
                        DeviceCheck::from(inner.devices.resolve(volume_id, size).await.map(|_| ()));
                    let Some(reason) = fence_reason(&check) else {
                        return Ok(None);
                    };
                    inner.teardown(volume_id, Teardown::Export).await?;
                    let reason = if attached {
                        reason
                    } else {
                        format!("{reason}; the volume is not attached to the appliance either")
                    };
                    Ok(Some(Fenced {
                        volume_id,
                        export_name: snap.name,
                        reason,
                    }))
                })
                .await?;
            if let Some(f) = done {
                tracing::warn!(volume = %f.volume_id, export = %f.export_name, reason = %f.reason, "device vanished behind the daemon's back; export fenced (no longer served)");
                inner.metrics.fenced();
                fenced.push(f);
            }
        }
        Ok(fenced)
    }
}
