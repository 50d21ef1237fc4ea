//! Wire types of the volume-daemon REST API: requests, responses, enums and error codes, shared by the daemon
//! and its clients. The OpenAPI document the daemon serves is generated from these types.
//!
//! These types are the compatibility contract (see `docs/api.md`): field names and value spellings match what
//! callers of the predecessor service send and read. Runtime and persisted types live in the daemon and are
//! converted to these explicitly.

mod cloud_states;
mod compat;
mod enums;
mod operations;
mod resources;
mod snapshots;

use uuid::Uuid;

pub use cloud_states::{CloudVmState, CloudVolumeState};
pub use compat::{
    ExportAgeCleanupRequest, ExportCleanupRequest, ExportCleanupResult, ExportValidation,
    ForceSyncResult, OrphanedExport, OrphanedExportCount, TestFailoverCleanupRequest,
    TestFailoverCleanupResponse,
};
pub use enums::{
    ApplianceSource, AttachTarget, ComponentStatus, DiskRole, DriftAction, DriftKind, ErrorCode,
    ExportStatus, HealthComponent, HealthStatus, LinuxState, OperationMode, OperationStatus,
    OperationStep, OperationType, RepairKind, VolumeState,
};
pub use operations::{
    AttachOperationRequest, AttachVolumeRequest, AttachVolumeResponse, CreateVolumeRequest,
    CreateVolumeResponse, DeleteVolumeResponse, DetachVolumeResponse, Operation, OperationKind,
    RepairRequest, RepairResponse, VolumeOperationRequest,
};
pub use resources::{
    Appliance, AttachmentInfo, CloudOffering, CloudVm, CloudVolumeData, CloudZone, ComponentHealth,
    CreateExportRequest, DeviceMapping, Drift, ErrorBody, Export, ExportList, ExportRemoved,
    Health, HealthDetails, ReconcileReport, ReconcileRequest, SetApplianceRequest, SnapshotInfo,
    VmVolume, VolumeStatus, IMPLEMENTATION_STATUS,
};
pub use snapshots::{
    CreateSnapshotRequest, SnapshotOperationRequest, SnapshotOperationResponse, SnapshotTracked,
    SnapshotUpdated, TrackSnapshotRequest, UpdateSnapshotRequest, VmSnapshots, VmSnapshotsCleared,
    VolumeSnapshot, VolumeSnapshotInfo,
};

/// Path prefix of every versioned endpoint.
pub const API_PREFIX: &str = "/api/v1";
/// Header carrying a caller-chosen idempotency key on mutations.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";
/// Prefix of every NBD export name the daemon creates; the rest is the volume UUID.
pub const EXPORT_NAME_PREFIX: &str = "migration-vol-";

/// The export name of a volume: `migration-vol-<uuid>`.
pub fn export_name(volume_id: Uuid) -> String {
    format!("{EXPORT_NAME_PREFIX}{volume_id}")
}

/// The volume an export name of the daemon's scheme names, if it is one.
pub fn volume_of_export(name: &str) -> Option<Uuid> {
    name.strip_prefix(EXPORT_NAME_PREFIX)
        .and_then(|s| Uuid::parse_str(s).ok())
}

/// Most client identities one export may admit.
pub const MAX_NBD_CLIENTS: usize = 64;
/// Longest client identity, in bytes (a certificate name).
pub const MAX_NBD_CLIENT_LEN: usize = 255;

/// Checks a list of NBD client identities (`nbd_clients`, `nbd_default_clients`): at most
/// [`MAX_NBD_CLIENTS`] names, each non-empty, at most [`MAX_NBD_CLIENT_LEN`] bytes, without control characters
/// or surrounding spaces. Says what is wrong with the first bad one.
pub fn check_nbd_clients(names: &[String]) -> Result<(), String> {
    if names.len() > MAX_NBD_CLIENTS {
        return Err(format!(
            "at most {MAX_NBD_CLIENTS} client identities, not {}",
            names.len()
        ));
    }
    for n in names {
        if n.is_empty() {
            return Err("a client identity must not be empty".into());
        }
        if n.len() > MAX_NBD_CLIENT_LEN {
            return Err(format!(
                "client identity {n:?} is {} bytes long; at most {MAX_NBD_CLIENT_LEN}",
                n.len()
            ));
        }
        if n.chars().any(char::is_control) {
            return Err(format!(
                "client identity {n:?} contains a control character"
            ));
        }
        if n.trim() != n {
            return Err(format!("client identity {n:?} starts or ends with a space"));
        }
    }
    // Names match ignoring ASCII letter case, so two that differ only in case are one name given twice.
    for (i, n) in names.iter().enumerate() {
        if let Some(first) = names[..i].iter().find(|m| m.eq_ignore_ascii_case(n)) {
            return Err(format!(
                "client identity {n:?} is given twice (as {first:?}; names match ignoring ASCII letter case)"
            ));
        }
    }
    Ok(())
}

