//! Typed CloudStack resources (volumes, VMs, zones, disk offerings, snapshots, asynchronous jobs) and the query
//! parameters of the calls that return them. Field names on the wire are CloudStack's; sizes are bytes.

use serde::{Deserialize, Serialize};

use crate::de;

/// Bytes in one GiB, the unit CloudStack uses for `size` on `createVolume` and `disksize` on offerings.
pub const GIB: u64 = 1024 * 1024 * 1024;

/// Converts bytes to whole GiB, rounding up (CloudStack takes volume sizes in GB = GiB).
pub fn bytes_to_gib_rounded_up(bytes: u64) -> u64 {
    bytes.div_ceil(GIB)
}

/// Parameters of `createVolume`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    pub name: String,
    pub zone_id: String,
    pub disk_offering_id: String,
    /// Size in bytes for offerings with a custom size; sent as GB rounded up. `None` for fixed offerings.
    pub size_bytes: Option<u64>,
}

/// A started asynchronous job: its id (record it before waiting) and, for create-type commands, the id
/// of the resource being created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncJob {
    pub job_id: String,
    pub resource_id: Option<String>,
}

/// Filters of `listVolumes`. Every set field is sent; all pages are fetched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListVolumes {
    pub id: Option<String>,
    pub virtualmachine_id: Option<String>,
    pub name: Option<String>,
    pub keyword: Option<String>,
    pub zone_id: Option<String>,
    /// `ROOT` or `DATADISK`.
    pub volume_type: Option<String>,
    pub state: Option<String>,
    /// Sends `listall=true` (needed to see resources of other accounts in the domain).
    pub list_all: bool,
    /// Page size used to fetch all pages; the client's default when `None`.
    pub page_size: Option<u32>,
}

/// Filters of `listVirtualMachines`. Every set field is sent; all pages are fetched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListVms {
    pub id: Option<String>,
    pub name: Option<String>,
    pub state: Option<String>,
    pub zone_id: Option<String>,
    /// Sends `listall=true` (needed to see VMs across the domain).
    pub list_all: bool,
    /// Page size used to fetch all pages; the client's default when `None`.
    pub page_size: Option<u32>,
}

/// A CloudStack volume. Attachment is expressed by `virtualmachine_id`/`device_id`, not by `state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    #[serde(deserialize_with = "de::string")]
    pub id: String,
    #[serde(default, deserialize_with = "de::string")]
    pub name: String,
    /// `Allocated`, `Creating`, `Ready`, `Destroy`, `Expunging`, …
    #[serde(default, deserialize_with = "de::string")]
    pub state: String,
    /// Size in bytes (0 when CloudStack did not say).
    #[serde(default, deserialize_with = "de::u64_or_zero")]
    pub size: u64,
    #[serde(
        rename = "virtualmachineid",
        default,
        deserialize_with = "de::opt_string"
    )]
    pub virtualmachine_id: Option<String>,
    #[serde(rename = "deviceid", default, deserialize_with = "de::opt_u32")]
    pub device_id: Option<u32>,
    /// `ROOT` or `DATADISK`.
    #[serde(rename = "type", default, deserialize_with = "de::opt_string")]
    pub volume_type: Option<String>,
    #[serde(rename = "zoneid", default, deserialize_with = "de::opt_string")]
    pub zone_id: Option<String>,
    #[serde(rename = "zonename", default, deserialize_with = "de::opt_string")]
    pub zone_name: Option<String>,
    #[serde(
        rename = "diskofferingid",
        default,
        deserialize_with = "de::opt_string"
    )]
    pub disk_offering_id: Option<String>,
    #[serde(
        rename = "diskofferingname",
        default,
        deserialize_with = "de::opt_string"
    )]
    pub disk_offering_name: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub created: Option<String>,
    /// Time of the current attachment.
    #[serde(default, deserialize_with = "de::opt_string")]
    pub attached: Option<String>,
    #[serde(rename = "vmname", default, deserialize_with = "de::opt_string")]
    pub vm_name: Option<String>,
    #[serde(rename = "vmstate", default, deserialize_with = "de::opt_string")]
    pub vm_state: Option<String>,
    /// Path or UUID of the volume on primary storage.
    #[serde(default, deserialize_with = "de::opt_string")]
    pub path: Option<String>,
    #[serde(rename = "storageid", default, deserialize_with = "de::opt_string")]
    pub storage_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub storage: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub hypervisor: Option<String>,
    #[serde(
        rename = "provisioningtype",
        default,
        deserialize_with = "de::opt_string"
    )]
    pub provisioning_type: Option<String>,
    #[serde(default, deserialize_with = "de::opt_bool")]
    pub destroyed: Option<bool>,
}

