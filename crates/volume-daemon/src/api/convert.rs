//! Conversions from the daemon's records and live state to the wire types of `volume-api`. The only place
//! where persisted shapes become API shapes.

use chrono::{DateTime, Utc};
use serde_json::json;
use volume_api::{
    Appliance, AttachmentInfo, DeviceMapping, Export, Operation, OperationStatus, OperationType,
    SnapshotInfo, VmVolume, VolumeStatus,
};

use super::ApiError;
use crate::engine::Engine;
use crate::identity::IdentityState;
use crate::store::{
    AttachTarget, AttachmentRecord, DiskRole, ExportRecord, OpStatus, OpType, OperationFilter,
    OperationRecord, VolumeRecord,
};

pub fn op_type_to_store(t: OperationType) -> OpType {
    match t {
        OperationType::Create => OpType::Create,
        OperationType::Attach => OpType::Attach,
        OperationType::Detach => OpType::Detach,
        OperationType::Delete => OpType::Delete,
    }
}

fn op_type_to_wire(t: OpType) -> OperationType {
    match t {
        OpType::Create => OperationType::Create,
        OpType::Attach => OperationType::Attach,
        OpType::Detach => OperationType::Detach,
        OpType::Delete => OperationType::Delete,
    }
}

pub fn op_status_to_store(s: OperationStatus) -> OpStatus {
    match s {
        OperationStatus::Pending => OpStatus::Pending,
        OperationStatus::Executing => OpStatus::Executing,
        OperationStatus::Completed => OpStatus::Completed,
        OperationStatus::Failed => OpStatus::Failed,
        OperationStatus::Cancelled => OpStatus::Cancelled,
    }
}

fn op_status_to_wire(s: OpStatus) -> OperationStatus {
    match s {
        OpStatus::Pending => OperationStatus::Pending,
        OpStatus::Executing => OperationStatus::Executing,
        OpStatus::Completed => OperationStatus::Completed,
        OpStatus::Failed => OperationStatus::Failed,
        OpStatus::Cancelled => OperationStatus::Cancelled,
    }
}

pub fn operation(op: &OperationRecord) -> Operation {
    Operation {
        id: op.id,
        op_type: op_type_to_wire(op.op_type),
        status: op_status_to_wire(op.status),
        volume_id: op.volume_id,
        vm_id: op.vm_id.clone(),
        request: op.request.clone(),
        response: op.response.clone(),
        error: op.error.as_ref().map(|e| e.message.clone()),
        error_code: op.error.as_ref().map(|e| e.code.clone()),
        step: op.step.clone(),
        cloudstack_job_id: op.cloud_job_id.clone(),
        created_at: op.created_at,
        updated_at: op.updated_at,
        completed_at: op.completed_at,
    }
}

fn target_str(t: AttachTarget) -> &'static str {
    match t {
        AttachTarget::Appliance => "appliance",
        AttachTarget::Remote => "remote",
    }
}

fn role_str(r: DiskRole) -> &'static str {
    match r {
        DiskRole::Data => "data",
        DiskRole::Root => "root",
    }
}

