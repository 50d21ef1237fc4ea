//! The simulated cloud's persisted state (zone, offerings, VMs, volumes, jobs) and its rules as pure
//! functions: id generation under a seed, device-slot choice, attach/detach/delete preconditions.

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

/// Bytes in one GiB; CloudStack sizes in requests are GiB.
pub const GIB: u64 = 1 << 30;
/// Data disks a VM may hold (CloudStack's KVM hypervisor capability `max_data_volumes_limit`).
pub const MAX_DATA_VOLUMES: u32 = 6;
/// The slot CloudStack keeps for the CD-ROM.
pub const CDROM_DEVICE_ID: u32 = 3;
/// Highest usable slot: data disks + ROOT + CD-ROM, counted from 0.
pub const MAX_DEVICE_ID: u32 = MAX_DATA_VOLUMES + 2 - 1;
/// Layout version of `state.json`.
pub const STATE_VERSION: u32 = 1;

/// A CloudStack API error as it goes on the wire: HTTP status / `errorcode`, `cserrorcode`, `errortext`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsError {
    pub errorcode: u16,
    pub cserrorcode: u32,
    pub errortext: String,
}

impl CsError {
    /// `InvalidParameterValueException`: 431 / 4350.
    pub fn param(text: impl Into<String>) -> Self {
        Self {
            errorcode: 431,
            cserrorcode: 4350,
            errortext: text.into(),
        }
    }
    /// A server-side failure (`RuntimeException` / `CloudRuntimeException`): 530 / 4250.
    pub fn internal(text: impl Into<String>) -> Self {
        Self {
            errorcode: 530,
            cserrorcode: 4250,
            errortext: text.into(),
        }
    }
    /// Bad credentials or signature: 401.
    pub fn unauthorized() -> Self {
        Self {
            errorcode: 401,
            cserrorcode: 0,
            errortext: "unable to verify user credentials and/or request signature".to_owned(),
        }
    }
    /// A required parameter is absent.
    pub fn missing(command: &str, param: &str) -> Self {
        Self::param(format!(
            "Unable to execute API command {} due to missing parameter {param}",
            command.to_lowercase()
        ))
    }
    /// A parameter names no entity or cannot be parsed (CloudStack's API-layer lookup message).
    pub fn invalid(command: &str, param: &str, value: &str) -> Self {
        Self::param(format!(
            "Unable to execute API command {} due to invalid value. Invalid parameter {param} value={value} \
             due to incorrect long value format, or entity does not exist or due to incorrect parameter \
             annotation for the field in api cmd class.",
            command.to_lowercase()
        ))
    }
}

/// The zone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Zone {
    pub id: String,
    pub name: String,
}

/// A disk offering; `size_gb` is `None` for a custom-size offering.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offering {
    pub id: String,
    pub name: String,
    pub displaytext: String,
    pub size_gb: Option<u64>,
    pub created: String,
}

/// A running VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub instance_name: String,
    pub created: String,
}

/// CloudStack volume states the simulator uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    /// Created, never attached: no primary storage yet.
    Allocated,
    /// Has storage (after the first attach).
    Ready,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allocated => "Allocated",
            Self::Ready => "Ready",
        }
    }
}

/// Where a volume is attached. `device` and `link` are set only for appliance attachments that exposed one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub vm_id: String,
    pub device_id: u32,
    pub attached: String,
    /// The loop device or backing file exposed to the appliance.
    pub device: Option<PathBuf>,
    /// The by-id link made for it.
    pub link: Option<PathBuf>,
    /// Whether `device` is a loop device this simulator attached.
    #[serde(default)]
    pub loop_device: bool,
}

/// A volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub size: u64,
    pub offering_id: String,
    pub state: VolumeState,
    pub created: String,
    pub attachment: Option<Attachment>,
}

/// What a job does when it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobAction {
    Create,
    Attach {
        vm_id: String,
        device_id: Option<u32>,
    },
    Detach,
}

impl JobAction {
    /// The API command that started it.
    pub fn command(&self) -> &'static str {
        match self {
            Self::Create => "createVolume",
            Self::Attach { .. } => "attachVolume",
            Self::Detach => "detachVolume",
        }
    }
    /// The Java command class CloudStack reports in `cmd`.
    pub fn cmd_class(&self) -> &'static str {
        match self {
            Self::Create => "org.apache.cloudstack.api.command.user.volume.CreateVolumeCmd",
            Self::Attach { .. } => "org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd",
            Self::Detach => "org.apache.cloudstack.api.command.user.volume.DetachVolumeCmd",
        }
    }
}

/// Outcome of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum JobOutcome {
    Pending,
    /// `volume` is the volume object as it was when the job finished.
    Succeeded {
        volume: serde_json::Value,
        completed: String,
    },
    Failed {
        error: CsError,
        completed: String,
    },
}

