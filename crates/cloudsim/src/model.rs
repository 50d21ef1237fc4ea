//! The simulated cloud's state (zone, offerings, templates, VMs, volumes, snapshots, jobs) and its rules as
//! pure functions: id generation under a seed, device-slot choice, attach/detach preconditions, paging.
//!
//! Every change goes through a `*_mut`/`insert_*`/`remove_*` method, which records the changed entity in
//! the dirty set; the store (`store.rs`) writes exactly those entities when the change commits.

use std::collections::BTreeSet;
use std::path::PathBuf;

use indexmap::IndexMap;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

/// Bytes in one GiB (CloudStack sizes in requests are GiB): the client library's constant.
pub use cloudstack::GIB;
/// Data disks a KVM VM may hold: `hypervisor_capabilities.max_data_volumes_limit`, whose column default is
/// 6 (CloudStack `setup/db/db/schema-40to410.sql`) and which no upgrade raises for KVM.
pub const MAX_DATA_VOLUMES: u32 = 6;
/// The slot CloudStack keeps for the CD-ROM.
pub const CDROM_DEVICE_ID: u32 = 3;
/// Layout version of the saved state.
pub const STATE_VERSION: u32 = 2;
/// CloudStack's `default.page.size`: the most items one list call returns, and the largest `pagesize`.
pub const DEFAULT_PAGE_SIZE: u64 = 500;
/// CloudStack's `custom.diskoffering.size.min` (GB).
pub const CUSTOM_SIZE_MIN_GB: u64 = 1;
/// CloudStack's `custom.diskoffering.size.max` (GB).
pub const CUSTOM_SIZE_MAX_GB: u64 = 1024;
/// Size of each VM's ROOT volume (from its template).
pub const ROOT_SIZE: u64 = 8 * GIB;

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
    /// `ServerApiException(PARAM_ERROR, …)` thrown by the API layer itself (paging checks): 431 / 9999.
    pub fn api_param(text: impl Into<String>) -> Self {
        Self {
            errorcode: 431,
            cserrorcode: 9999,
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
    /// Bad credentials, bad signature, unknown or missing command: 401.
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
    /// Whether this is a parameter error (431), which fails a job with `jobresultcode` 431.
    pub fn is_param(&self) -> bool {
        self.errorcode == 431
    }
}

/// The zone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Zone {
    pub id: String,
    pub name: String,
}

/// A disk offering; `size_gb` is `None` for a custom-size offering, whose sizes must lie in
/// `min_gb..=max_gb`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offering {
    pub id: String,
    pub name: String,
    pub displaytext: String,
    pub size_gb: Option<u64>,
    pub min_gb: u64,
    pub max_gb: u64,
    pub created: String,
}

/// A compute (service) offering.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceOffering {
    pub id: String,
    pub name: String,
    pub cpus: u32,
    pub cpu_mhz: u32,
    pub memory_mb: u32,
}

/// The template every VM was deployed from, and its OS type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub os_type_id: String,
    pub os_type_name: String,
}

/// The guest network and the zone's source-NAT public address.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub public_ip_id: String,
    pub public_ip: String,
}

/// Hypervisors of the simulated hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hypervisor {
    #[serde(rename = "KVM")]
    Kvm,
    VMware,
    XenServer,
}

impl Hypervisor {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "KVM",
            Self::VMware => "VMware",
            Self::XenServer => "XenServer",
        }
    }
    /// `hypervisor_capabilities.max_data_volumes_limit`: KVM keeps the column default 6
    /// (`schema-40to410.sql`), XenServer 6.0+ has 13 (same file), VMware 30 (a later `schema-*.sql`
    /// upgrade: `SET max_data_volumes_limit=30 WHERE hypervisor_type='VMware'`).
    pub fn max_data_volumes(self) -> u32 {
        match self {
            Self::Kvm => MAX_DATA_VOLUMES,
            Self::XenServer => 13,
            Self::VMware => 30,
        }
    }
    /// Highest usable device slot: data disks + ROOT + CD-ROM, counted from 0.
    pub fn max_device_id(self) -> u32 {
        self.max_data_volumes() + 2 - 1
    }
}

