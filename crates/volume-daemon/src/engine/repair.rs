//! The reconciler's repairs, run by the engine in the volume's turn (so they never interleave with an
//! operation on it) through the same teardown and export code the workflows use.

use uuid::Uuid;

use super::export::Teardown;
use super::{Engine, EngineError};
use crate::store::AttachTarget;

/// A repair with one safe outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repair {
    /// The cloud no longer attaches the volume: forget the attachment, its export and its stable name.
    ForgetAttachment,
    /// Attached to the appliance but not served: re-verify the device and serve it again.
    Reexport,
    /// Served without an appliance attachment: stop serving it and drop its record.
    RemoveOrphanExport,
}

impl Engine {
    /// Applies one repair to the volume.
    pub(crate) async fn repair(&self, volume_id: Uuid, repair: Repair) -> Result<(), EngineError> {
        let inner = &self.inner;
        self.in_turn(volume_id, async {
            match repair {
                Repair::ForgetAttachment => {
                    inner.teardown(volume_id, Teardown::ExportAndName).await?;
                    inner.store.clear_attachment(volume_id).await?;
                }
                Repair::Reexport => {
                    let att = inner
                        .store
                        .get_attachment(volume_id)
                        .await?
                        .filter(|a| a.target == AttachTarget::Appliance)
                        .ok_or_else(|| {
                            EngineError::Conflict(format!(
                                "volume {volume_id} is no longer attached to the appliance"
                            ))
                        })?;
                    inner.reexport(&att).await?;
                }
                Repair::RemoveOrphanExport => {
                    inner.teardown(volume_id, Teardown::Export).await?;
                    inner.store.delete_export(volume_id).await?;
                }
            }
            tracing::info!(volume = %volume_id, ?repair, "repaired");
            Ok(())
        })
        .await
    }
}