/// An asynchronous job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub volume_id: String,
    pub action: JobAction,
    pub created: String,
    /// Extra delay (fault injection) decided when the job was submitted.
    #[serde(default)]
    pub extra_delay_ms: u64,
    pub outcome: JobOutcome,
}

impl Job {
    pub fn is_pending(&self) -> bool {
        matches!(self.outcome, JobOutcome::Pending)
    }
}

/// The whole persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub seed: u64,
    /// Counter feeding id generation, so ids stay deterministic across restarts.
    pub next_seq: u64,
    pub account_id: String,
    pub user_id: String,
    pub domain_id: String,
    pub zone: Zone,
    pub offerings: Vec<Offering>,
    pub appliance_vm_id: String,
    pub vms: Vec<Vm>,
    pub volumes: Vec<Volume>,
    pub jobs: Vec<Job>,
    /// By-id links deliberately left behind on detach (fault injection), for cleanup.
    #[serde(default)]
    pub leftover_links: Vec<PathBuf>,
}

/// Current time in CloudStack's format (`2012-06-05T08:47:54+0200`).
pub fn now_string() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%z").to_string()
}

/// The UUID derived from `seed` and `seq`: the same pair always gives the same id.
pub fn seeded_uuid(seed: u64, seq: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// The virtio serial CloudStack's KVM agent gives a volume: the first 20 hex digits of the UUID without dashes.
pub fn virtio_serial(volume_id: &str) -> Option<String> {
    let id = uuid::Uuid::parse_str(volume_id).ok()?;
    Some(blockdev::serial_for_volume(&id))
}

impl State {
    /// A fresh cloud: one zone, a 5 GB and a custom-size offering, the appliance and two other running VMs.
    pub fn new(seed: u64, appliance_vm_id: Option<String>) -> Self {
        let created = now_string();
        let mut st = Self {
            version: STATE_VERSION,
            seed,
            next_seq: 0,
            account_id: String::new(),
            user_id: String::new(),
            domain_id: String::new(),
            zone: Zone {
                id: String::new(),
                name: "sim-zone-1".to_owned(),
            },
            offerings: Vec::new(),
            appliance_vm_id: String::new(),
            vms: Vec::new(),
            volumes: Vec::new(),
            jobs: Vec::new(),
            leftover_links: Vec::new(),
        };
        st.account_id = st.next_id();
        st.user_id = st.next_id();
        st.domain_id = st.next_id();
        st.zone.id = st.next_id();
        st.offerings = vec![
            Offering {
                id: st.next_id(),
                name: "Small".to_owned(),
                displaytext: "Small Disk, 5 GB".to_owned(),
                size_gb: Some(5),
                created: created.clone(),
            },
            Offering {
                id: st.next_id(),
                name: "Custom".to_owned(),
                displaytext: "Custom Disk".to_owned(),
                size_gb: None,
                created: created.clone(),
            },
        ];
        let appliance = appliance_vm_id.unwrap_or_else(|| st.next_id());
        let others = [st.next_id(), st.next_id()];
        st.appliance_vm_id = appliance.clone();
        let names = ["migration-appliance", "workload-1", "workload-2"];
        for (n, (id, name)) in [appliance, others[0].clone(), others[1].clone()]
            .into_iter()
            .zip(names)
            .enumerate()
        {
            st.vms.push(Vm {
                id,
                name: name.to_owned(),
                instance_name: format!("i-2-{}-VM", 100 + n),
                created: created.clone(),
            });
        }
        st
    }

    /// The next deterministic id.
    pub fn next_id(&mut self) -> String {
        let id = seeded_uuid(self.seed, self.next_seq);
        self.next_seq += 1;
        id
    }

    pub fn vm(&self, id: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.id == id)
    }

    pub fn volume(&self, id: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.id == id)
    }

    pub fn volume_mut(&mut self, id: &str) -> Option<&mut Volume> {
        self.volumes.iter_mut().find(|v| v.id == id)
    }

    pub fn offering(&self, id: &str) -> Option<&Offering> {
        self.offerings.iter().find(|o| o.id == id)
    }

    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.id == id)
    }

    /// Device slots in use on a VM.
    pub fn used_device_ids(&self, vm_id: &str) -> Vec<u32> {
        self.volumes
            .iter()
            .filter_map(|v| v.attachment.as_ref())
            .filter(|a| a.vm_id == vm_id)
            .map(|a| a.device_id)
            .collect()
    }

    /// Checks an attach of `volume_id` to `vm_id` and returns the slot it gets (CloudStack's
    /// `VolumeApiServiceImpl.attachVolumeToVM` / `getDeviceId` rules).
    pub fn plan_attach(
        &self,
        volume_id: &str,
        vm_id: &str,
        requested: Option<u32>,
    ) -> Result<u32, CsError> {
        let vol = self
            .volume(volume_id)
            .ok_or_else(|| CsError::param(format!("Unable to find volume with ID: {volume_id}")))?;
        if vol.attachment.is_some() {
            return Err(CsError::param(
                "Please specify a volume that is not attached to any VM.",
            ));
        }
        if self.vm(vm_id).is_none() {
            return Err(CsError::param(format!(
                "Unable to find VM with ID: {vm_id}"
            )));
        }
        choose_device_id(&self.used_device_ids(vm_id), requested, vm_id)
    }
}

