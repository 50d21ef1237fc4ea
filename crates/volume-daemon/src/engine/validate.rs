//! Validation: the checks that make a bad request a 4xx naming the field at fault instead of a failed
//! operation, run before anything is journaled (and `create`'s again when it runs).

use std::future::Future;
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;
use volume_api::CreateVolumeRequest;

use super::journal::Request;
use super::{EngineError, Inner};
use crate::cloud::{CloudDiskOffering, CloudError, CloudErrorKind};

/// One GiB: volume sizes are rounded up to whole GiB (CloudStack sizes volumes in GB).
use cloudstack::GIB;

/// How long a request waits for CloudStack before it is answered without it. The predecessor answered every
/// request from its database alone, and its clients give up on a request after 30 s; a CloudStack that hangs
/// would otherwise hold a request for its whole retry budget (five attempts of up to 30 s). A read then shows
/// the last recorded state, and a check is left to the operation's turn.
pub(crate) const CLOUD_WAIT_IN_REQUEST: Duration = Duration::from_secs(5);

/// `call`, or a `cloud_unavailable` error when CloudStack has not answered within [`CLOUD_WAIT_IN_REQUEST`].
pub(crate) async fn within_request<T>(
    action: &'static str,
    call: impl Future<Output = Result<T, CloudError>>,
) -> Result<T, CloudError> {
    tokio::time::timeout(CLOUD_WAIT_IN_REQUEST, call)
        .await
        .unwrap_or_else(|_| {
            Err(CloudError {
                kind: CloudErrorKind::Unavailable,
                action,
                source: format!(
                    "CloudStack gave no answer within {} s",
                    CLOUD_WAIT_IN_REQUEST.as_secs()
                )
                .into(),
            })
        })
}

/// Whether `s` holds a control character.
pub(crate) fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// The first string in `v` that holds a control character, as a path like `metadata.owner` (the notation
/// of the body's other field errors), or the object whose key holds one; `None` when there is none.
pub(crate) fn control_in_json(v: &Value) -> Option<String> {
    fn walk(v: &Value, path: &mut Vec<String>) -> Option<String> {
        let here = |path: &Vec<String>| {
            if path.is_empty() {
                "body".to_string()
            } else {
                path.join(".").replace(".[", "[")
            }
        };
        match v {
            Value::String(s) if has_control(s) => Some(here(path)),
            Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                path.push(format!("[{i}]"));
                let found = walk(item, path);
                path.pop();
                found
            }),
            Value::Object(map) => map.iter().find_map(|(k, item)| {
                // A bad key is reported as its object (the key itself is not printable).
                if has_control(k) {
                    return Some(here(path));
                }
                path.push(k.clone());
                let found = walk(item, path);
                path.pop();
                found
            }),
            _ => None,
        }
    }
    walk(v, &mut Vec::new())
}

/// Refuses a request (as journaled) with a control character in any of its strings: such text cannot be
/// stored by every database, so the operation could be neither recorded nor finished.
pub(crate) fn refuse_control(request: &Value) -> Result<(), EngineError> {
    match control_in_json(request) {
        None => Ok(()),
        Some(path) => {
            let top = path.split(['.', '[']).next().unwrap_or_default();
            let field = [
                "name",
                "zone_id",
                "disk_offering_id",
                "vm_id",
                "metadata",
                "volume_id",
                "test_vm_id",
                "oma_vm_id",
            ]
            .into_iter()
            .find(|f| *f == top)
            .unwrap_or("request");
            Err(EngineError::Invalid {
                field,
                message: format!(
                    "{path} contains a control character (such as NUL); send printable text"
                ),
            })
        }
    }
}

/// The longest id of CloudStack's (zone, disk offering, VM, snapshot) a request may name. CloudStack's ids
/// are UUIDs (36 bytes); a longer value is not one of them, and would be journaled, logged and sent to
/// CloudStack whole.
pub(crate) const MAX_CLOUD_ID: usize = 255;