/// VM states the simulator uses (`com.cloud.vm.VirtualMachine.State`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Running,
    Stopped,
    /// `destroyVirtualMachine` without `expunge`: kept (with its volumes attached) until expunged.
    Destroyed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "Running",
            Self::Stopped => "Stopped",
            Self::Destroyed => "Destroyed",
        }
    }
}

/// A VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub instance_name: String,
    pub created: String,
    pub state: VmState,
    pub hypervisor: Hypervisor,
    pub ip: String,
    pub mac: String,
    pub nic_id: String,
}

/// CloudStack volume states the simulator uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    /// Created, never attached to a running VM: no primary storage yet.
    Allocated,
    /// Has storage.
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

/// A resource tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

/// A volume. Its type follows `VolumeDaoImpl.attachVolume`/`detachVolume`: ROOT while attached at device
/// 0, DATADISK otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub size: u64,
    /// The disk offering; `None` for ROOT volumes deployed with a VM.
    pub offering_id: Option<String>,
    pub state: VolumeState,
    pub created: String,
    pub attachment: Option<Attachment>,
    #[serde(default)]
    pub tags: Vec<Tag>,
}

impl Volume {
    pub fn is_root(&self) -> bool {
        self.attachment.as_ref().is_some_and(|a| a.device_id == 0)
    }
}

/// A volume snapshot (always `BackedUp` once its job finished).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub volume_id: String,
    pub volume_name: String,
    pub volume_type: String,
    pub size: u64,
    pub created: String,
    pub backed_up: bool,
}

/// How `detachVolume` named its volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetachTarget {
    Volume(String),
    Slot {
        vm_id: String,
        device_id: u64,
    },
    /// Neither (or both) were given: the job fails as CloudStack's does.
    Ambiguous,
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
    Detach {
        target: DetachTarget,
    },
    StopVm,
    StartVm,
    /// `destroyVirtualMachine`; with `expunge` the VM is removed at once.
    DestroyVm {
        expunge: bool,
    },
    CreateSnapshot {
        snapshot_id: String,
    },
    DeleteSnapshot,
    RevertSnapshot,
    CreateTags {
        volume_ids: Vec<String>,
        tags: Vec<Tag>,
    },
    DeleteTags {
        volume_ids: Vec<String>,
        tags: Vec<(String, Option<String>)>,
    },
}

impl JobAction {
    /// The API command that started it.
    pub fn command(&self) -> &'static str {
        match self {
            Self::Create => "createVolume",
            Self::Attach { .. } => "attachVolume",
            Self::Detach { .. } => "detachVolume",
            Self::StopVm => "stopVirtualMachine",
            Self::StartVm => "startVirtualMachine",
            Self::DestroyVm { .. } => "destroyVirtualMachine",
            Self::CreateSnapshot { .. } => "createSnapshot",
            Self::DeleteSnapshot => "deleteSnapshot",
            Self::RevertSnapshot => "revertSnapshot",
            Self::CreateTags { .. } => "createTags",
            Self::DeleteTags { .. } => "deleteTags",
        }
    }
    /// The Java command class CloudStack reports in `cmd`.
    pub fn cmd_class(&self) -> &'static str {
        match self {
            Self::Create => "org.apache.cloudstack.api.command.user.volume.CreateVolumeCmd",
            Self::Attach { .. } => "org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd",
            Self::Detach { .. } => "org.apache.cloudstack.api.command.user.volume.DetachVolumeCmd",
            Self::StopVm => "org.apache.cloudstack.api.command.user.vm.StopVMCmd",
            Self::StartVm => "org.apache.cloudstack.api.command.user.vm.StartVMCmd",
            Self::DestroyVm { .. } => "org.apache.cloudstack.api.command.user.vm.DestroyVMCmd",
            Self::CreateSnapshot { .. } => {
                "org.apache.cloudstack.api.command.user.snapshot.CreateSnapshotCmd"
            }
            Self::DeleteSnapshot => {
                "org.apache.cloudstack.api.command.user.snapshot.DeleteSnapshotCmd"
            }
            Self::RevertSnapshot => {
                "org.apache.cloudstack.api.command.user.snapshot.RevertSnapshotCmd"
            }
            Self::CreateTags { .. } => "org.apache.cloudstack.api.command.user.tag.CreateTagsCmd",
            Self::DeleteTags { .. } => "org.apache.cloudstack.api.command.user.tag.DeleteTagsCmd",
        }
    }
    /// `jobinstancetype`.
    pub fn instance_type(&self) -> Option<&'static str> {
        match self {
            Self::Create | Self::Attach { .. } | Self::Detach { .. } => Some("Volume"),
            Self::StopVm | Self::StartVm | Self::DestroyVm { .. } => Some("VirtualMachine"),
            Self::CreateSnapshot { .. } | Self::DeleteSnapshot | Self::RevertSnapshot => {
                Some("Snapshot")
            }
            Self::CreateTags { .. } | Self::DeleteTags { .. } => None,
        }
    }
}