/// Picks the device slot: a requested slot must be `0..=MAX_DEVICE_ID`, not 3 and free; otherwise the
/// lowest free slot from 1 skipping 3. Data disks beyond `MAX_DATA_VOLUMES` are refused with CloudStack's text.
pub fn choose_device_id(used: &[u32], requested: Option<u32>, vm_id: &str) -> Result<u32, CsError> {
    let data_disks = used.iter().filter(|&&d| d != 0).count();
    let wants_root = requested == Some(0);
    if !wants_root && data_disks >= MAX_DATA_VOLUMES as usize {
        return Err(CsError::param(format!(
            "The specified VM already has the maximum number of data disks ({MAX_DATA_VOLUMES}) attached. \
             Please specify another VM."
        )));
    }
    match requested {
        Some(d) => {
            if d > MAX_DEVICE_ID || d == CDROM_DEVICE_ID {
                return Err(CsError::internal(format!(
                    "deviceId should be 0 ≤ deviceId ≤ {MAX_DEVICE_ID} and ≠ {CDROM_DEVICE_ID}"
                )));
            }
            if used.contains(&d) {
                return Err(CsError::internal(format!(
                    "deviceId {d} is used by vm {vm_id}"
                )));
            }
            Ok(d)
        }
        None => (1..=MAX_DEVICE_ID)
            .filter(|&d| d != CDROM_DEVICE_ID)
            .find(|d| !used.contains(d))
            .ok_or_else(|| CsError::internal(format!("All device Ids are used by vm {vm_id}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_free_slot_skips_cdrom_and_root() {
        assert_eq!(choose_device_id(&[], None, "vm"), Ok(1));
        assert_eq!(choose_device_id(&[1, 2], None, "vm"), Ok(4));
        assert_eq!(choose_device_id(&[0, 1, 2, 4], None, "vm"), Ok(5));
        assert_eq!(choose_device_id(&[1, 4], None, "vm"), Ok(2));
    }

    #[test]
    fn requested_slots_follow_cloudstack_rules() {
        assert_eq!(choose_device_id(&[1], Some(0), "vm"), Ok(0));
        assert_eq!(
            choose_device_id(&[0], Some(0), "vm").map_err(|e| e.errortext),
            Err("deviceId 0 is used by vm vm".into())
        );
        assert_eq!(
            choose_device_id(&[], Some(3), "vm").map_err(|e| e.errorcode),
            Err(530)
        );
        assert_eq!(
            choose_device_id(&[], Some(MAX_DEVICE_ID + 1), "vm").map_err(|e| e.errorcode),
            Err(530)
        );
        assert_eq!(choose_device_id(&[], Some(5), "vm"), Ok(5));
    }

    #[test]
    fn data_disk_limit_has_cloudstack_text() {
        let full = [1, 2, 4, 5, 6, 7];
        let err = choose_device_id(&full, None, "vm").expect_err("limit");
        assert_eq!(err.errorcode, 431);
        assert_eq!(
            err.errortext,
            "The specified VM already has the maximum number of data disks (6) attached. Please specify another VM."
        );
        // The root slot stays available.
        assert_eq!(choose_device_id(&full, Some(0), "vm"), Ok(0));
    }

    #[test]
    fn ids_are_deterministic_under_seed() {
        assert_eq!(seeded_uuid(7, 3), seeded_uuid(7, 3));
        assert_ne!(seeded_uuid(7, 3), seeded_uuid(8, 3));
        let a = State::new(42, None);
        let b = State::new(42, None);
        assert_eq!(a.appliance_vm_id, b.appliance_vm_id);
        assert_eq!(a.zone.id, b.zone.id);
        assert_eq!(a.vms.len(), 3);
    }

    #[test]
    fn serial_is_first_20_hex_digits() {
        assert_eq!(
            virtio_serial("60338035-92fb-4d27-98d4-b60ad4b38b87").as_deref(),
            Some("6033803592fb4d2798d4")
        );
        assert_eq!(virtio_serial("not-a-uuid"), None);
    }
}
