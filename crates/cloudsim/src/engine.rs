//! The simulated cloud: owns the state, executes API commands and asynchronous jobs, applies faults and
//! saves the state atomically after every change. Knows nothing of HTTP.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::devices::Devices;
use crate::error::SimError;
use crate::faults::FaultHandle;
use crate::model::{
    Attachment, CsError, Job, JobAction, JobOutcome, State, Volume, VolumeState, GIB,
};

/// Request parameters in arrival order; names are looked up case-insensitively.
#[derive(Debug, Clone, Default)]
pub(crate) struct Params(pub Vec<(String, String)>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn require(&self, command: &str, name: &str) -> Result<&str, CsError> {
        self.get(name)
            .ok_or_else(|| CsError::missing(command, name))
    }

    fn number(&self, command: &str, name: &str) -> Result<Option<u64>, CsError> {
        self.get(name)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| CsError::invalid(command, name, v))
            })
            .transpose()
    }
}

/// The simulator's shared core.
#[derive(Debug)]
pub(crate) struct Engine {
    state: Mutex<State>,
    state_path: PathBuf,
    pub faults: FaultHandle,
    pub devices: Devices,
    job_delay: Duration,
    stopped: AtomicBool,
    cancel: tokio::sync::watch::Sender<bool>,
}

/// Saves `state` to `path` atomically: write a temporary file, sync it, rename it over the old one.
pub(crate) fn save_state(path: &Path, state: &State) -> Result<(), SimError> {
    use std::io::Write as _;
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(state).expect("invariant: the state serializes to JSON");
    let mut f = std::fs::File::create(&tmp).map_err(SimError::io("write state file", &tmp))?;
    f.write_all(&body)
        .map_err(SimError::io("write state file", &tmp))?;
    f.sync_all()
        .map_err(SimError::io("sync state file", &tmp))?;
    std::fs::rename(&tmp, path).map_err(SimError::io("replace state file", path))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Loads the state saved at `path`, if any.
pub(crate) fn load_state(path: &Path) -> Result<Option<State>, SimError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| SimError::CorruptState {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SimError::io("read state file", path)(e)),
    }
}

fn list_body(key: &str, items: Vec<Value>, total: usize) -> Value {
    if total == 0 {
        return json!({});
    }
    let mut m = Map::new();
    m.insert("count".into(), json!(total));
    if !items.is_empty() {
        m.insert(key.into(), Value::Array(items));
    }
    Value::Object(m)
}

fn internal(e: &SimError) -> CsError {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    CsError::internal(text)
}

