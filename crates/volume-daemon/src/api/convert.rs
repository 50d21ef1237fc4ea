//! Conversions from the daemon's records and the engine's views to the wire types of `volume-api`. Pure: the
//! engine gathers what they need (see `engine::reads`); the only place where persisted shapes become API
//! shapes.

use chrono::{DateTime, Utc};
use volume_api::{
    Appliance, AttachmentInfo, CloudVmState, CloudVolumeData, CloudVolumeState, DeviceMapping,
    ErrorCode, Export, ExportStatus, LinuxState, Operation, OperationMode, OperationStep,
    SnapshotInfo, VmVolume, VolumeState, VolumeStatus,
};

use crate::engine::{DeviceCheck, EngineError, ExportView, VolumeView};
use crate::identity::IdentityState;
use crate::store::{AttachmentRecord, OperationRecord, VolumeRecord};

/// An operation as the API shows it; its request and response are read as its kind's types.
pub fn operation(op: &OperationRecord) -> Result<Operation, EngineError> {
    Ok(Operation {
        id: op.id,
        kind: crate::engine::wire_kind(op)?,
        status: op.status,
        volume_id: op.volume_id,
        vm_id: op.vm_id.clone(),
        error: op.error.as_ref().map(|e| e.message.clone()),
        // Every code this and earlier versions stored is an ErrorCode; anything else is reported as internal.
        error_code: op
            .error
            .as_ref()
            .map(|e| ErrorCode::parse(&e.code).unwrap_or(ErrorCode::Internal)),
        step: OperationStep::parse_stored(&op.step).ok_or_else(|| EngineError::Journal {
            operation: op.id,
            problem: format!("step {:?} is unknown", op.step),
        })?,
        cloudstack_job_id: op.cloud_job_id.clone(),
        created_at: op.created_at,
        updated_at: op.updated_at,
        completed_at: op.completed_at,
    })
}