/// Renders an error and its `source()` chain as one line, `outer: inner: root`, each cause once (a cause whose
/// text the outer message already contains is not repeated). Used by the daemon and volumectl alike.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use serde_json::json;

    #[test]
    fn create_request_rejects_unknown_fields() {
        let err = serde_json::from_str::<CreateVolumeRequest>(
            r#"{"name":"a","size":1,"disk_offering_id":"d","zone_id":"z","bogus":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    fn attach_op(response: Option<AttachVolumeResponse>) -> Operation {
        Operation {
            id: Uuid::nil(),
            kind: OperationKind::Attach {
                request: AttachOperationRequest {
                    volume_id: Uuid::nil(),
                    vm_id: "vm".into(),
                    device_id: Some(0),
                    attach_as: Some(DiskRole::Root),
                    nbd_clients: None,
                },
                response,
            },
            status: OperationStatus::Executing,
            volume_id: None,
            vm_id: Some("vm".into()),
            error: None,
            error_code: None,
            step: OperationStep::CloudAttachJob,
            cloudstack_job_id: None,
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
            completed_at: None,
        }
    }

    #[test]
    fn operation_uses_contract_spellings_and_round_trips() {
        let op = attach_op(None);
        let v = serde_json::to_value(&op).unwrap();
        assert_eq!(v["type"], "attach");
        assert_eq!(v["status"], "executing");
        assert_eq!(v["step"], "cloud_attach_job");
        assert!(v["volume_id"].is_null());
        assert!(v["response"].is_null());
        assert_eq!(
            v["request"],
            json!({"volume_id": Uuid::nil(), "vm_id": "vm", "device_id": 0, "attach_as": "root"})
        );
        let back: Operation = serde_json::from_value(v).unwrap();
        assert_eq!(back, op);
        assert_eq!(back.op_type(), OperationType::Attach);
    }

    #[test]
    fn a_remote_attach_response_has_no_local_fields() {
        let r = AttachVolumeResponse {
            volume_id: Uuid::nil(),
            vm_id: "vm".into(),
            device_path: None,
            device_id: Some(0),
            attach_as: Some(DiskRole::Root),
            kernel_device: None,
            persistent_device_name: None,
            symlink_path: None,
            export_name: None,
            nbd_port: None,
            export_generation: None,
            device_appeared_ms: None,
            message: "volume attached".into(),
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"volume_id": Uuid::nil(), "vm_id": "vm", "device_path": null, "device_id": 0,
                   "attach_as": "root", "message": "volume attached"})
        );
        let op = attach_op(Some(r));
        assert_eq!(op.response_volume_id(), Some(Uuid::nil()));
        assert_eq!(op.response_device_path(), None);
    }

    #[test]
    fn enums_spell_as_stored_and_parse_back() {
        for s in OperationStep::ALL {
            assert_eq!(OperationStep::parse(s.as_str()), Some(*s));
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(*c));
            assert_eq!(serde_json::to_value(c).unwrap(), json!(c.as_str()));
        }
        assert_eq!(
            OperationStep::parse_stored("compensating: detach"),
            Some(OperationStep::Compensating)
        );
        assert_eq!(OperationStep::parse("cloud_attach"), None);
        assert_eq!(OperationMode::from(AttachTarget::Appliance).as_str(), "oma");
    }

    #[test]
    fn error_chains_name_each_cause_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "cannot attach: disk full",
            Some(Box::new(E("disk full", Some(Box::new(E("ENOSPC", None)))))),
        );
        assert_eq!(error_chain(&e), "cannot attach: disk full: ENOSPC");
    }

    #[test]
    fn client_identity_lists_are_bounded_and_plain_text() {
        let ok = vec!["writer-1".to_string(), "writer.example.com".into()];
        assert_eq!(check_nbd_clients(&ok), Ok(()));
        assert_eq!(check_nbd_clients(&[]), Ok(()));
        for bad in [
            "",
            " writer",
            "wri\nter",
            &"x".repeat(MAX_NBD_CLIENT_LEN + 1),
        ] {
            assert!(check_nbd_clients(&[bad.to_string()]).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..=MAX_NBD_CLIENTS).map(|i| format!("w{i}")).collect();
        assert!(check_nbd_clients(&many).is_err());
        // One name twice, also in another letter case.
        for twice in [["a", "a"], ["Writer-1", "wRITER-1"]] {
            let twice: Vec<String> = twice.iter().map(|s| s.to_string()).collect();
            assert!(check_nbd_clients(&twice).is_err(), "{twice:?}");
        }
    }

    #[test]
    fn export_names_follow_the_scheme() {
        let id = Uuid::parse_str("60338035-92fb-4d27-98d4-b60ad4b38b87").unwrap();
        assert_eq!(
            export_name(id),
            "migration-vol-60338035-92fb-4d27-98d4-b60ad4b38b87"
        );
        assert_eq!(volume_of_export(&export_name(id)), Some(id));
        assert_eq!(
            volume_of_export("other-60338035-92fb-4d27-98d4-b60ad4b38b87"),
            None
        );
        assert_eq!(volume_of_export("migration-vol-x"), None);
    }
}