/// Outcome of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum JobOutcome {
    Pending,
    /// `result` is the `jobresult` object (e.g. `{"volume": {…}}`) as it was when the job finished.
    Succeeded {
        result: serde_json::Value,
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
    /// The entity the job works on (`jobinstanceid`), when known.
    pub instance_id: Option<String>,
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

/// An entity whose change must be saved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Meta,
    Vm(String),
    Volume(String),
    Snapshot(String),
    Job(String),
}

/// The whole state. Fields are read directly; changes go through the methods that mark them dirty.
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
    pub service_offering: ServiceOffering,
    pub template: Template,
    pub network: Network,
    pub appliance_vm_id: String,
    pub vms: Vec<Vm>,
    pub volumes: IndexMap<String, Volume>,
    pub snapshots: IndexMap<String, Snapshot>,
    pub jobs: IndexMap<String, Job>,
    /// By-id links deliberately left behind on detach (fault injection), for cleanup.
    #[serde(default)]
    pub leftover_links: Vec<PathBuf>,
    #[serde(skip)]
    dirty: BTreeSet<Key>,
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

/// The VMs of a fresh cloud: `(name, state, hypervisor)`. The appliance first.
const VMS: [(&str, VmState, Hypervisor); 4] = [
    ("migration-appliance", VmState::Running, Hypervisor::Kvm),
    ("workload-1", VmState::Running, Hypervisor::Kvm),
    ("workload-2", VmState::Running, Hypervisor::Kvm),
    ("legacy-vmware", VmState::Stopped, Hypervisor::VMware),
];