/// Refuses a request (as journaled) naming a CloudStack id longer than [`MAX_CLOUD_ID`], naming the field.
pub(crate) fn refuse_long_ids(request: &Value) -> Result<(), EngineError> {
    for field in [
        "zone_id",
        "disk_offering_id",
        "vm_id",
        "test_vm_id",
        "oma_vm_id",
        "snapshot_id",
    ] {
        if let Some(Value::String(id)) = request.get(field) {
            if id.len() > MAX_CLOUD_ID {
                return Err(EngineError::Invalid {
                    field,
                    message: format!(
                        "{field} is {} bytes long; a CloudStack id has at most {MAX_CLOUD_ID} (a UUID has 36)",
                        id.len()
                    ),
                });
            }
        }
    }
    Ok(())
}

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
    if c.size == Some(0) {
        return invalid("size", "size must be a positive number of bytes");
    }
    if c.size.is_some_and(|s| s > 64 * 1024 * GIB) {
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

/// The size a new volume gets from its request and its offering: `(size to send to CloudStack, size
/// expected)`. A custom-size offering needs `size` (sent rounded up to whole GiB); a fixed-size offering
/// takes none (CloudStack refuses one), so a given `size` must equal the offering's.
pub(crate) fn create_size(
    c: &CreateVolumeRequest,
    offering: &CloudDiskOffering,
) -> Result<(Option<u64>, u64), EngineError> {
    match (offering.size_bytes, c.size) {
        (None, Some(size)) => Ok((Some(round_up_gib(size)), round_up_gib(size))),
        (None, None) => Err(EngineError::Invalid {
            field: "size",
            message: format!(
                "size is required: disk offering {} ({}) takes a custom size",
                offering.id, offering.name
            ),
        }),
        (Some(fixed), None) => Ok((None, fixed)),
        (Some(fixed), Some(size)) if round_up_gib(size) == fixed => Ok((None, fixed)),
        (Some(fixed), Some(size)) => Err(EngineError::Invalid {
            field: "size",
            message: format!(
                "size {size} does not match disk offering {} ({}), which has the fixed size {fixed} bytes; \
                 leave size out or give {fixed}",
                offering.id, offering.name
            ),
        }),
    }
}

/// `size` rounded up to whole GiB.
pub(crate) fn round_up_gib(size: u64) -> u64 {
    size.div_ceil(GIB) * GIB
}

impl Inner {
    /// Synchronous checks that make a request a 4xx instead of a failed operation.
    pub(super) async fn precheck(&self, req: &Request) -> Result<(), EngineError> {
        match req {
            Request::Create(c) => {
                validate_create(c)?;
                // Without an answer in time, the operation looks the offering up again in its turn.
                if let Ok(offering) = tokio::time::timeout(
                    CLOUD_WAIT_IN_REQUEST,
                    self.disk_offering(&c.disk_offering_id),
                )
                .await
                {
                    create_size(c, &offering?)?;
                }
                self.require_zone(&c.zone_id).await
            }
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
                if let Some(clients) = &a.nbd_clients {
                    if a.vm_id != appliance {
                        return Err(EngineError::Invalid {
                            field: "nbd_clients",
                            message:
                                "nbd_clients applies only to an attach to the appliance (which \
                                      exports the volume over NBD)"
                                    .into(),
                        });
                    }
                    volume_api::check_nbd_clients(clients).map_err(|message| {
                        EngineError::Invalid {
                            field: "nbd_clients",
                            message,
                        }
                    })?;
                }
                if a.vm_id != appliance {
                    self.require_vm(&a.vm_id).await?;
                }
                self.require_volume(a.volume_id).await?;
                if !self.has_unfinished(a.volume_id).await? {
                    if let Some(att) = self.store.get_attachment(a.volume_id).await? {
                        // A record CloudStack no longer holds (the volume detached behind the daemon's back)
                        // is forgotten by the attach in its turn; without an answer in time, the record stands.
                        let cloud = within_request(
                            "listVolumes",
                            self.cloud.get_volume(&a.volume_id.to_string()),
                        )
                        .await;
                        let detached_in_cloud = match &cloud {
                            Ok(v) => v.as_ref().is_some_and(|v| v.vm_id.is_none()),
                            Err(_) => false,
                        };
                        if !detached_in_cloud {
                            return Err(EngineError::Conflict(format!(
                                "volume {} is already attached to VM {}; detach it first",
                                a.volume_id, att.vm_id
                            )));
                        }
                    }
                }
                Ok(())
            }
            Request::Detach(r) | Request::Delete(r) => self.require_volume(r.volume_id).await,
            // An adoption asked for by a caller names a volume that must exist.
            Request::Repair(r) if r.repair == volume_api::RepairKind::Adopt => {
                self.require_volume(r.volume_id).await
            }
            // Submitted by the reconciler for what it found; the repair itself checks the state in its turn.
            Request::Repair(_) => Ok(()),
            Request::SnapshotCreate(r) => {
                if let Some(n) = &r.name {
                    if n.trim().is_empty() || n.len() > 255 {
                        return Err(EngineError::Invalid {
                            field: "name",
                            message: "a snapshot name must be 1 to 255 bytes, not only spaces"
                                .into(),
                        });
                    }
                }
                self.require_volume(r.volume_id).await
            }
            Request::TestFailoverCleanup(r) => {
                for (field, value) in [("test_vm_id", &r.test_vm_id), ("oma_vm_id", &r.oma_vm_id)] {
                    if value.trim().is_empty() {
                        return Err(EngineError::Invalid {
                            field,
                            message: format!("{field} must not be empty"),
                        });
                    }
                }
                let appliance = self.identity.require().await?;
                if r.oma_vm_id != appliance {
                    return Err(super::cleanup::wrong_appliance(&r.oma_vm_id, &appliance));
                }
                if r.test_vm_id == appliance {
                    return Err(EngineError::Invalid {
                        field: "test_vm_id",
                        message: format!(
                            "test_vm_id names the appliance {appliance}; name the test VM the volume was attached \
                             to for the test failover"
                        ),
                    });
                }
                self.require_volume(r.volume_id).await?;
                if !self.has_unfinished(r.volume_id).await? {
                    // Attached to the test VM as the daemon records it, or as CloudStack reports it (the hub
                    // may have attached it without the daemon).
                    let recorded = self
                        .store
                        .get_attachment(r.volume_id)
                        .await?
                        .map(|a| a.vm_id);
                    if recorded.as_deref() != Some(r.test_vm_id.as_str()) {
                        let cloud = within_request(
                            "listVolumes",
                            self.cloud.get_volume(&r.volume_id.to_string()),
                        )
                        .await
                        .or_else(|e| match e.kind {
                            CloudErrorKind::NotFound => Ok(None),
                            _ => Err(e),
                        })?
                        .and_then(|v| v.vm_id);
                        if cloud.as_deref() != Some(r.test_vm_id.as_str()) {
                            return Err(super::cleanup::not_attached(
                                r.volume_id,
                                &r.test_vm_id,
                                recorded,
                                Some(cloud),
                            ));
                        }
                    }
                }
                Ok(())
            }
            Request::SnapshotRevert(r) | Request::SnapshotDelete(r) => {
                let revert = matches!(req, Request::SnapshotRevert(_));
                let Some(snapshot_id) = r.snapshot_id.as_deref().filter(|s| !s.is_empty()) else {
                    return Err(EngineError::Invalid {
                        field: "snapshot_id",
                        message:
                            "name the snapshot (GET /api/v1/volumes/{id}/snapshots lists them)"
                                .into(),
                    });
                };
                self.require_volume(r.volume_id).await?;
                self.require_snapshot_of(r.volume_id, snapshot_id).await?;
                if revert && !self.has_unfinished(r.volume_id).await? {
                    if let Some(att) = self.store.get_attachment(r.volume_id).await? {
                        return Err(super::snapshot::attached(r.volume_id, &att.vm_id));
                    }
                    // Attached behind the daemon's back: CloudStack says so (no answer in time leaves
                    // the check to the operation's turn).
                    let id = r.volume_id.to_string();
                    if let Ok(Some(vm)) = within_request("listVolumes", self.cloud.get_volume(&id))
                        .await
                        .map(|cv| cv.and_then(|cv| cv.vm_id))
                    {
                        return Err(super::snapshot::attached(r.volume_id, &vm));
                    }
                }
                Ok(())
            }
        }
    }

    /// The disk offering `id`, from the cache, else from the cloud (the cache is refilled with every offering
    /// the cloud lists); an unknown id is a 400 naming `disk_offering_id`.
    pub(super) async fn disk_offering(&self, id: &str) -> Result<CloudDiskOffering, EngineError> {
        let mut cache = self.offerings.lock().await;
        if let Some(o) = cache.get(id) {
            return Ok(o.clone());
        }
        for o in self.cloud.disk_offerings().await? {
            cache.insert(o.id.clone(), o);
        }
        cache.get(id).cloned().ok_or_else(|| EngineError::Invalid {
            field: "disk_offering_id",
            message: format!(
                "disk offering {id:?} does not exist in CloudStack; list them with `volumectl cloud offerings`"
            ),
        })
    }

    /// 400 naming `zone_id` when the cloud lists no zone with that id; when the cloud cannot be asked, the
    /// operation finds out in its turn.
    async fn require_zone(&self, zone_id: &str) -> Result<(), EngineError> {
        match within_request("listZones", self.cloud.zones()).await {
            Ok(zones) if !zones.iter().any(|z| z.id == zone_id) => Err(EngineError::Invalid {
                field: "zone_id",
                message: format!(
                    "zone {zone_id:?} does not exist in CloudStack; list them with `volumectl cloud zones`"
                ),
            }),
            _ => Ok(()),
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

    /// 422 naming `vm_id` when the cloud says it has no such VM.
    async fn require_vm(&self, vm_id: &str) -> Result<(), EngineError> {
        match within_request("listVirtualMachines", self.cloud.get_vm(vm_id)).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(EngineError::NoSuchVm(vm_id.to_string())),
            // CloudStack refuses an id that is not one of its ids as an invalid parameter.
            Err(e)
                if matches!(
                    e.kind,
                    CloudErrorKind::NotFound | CloudErrorKind::InvalidParameter
                ) =>
            {
                Err(EngineError::NoSuchVm(vm_id.to_string()))
            }
            // The cloud will be asked again when the operation runs.
            Err(_) => Ok(()),
        }
    }

    /// 404 when the cloud does not know the snapshot, 400 naming `snapshot_id` when it is another volume's;
    /// when the cloud cannot be asked the operation finds out in its turn.
    async fn require_snapshot_of(
        &self,
        volume_id: Uuid,
        snapshot_id: &str,
    ) -> Result<(), EngineError> {
        match within_request("listSnapshots", self.cloud.get_snapshot(snapshot_id)).await {
            Ok(Some(s)) if s.volume_id == volume_id.to_string() => Ok(()),
            Ok(Some(s)) => Err(super::snapshot::another_volumes_snapshot(
                snapshot_id,
                &s.volume_id,
                volume_id,
            )),
            Ok(None) => Err(super::snapshot::no_such_snapshot(snapshot_id, volume_id)),
            Err(e) if e.kind == CloudErrorKind::NotFound => Err(EngineError::NotFound(format!(
                "CloudStack has no snapshot {snapshot_id}"
            ))),
            Err(_) => Ok(()),
        }
    }

    /// 404 unless the volume is known to the store or to the cloud.
    pub(super) async fn require_volume(&self, volume_id: Uuid) -> Result<(), EngineError> {
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
        match within_request("listVolumes", self.cloud.get_volume(&volume_id.to_string())).await {
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
    use serde_json::json;

    #[test]
    fn sizes_round_up_to_whole_gib() {
        assert_eq!(round_up_gib(1), GIB);
        assert_eq!(round_up_gib(GIB), GIB);
        assert_eq!(round_up_gib(GIB + 1), 2 * GIB);
        assert_eq!(round_up_gib(5 * GIB + 4096), 6 * GIB);
    }

    #[test]
    fn custom_offerings_need_a_size_and_fixed_ones_take_none() {
        let req = |size| CreateVolumeRequest {
            name: "disk-0".into(),
            size,
            disk_offering_id: "o".into(),
            zone_id: "z".into(),
            metadata: None,
        };
        let custom = CloudDiskOffering {
            id: "o".into(),
            name: "Custom".into(),
            size_bytes: None,
            display_text: None,
        };
        let fixed = CloudDiskOffering {
            size_bytes: Some(5 * GIB),
            ..custom.clone()
        };
        assert_eq!(
            create_size(&req(Some(GIB + 1)), &custom).unwrap(),
            (Some(2 * GIB), 2 * GIB)
        );
        assert_eq!(create_size(&req(None), &fixed).unwrap(), (None, 5 * GIB));
        assert_eq!(
            create_size(&req(Some(5 * GIB)), &fixed).unwrap(),
            (None, 5 * GIB)
        );
        for (r, o) in [(req(None), &custom), (req(Some(GIB)), &fixed)] {
            match create_size(&r, o) {
                Err(EngineError::Invalid { field, .. }) => assert_eq!(field, "size"),
                other => panic!("expected invalid size, got {other:?}"),
            }
        }
    }

    #[test]
    fn create_validation_names_the_field() {
        let ok = CreateVolumeRequest {
            name: "disk-0".into(),
            size: Some(1),
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
                    size: Some(0),
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

    #[test]
    fn the_first_control_character_is_named_by_its_path() {
        assert_eq!(
            control_in_json(&json!({"name": "ok", "zone_id": "a\u{0}"})).as_deref(),
            Some("zone_id")
        );
        assert_eq!(
            control_in_json(&json!({"metadata": {"owner": "x\ty"}})).as_deref(),
            Some("metadata.owner")
        );
        assert_eq!(
            control_in_json(&json!({"metadata": {"k\u{7f}": "v"}})).as_deref(),
            Some("metadata")
        );
        assert_eq!(
            control_in_json(&json!({"a": ["x", "\u{85}"]})).as_deref(),
            Some("a[1]")
        );
        assert_eq!(
            control_in_json(&json!({"name": "grüße, 名前 ✓", "n": 1})),
            None
        );
    }
}
