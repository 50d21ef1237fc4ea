//! Validation: the checks that make a bad request a 4xx naming the field at fault instead of a failed
//! operation, run before anything is journaled (and `create`'s again when it runs).

use uuid::Uuid;
use volume_api::CreateVolumeRequest;

use super::journal::Request;
use super::{EngineError, Inner};
use crate::cloud::CloudErrorKind;

/// One GiB: volume sizes are rounded up to whole GiB (CloudStack sizes volumes in GB).
use cloudstack::GIB;

/// Validation of `POST /volumes`.
pub(crate) fn validate_create(c: &CreateVolumeRequest) -> Result<(), EngineError> {
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
pub(crate) fn round_up_gib(size: u64) -> u64 {
    size.div_ceil(GIB) * GIB
}

impl Inner {
    /// Synchronous checks that make a request a 4xx instead of a failed operation.
    pub(super) async fn precheck(&self, req: &Request) -> Result<(), EngineError> {
        match req {
            Request::Create(c) => validate_create(c),
            Request::Attach(a) => {
                if a.vm_id.trim().is_empty() {
                    return Err(EngineError::Invalid {
                        field: "vm_id",
                        message: "vm_id must not be empty".into(),
                    });
                }
                let appliance = self.identity.require().await?;
                if a.is_root() && a.vm_id == appliance {
                    return Err(EngineError::Invalid {
                        field: "vm_id",
                        message: "a volume cannot be attached as the root disk of the appliance"
                            .into(),
                    });
                }
                self.require_volume(a.volume_id).await?;
                if !self.has_unfinished(a.volume_id).await? {
                    if let Some(att) = self.store.get_attachment(a.volume_id).await? {
                        return Err(EngineError::Conflict(format!(
                            "volume {} is already attached to VM {}; detach it first",
                            a.volume_id, att.vm_id
                        )));
                    }
                }
                Ok(())
            }
            Request::Detach(r) | Request::Delete(r) => self.require_volume(r.volume_id).await,
        }
    }

    async fn has_unfinished(&self, volume_id: Uuid) -> Result<bool, EngineError> {
        Ok(self
            .store
            .unfinished_operations()
            .await?
            .iter()
            .any(|o| o.volume_id == Some(volume_id)))
    }

    /// 404 unless the volume is known to the store or to the cloud.
    async fn require_volume(&self, volume_id: Uuid) -> Result<(), EngineError> {
        if let Some(v) = self.store.get_volume(volume_id).await? {
            if v.deleted_at.is_none() {
                return Ok(());
            }
            return Err(EngineError::NotFound(format!(
                "volume {volume_id} was deleted"
            )));
        }
        let unknown = || {
            EngineError::NotFound(format!(
                "volume {volume_id} is not known to the daemon or to CloudStack"
            ))
        };
        match self.cloud.get_volume(&volume_id.to_string()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(unknown()),
            Err(e) if e.kind == CloudErrorKind::NotFound => Err(unknown()),
            // The cloud will be asked again when the operation runs.
            Err(_) => Ok(()),
        }
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