/// A CloudStack virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualMachine {
    #[serde(deserialize_with = "de::string")]
    pub id: String,
    #[serde(default, deserialize_with = "de::string")]
    pub name: String,
    /// `Running`, `Stopped`, `Starting`, …
    #[serde(default, deserialize_with = "de::string")]
    pub state: String,
    #[serde(rename = "displayname", default, deserialize_with = "de::opt_string")]
    pub display_name: Option<String>,
    #[serde(rename = "instancename", default, deserialize_with = "de::opt_string")]
    pub instance_name: Option<String>,
    #[serde(rename = "zoneid", default, deserialize_with = "de::opt_string")]
    pub zone_id: Option<String>,
    #[serde(rename = "zonename", default, deserialize_with = "de::opt_string")]
    pub zone_name: Option<String>,
    #[serde(rename = "hostid", default, deserialize_with = "de::opt_string")]
    pub host_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub hypervisor: Option<String>,
    #[serde(rename = "rootdeviceid", default, deserialize_with = "de::opt_u32")]
    pub root_device_id: Option<u32>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub created: Option<String>,
}

/// A CloudStack zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    #[serde(deserialize_with = "de::string")]
    pub id: String,
    #[serde(default, deserialize_with = "de::string")]
    pub name: String,
}

/// A CloudStack disk offering. `custom` offerings take a size on `createVolume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskOffering {
    #[serde(deserialize_with = "de::string")]
    pub id: String,
    #[serde(default, deserialize_with = "de::string")]
    pub name: String,
    /// Size in GiB (0 for custom offerings).
    #[serde(rename = "disksize", default, deserialize_with = "de::u64_or_zero")]
    pub disk_size_gb: u64,
    #[serde(
        rename = "iscustomized",
        default,
        deserialize_with = "de::bool_lenient"
    )]
    pub custom: bool,
    #[serde(rename = "displaytext", default, deserialize_with = "de::opt_string")]
    pub display_text: Option<String>,
}

/// Filters of `listSnapshots`. Every set field is sent; all pages are fetched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListSnapshots {
    pub id: Option<String>,
    pub volume_id: Option<String>,
    pub name: Option<String>,
    /// Sends `listall=true` (needed to see snapshots of other accounts in the domain).
    pub list_all: bool,
    /// Page size used to fetch all pages; the client's default when `None`.
    pub page_size: Option<u32>,
}

/// A CloudStack volume snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(deserialize_with = "de::string")]
    pub id: String,
    #[serde(default, deserialize_with = "de::string")]
    pub name: String,
    #[serde(rename = "volumeid", default, deserialize_with = "de::string")]
    pub volume_id: String,
    #[serde(rename = "volumename", default, deserialize_with = "de::opt_string")]
    pub volume_name: Option<String>,
    /// `ROOT` or `DATADISK`.
    #[serde(rename = "volumetype", default, deserialize_with = "de::opt_string")]
    pub volume_type: Option<String>,
    /// `Allocated`, `Creating`, `CreatedOnPrimary`, `BackingUp`, `BackedUp`, `Copying`, `Destroying`,
    /// `Destroyed`, `Error`.
    #[serde(default, deserialize_with = "de::string")]
    pub state: String,
    /// `MANUAL`, `RECURRING`, …
    #[serde(rename = "snapshottype", default, deserialize_with = "de::opt_string")]
    pub snapshot_type: Option<String>,
    #[serde(rename = "intervaltype", default, deserialize_with = "de::opt_string")]
    pub interval_type: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub created: Option<String>,
    #[serde(rename = "zoneid", default, deserialize_with = "de::opt_string")]
    pub zone_id: Option<String>,
    /// Bytes the snapshot takes on storage.
    #[serde(rename = "physicalsize", default, deserialize_with = "de::opt_u64")]
    pub physical_size: Option<u64>,
    /// Bytes of the volume it was taken of.
    #[serde(rename = "virtualsize", default, deserialize_with = "de::opt_u64")]
    pub virtual_size: Option<u64>,
    /// Whether CloudStack can revert the volume to it.
    #[serde(default, deserialize_with = "de::opt_bool")]
    pub revertable: Option<bool>,
}