impl State {
    /// A fresh cloud: one zone, a 5 GB and a custom-size disk offering, a service offering, a template,
    /// a network, the appliance and two other running KVM VMs and a stopped VMware VM, each with its ROOT
    /// volume at device 0.
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
            service_offering: ServiceOffering {
                id: String::new(),
                name: "Medium Instance".to_owned(),
                cpus: 2,
                cpu_mhz: 1000,
                memory_mb: 4096,
            },
            template: Template {
                id: String::new(),
                name: "debian-12".to_owned(),
                os_type_id: String::new(),
                os_type_name: "Debian GNU/Linux 12 (64-bit)".to_owned(),
            },
            network: Network {
                id: String::new(),
                name: "sim-network".to_owned(),
                public_ip_id: String::new(),
                public_ip: "203.0.113.10".to_owned(),
            },
            appliance_vm_id: String::new(),
            vms: Vec::new(),
            volumes: IndexMap::new(),
            snapshots: IndexMap::new(),
            jobs: IndexMap::new(),
            leftover_links: Vec::new(),
            dirty: BTreeSet::new(),
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
                min_gb: 5,
                max_gb: 5,
                created: created.clone(),
            },
            Offering {
                id: st.next_id(),
                name: "Custom".to_owned(),
                displaytext: "Custom Disk".to_owned(),
                size_gb: None,
                min_gb: CUSTOM_SIZE_MIN_GB,
                max_gb: CUSTOM_SIZE_MAX_GB,
                created: created.clone(),
            },
        ];
        let appliance = appliance_vm_id.unwrap_or_else(|| st.next_id());
        let others = [st.next_id(), st.next_id(), st.next_id()];
        st.service_offering.id = st.next_id();
        st.template.id = st.next_id();
        st.template.os_type_id = st.next_id();
        st.network.id = st.next_id();
        st.network.public_ip_id = st.next_id();
        st.appliance_vm_id = appliance.clone();
        let ids = [
            appliance,
            others[0].clone(),
            others[1].clone(),
            others[2].clone(),
        ];
        for (n, (id, (name, state, hypervisor))) in ids.into_iter().zip(VMS).enumerate() {
            let nic_id = st.next_id();
            st.vms.push(Vm {
                id: id.clone(),
                name: name.to_owned(),
                instance_name: format!("i-2-{}-VM", 100 + n),
                created: created.clone(),
                state,
                hypervisor,
                ip: format!("10.1.1.{}", 10 + n),
                mac: format!("02:00:4c:5a:00:{:02x}", 10 + n),
                nic_id,
            });
            let root_id = st.next_id();
            st.volumes.insert(
                root_id.clone(),
                Volume {
                    id: root_id,
                    name: format!("ROOT-{}", 100 + n),
                    size: ROOT_SIZE,
                    offering_id: None,
                    state: VolumeState::Ready,
                    created: created.clone(),
                    attachment: Some(Attachment {
                        vm_id: id,
                        device_id: 0,
                        attached: created.clone(),
                        device: None,
                        link: None,
                        loop_device: false,
                    }),
                    tags: Vec::new(),
                },
            );
        }
        st
    }

    /// The next deterministic id.
    pub fn next_id(&mut self) -> String {
        let id = seeded_uuid(self.seed, self.next_seq);
        self.next_seq += 1;
        self.dirty.insert(Key::Meta);
        id
    }

    /// Takes the set of entities changed since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<Key> {
        std::mem::take(&mut self.dirty)
    }

    pub fn vm(&self, id: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.id == id)
    }

    pub fn vm_mut(&mut self, id: &str) -> Option<&mut Vm> {
        self.dirty.insert(Key::Vm(id.to_owned()));
        self.vms.iter_mut().find(|v| v.id == id)
    }

    pub fn insert_vm(&mut self, vm: Vm) {
        self.dirty.insert(Key::Vm(vm.id.clone()));
        self.vms.push(vm);
    }

    pub fn remove_vm(&mut self, id: &str) -> Option<Vm> {
        self.dirty.insert(Key::Vm(id.to_owned()));
        let at = self.vms.iter().position(|v| v.id == id)?;
        Some(self.vms.remove(at))
    }

    pub fn volume(&self, id: &str) -> Option<&Volume> {
        self.volumes.get(id)
    }

    pub fn volume_mut(&mut self, id: &str) -> Option<&mut Volume> {
        self.dirty.insert(Key::Volume(id.to_owned()));
        self.volumes.get_mut(id)
    }

    pub fn insert_volume(&mut self, v: Volume) {
        self.dirty.insert(Key::Volume(v.id.clone()));
        self.volumes.insert(v.id.clone(), v);
    }

    pub fn remove_volume(&mut self, id: &str) -> Option<Volume> {
        self.dirty.insert(Key::Volume(id.to_owned()));
        self.volumes.shift_remove(id)
    }

    pub fn snapshot(&self, id: &str) -> Option<&Snapshot> {
        self.snapshots.get(id)
    }

    pub fn snapshot_mut(&mut self, id: &str) -> Option<&mut Snapshot> {
        self.dirty.insert(Key::Snapshot(id.to_owned()));
        self.snapshots.get_mut(id)
    }

    pub fn insert_snapshot(&mut self, s: Snapshot) {
        self.dirty.insert(Key::Snapshot(s.id.clone()));
        self.snapshots.insert(s.id.clone(), s);
    }

    pub fn remove_snapshot(&mut self, id: &str) -> Option<Snapshot> {
        self.dirty.insert(Key::Snapshot(id.to_owned()));
        self.snapshots.shift_remove(id)
    }

    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }

    pub fn job_mut(&mut self, id: &str) -> Option<&mut Job> {
        self.dirty.insert(Key::Job(id.to_owned()));
        self.jobs.get_mut(id)
    }

    pub fn insert_job(&mut self, j: Job) {
        self.dirty.insert(Key::Job(j.id.clone()));
        self.jobs.insert(j.id.clone(), j);
    }

    pub fn add_leftover_link(&mut self, link: PathBuf) {
        self.dirty.insert(Key::Meta);
        self.leftover_links.push(link);
    }

    pub fn offering(&self, id: &str) -> Option<&Offering> {
        self.offerings.iter().find(|o| o.id == id)
    }

    /// Volumes attached to a VM.
    pub fn attached_to<'a>(&'a self, vm_id: &'a str) -> impl Iterator<Item = &'a Volume> + 'a {
        self.volumes
            .values()
            .filter(move |v| v.attachment.as_ref().is_some_and(|a| a.vm_id == vm_id))
    }

    /// Device slots in use on a VM.
    pub fn used_device_ids(&self, vm_id: &str) -> Vec<u32> {
        self.attached_to(vm_id)
            .filter_map(|v| v.attachment.as_ref().map(|a| a.device_id))
            .collect()
    }

    /// Checks an attach of `volume_id` to `vm_id` and returns the slot it gets, with the checks of
    /// CloudStack's `VolumeApiServiceImpl.attachVolumeToVM` (root rules in `checkDeviceId` and
    /// `validateRootVolumeDetachAttach`, the data-disk limit from `getMaxDataVolumesSupported`) and
    /// `getDeviceId`.
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
        let vm = self
            .vm(vm_id)
            .ok_or_else(|| CsError::param(format!("Unable to find VM with ID: {vm_id}")))?;
        if !matches!(vm.state, VmState::Running | VmState::Stopped) {
            return Err(CsError::param(
                "Please specify a VM that is either running or stopped.",
            ));
        }
        if requested == Some(0) {
            check_root_change(vm)?;
            if self.used_device_ids(vm_id).contains(&0) {
                return Err(CsError::param("Vm already has root volume attached to it"));
            }
        }
        choose_device_id(
            &self.used_device_ids(vm_id),
            requested,
            vm_id,
            vm.hypervisor,
        )
    }
}