impl Engine {
    pub fn new(
        state: State,
        state_path: PathBuf,
        faults: FaultHandle,
        devices: Devices,
        job_delay: Duration,
    ) -> Self {
        Self {
            state: Mutex::new(state),
            state_path,
            faults,
            devices,
            job_delay,
            stopped: AtomicBool::new(false),
            cancel: tokio::sync::watch::Sender::new(false),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, st: &State) -> Result<(), CsError> {
        save_state(&self.state_path, st).map_err(|e| {
            tracing::error!(error = %e, "saving simulator state failed");
            internal(&e)
        })
    }

    /// Stops job processing: pending jobs stay pending in the saved state.
    pub fn stop(&self) {
        let _guard = self.lock();
        self.stopped.store(true, Ordering::SeqCst);
        self.cancel.send_replace(true);
    }

    /// Re-creates the appliance's devices and links from the state, and restarts pending jobs.
    pub fn recover(self: &Arc<Self>) -> Result<(), SimError> {
        let mut st = self.lock();
        let appliance = st.appliance_vm_id.clone();
        for vol in st.volumes.iter_mut() {
            let Some(att) = vol.attachment.as_mut() else {
                continue;
            };
            if att.vm_id != appliance || att.device.is_none() {
                continue;
            }
            let exposed = self.devices.recover(&vol.id)?;
            att.device = Some(exposed.device.clone());
            att.loop_device = exposed.loop_device;
            if att.link.is_some() {
                att.link = Some(self.devices.link(&vol.id, &exposed.device)?);
            }
        }
        save_state(&self.state_path, &st)?;
        let pending: Vec<(String, u64)> = st
            .jobs
            .iter()
            .filter(|j| j.is_pending())
            .map(|j| (j.id.clone(), j.extra_delay_ms))
            .collect();
        drop(st);
        for (id, extra) in pending {
            self.spawn_job(id, Duration::from_millis(extra));
        }
        Ok(())
    }

    /// Removes every loop device and link this simulator made, without changing the state.
    pub fn detach_all_devices(&self) {
        let st = self.lock();
        for vol in &st.volumes {
            let Some(att) = &vol.attachment else { continue };
            if let Some(link) = &att.link {
                let _ = self.devices.unlink(link);
            }
            if let Some(dev) = &att.device {
                if let Err(e) = self.devices.release(dev, att.loop_device) {
                    tracing::warn!(error = %e, "releasing a device failed");
                }
            }
        }
        for link in &st.leftover_links {
            let _ = self.devices.unlink(link);
        }
    }

    // ---- rendering -------------------------------------------------------------------------------

    /// The volume object; `faulted` applies the wrong-size fault to `size`.
    pub fn volume_json(&self, st: &State, v: &Volume, faulted: bool) -> Value {
        let offering = st.offering(&v.offering_id);
        let mut m = json!({
            "id": v.id,
            "name": v.name,
            "zoneid": st.zone.id,
            "zonename": st.zone.name,
            "type": if v.attachment.as_ref().is_some_and(|a| a.device_id == 0) { "ROOT" } else { "DATADISK" },
            "size": if faulted { self.faults.reported_size(&v.id, v.size) } else { v.size },
            "created": v.created,
            "state": v.state.as_str(),
            "account": "admin",
            "accountid": st.account_id,
            "domainid": st.domain_id,
            "domain": "ROOT",
            "storagetype": "shared",
            "provisioningtype": "thin",
            "hypervisor": if v.state == VolumeState::Allocated { "None" } else { "KVM" },
            "diskofferingid": v.offering_id,
            "diskofferingname": offering.map(|o| o.name.clone()),
            "diskofferingdisplaytext": offering.map(|o| o.displaytext.clone()),
            "storage": if v.state == VolumeState::Allocated { "none" } else { "sim-primary" },
            "destroyed": false,
            "isextractable": true,
            "displayvolume": true,
        });
        if let (Some(att), Some(obj)) = (&v.attachment, m.as_object_mut()) {
            let vm = st.vm(&att.vm_id);
            obj.insert("deviceid".into(), json!(att.device_id));
            obj.insert("virtualmachineid".into(), json!(att.vm_id));
            obj.insert("vmname".into(), json!(vm.map(|v| v.name.clone())));
            obj.insert("vmdisplayname".into(), json!(vm.map(|v| v.name.clone())));
            obj.insert("vmstate".into(), json!("Running"));
            obj.insert("vmtype".into(), json!("User"));
            obj.insert("attached".into(), json!(att.attached));
            obj.insert("path".into(), json!(v.id));
        }
        m
    }

    fn vm_json(&self, st: &State, vm: &crate::model::Vm) -> Value {
        json!({
            "id": vm.id,
            "name": vm.name,
            "displayname": vm.name,
            "instancename": vm.instance_name,
            "account": "admin",
            "domainid": st.domain_id,
            "domain": "ROOT",
            "created": vm.created,
            "state": "Running",
            "haenable": false,
            "zoneid": st.zone.id,
            "zonename": st.zone.name,
            "hypervisor": "KVM",
            "cpunumber": 2,
            "memory": 4096,
            "rootdeviceid": 0,
            "rootdevicetype": "ROOT",
            "passwordenabled": false,
            "nic": [],
            "tags": [],
        })
    }

    fn job_json(&self, st: &State, j: &Job) -> Value {
        let mut m = json!({
            "accountid": st.account_id,
            "userid": st.user_id,
            "cmd": j.action.cmd_class(),
            "created": j.created,
            "jobid": j.id,
            "jobinstanceid": j.volume_id,
            "jobinstancetype": "Volume",
            "jobprocstatus": 0,
        });
        let obj = m
            .as_object_mut()
            .expect("invariant: json! of an object literal is an object");
        match &j.outcome {
            JobOutcome::Pending => {
                obj.insert("jobstatus".into(), json!(0));
                obj.insert("jobresultcode".into(), json!(0));
            }
            JobOutcome::Succeeded { volume, completed } => {
                let mut volume = volume.clone();
                if let Some(size) = volume.get("size").and_then(Value::as_u64) {
                    volume["size"] = json!(self.faults.reported_size(&j.volume_id, size));
                }
                obj.insert("jobstatus".into(), json!(1));
                obj.insert("jobresultcode".into(), json!(0));
                obj.insert("jobresulttype".into(), json!("object"));
                obj.insert("jobresult".into(), json!({ "volume": volume }));
                obj.insert("completed".into(), json!(completed));
            }
            JobOutcome::Failed { error, completed } => {
                obj.insert("jobstatus".into(), json!(2));
                obj.insert("jobresultcode".into(), json!(530));
                obj.insert("jobresulttype".into(), json!("object"));
                obj.insert(
                    "jobresult".into(),
                    json!({ "errorcode": error.errorcode, "errortext": error.errortext }),
                );
                obj.insert("completed".into(), json!(completed));
            }
        }
        m
    }

    // ---- commands --------------------------------------------------------------------------------

    /// Executes one API command; `command` is the name as sent. Returns the body inside `<command>response`.
    pub fn execute(self: &Arc<Self>, command: &str, p: &Params) -> Result<Value, CsError> {
        match command.to_ascii_lowercase().as_str() {
            "listzones" => Ok(self.list_zones(p)),
            "listdiskofferings" => Ok(self.list_disk_offerings(p)),
            "listvirtualmachines" => Ok(self.list_vms(p)),
            "listvolumes" => self.list_volumes(command, p),
            "createvolume" => self.create_volume(command, p),
            "attachvolume" => self.attach_volume(command, p),
            "detachvolume" => self.detach_volume(command, p),
            "deletevolume" => self.delete_volume(command, p),
            "queryasyncjobresult" => self.query_job(command, p),
            "listasyncjobs" => Ok(self.list_jobs()),
            _ => Err(CsError {
                errorcode: 432,
                cserrorcode: 9999,
                errortext: "The given command does not exist or it is not available for user"
                    .to_owned(),
            }),
        }
    }

    fn list_zones(&self, p: &Params) -> Value {
        let st = self.lock();
        let z = &st.zone;
        let items: Vec<Value> = [z]
            .into_iter()
            .filter(|z| p.get("id").is_none_or(|id| id == z.id))
            .filter(|z| p.get("name").is_none_or(|n| n == z.name))
            .map(|z| {
                json!({
                    "id": z.id, "name": z.name, "networktype": "Advanced", "allocationstate": "Enabled",
                    "securitygroupsenabled": false, "localstorageenabled": false, "zonetoken": z.id,
                })
            })
            .collect();
        let n = items.len();
        list_body("zone", items, n)
    }

    fn list_disk_offerings(&self, p: &Params) -> Value {
        let st = self.lock();
        let items: Vec<Value> = st
            .offerings
            .iter()
            .filter(|o| p.get("id").is_none_or(|id| id == o.id))
            .filter(|o| p.get("name").is_none_or(|n| n == o.name))
            .map(|o| {
                json!({
                    "id": o.id, "name": o.name, "displaytext": o.displaytext,
                    "disksize": o.size_gb.unwrap_or(0), "iscustomized": o.size_gb.is_none(),
                    "created": o.created, "storagetype": "shared", "provisioningtype": "thin",
                })
            })
            .collect();
        let n = items.len();
        list_body("diskoffering", items, n)
    }

    fn list_vms(&self, p: &Params) -> Value {
        let st = self.lock();
        let items: Vec<Value> = st
            .vms
            .iter()
            .filter(|v| p.get("id").is_none_or(|id| id == v.id))
            .filter(|v| p.get("name").is_none_or(|n| n == v.name))
            .filter(|_| {
                p.get("state")
                    .is_none_or(|s| s.eq_ignore_ascii_case("Running"))
            })
            .filter(|_| p.get("zoneid").is_none_or(|z| z == st.zone.id))
            .map(|v| self.vm_json(&st, v))
            .collect();
        let n = items.len();
        list_body("virtualmachine", items, n)
    }

    fn list_volumes(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let page = p.number(command, "page")?;
        let pagesize = p.number(command, "pagesize")?;
        let st = self.lock();
        let matched: Vec<&Volume> = st
            .volumes
            .iter()
            .filter(|v| p.get("id").is_none_or(|id| id == v.id))
            .filter(|v| p.get("name").is_none_or(|n| n == v.name))
            .filter(|v| p.get("keyword").is_none_or(|k| v.name.contains(k)))
            .filter(|v| {
                p.get("virtualmachineid")
                    .is_none_or(|vm| v.attachment.as_ref().is_some_and(|a| a.vm_id == vm))
            })
            .filter(|v| {
                p.get("state")
                    .is_none_or(|s| s.eq_ignore_ascii_case(v.state.as_str()))
            })
            .filter(|_| p.get("zoneid").is_none_or(|z| z == st.zone.id))
            .filter(|v| {
                p.get("type").is_none_or(|t| {
                    let is_root = v.attachment.as_ref().is_some_and(|a| a.device_id == 0);
                    t.eq_ignore_ascii_case(if is_root { "ROOT" } else { "DATADISK" })
                })
            })
            .collect();
        let total = matched.len();
        let (skip, take) = match (page, pagesize) {
            (_, Some(0)) => return Err(CsError::invalid(command, "pagesize", "0")),
            (Some(page), Some(size)) => ((page.max(1) - 1).saturating_mul(size), size),
            (None, Some(size)) => (0, size),
            (Some(_), None) => (0, u64::MAX),
            (None, None) => (0, u64::MAX),
        };
        let items: Vec<Value> = matched
            .into_iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .take(usize::try_from(take).unwrap_or(usize::MAX))
            .map(|v| self.volume_json(&st, v, true))
            .collect();
        Ok(list_body("volume", items, total))
    }

    fn create_volume(self: &Arc<Self>, command: &str, p: &Params) -> Result<Value, CsError> {
        let offering_id = p.require(command, "diskofferingid")?;
        let zone_id = p.require(command, "zoneid")?;
        let size_gb = p.number(command, "size")?;
        let mut st = self.lock();
        if zone_id != st.zone.id {
            return Err(CsError::invalid(command, "zoneid", zone_id));
        }
        let offering = st
            .offering(offering_id)
            .ok_or_else(|| CsError::invalid(command, "diskofferingid", offering_id))?;
        let gb = match (offering.size_gb, size_gb) {
            (Some(fixed), None) => fixed,
            (Some(_), Some(_)) => {
                return Err(CsError::param(
                    "This disk offering does not allow custom size, please specify a disk offering that allows custom size",
                ))
            }
            (None, None) => return Err(CsError::param("This disk offering requires a custom size specified")),
            (None, Some(0)) => return Err(CsError::param("Invalid size for custom volume creation: 0")),
            (None, Some(gb)) => gb,
        };
        let size = gb
            .checked_mul(GIB)
            .ok_or_else(|| CsError::invalid(command, "size", &gb.to_string()))?;
        let offering_id = offering.id.clone();
        let id = st.next_id();
        let name = p
            .get("name")
            .map_or_else(|| format!("volume-{}", &id[..8]), str::to_owned);
        self.devices
            .create_backing(&id, size)
            .map_err(|e| internal(&e))?;
        st.volumes.push(Volume {
            id: id.clone(),
            name,
            size,
            offering_id,
            state: VolumeState::Allocated,
            created: crate::model::now_string(),
            attachment: None,
        });
        let jobid = self.submit(&mut st, &id, JobAction::Create)?;
        Ok(json!({ "id": id, "jobid": jobid }))
    }

    fn attach_volume(self: &Arc<Self>, command: &str, p: &Params) -> Result<Value, CsError> {
        let id = p.require(command, "id")?;
        let vm_id = p.require(command, "virtualmachineid")?;
        let device_id = p
            .number(command, "deviceid")?
            .map(|d| {
                u32::try_from(d).map_err(|_| CsError::invalid(command, "deviceid", &d.to_string()))
            })
            .transpose()?;
        let mut st = self.lock();
        if st.volume(id).is_none() {
            return Err(CsError::invalid(command, "id", id));
        }
        if st.vm(vm_id).is_none() {
            return Err(CsError::invalid(command, "virtualmachineid", vm_id));
        }
        let jobid = self.submit(
            &mut st,
            id,
            JobAction::Attach {
                vm_id: vm_id.to_owned(),
                device_id,
            },
        )?;
        Ok(json!({ "jobid": jobid }))
    }

    fn detach_volume(self: &Arc<Self>, command: &str, p: &Params) -> Result<Value, CsError> {
        let mut st = self.lock();
        let id = match p.get("id") {
            Some(id) => {
                if st.volume(id).is_none() {
                    return Err(CsError::invalid(command, "id", id));
                }
                id.to_owned()
            }
            None => {
                let (Some(vm), Some(dev)) =
                    (p.get("virtualmachineid"), p.number(command, "deviceid")?)
                else {
                    return Err(CsError::param(
                        "Please provide either a volume id, or a tuple(device id, instance id)",
                    ));
                };
                st.volumes
                    .iter()
                    .find(|v| {
                        v.attachment
                            .as_ref()
                            .is_some_and(|a| a.vm_id == vm && u64::from(a.device_id) == dev)
                    })
                    .map(|v| v.id.clone())
                    .ok_or_else(|| {
                        CsError::param(
                            "Unable to find the volume: there is no volume at that device id",
                        )
                    })?
            }
        };
        let jobid = self.submit(&mut st, &id, JobAction::Detach)?;
        Ok(json!({ "jobid": jobid }))
    }

    fn delete_volume(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let id = p.require(command, "id")?;
        let mut st = self.lock();
        let vol = st
            .volume(id)
            .ok_or_else(|| CsError::invalid(command, "id", id))?;
        if vol.attachment.is_some() {
            return Err(CsError::param(
                "Please specify a volume that is not attached to any VM.",
            ));
        }
        self.devices.remove_backing(id).map_err(|e| internal(&e))?;
        st.volumes.retain(|v| v.id != id);
        self.save(&st)?;
        Ok(json!({ "success": "true" }))
    }

    fn query_job(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let id = p.require(command, "jobid")?;
        let st = self.lock();
        let job = st
            .job(id)
            .ok_or_else(|| CsError::invalid(command, "jobid", id))?;
        Ok(self.job_json(&st, job))
    }

    fn list_jobs(&self) -> Value {
        let st = self.lock();
        let items: Vec<Value> = st.jobs.iter().map(|j| self.job_json(&st, j)).collect();
        let n = items.len();
        list_body("asyncjobs", items, n)
    }

    // ---- jobs ------------------------------------------------------------------------------------

    fn submit(
        self: &Arc<Self>,
        st: &mut State,
        volume_id: &str,
        action: JobAction,
    ) -> Result<String, CsError> {
        let extra = self.faults.take_job_delay(action.command());
        let id = st.next_id();
        st.jobs.push(Job {
            id: id.clone(),
            volume_id: volume_id.to_owned(),
            action,
            created: crate::model::now_string(),
            extra_delay_ms: u64::try_from(extra.as_millis()).unwrap_or(u64::MAX),
            outcome: JobOutcome::Pending,
        });
        self.save(st)?;
        self.spawn_job(id.clone(), extra);
        Ok(id)
    }

    fn spawn_job(self: &Arc<Self>, job_id: String, extra: Duration) {
        let engine = Arc::clone(self);
        let mut cancel = self.cancel.subscribe();
        let delay = self.job_delay + extra;
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = cancel.wait_for(|stopped| *stopped) => return,
            }
            let run = tokio::task::spawn_blocking(move || engine.finish_job(&job_id));
            if let Err(e) = run.await {
                tracing::error!(error = %e, "a simulated job panicked");
            }
        });
    }

    fn finish_job(&self, job_id: &str) {
        let mut st = self.lock();
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Some(idx) = st
            .jobs
            .iter()
            .position(|j| j.id == job_id && j.is_pending())
        else {
            return;
        };
        let job = st.jobs[idx].clone();
        let result = match self.faults.take_job_failure(job.action.command()) {
            Some(e) => Err(e),
            None => self.apply(&mut st, &job),
        };
        let completed = crate::model::now_string();
        st.jobs[idx].outcome = match result {
            Ok(volume) => JobOutcome::Succeeded { volume, completed },
            Err(error) => {
                tracing::info!(job = job_id, error = %error.errortext, "simulated job failed");
                JobOutcome::Failed { error, completed }
            }
        };
        if let Err(e) = self.save(&st) {
            tracing::error!(error = %e.errortext, "job result not saved");
        }
    }

    fn apply(&self, st: &mut State, job: &Job) -> Result<Value, CsError> {
        let vid = job.volume_id.as_str();
        let gone = || CsError::param(format!("Unable to find volume with ID: {vid}"));
        match &job.action {
            JobAction::Create => {}
            JobAction::Attach { vm_id, device_id } => {
                let slot = st.plan_attach(vid, vm_id, *device_id)?;
                let mut att = Attachment {
                    vm_id: vm_id.clone(),
                    device_id: slot,
                    attached: crate::model::now_string(),
                    device: None,
                    link: None,
                    loop_device: false,
                };
                if *vm_id == st.appliance_vm_id {
                    let exposed = self.devices.expose(vid).map_err(|e| internal(&e))?;
                    if !self.faults.take_skip_link(vid) {
                        match self.devices.link(vid, &exposed.device) {
                            Ok(link) => att.link = Some(link),
                            Err(e) => {
                                let _ = self.devices.release(&exposed.device, exposed.loop_device);
                                return Err(internal(&e));
                            }
                        }
                    }
                    att.device = Some(exposed.device);
                    att.loop_device = exposed.loop_device;
                }
                let vol = st.volume_mut(vid).ok_or_else(gone)?;
                vol.attachment = Some(att);
                vol.state = VolumeState::Ready;
            }
            JobAction::Detach => {
                let vol = st.volume(vid).ok_or_else(gone)?;
                let Some(att) = vol.attachment.clone() else {
                    return Err(CsError::param(
                        "The specified volume is not attached to a VM.",
                    ));
                };
                if let Some(link) = &att.link {
                    if self.faults.take_keep_link(vid) {
                        st.leftover_links.push(link.clone());
                    } else {
                        self.devices.unlink(link).map_err(|e| internal(&e))?;
                    }
                }
                if let Some(dev) = &att.device {
                    self.devices
                        .release(dev, att.loop_device)
                        .map_err(|e| internal(&e))?;
                }
                st.volume_mut(vid).ok_or_else(gone)?.attachment = None;
            }
        }
        let vol = st.volume(vid).ok_or_else(gone)?;
        Ok(self.volume_json(st, vol, false))
    }
}