fn file_name(p: &str) -> Option<String> {
    std::path::Path::new(p)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

fn attachment_info(a: &AttachmentRecord) -> AttachmentInfo {
    AttachmentInfo {
        vm_id: a.vm_id.clone(),
        target: a.target,
        role: a.role,
        device_id: a.device_id,
        device_path: a.by_id_path.clone().or_else(|| a.kernel_device.clone()),
        kernel_device: a.kernel_device.clone(),
        persistent_device_name: a.stable_name.as_deref().and_then(file_name),
        symlink_path: a.stable_name.clone(),
        nbd_clients: a.nbd_clients.clone(),
    }
}

/// The device's state and, when unverified, why.
fn linux_state(d: &DeviceCheck) -> (LinuxState, Option<String>) {
    match d {
        DeviceCheck::Present => (LinuxState::Present, None),
        DeviceCheck::Missing => (LinuxState::Missing, None),
        DeviceCheck::Unverified(e) => (LinuxState::Unverified, Some(crate::error_chain(e))),
    }
}

fn to_utc(t: Option<std::time::SystemTime>) -> Option<DateTime<Utc>> {
    t.map(DateTime::<Utc>::from)
}

/// An export record joined with the live registry (status and counters).
pub fn export(e: &ExportView) -> Export {
    let r = &e.record;
    let c = e
        .live
        .as_ref()
        .map(|s| s.counters.clone())
        .unwrap_or_default();
    Export {
        export_name: r.export_name.clone(),
        volume_id: r.volume_id,
        device_path: r.device_path.clone(),
        port: e.port,
        status: if e.live.is_some() {
            ExportStatus::Active
        } else {
            ExportStatus::Inactive
        },
        read_only: r.read_only,
        generation: r.generation,
        size: e.live.as_ref().map(|s| s.size).unwrap_or(0),
        connections: c.connections_current,
        total_connections: c.connections_total,
        peers: c.peers.iter().map(|p| p.to_string()).collect(),
        nbd_clients: e
            .live
            .as_ref()
            .map(|s| crate::exports::clients_of(&s.access))
            .unwrap_or_default(),
        client_identities: c.identities.iter().flatten().cloned().collect(),
        // Totals across the daemon's runs: earlier runs' (stored) plus this run's (live).
        bytes_read: r.bytes_read_before.saturating_add(c.bytes_read),
        bytes_written: r.bytes_written_before.saturating_add(c.bytes_written),
        highest_offset_written: c.highest_offset_written,
        last_activity: to_utc(c.last_activity),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// `GET /volumes/{id}`: the record, its attachment, live export and device, and the cloud's view.
pub fn volume_status(v: VolumeView) -> Result<VolumeStatus, EngineError> {
    let VolumeView {
        volume: rec,
        attachment,
        export: live_export,
        cloud,
        device,
        last_operation,
    } = v;
    let (cloudstack_data, cloudstack_error) = match cloud {
        None => (None, None),
        Some(Ok(Some(cv))) => (
            Some(CloudVolumeData {
                state: CloudVolumeState::from(cv.state.as_str()),
                virtualmachineid: cv.vm_id,
                deviceid: cv.device_id,
                size: cv.size,
                volume_type: cv.volume_type,
            }),
            None,
        ),
        Some(Ok(None)) => (
            None,
            Some("CloudStack does not know this volume".to_string()),
        ),
        Some(Err(e)) => (None, Some(e.chain())),
    };
    let state = if rec.deleted_at.is_some() {
        VolumeState::Deleted
    } else if attachment.is_some() {
        VolumeState::Attached
    } else {
        VolumeState::Detached
    };
    let (linux_state, linux_problem) = match device.as_ref().map(linux_state) {
        Some((s, p)) => (Some(s), p),
        None => (None, None),
    };
    let snapshot = rec.snapshot;
    Ok(VolumeStatus {
        volume_id: rec.id,
        name: rec.name,
        size: rec.size_bytes,
        disk_offering_id: rec.disk_offering_id,
        zone_id: rec.zone_id,
        metadata: rec.metadata,
        state,
        linux_state,
        linux_problem,
        attachment: attachment.as_ref().map(attachment_info),
        export: live_export.as_ref().map(export),
        cloudstack_data,
        cloudstack_error,
        snapshot: SnapshotInfo {
            snapshot_id: snapshot.snapshot_id,
            snapshot_name: snapshot.snapshot_name,
            snapshot_status: snapshot.snapshot_status,
            vm_context_id: snapshot.vm_context_id,
            snapshot_created_at: snapshot.snapshot_created_at,
        },
        last_operation: last_operation.as_ref().map(operation).transpose()?,
        created_at: rec.created_at,
        updated_at: rec.updated_at,
    })
}

/// `GET /volumes/{id}/device`, in the predecessor's shape.
pub fn device_mapping(d: &crate::engine::DeviceView) -> DeviceMapping {
    let a = &d.attachment;
    let size = d.volume.as_ref().map(|v| v.size_bytes).unwrap_or(0);
    // The cloud's state now; the last one recorded when the cloud cannot be asked.
    // The predecessor's texts when there is neither stay as they were (kept as `Other`).
    let cloud_state = CloudVolumeState::from(match &d.cloud {
        Ok(Some(cv)) => cv.state.as_str(),
        Ok(None) => "unknown to CloudStack",
        Err(_) => d
            .volume
            .as_ref()
            .and_then(|v| v.cloud_state.as_deref())
            .unwrap_or("unknown"),
    });
    let (linux_state, linux_problem) = match &d.device {
        Some(c) => linux_state(c),
        None => (LinuxState::Remote, None),
    };
    DeviceMapping {
        volume_id: a.volume_id,
        volume_uuid: a.volume_id,
        vm_id: a.vm_id.clone(),
        operation_mode: OperationMode::from(a.target),
        cloudstack_device_id: a.device_id,
        device_path: a.by_id_path.clone().or_else(|| a.kernel_device.clone()),
        persistent_device_name: a.stable_name.as_deref().and_then(file_name),
        symlink_path: a.stable_name.clone(),
        kernel_device: a.kernel_device.clone(),
        size,
        cloudstack_state: cloud_state,
        linux_state,
        linux_problem,
        disk_role: a.role,
        created_at: a.created_at,
        updated_at: a.updated_at,
    }
}

/// One entry of `GET /vms/{vm_id}/volumes`.
pub fn vm_volume(a: &AttachmentRecord, v: &VolumeRecord) -> VmVolume {
    VmVolume {
        volume_id: a.volume_id,
        name: v.name.clone(),
        vm_id: a.vm_id.clone(),
        device_path: a.by_id_path.clone().or_else(|| a.kernel_device.clone()),
        device_id: a.device_id,
        role: a.role,
        state: VolumeState::Attached,
        size: v.size_bytes,
    }
}

pub fn appliance(s: &IdentityState) -> Appliance {
    Appliance {
        vm_id: s.vm_id.clone(),
        source: s.source,
        verified: s.verified,
        vm_name: s.vm_name.clone(),
        vm_state: s.vm_state.as_deref().map(CloudVmState::from),
        problem: s.problem.clone(),
    }
}