fn file_name(p: &str) -> Option<String> {
    std::path::Path::new(p)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

fn attachment_info(a: &AttachmentRecord) -> AttachmentInfo {
    AttachmentInfo {
        vm_id: a.vm_id.clone(),
        target: target_str(a.target).into(),
        role: role_str(a.role).into(),
        device_id: a.device_id,
        device_path: a.by_id_path.clone().or_else(|| a.kernel_device.clone()),
        kernel_device: a.kernel_device.clone(),
        persistent_device_name: a.stable_name.as_deref().and_then(file_name),
        symlink_path: a.stable_name.clone(),
    }
}

/// The local device's state of an appliance attachment: `present`, `missing` or the verification problem.
async fn linux_state(engine: &Engine, a: &AttachmentRecord, size: u64) -> Option<String> {
    if a.target != AttachTarget::Appliance {
        return None;
    }
    Some(match engine.devices().resolve(a.volume_id, size).await {
        Ok(_) => "present".into(),
        Err(e) if e.code() == "device_not_found" => "missing".into(),
        Err(e) => crate::error_chain(&e),
    })
}

fn to_utc(t: Option<std::time::SystemTime>) -> Option<DateTime<Utc>> {
    t.map(DateTime::<Utc>::from)
}

/// An export record joined with the live registry (status and counters).
pub fn export(engine: &Engine, r: &ExportRecord) -> Export {
    let live = engine
        .exports()
        .get(r.volume_id)
        .filter(|s| s.generation == r.generation);
    let c = live
        .as_ref()
        .map(|s| s.counters.clone())
        .unwrap_or_default();
    Export {
        export_name: r.export_name.clone(),
        volume_id: r.volume_id,
        device_path: r.device_path.clone(),
        port: engine.exports().port(),
        status: if live.is_some() { "active" } else { "inactive" }.into(),
        read_only: r.read_only,
        generation: r.generation,
        size: live.as_ref().map(|s| s.size).unwrap_or(0),
        connections: c.connections_current,
        total_connections: c.connections_total,
        peers: c.peers.iter().map(|p| p.to_string()).collect(),
        bytes_read: c.bytes_read,
        bytes_written: c.bytes_written,
        highest_offset_written: c.highest_offset_written,
        last_activity: to_utc(c.last_activity),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// `GET /volumes/{id}`: the record, its attachment, live export and device, and (when `ask_cloud`) the cloud.
pub async fn volume_status(
    engine: &Engine,
    v: VolumeRecord,
    ask_cloud: bool,
) -> Result<VolumeStatus, ApiError> {
    let store = engine.store();
    let att = store.get_attachment(v.id).await?;
    let export_rec = store.get_export(v.id).await?;
    let last = store
        .list_operations(&OperationFilter {
            volume_id: Some(v.id),
            limit: Some(1),
            ..Default::default()
        })
        .await?
        .into_iter()
        .next();
    let (cloudstack_data, cloudstack_error) = if ask_cloud {
        match engine.cloud().get_volume(&v.id.to_string()).await {
            Ok(Some(cv)) => (
                Some(json!({
                    "state": cv.state,
                    "virtualmachineid": cv.vm_id,
                    "deviceid": cv.device_id,
                    "size": cv.size,
                    "type": cv.volume_type,
                })),
                None,
            ),
            Ok(None) => (
                None,
                Some("CloudStack does not know this volume".to_string()),
            ),
            Err(e) => (None, Some(e.chain())),
        }
    } else {
        (None, None)
    };
    let state = if v.deleted_at.is_some() {
        "deleted"
    } else if att.is_some() {
        "attached"
    } else {
        "detached"
    };
    Ok(VolumeStatus {
        volume_id: v.id,
        name: v.name.clone(),
        size: v.size_bytes,
        disk_offering_id: v.disk_offering_id.clone(),
        zone_id: v.zone_id.clone(),
        metadata: v.metadata.clone(),
        state: state.into(),
        linux_state: match &att {
            Some(a) => linux_state(engine, a, v.size_bytes).await,
            None => None,
        },
        attachment: att.as_ref().map(attachment_info),
        export: export_rec.as_ref().map(|r| export(engine, r)),
        cloudstack_data,
        cloudstack_error,
        snapshot: SnapshotInfo {
            snapshot_id: v.snapshot.snapshot_id.clone(),
            snapshot_name: v.snapshot.snapshot_name.clone(),
            snapshot_status: v.snapshot.snapshot_status.clone(),
            vm_context_id: v.snapshot.vm_context_id.clone(),
            snapshot_created_at: v.snapshot.snapshot_created_at,
        },
        last_operation: last.as_ref().map(operation),
        created_at: v.created_at,
        updated_at: v.updated_at,
    })
}

/// `GET /volumes/{id}/device`, in the predecessor's shape.
pub async fn device_mapping(
    engine: &Engine,
    a: AttachmentRecord,
) -> Result<DeviceMapping, ApiError> {
    let v = engine.store().get_volume(a.volume_id).await?;
    let size = v.as_ref().map(|v| v.size_bytes).unwrap_or(0);
    // The cloud's state now; the last one recorded when the cloud cannot be asked.
    let recorded = || v.as_ref().and_then(|v| v.cloud_state.clone());
    let cloud_state = match engine.cloud().get_volume(&a.volume_id.to_string()).await {
        Ok(Some(cv)) => cv.state,
        Ok(None) => "unknown to CloudStack".into(),
        Err(e) => {
            tracing::warn!(volume = %a.volume_id, error = %e.chain(), "cannot read the volume's cloud state");
            recorded().unwrap_or_else(|| "unknown".into())
        }
    };
    let linux_state = linux_state(engine, &a, size)
        .await
        .unwrap_or_else(|| "remote".into());
    Ok(DeviceMapping {
        volume_id: a.volume_id,
        volume_uuid: a.volume_id,
        vm_id: a.vm_id.clone(),
        operation_mode: match a.target {
            AttachTarget::Appliance => "oma",
            AttachTarget::Remote => "failover",
        }
        .into(),
        cloudstack_device_id: a.device_id,
        device_path: a.by_id_path.clone().or_else(|| a.kernel_device.clone()),
        persistent_device_name: a.stable_name.as_deref().and_then(file_name),
        symlink_path: a.stable_name.clone(),
        kernel_device: a.kernel_device.clone(),
        size,
        cloudstack_state: cloud_state,
        linux_state,
        disk_role: role_str(a.role).into(),
        created_at: a.created_at,
        updated_at: a.updated_at,
    })
}

/// One entry of `GET /vms/{vm_id}/volumes`.
pub async fn vm_volume(engine: &Engine, a: AttachmentRecord) -> Result<VmVolume, ApiError> {
    let v = engine.store().get_volume(a.volume_id).await?;
    Ok(VmVolume {
        volume_id: a.volume_id,
        name: v.as_ref().map(|v| v.name.clone()).unwrap_or_default(),
        vm_id: a.vm_id.clone(),
        device_path: a.by_id_path.clone().or_else(|| a.kernel_device.clone()),
        device_id: a.device_id,
        role: role_str(a.role).into(),
        state: "attached".into(),
        size: v.as_ref().map(|v| v.size_bytes).unwrap_or(0),
    })
}

pub fn appliance(s: &IdentityState) -> Appliance {
    Appliance {
        vm_id: s.vm_id.clone(),
        source: s.source.as_str().into(),
        verified: s.verified,
        vm_name: s.vm_name.clone(),
        vm_state: s.vm_state.clone(),
        problem: s.problem.clone(),
    }
}