/// The error a failed asynchronous job reports in its `jobresult`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub errorcode: u32,
    pub cserrorcode: Option<u32>,
    pub errortext: String,
}

impl JobError {
    /// The kind this failure falls into, by the same rules as synchronous errors.
    pub fn kind(&self) -> crate::ErrorKind {
        crate::error::classify(self.errorcode, self.cserrorcode, &self.errortext)
    }
}

/// The state of an asynchronous job (`jobstatus` 0, 1, 2).
#[derive(Debug, Clone, PartialEq)]
pub enum JobStatus {
    Pending,
    /// The job finished; the value is its `jobresult` (e.g. `{"volume": {…}}`).
    Succeeded(serde_json::Value),
    Failed(JobError),
}

/// One entry of `listAsyncJobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncJobInfo {
    #[serde(rename = "jobid", deserialize_with = "de::string")]
    pub job_id: String,
    /// Java class of the command, e.g. `org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd`.
    #[serde(default, deserialize_with = "de::opt_string")]
    pub cmd: Option<String>,
    /// 0 pending, 1 succeeded, 2 failed.
    #[serde(rename = "jobstatus", default, deserialize_with = "de::opt_i64")]
    pub job_status: Option<i64>,
    #[serde(
        rename = "jobinstancetype",
        default,
        deserialize_with = "de::opt_string"
    )]
    pub instance_type: Option<String>,
    #[serde(rename = "jobinstanceid", default, deserialize_with = "de::opt_string")]
    pub instance_id: Option<String>,
    #[serde(rename = "jobresultcode", default, deserialize_with = "de::opt_i64")]
    pub result_code: Option<i64>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub created: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gib_rounds_up() {
        assert_eq!(bytes_to_gib_rounded_up(0), 0);
        assert_eq!(bytes_to_gib_rounded_up(1), 1);
        assert_eq!(bytes_to_gib_rounded_up(GIB), 1);
        assert_eq!(bytes_to_gib_rounded_up(GIB + 1), 2);
        assert_eq!(bytes_to_gib_rounded_up(10 * GIB), 10);
    }

    #[test]
    fn volume_tolerates_numbers_strings_and_unknown_fields() {
        let v: Volume = serde_json::from_value(serde_json::json!({
            "id": 42, "name": "v", "state": "Ready", "size": "1073741824", "deviceid": "3",
            "virtualmachineid": 7, "type": "DATADISK", "destroyed": "false", "unknown": {"x": 1}
        }))
        .expect("decodes");
        assert_eq!(v.id, "42");
        assert_eq!(v.size, GIB);
        assert_eq!(v.device_id, Some(3));
        assert_eq!(v.virtualmachine_id.as_deref(), Some("7"));
        assert_eq!(v.destroyed, Some(false));
        assert_eq!(v.zone_id, None);
    }

    #[test]
    fn disk_offering_boolean_as_string() {
        let o: DiskOffering = serde_json::from_value(serde_json::json!({
            "id": "a", "name": "custom", "disksize": 0, "iscustomized": "true"
        }))
        .expect("decodes");
        assert!(o.custom);
        assert_eq!(o.disk_size_gb, 0);
    }
}