/// `validateRootVolumeDetachAttach`: a ROOT volume is attached or detached only while the VM is stopped.
pub fn check_root_change(vm: &Vm) -> Result<(), CsError> {
    if matches!(vm.state, VmState::Stopped | VmState::Destroyed) {
        Ok(())
    } else {
        Err(CsError::param(
            "Root volume detach can happen only when vm is in states: Stopped or Destroyed",
        ))
    }
}

/// Picks the device slot: a requested slot must be `0..=max` (max from the hypervisor's data-disk limit),
/// not 3 and free; otherwise the lowest free slot from 1 skipping 3. Data disks beyond the hypervisor's
/// limit are refused with CloudStack's text.
pub fn choose_device_id(
    used: &[u32],
    requested: Option<u32>,
    vm_id: &str,
    hypervisor: Hypervisor,
) -> Result<u32, CsError> {
    let limit = hypervisor.max_data_volumes();
    let max_device_id = hypervisor.max_device_id();
    let data_disks = used.iter().filter(|&&d| d != 0).count();
    let wants_root = requested == Some(0);
    if !wants_root && data_disks >= limit as usize {
        return Err(CsError::param(format!(
            "The specified VM already has the maximum number of data disks ({limit}) attached. \
             Please specify another VM."
        )));
    }
    match requested {
        Some(d) => {
            if d > max_device_id || d == CDROM_DEVICE_ID {
                return Err(CsError::internal(format!(
                    "deviceId should be 0 ≤ deviceId ≤ {max_device_id} and ≠ {CDROM_DEVICE_ID}"
                )));
            }
            if used.contains(&d) {
                return Err(CsError::internal(format!(
                    "deviceId {d} is used by vm {vm_id}"
                )));
            }
            Ok(d)
        }
        None => (1..=max_device_id)
            .filter(|&d| d != CDROM_DEVICE_ID)
            .find(|d| !used.contains(d))
            .ok_or_else(|| CsError::internal(format!("All device Ids are used by vm {vm_id}"))),
    }
}

/// Which slice of a list to return, by `BaseListCmd`/`ParamProcessWorker` rules: `page` and `pagesize`
/// come together, `pagesize` is at most `max` (`default.page.size`), `-1` is unlimited (without `page`),
/// and no paging at all returns the first `max` items.
pub fn page_window(
    page: Option<i64>,
    pagesize: Option<i64>,
    max: u64,
) -> Result<(usize, Option<usize>), CsError> {
    let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    match (page, pagesize) {
        (None, None) => Ok((0, Some(to_usize(max)))),
        (None, Some(-1)) => Ok((0, None)),
        (Some(_), Some(-1)) => Err(CsError::api_param(
            "Can't specify page parameter when pagesize is -1 (Unlimited)",
        )),
        (None, Some(_)) => Err(CsError::api_param(
            "\"page\" parameter is required when \"pagesize\" is specified",
        )),
        (Some(_), None) => Err(CsError::api_param(
            "\"pagesize\" parameter is required when \"page\" is specified",
        )),
        (Some(page), Some(size)) => {
            let size = u64::try_from(size)
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| CsError::api_param(format!("Invalid pagesize: {size}")))?;
            if size > max {
                return Err(CsError::param(format!(
                    "Page size can't exceed max allowed page size value: {max}"
                )));
            }
            let page = u64::try_from(page.max(1)).unwrap_or(1);
            Ok((
                to_usize((page - 1).saturating_mul(size)),
                Some(to_usize(size)),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM: Hypervisor = Hypervisor::Kvm;

    #[test]
    fn next_free_slot_skips_cdrom_and_root() {
        assert_eq!(choose_device_id(&[], None, "vm", KVM), Ok(1));
        assert_eq!(choose_device_id(&[1, 2], None, "vm", KVM), Ok(4));
        assert_eq!(choose_device_id(&[0, 1, 2, 4], None, "vm", KVM), Ok(5));
        assert_eq!(choose_device_id(&[1, 4], None, "vm", KVM), Ok(2));
    }

    #[test]
    fn requested_slots_follow_cloudstack_rules() {
        assert_eq!(choose_device_id(&[1], Some(0), "vm", KVM), Ok(0));
        assert_eq!(
            choose_device_id(&[0], Some(0), "vm", KVM).map_err(|e| e.errortext),
            Err("deviceId 0 is used by vm vm".into())
        );
        assert_eq!(
            choose_device_id(&[], Some(3), "vm", KVM).map_err(|e| e.errorcode),
            Err(530)
        );
        assert_eq!(
            choose_device_id(&[], Some(KVM.max_device_id() + 1), "vm", KVM)
                .map_err(|e| e.errorcode),
            Err(530)
        );
        assert_eq!(choose_device_id(&[], Some(5), "vm", KVM), Ok(5));
        assert_eq!(
            choose_device_id(&[], Some(20), "vm", Hypervisor::VMware),
            Ok(20)
        );
    }

    #[test]
    fn data_disk_limit_is_per_hypervisor_with_cloudstack_text() {
        let full = [1, 2, 4, 5, 6, 7];
        let err = choose_device_id(&full, None, "vm", KVM).expect_err("limit");
        assert_eq!(err.errorcode, 431);
        assert_eq!(
            err.errortext,
            "The specified VM already has the maximum number of data disks (6) attached. Please specify another VM."
        );
        // The root slot stays available; VMware takes more.
        assert_eq!(choose_device_id(&full, Some(0), "vm", KVM), Ok(0));
        assert_eq!(
            choose_device_id(&full, None, "vm", Hypervisor::VMware),
            Ok(8)
        );
        let xen: Vec<u32> = (1..=14).filter(|d| *d != 3).collect();
        assert!(choose_device_id(&xen, None, "vm", Hypervisor::XenServer)
            .expect_err("xen limit")
            .errortext
            .contains("(13)"));
    }

    #[test]
    fn paging_rules() {
        assert_eq!(page_window(None, None, 500), Ok((0, Some(500))));
        assert_eq!(page_window(None, Some(-1), 500), Ok((0, None)));
        assert_eq!(page_window(Some(3), Some(10), 500), Ok((20, Some(10))));
        let text = |r: Result<(usize, Option<usize>), CsError>| r.expect_err("refused").errortext;
        assert_eq!(
            text(page_window(None, Some(10), 500)),
            "\"page\" parameter is required when \"pagesize\" is specified"
        );
        assert_eq!(
            text(page_window(Some(1), None, 500)),
            "\"pagesize\" parameter is required when \"page\" is specified"
        );
        assert_eq!(
            text(page_window(Some(1), Some(501), 500)),
            "Page size can't exceed max allowed page size value: 500"
        );
        assert!(page_window(Some(1), Some(-1), 500).is_err());
    }

    #[test]
    fn ids_are_deterministic_under_seed() {
        assert_eq!(seeded_uuid(7, 3), seeded_uuid(7, 3));
        assert_ne!(seeded_uuid(7, 3), seeded_uuid(8, 3));
        let a = State::new(42, None);
        let b = State::new(42, None);
        assert_eq!(a.appliance_vm_id, b.appliance_vm_id);
        assert_eq!(a.zone.id, b.zone.id);
        assert_eq!(a.vms.len(), 4);
        // Every VM has its ROOT volume at device 0.
        for vm in &a.vms {
            assert_eq!(a.attached_to(&vm.id).filter(|v| v.is_root()).count(), 1);
        }
    }

    #[test]
    fn root_attach_rules() {
        let mut st = State::new(1, None);
        let vm = st.vms[1].id.clone();
        let id = st.next_id();
        st.insert_volume(Volume {
            id: id.clone(),
            name: "new-root".into(),
            size: GIB,
            offering_id: None,
            state: VolumeState::Allocated,
            created: now_string(),
            attachment: None,
            tags: Vec::new(),
        });
        let err = st.plan_attach(&id, &vm, Some(0)).expect_err("running");
        assert_eq!(
            (err.errorcode, err.errortext.as_str()),
            (
                431,
                "Root volume detach can happen only when vm is in states: Stopped or Destroyed"
            )
        );
        st.vm_mut(&vm).expect("vm").state = VmState::Stopped;
        let err = st.plan_attach(&id, &vm, Some(0)).expect_err("has a root");
        assert_eq!(
            (err.errorcode, err.errortext.as_str()),
            (431, "Vm already has root volume attached to it")
        );
        let root = st
            .attached_to(&vm)
            .find(|v| v.is_root())
            .expect("root")
            .id
            .clone();
        st.volume_mut(&root).expect("root").attachment = None;
        assert_eq!(st.plan_attach(&id, &vm, Some(0)), Ok(0));
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
