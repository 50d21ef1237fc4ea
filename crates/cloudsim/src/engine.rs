//! The simulated cloud: owns the state and its store, executes API commands and asynchronous jobs,
//! applies faults and actions behind the client's back, and commits every change. Knows nothing of HTTP.
//!
//! Where a rule comes from (CloudStack class or setting) is said next to it, and listed in the README.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::devices::Devices;
use crate::error::SimError;
use crate::faults::FaultHandle;
use crate::model::{
    check_root_change, now_string, page_window, Attachment, CsError, DetachTarget, Hypervisor, Job,
    JobAction, JobOutcome, Snapshot, State, Tag, Vm, VmState, Volume, VolumeState, GIB, ROOT_SIZE,
};
use crate::store::Store;

/// Every command the simulator implements. CloudStack's command names are case-sensitive (its API
/// registry is a plain map): any other name is refused like an unknown command.
pub(crate) const COMMANDS: &[&str] = &[
    "listZones",
    "listDiskOfferings",
    "listServiceOfferings",
    "listTemplates",
    "listOsTypes",
    "listHypervisors",
    "listNetworks",
    "listPublicIpAddresses",
    "listPortForwardingRules",
    "listIpForwardingRules",
    "listVirtualMachines",
    "listVolumes",
    "listSnapshots",
    "listTags",
    "listAsyncJobs",
    "queryAsyncJobResult",
    "createVolume",
    "attachVolume",
    "detachVolume",
    "deleteVolume",
    "stopVirtualMachine",
    "startVirtualMachine",
    "destroyVirtualMachine",
    "createSnapshot",
    "deleteSnapshot",
    "revertSnapshot",
    "createTags",
    "deleteTags",
];

/// Template filters `listTemplates` accepts (`TemplateFilter` in CloudStack's `VirtualMachineTemplate`).
const TEMPLATE_FILTERS: &[&str] = &[
    "featured",
    "self",
    "selfexecutable",
    "sharedexecutable",
    "executable",
    "community",
    "all",
];

/// Request parameters in arrival order; names are looked up case-insensitively (CloudStack lower-cases
/// parameter names before binding them).
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

    fn int(&self, command: &str, name: &str) -> Result<Option<i64>, CsError> {
        self.get(name)
            .map(|v| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| CsError::invalid(command, name, v))
            })
            .transpose()
    }

    /// A comma-separated list parameter (`resourceids=a,b`).
    fn list(&self, name: &str) -> Vec<String> {
        self.get(name)
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A map parameter: `tags[0].key=k&tags[0].value=v` → `[(k, Some(v))]`, in index order.
    fn map(&self, name: &str) -> Vec<(String, Option<String>)> {
        let mut entries: std::collections::BTreeMap<u64, (Option<String>, Option<String>)> =
            std::collections::BTreeMap::new();
        let prefix = format!("{}[", name.to_ascii_lowercase());
        for (k, v) in &self.0 {
            let k = k.to_ascii_lowercase();
            let Some(rest) = k.strip_prefix(&prefix) else {
                continue;
            };
            let Some((idx, field)) = rest.split_once("].") else {
                continue;
            };
            let Ok(idx) = idx.parse::<u64>() else {
                continue;
            };
            let e = entries.entry(idx).or_default();
            match field {
                "key" => e.0 = Some(v.clone()),
                "value" => e.1 = Some(v.clone()),
                _ => {}
            }
        }
        entries
            .into_values()
            .filter_map(|(k, v)| k.map(|k| (k, v)))
            .collect()
    }
}

fn eq_ci(a: &str, b: &str) -> bool {
    a.to_lowercase() == b.to_lowercase()
}

fn contains_ci(hay: &str, needle: &str) -> bool {
    hay.to_lowercase().contains(&needle.to_lowercase())
}

/// The state and its store, changed together under one lock.
#[derive(Debug)]
pub(crate) struct Shared {
    pub st: State,
    store: Store,
}

/// The simulator's shared core.
#[derive(Debug)]
pub(crate) struct Engine {
    shared: Mutex<Shared>,
    pub faults: FaultHandle,
    pub devices: Devices,
    job_delay: Duration,
    page_size: u64,
    stopped: AtomicBool,
    cancel: tokio::sync::watch::Sender<bool>,
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
    CsError::internal(volume_api::error_chain(e))
}

impl crate::faults::Actions for Engine {
    fn set_vm_state(&self, vm_id: &str, state: VmState) -> Result<Value, CsError> {
        Engine::set_vm_state(self, vm_id, state)
    }
    fn force_detach(&self, volume_id: &str) -> Result<Value, CsError> {
        Engine::force_detach(self, volume_id)
    }
    fn deploy_vm(&self, name: &str) -> Result<Value, CsError> {
        Engine::deploy_vm(self, name)
    }
}

impl Engine {
    /// Opens the store in `state_dir` (a fresh cloud from `fresh` when there is none).
    pub fn open(
        state_dir: &Path,
        fresh: impl FnOnce() -> State,
        faults: FaultHandle,
        devices: Devices,
        job_delay: Duration,
        page_size: u64,
    ) -> Result<Self, SimError> {
        let (store, st) = Store::open(state_dir, fresh)?;
        Ok(Self {
            shared: Mutex::new(Shared { st, store }),
            faults,
            devices,
            job_delay,
            page_size,
            stopped: AtomicBool::new(false),
            cancel: tokio::sync::watch::Sender::new(false),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn commit(&self, g: &mut Shared) -> Result<(), CsError> {
        let Shared { st, store } = g;
        store.commit(st).map_err(|e| {
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

    /// Makes sure every volume has its backing file, re-creates the appliance's devices and links from
    /// the state, and restarts pending jobs.
    pub fn recover(self: &Arc<Self>) -> Result<(), SimError> {
        let mut g = self.lock();
        let st = &mut g.st;
        let appliance = st.appliance_vm_id.clone();
        let ids: Vec<String> = st.volumes.keys().cloned().collect();
        for id in ids {
            let Some(vol) = st.volume(&id) else { continue };
            if !self.devices.backing_path(&id).exists() {
                self.devices.create_backing(&id, vol.size)?;
            }
            let Some(att) = &vol.attachment else { continue };
            if att.vm_id != appliance || att.device.is_none() {
                continue;
            }
            let had_link = att.link.is_some();
            let exposed = self.devices.recover(&id)?;
            let link = if had_link {
                Some(self.devices.link(&id, &exposed.device)?)
            } else {
                None
            };
            if let Some(att) = st.volume_mut(&id).and_then(|v| v.attachment.as_mut()) {
                att.device = Some(exposed.device);
                att.loop_device = exposed.loop_device;
                att.link = link;
            }
        }
        let Shared { st, store } = &mut *g;
        store.commit(st)?;
        let pending: Vec<(String, u64)> = st
            .jobs
            .values()
            .filter(|j| j.is_pending())
            .map(|j| (j.id.clone(), j.extra_delay_ms))
            .collect();
        drop(g);
        for (id, extra) in pending {
            self.spawn_job(id, Duration::from_millis(extra));
        }
        Ok(())
    }

    /// Removes every loop device and link this simulator made, without changing the state.
    pub fn detach_all_devices(&self) {
        let g = self.lock();
        for vol in g.st.volumes.values() {
            let Some(att) = &vol.attachment else { continue };
            if let Some(link) = &att.link {
                let _ = self.devices.unlink(link);
            }
            if let Some(dev) = &att.device {
                if let Err(e) = self.devices.release(&vol.id, dev, att.loop_device) {
                    tracing::warn!(error = %e, "releasing a device failed");
                }
            }
        }
        for link in &g.st.leftover_links {
            let _ = self.devices.unlink(link);
        }
    }

    // ---- rendering -------------------------------------------------------------------------------

    fn tag_json(st: &State, resource_id: &str, t: &Tag) -> Value {
        json!({
            "key": t.key, "value": t.value, "resourcetype": "Volume", "resourceid": resource_id,
            "account": "admin", "domainid": st.domain_id, "domain": "ROOT",
        })
    }

    /// The volume object; `faulted` applies the wrong-size fault to `size`.
    pub fn volume_json(&self, st: &State, v: &Volume, faulted: bool) -> Value {
        let offering = v.offering_id.as_deref().and_then(|id| st.offering(id));
        let mut m = json!({
            "id": v.id,
            "name": v.name,
            "zoneid": st.zone.id,
            "zonename": st.zone.name,
            "type": if v.is_root() { "ROOT" } else { "DATADISK" },
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
            "storage": if v.state == VolumeState::Allocated { "none" } else { "sim-primary" },
            "destroyed": false,
            "isextractable": true,
            "displayvolume": true,
            "tags": v.tags.iter().map(|t| Self::tag_json(st, &v.id, t)).collect::<Vec<_>>(),
        });
        let obj = m
            .as_object_mut()
            .expect("invariant: json! of an object literal is an object");
        if let Some(o) = offering {
            obj.insert("diskofferingid".into(), json!(o.id));
            obj.insert("diskofferingname".into(), json!(o.name));
            obj.insert("diskofferingdisplaytext".into(), json!(o.displaytext));
        } else {
            obj.insert("templateid".into(), json!(st.template.id));
            obj.insert("templatename".into(), json!(st.template.name));
            obj.insert("serviceofferingid".into(), json!(st.service_offering.id));
            obj.insert(
                "serviceofferingname".into(),
                json!(st.service_offering.name),
            );
        }
        if let Some(att) = &v.attachment {
            let vm = st.vm(&att.vm_id);
            obj.insert("deviceid".into(), json!(att.device_id));
            obj.insert("virtualmachineid".into(), json!(att.vm_id));
            obj.insert("vmname".into(), json!(vm.map(|v| v.name.clone())));
            obj.insert("vmdisplayname".into(), json!(vm.map(|v| v.name.clone())));
            obj.insert(
                "vmstate".into(),
                json!(vm.map_or("Running", |v| v.state.as_str())),
            );
            obj.insert("vmtype".into(), json!("User"));
            obj.insert("attached".into(), json!(att.attached));
            obj.insert("path".into(), json!(v.id));
        }
        m
    }

    fn vm_json(st: &State, vm: &Vm) -> Value {
        let so = &st.service_offering;
        json!({
            "id": vm.id,
            "name": vm.name,
            "displayname": vm.name,
            "instancename": vm.instance_name,
            "account": "admin",
            "domainid": st.domain_id,
            "domain": "ROOT",
            "created": vm.created,
            "state": vm.state.as_str(),
            "haenable": false,
            "zoneid": st.zone.id,
            "zonename": st.zone.name,
            "hypervisor": vm.hypervisor.as_str(),
            "serviceofferingid": so.id,
            "serviceofferingname": so.name,
            "cpunumber": so.cpus,
            "cpuspeed": so.cpu_mhz,
            "memory": so.memory_mb,
            "templateid": st.template.id,
            "templatename": st.template.name,
            "templatedisplaytext": st.template.name,
            "guestosid": st.template.os_type_id,
            "ostypeid": st.template.os_type_id,
            "osdisplayname": st.template.os_type_name,
            "rootdeviceid": 0,
            "rootdevicetype": "ROOT",
            "passwordenabled": false,
            "nic": [{
                "id": vm.nic_id, "networkid": st.network.id, "networkname": st.network.name,
                "ipaddress": vm.ip, "netmask": "255.255.255.0", "gateway": "10.1.1.1",
                "macaddress": vm.mac, "isdefault": true, "traffictype": "Guest", "type": "Isolated",
            }],
            "securitygroup": [],
            "affinitygroup": [],
            "tags": [],
        })
    }

    fn snapshot_json(st: &State, s: &Snapshot) -> Value {
        json!({
            "id": s.id, "name": s.name, "volumeid": s.volume_id, "volumename": s.volume_name,
            "volumetype": s.volume_type, "snapshottype": "MANUAL", "intervaltype": "MANUAL",
            "state": if s.backed_up { "BackedUp" } else { "Creating" },
            "created": s.created, "zoneid": st.zone.id, "account": "admin", "domainid": st.domain_id,
            "domain": "ROOT", "physicalsize": s.size, "virtualsize": s.size, "revertable": true,
            "locationtype": "Primary", "tags": [],
        })
    }

    /// The job object. A failed job carries `jobresultcode` 431 for parameter errors and 530 otherwise,
    /// as `ApiAsyncJobDispatcher.runJob` completes it (an `InvalidParameterValueException` becomes a
    /// `ServerApiException(PARAM_ERROR)`), with `cserrorcode` 4350 or 9999.
    fn job_json(&self, st: &State, j: &Job) -> Value {
        let mut m = json!({
            "accountid": st.account_id,
            "userid": st.user_id,
            "cmd": j.action.cmd_class(),
            "created": j.created,
            "jobid": j.id,
            "jobprocstatus": 0,
        });
        let obj = m
            .as_object_mut()
            .expect("invariant: json! of an object literal is an object");
        if let (Some(id), Some(kind)) = (&j.instance_id, j.action.instance_type()) {
            obj.insert("jobinstanceid".into(), json!(id));
            obj.insert("jobinstancetype".into(), json!(kind));
        }
        match &j.outcome {
            JobOutcome::Pending => {
                obj.insert("jobstatus".into(), json!(0));
                obj.insert("jobresultcode".into(), json!(0));
            }
            JobOutcome::Succeeded { result, completed } => {
                let mut result = result.clone();
                if let (Some(id), Some(size)) = (
                    result["volume"]["id"].as_str().map(str::to_owned),
                    result["volume"]["size"].as_u64(),
                ) {
                    result["volume"]["size"] = json!(self.faults.reported_size(&id, size));
                }
                obj.insert("jobstatus".into(), json!(1));
                obj.insert("jobresultcode".into(), json!(0));
                obj.insert("jobresulttype".into(), json!("object"));
                obj.insert("jobresult".into(), result);
                obj.insert("completed".into(), json!(completed));
            }
            JobOutcome::Failed { error, completed } => {
                let (code, cs) = if error.is_param() {
                    (431, 4350)
                } else {
                    (530, 9999)
                };
                obj.insert("jobstatus".into(), json!(2));
                obj.insert("jobresultcode".into(), json!(code));
                obj.insert("jobresulttype".into(), json!("object"));
                obj.insert(
                    "jobresult".into(),
                    json!({ "errorcode": error.errorcode, "cserrorcode": cs, "errortext": error.errortext }),
                );
                obj.insert("completed".into(), json!(completed));
            }
        }
        m
    }

    // ---- commands --------------------------------------------------------------------------------

    /// Whether `command` is implemented (exact, case-sensitive name).
    pub fn knows(command: &str) -> bool {
        COMMANDS.contains(&command)
    }

    /// Executes one API command; `command` must be one of [`COMMANDS`]. Returns the body inside
    /// `<command>response`.
    pub fn execute(self: &Arc<Self>, command: &str, p: &Params) -> Result<Value, CsError> {
        match command {
            "listZones" => self.list_zones(command, p),
            "listDiskOfferings" => self.list_disk_offerings(command, p),
            "listServiceOfferings" => self.list_service_offerings(command, p),
            "listTemplates" => self.list_templates(command, p),
            "listOsTypes" => self.list_os_types(command, p),
            "listHypervisors" => Ok(list_body(
                "hypervisor",
                ["KVM", "VMware", "XenServer"]
                    .iter()
                    .map(|h| json!({ "name": h }))
                    .collect(),
                3,
            )),
            "listNetworks" => self.list_networks(command, p),
            "listPublicIpAddresses" => self.list_public_ips(command, p),
            // No forwarding rules exist: the zone's one public address is the source NAT.
            "listPortForwardingRules" => self
                .paged(command, p, Vec::<Value>::new(), |v| v)
                .map(|(items, n)| list_body("portforwardingrule", items, n)),
            "listIpForwardingRules" => self
                .paged(command, p, Vec::<Value>::new(), |v| v)
                .map(|(items, n)| list_body("ipforwardingrule", items, n)),
            "listVirtualMachines" => self.list_vms(command, p),
            "listVolumes" => self.list_volumes(command, p),
            "listSnapshots" => self.list_snapshots(command, p),
            "listTags" => self.list_tags(command, p),
            "listAsyncJobs" => self.list_jobs(command, p),
            "queryAsyncJobResult" => self.query_job(command, p),
            "createVolume" => self.create_volume(command, p),
            "attachVolume" => self.attach_volume(command, p),
            "detachVolume" => self.detach_volume(command, p),
            "deleteVolume" => self.delete_volume(command, p),
            "stopVirtualMachine" => self.vm_job(command, p, JobAction::StopVm),
            "startVirtualMachine" => self.vm_job(command, p, JobAction::StartVm),
            "destroyVirtualMachine" => {
                let expunge = match p.get("expunge") {
                    None => false,
                    Some(v) if v.eq_ignore_ascii_case("true") => true,
                    Some(v) if v.eq_ignore_ascii_case("false") => false,
                    Some(v) => return Err(CsError::invalid(command, "expunge", v)),
                };
                self.vm_job(command, p, JobAction::DestroyVm { expunge })
            }
            "createSnapshot" => self.create_snapshot(command, p),
            "deleteSnapshot" => self.snapshot_job(command, p, JobAction::DeleteSnapshot),
            "revertSnapshot" => self.snapshot_job(command, p, JobAction::RevertSnapshot),
            "createTags" => self.tags_job(command, p, true),
            "deleteTags" => self.tags_job(command, p, false),
            other => Err(CsError::internal(format!(
                "command {other} is listed but not dispatched"
            ))),
        }
    }

    /// Applies `page`/`pagesize` to `items` and renders the page; returns it with the total count.
    fn paged<T>(
        &self,
        command: &str,
        p: &Params,
        items: Vec<T>,
        render: impl Fn(T) -> Value,
    ) -> Result<(Vec<Value>, usize), CsError> {
        let (skip, take) = page_window(
            p.int(command, "page")?,
            p.int(command, "pagesize")?,
            self.page_size,
        )?;
        let total = items.len();
        let page = items
            .into_iter()
            .skip(skip)
            .take(take.unwrap_or(usize::MAX))
            .map(render)
            .collect();
        Ok((page, total))
    }

    fn list_zones(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let g = self.lock();
        let z = &g.st.zone;
        let items: Vec<Value> = [z]
            .into_iter()
            .filter(|z| p.get("id").is_none_or(|id| id == z.id))
            .filter(|z| p.get("name").is_none_or(|n| eq_ci(n, &z.name)))
            .map(|z| {
                json!({
                    "id": z.id, "name": z.name, "networktype": "Advanced", "allocationstate": "Enabled",
                    "securitygroupsenabled": false, "localstorageenabled": false, "zonetoken": z.id,
                })
            })
            .collect();
        let (items, n) = self.paged(command, p, items, |v| v)?;
        Ok(list_body("zone", items, n))
    }

    fn list_disk_offerings(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let g = self.lock();
        let items: Vec<Value> =
            g.st.offerings
                .iter()
                .filter(|o| p.get("id").is_none_or(|id| id == o.id))
                .filter(|o| p.get("name").is_none_or(|n| eq_ci(n, &o.name)))
                .map(|o| {
                    let mut v = json!({
                        "id": o.id, "name": o.name, "displaytext": o.displaytext,
                        "disksize": o.size_gb.unwrap_or(0), "iscustomized": o.size_gb.is_none(),
                        "created": o.created, "storagetype": "shared", "provisioningtype": "thin",
                    });
                    if o.size_gb.is_none() {
                        v["customizeddiskofferingminsize"] = json!(o.min_gb);
                        v["customizeddiskofferingmaxsize"] = json!(o.max_gb);
                    }
                    v
                })
                .collect();
        let (items, n) = self.paged(command, p, items, |v| v)?;
        Ok(list_body("diskoffering", items, n))
    }

    fn list_service_offerings(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let g = self.lock();
        let so = &g.st.service_offering;
        let items: Vec<Value> = [so]
            .into_iter()
            .filter(|o| p.get("id").is_none_or(|id| id == o.id))
            .filter(|o| p.get("name").is_none_or(|n| eq_ci(n, &o.name)))
            .map(|o| {
                json!({
                    "id": o.id, "name": o.name, "displaytext": o.name, "cpunumber": o.cpus,
                    "cpuspeed": o.cpu_mhz, "memory": o.memory_mb, "storagetype": "shared",
                    "offerha": false, "limitcpuuse": false, "iscustomized": false,
                    "provisioningtype": "thin", "issystem": false, "defaultuse": false,
                })
            })
            .collect();
        let (items, n) = self.paged(command, p, items, |v| v)?;
        Ok(list_body("serviceoffering", items, n))
    }

    fn list_templates(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let filter = p.require(command, "templatefilter")?;
        if !TEMPLATE_FILTERS.contains(&filter) {
            return Err(CsError::invalid(command, "templatefilter", filter));
        }
        let g = self.lock();
        let st = &g.st;
        let t = &st.template;
        let items: Vec<Value> = [t]
            .into_iter()
            .filter(|t| p.get("id").is_none_or(|id| id == t.id))
            .filter(|t| p.get("name").is_none_or(|n| eq_ci(n, &t.name)))
            .filter(|_| p.get("zoneid").is_none_or(|z| z == st.zone.id))
            .map(|t| {
                json!({
                    "id": t.id, "name": t.name, "displaytext": t.name, "ispublic": true,
                    "isfeatured": true, "isready": true, "passwordenabled": false,
                    "format": "QCOW2", "hypervisor": "KVM", "ostypeid": t.os_type_id,
                    "ostypename": t.os_type_name, "size": crate::model::ROOT_SIZE,
                    "templatetype": "USER", "status": "Download Complete",
                    "zoneid": st.zone.id, "zonename": st.zone.name, "account": "admin",
                    "domainid": st.domain_id, "domain": "ROOT", "crossZones": false,
                    "created": st.offerings.first().map(|o| o.created.clone()), "tags": [],
                })
            })
            .collect();
        let (items, n) = self.paged(command, p, items, |v| v)?;
        Ok(list_body("template", items, n))
    }

    fn list_os_types(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let g = self.lock();
        let t = &g.st.template;
        let items: Vec<Value> = [t]
            .into_iter()
            .filter(|t| p.get("id").is_none_or(|id| id == t.os_type_id))
            .map(|t| json!({ "id": t.os_type_id, "description": t.os_type_name, "isuserdefined": false }))
            .collect();
        let (items, n) = self.paged(command, p, items, |v| v)?;
        Ok(list_body("ostype", items, n))
    }

    fn list_networks(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let g = self.lock();
        let st = &g.st;
        let net = &st.network;
        let items: Vec<Value> = [net]
            .into_iter()
            .filter(|n| p.get("id").is_none_or(|id| id == n.id))
            .filter(|_| p.get("zoneid").is_none_or(|z| z == st.zone.id))
            .map(|n| {
                json!({
                    "id": n.id, "name": n.name, "displaytext": n.name, "type": "Isolated",
                    "traffictype": "Guest", "state": "Implemented", "cidr": "10.1.1.0/24",
                    "gateway": "10.1.1.1", "netmask": "255.255.255.0", "zoneid": st.zone.id,
                    "zonename": st.zone.name, "account": "admin", "domainid": st.domain_id,
                    "domain": "ROOT", "isdefault": true, "issystem": false, "tags": [],
                })
            })
            .collect();
        let (items, n) = self.paged(command, p, items, |v| v)?;
        Ok(list_body("network", items, n))
    }

    fn list_public_ips(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let g = self.lock();
        let st = &g.st;
        let net = &st.network;
        let items: Vec<Value> = [net]
            .into_iter()
            .filter(|n| p.get("id").is_none_or(|id| id == n.public_ip_id))
            .filter(|_| p.get("zoneid").is_none_or(|z| z == st.zone.id))
            .map(|n| {
                json!({
                    "id": n.public_ip_id, "ipaddress": n.public_ip, "issourcenat": true,
                    "isstaticnat": false, "issystem": false, "state": "Allocated",
                    "associatednetworkid": n.id, "associatednetworkname": n.name,
                    "zoneid": st.zone.id, "zonename": st.zone.name, "account": "admin",
                    "domainid": st.domain_id, "domain": "ROOT", "forvirtualnetwork": true,
                    "tags": [],
                })
            })
            .collect();
        let (items, n) = self.paged(command, p, items, |v| v)?;
        Ok(list_body("publicipaddress", items, n))
    }

    fn list_vms(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let g = self.lock();
        let st = &g.st;
        let items: Vec<&Vm> = st
            .vms
            .iter()
            .filter(|v| p.get("id").is_none_or(|id| id == v.id))
            .filter(|v| p.get("name").is_none_or(|n| eq_ci(n, &v.name)))
            .filter(|v| p.get("keyword").is_none_or(|k| contains_ci(&v.name, k)))
            .filter(|v| p.get("state").is_none_or(|s| eq_ci(s, v.state.as_str())))
            .filter(|v| {
                p.get("hypervisor")
                    .is_none_or(|h| eq_ci(h, v.hypervisor.as_str()))
            })
            .filter(|_| p.get("zoneid").is_none_or(|z| z == st.zone.id))
            .collect();
        let (items, n) = self.paged(command, p, items, |v| Self::vm_json(st, v))?;
        Ok(list_body("virtualmachine", items, n))
    }

    /// `listVolumes`: `name` is an exact and `keyword` a substring match, both case-insensitive as in
    /// CloudStack's `SearchCriteria` over MySQL's case-insensitive collation; `tags[n].key/value` filter.
    fn list_volumes(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let tags = p.map("tags");
        let g = self.lock();
        let st = &g.st;
        let items: Vec<&Volume> = st
            .volumes
            .values()
            .filter(|v| p.get("id").is_none_or(|id| id == v.id))
            .filter(|v| p.get("name").is_none_or(|n| eq_ci(n, &v.name)))
            .filter(|v| p.get("keyword").is_none_or(|k| contains_ci(&v.name, k)))
            .filter(|v| {
                p.get("virtualmachineid")
                    .is_none_or(|vm| v.attachment.as_ref().is_some_and(|a| a.vm_id == vm))
            })
            .filter(|v| p.get("state").is_none_or(|s| eq_ci(s, v.state.as_str())))
            .filter(|v| {
                p.get("diskofferingid")
                    .is_none_or(|o| v.offering_id.as_deref() == Some(o))
            })
            .filter(|_| p.get("zoneid").is_none_or(|z| z == st.zone.id))
            .filter(|v| {
                p.get("type")
                    .is_none_or(|t| eq_ci(t, if v.is_root() { "ROOT" } else { "DATADISK" }))
            })
            .filter(|v| {
                tags.iter().all(|(k, val)| {
                    v.tags
                        .iter()
                        .any(|t| t.key == *k && val.as_ref().is_none_or(|val| t.value == *val))
                })
            })
            .collect();
        let (items, n) = self.paged(command, p, items, |v| self.volume_json(st, v, true))?;
        Ok(list_body("volume", items, n))
    }

    fn list_snapshots(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let g = self.lock();
        let st = &g.st;
        let items: Vec<&Snapshot> = st
            .snapshots
            .values()
            .filter(|s| p.get("id").is_none_or(|id| id == s.id))
            .filter(|s| p.get("volumeid").is_none_or(|v| v == s.volume_id))
            .filter(|s| p.get("name").is_none_or(|n| eq_ci(n, &s.name)))
            .filter(|s| p.get("keyword").is_none_or(|k| contains_ci(&s.name, k)))
            .collect();
        let (items, n) = self.paged(command, p, items, |s| Self::snapshot_json(st, s))?;
        Ok(list_body("snapshot", items, n))
    }

    fn list_tags(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let g = self.lock();
        let st = &g.st;
        let wants_volumes = p
            .get("resourcetype")
            .is_none_or(|t| t.eq_ignore_ascii_case("Volume"));
        let items: Vec<(&Volume, &Tag)> = st
            .volumes
            .values()
            .filter(|_| wants_volumes)
            .filter(|v| p.get("resourceid").is_none_or(|id| id == v.id))
            .flat_map(|v| v.tags.iter().map(move |t| (v, t)))
            .filter(|(_, t)| p.get("key").is_none_or(|k| k == t.key))
            .filter(|(_, t)| p.get("value").is_none_or(|val| val == t.value))
            .collect();
        let (items, n) = self.paged(command, p, items, |(v, t)| Self::tag_json(st, &v.id, t))?;
        Ok(list_body("tag", items, n))
    }

    fn list_jobs(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let g = self.lock();
        let st = &g.st;
        let items: Vec<&Job> = st.jobs.values().collect();
        let (items, n) = self.paged(command, p, items, |j| self.job_json(st, j))?;
        Ok(list_body("asyncjobs", items, n))
    }

    fn query_job(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let id = p.require(command, "jobid")?;
        let g = self.lock();
        let job =
            g.st.job(id)
                .ok_or_else(|| CsError::invalid(command, "jobid", id))?;
        Ok(self.job_json(&g.st, job))
    }

    /// `createVolume`, checked synchronously as `VolumeApiServiceImpl.allocVolume` does (it runs in
    /// `CreateVolumeCmd.create()`, before the job): a custom offering needs `size` within
    /// `validateCustomDiskOfferingSizeRange`'s bounds, a fixed one refuses it.
    fn create_volume(self: &Arc<Self>, command: &str, p: &Params) -> Result<Value, CsError> {
        let offering_id = p.require(command, "diskofferingid")?;
        let zone_id = p.require(command, "zoneid")?;
        let size_gb = p.number(command, "size")?;
        let mut g = self.lock();
        let st = &mut g.st;
        if zone_id != st.zone.id {
            return Err(CsError::invalid(command, "zoneid", zone_id));
        }
        let offering = st
            .offering(offering_id)
            .ok_or_else(|| CsError::invalid(command, "diskofferingid", offering_id))?;
        let gb = match (offering.size_gb, size_gb) {
            (None, None) => {
                return Err(CsError::param(
                    "This disk offering requires a custom size specified",
                ))
            }
            (None, Some(gb)) if gb < offering.min_gb || gb > offering.max_gb => {
                return Err(CsError::param(format!(
                    "Volume size: {gb} GB is out of allowed range. Min: {}. Max: {}",
                    offering.min_gb, offering.max_gb
                )))
            }
            (None, Some(gb)) => gb,
            (Some(_), Some(_)) => {
                return Err(CsError::param(
                    "This disk offering does not allow custom size",
                ))
            }
            (Some(fixed), None) => fixed,
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
        st.insert_volume(Volume {
            id: id.clone(),
            name,
            size,
            offering_id: Some(offering_id),
            state: VolumeState::Allocated,
            created: now_string(),
            attachment: None,
            tags: Vec::new(),
        });
        let jobid = self.submit(&mut g, Some(&id), JobAction::Create)?;
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
        let mut g = self.lock();
        if g.st.volume(id).is_none() {
            return Err(CsError::invalid(command, "id", id));
        }
        if g.st.vm(vm_id).is_none() {
            return Err(CsError::invalid(command, "virtualmachineid", vm_id));
        }
        let jobid = self.submit(
            &mut g,
            Some(id),
            JobAction::Attach {
                vm_id: vm_id.to_owned(),
                device_id,
            },
        )?;
        Ok(json!({ "jobid": jobid }))
    }

    /// `detachVolume`: unknown ids are refused by the API layer (431); every other check runs in the job,
    /// as `VolumeApiServiceImpl.detachVolumeFromVM` does.
    fn detach_volume(self: &Arc<Self>, command: &str, p: &Params) -> Result<Value, CsError> {
        let mut g = self.lock();
        let id = p.get("id");
        let vm = p.get("virtualmachineid");
        let dev = p.number(command, "deviceid")?;
        if let Some(id) = id {
            if g.st.volume(id).is_none() {
                return Err(CsError::invalid(command, "id", id));
            }
        }
        if let Some(vm) = vm {
            if g.st.vm(vm).is_none() {
                return Err(CsError::invalid(command, "virtualmachineid", vm));
            }
        }
        let target = match (id, vm, dev) {
            (Some(id), None, None) => DetachTarget::Volume(id.to_owned()),
            (None, Some(vm), Some(dev)) => DetachTarget::Slot {
                vm_id: vm.to_owned(),
                device_id: dev,
            },
            _ => DetachTarget::Ambiguous,
        };
        let jobid = self.submit(&mut g, id, JobAction::Detach { target })?;
        Ok(json!({ "jobid": jobid }))
    }

    fn delete_volume(&self, command: &str, p: &Params) -> Result<Value, CsError> {
        let id = p.require(command, "id")?;
        let mut g = self.lock();
        let vol =
            g.st.volume(id)
                .ok_or_else(|| CsError::invalid(command, "id", id))?;
        if vol.attachment.is_some() {
            return Err(CsError::param(
                "Please specify a volume that is not attached to any VM.",
            ));
        }
        self.devices.remove_backing(id).map_err(|e| internal(&e))?;
        g.st.remove_volume(id);
        self.commit(&mut g)?;
        Ok(json!({ "success": "true" }))
    }

    fn vm_job(
        self: &Arc<Self>,
        command: &str,
        p: &Params,
        action: JobAction,
    ) -> Result<Value, CsError> {
        let id = p.require(command, "id")?;
        let mut g = self.lock();
        if g.st.vm(id).is_none() {
            return Err(CsError::invalid(command, "id", id));
        }
        let jobid = self.submit(&mut g, Some(id), action)?;
        Ok(json!({ "jobid": jobid }))
    }

    /// `createSnapshot`: the snapshot row exists at once (`CreateSnapshotCmd.create()`), its content is
    /// taken by the job.
    fn create_snapshot(self: &Arc<Self>, command: &str, p: &Params) -> Result<Value, CsError> {
        let volume_id = p.require(command, "volumeid")?;
        let mut g = self.lock();
        let st = &mut g.st;
        let vol = st
            .volume(volume_id)
            .ok_or_else(|| CsError::invalid(command, "volumeid", volume_id))?;
        let vm_name = vol
            .attachment
            .as_ref()
            .and_then(|a| st.vm(&a.vm_id))
            .map(|v| v.name.clone());
        let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S");
        let name = p.get("name").map_or_else(
            || match &vm_name {
                Some(vm) => format!("{vm}_{}_{stamp}", vol.name),
                None => format!("{}_{stamp}", vol.name),
            },
            str::to_owned,
        );
        let snap = Snapshot {
            id: String::new(),
            name,
            volume_id: vol.id.clone(),
            volume_name: vol.name.clone(),
            volume_type: if vol.is_root() { "ROOT" } else { "DATADISK" }.to_owned(),
            size: vol.size,
            created: now_string(),
            backed_up: false,
        };
        let id = st.next_id();
        st.insert_snapshot(Snapshot {
            id: id.clone(),
            ..snap
        });
        let jobid = self.submit(
            &mut g,
            Some(&id),
            JobAction::CreateSnapshot {
                snapshot_id: id.clone(),
            },
        )?;
        Ok(json!({ "id": id, "jobid": jobid }))
    }

    fn snapshot_job(
        self: &Arc<Self>,
        command: &str,
        p: &Params,
        action: JobAction,
    ) -> Result<Value, CsError> {
        let id = p.require(command, "id")?;
        let mut g = self.lock();
        if g.st.snapshot(id).is_none() {
            return Err(CsError::invalid(command, "id", id));
        }
        let jobid = self.submit(&mut g, Some(id), action)?;
        Ok(json!({ "jobid": jobid }))
    }

    /// `createTags`/`deleteTags` (both asynchronous in CloudStack) for `resourcetype=Volume`.
    fn tags_job(
        self: &Arc<Self>,
        command: &str,
        p: &Params,
        create: bool,
    ) -> Result<Value, CsError> {
        let ids = p.list("resourceids");
        if ids.is_empty() {
            return Err(CsError::missing(command, "resourceids"));
        }
        let rtype = p.require(command, "resourcetype")?;
        if !rtype.eq_ignore_ascii_case("Volume") {
            return Err(CsError::param(format!(
                "Resource type {rtype} is not supported by the simulator; tags work on Volume"
            )));
        }
        let tags = p.map("tags");
        if create && tags.is_empty() {
            return Err(CsError::missing(command, "tags"));
        }
        let mut g = self.lock();
        if let Some(bad) = ids.iter().find(|id| g.st.volume(id).is_none()) {
            return Err(CsError::param(format!(
                "Unable to find resource by id {bad} and type Volume"
            )));
        }
        let action = if create {
            JobAction::CreateTags {
                volume_ids: ids,
                tags: tags
                    .into_iter()
                    .map(|(key, value)| Tag {
                        key,
                        value: value.unwrap_or_default(),
                    })
                    .collect(),
            }
        } else {
            JobAction::DeleteTags {
                volume_ids: ids,
                tags,
            }
        };
        let jobid = self.submit(&mut g, None, action)?;
        Ok(json!({ "jobid": jobid }))
    }

    // ---- actions behind the client's back ---------------------------------------------------------

    /// Stops or starts a VM at once, without a job (as if an operator or HA did it).
    pub fn set_vm_state(&self, vm_id: &str, state: VmState) -> Result<Value, CsError> {
        let mut g = self.lock();
        let vm =
            g.st.vm_mut(vm_id)
                .ok_or_else(|| CsError::param(format!("Unable to find VM with ID: {vm_id}")))?;
        vm.state = state;
        if state == VmState::Running {
            Self::ready_attached(&mut g.st, vm_id);
        }
        self.commit(&mut g)?;
        let vm = g.st.vm(vm_id).expect("invariant: the VM was just found");
        Ok(Self::vm_json(&g.st, vm))
    }

    /// Detaches a volume at once, without a job and without CloudStack's checks (as if the hypervisor
    /// lost the disk and an operator cleaned up).
    pub fn force_detach(&self, volume_id: &str) -> Result<Value, CsError> {
        let mut g = self.lock();
        let Some(att) = g.st.volume(volume_id).and_then(|v| v.attachment.clone()) else {
            return Err(CsError::param(format!(
                "Volume {volume_id} does not exist or is not attached"
            )));
        };
        self.release_attachment(&mut g.st, volume_id, &att)?;
        if let Some(v) = g.st.volume_mut(volume_id) {
            v.attachment = None;
        }
        self.commit(&mut g)?;
        let v =
            g.st.volume(volume_id)
                .expect("invariant: the volume was just found");
        Ok(self.volume_json(&g.st, v, true))
    }

    /// Adds a running KVM VM with its ROOT volume at once, without a job (as if it had been deployed, e.g.
    /// a test-failover VM); returns the VM object.
    pub fn deploy_vm(&self, name: &str) -> Result<Value, CsError> {
        let mut g = self.lock();
        let st = &mut g.st;
        let n = st.vms.len() + st.next_seq as usize;
        let (id, nic_id, root_id) = (st.next_id(), st.next_id(), st.next_id());
        let created = now_string();
        st.insert_vm(Vm {
            id: id.clone(),
            name: name.to_owned(),
            instance_name: format!("i-2-{}-VM", 100 + n),
            created: created.clone(),
            state: VmState::Running,
            hypervisor: Hypervisor::Kvm,
            ip: format!("10.1.{}.{}", 2 + (n / 250) % 250, 10 + n % 240),
            mac: format!("02:00:4c:5b:{:02x}:{:02x}", (n >> 8) & 0xff, n & 0xff),
            nic_id,
        });
        st.insert_volume(Volume {
            id: root_id.clone(),
            name: format!("ROOT-{}", 100 + n),
            size: ROOT_SIZE,
            offering_id: None,
            state: VolumeState::Ready,
            created: created.clone(),
            attachment: Some(Attachment {
                vm_id: id.clone(),
                device_id: 0,
                attached: created,
                device: None,
                link: None,
                loop_device: false,
            }),
            tags: Vec::new(),
        });
        self.commit(&mut g)?;
        let vm = g.st.vm(&id).expect("invariant: the VM was just added");
        Ok(Self::vm_json(&g.st, vm))
    }

    /// `UserVmManagerImpl.destroyVm`: a running VM is stopped first. Without `expunge` the VM stays, in
    /// state `Destroyed`, with its volumes attached (recoverable). With `expunge` it is removed
    /// (`VolumeOrchestrator.cleanupVolumes`): its ROOT volume is destroyed and its data volumes are detached
    /// and kept (`Ready`, no VM); an appliance data volume's device and link go as on a detach.
    fn destroy_vm(&self, st: &mut State, vm_id: &str, expunge: bool) -> Result<Value, CsError> {
        let gone = || CsError::param(format!("Unable to find VM with ID: {vm_id}"));
        let vm = st.vm(vm_id).ok_or_else(gone)?;
        if vm.state == VmState::Destroyed && !expunge {
            return Err(CsError::param(format!(
                "VM {} ({}) is already in state Destroyed",
                vm.name, vm.id
            )));
        }
        st.vm_mut(vm_id).ok_or_else(gone)?.state = VmState::Destroyed;
        let mut result = Self::vm_json(st, st.vm(vm_id).ok_or_else(gone)?);
        if !expunge {
            return Ok(json!({ "virtualmachine": result }));
        }
        let attached: Vec<(String, bool, Attachment)> = st
            .attached_to(vm_id)
            .filter_map(|v| v.attachment.clone().map(|a| (v.id.clone(), v.is_root(), a)))
            .collect();
        for (vol, root, att) in attached {
            self.release_attachment(st, &vol, &att)?;
            if root {
                self.devices
                    .remove_backing(&vol)
                    .map_err(|e| internal(&e))?;
                st.remove_volume(&vol);
            } else if let Some(v) = st.volume_mut(&vol) {
                v.attachment = None;
            }
        }
        st.remove_vm(vm_id);
        result["state"] = json!("Expunging");
        Ok(json!({ "virtualmachine": result }))
    }

    // ---- jobs ------------------------------------------------------------------------------------

    fn submit(
        self: &Arc<Self>,
        g: &mut Shared,
        instance_id: Option<&str>,
        action: JobAction,
    ) -> Result<String, CsError> {
        let extra = self.faults.take_job_delay(action.command());
        let id = g.st.next_id();
        g.st.insert_job(Job {
            id: id.clone(),
            instance_id: instance_id.map(str::to_owned),
            action,
            created: now_string(),
            extra_delay_ms: u64::try_from(extra.as_millis()).unwrap_or(u64::MAX),
            outcome: JobOutcome::Pending,
        });
        self.commit(g)?;
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
        let mut g = self.lock();
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Some(job) = g.st.job(job_id).filter(|j| j.is_pending()).cloned() else {
            return;
        };
        let result = match self.faults.take_job_failure(job.action.command()) {
            Some(e) => Err(e),
            None => self.apply(&mut g.st, &job),
        };
        let completed = now_string();
        let outcome = match result {
            Ok(result) => JobOutcome::Succeeded { result, completed },
            Err(error) => {
                tracing::info!(job = job_id, error = %error.errortext, "simulated job failed");
                JobOutcome::Failed { error, completed }
            }
        };
        if let Some(j) = g.st.job_mut(job_id) {
            j.outcome = outcome;
        }
        if let Err(e) = self.commit(&mut g) {
            tracing::error!(error = %e.errortext, "job result not saved");
        }
    }

    /// Volumes attached to a VM that starts get their storage (`Allocated` → `Ready`).
    fn ready_attached(st: &mut State, vm_id: &str) {
        let ids: Vec<String> = st
            .attached_to(vm_id)
            .filter(|v| v.state == VolumeState::Allocated)
            .map(|v| v.id.clone())
            .collect();
        for id in ids {
            if let Some(v) = st.volume_mut(&id) {
                v.state = VolumeState::Ready;
            }
        }
    }

    /// Removes what an appliance attachment exposed (link, loop device).
    fn release_attachment(
        &self,
        st: &mut State,
        vid: &str,
        att: &Attachment,
    ) -> Result<(), CsError> {
        if let Some(link) = &att.link {
            if self.faults.take_keep_link(vid) {
                st.add_leftover_link(link.clone());
            } else {
                self.devices.unlink(link).map_err(|e| internal(&e))?;
            }
        }
        if let Some(dev) = &att.device {
            self.devices
                .release(vid, dev, att.loop_device)
                .map_err(|e| internal(&e))?;
        }
        Ok(())
    }

    fn apply(&self, st: &mut State, job: &Job) -> Result<Value, CsError> {
        let iid = job.instance_id.clone().unwrap_or_default();
        let vid = iid.as_str();
        let gone = || CsError::param(format!("Unable to find volume with ID: {vid}"));
        let volume_result = |st: &State, id: &str| -> Result<Value, CsError> {
            let vol = st
                .volume(id)
                .ok_or_else(|| CsError::param(format!("Unable to find volume with ID: {id}")))?;
            Ok(json!({ "volume": self.volume_json(st, vol, false) }))
        };
        match &job.action {
            JobAction::Create => volume_result(st, vid),
            JobAction::Attach { vm_id, device_id } => {
                let slot = st.plan_attach(vid, vm_id, *device_id)?;
                let mut att = Attachment {
                    vm_id: vm_id.clone(),
                    device_id: slot,
                    attached: now_string(),
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
                                let _ =
                                    self.devices
                                        .release(vid, &exposed.device, exposed.loop_device);
                                return Err(internal(&e));
                            }
                        }
                    }
                    att.device = Some(exposed.device);
                    att.loop_device = exposed.loop_device;
                }
                // A volume attached to a stopped VM stays Allocated until the VM starts.
                let running = st.vm(vm_id).is_some_and(|v| v.state == VmState::Running);
                let vol = st.volume_mut(vid).ok_or_else(gone)?;
                vol.attachment = Some(att);
                if running {
                    vol.state = VolumeState::Ready;
                }
                volume_result(st, vid)
            }
            JobAction::Detach { target } => {
                // VolumeApiServiceImpl.detachVolumeFromVM, in its order.
                let vid = match target {
                    DetachTarget::Ambiguous => {
                        return Err(CsError::param(
                            "Please provide either a volume id, or a tuple(device id, instance id)",
                        ))
                    }
                    DetachTarget::Volume(id) => id.clone(),
                    DetachTarget::Slot { vm_id, device_id } => st
                        .attached_to(vm_id)
                        .find(|v| {
                            v.attachment
                                .as_ref()
                                .is_some_and(|a| u64::from(a.device_id) == *device_id)
                        })
                        .map(|v| v.id.clone())
                        // `findByInstanceAndDeviceId(...).get(0)` on an empty list.
                        .ok_or_else(|| CsError::internal("Index 0 out of bounds for length 0"))?,
                };
                let vol = st.volume(&vid).ok_or_else(|| {
                    CsError::param(format!("Unable to find volume with ID: {vid}"))
                })?;
                let Some(att) = vol.attachment.clone() else {
                    return Err(CsError::param(
                        "The specified volume is not attached to a VM.",
                    ));
                };
                if att.device_id == 0 {
                    let vm = st.vm(&att.vm_id).ok_or_else(gone)?;
                    check_root_change(vm)?;
                }
                self.release_attachment(st, &vid, &att)?;
                st.volume_mut(&vid).ok_or_else(gone)?.attachment = None;
                volume_result(st, &vid)
            }
            JobAction::StopVm | JobAction::StartVm => {
                let start = job.action == JobAction::StartVm;
                let vm = st
                    .vm(vid)
                    .ok_or_else(|| CsError::param(format!("Unable to find VM with ID: {vid}")))?;
                if vm.state == VmState::Destroyed {
                    return Err(CsError::param(format!(
                        "VM {} ({}) is in state Destroyed; recover it first",
                        vm.name, vm.id
                    )));
                }
                if start && vm.state == VmState::Stopped && !st.used_device_ids(vid).contains(&0) {
                    return Err(CsError::internal(format!(
                        "Unable to start VM {} ({}): it has no ROOT volume",
                        vm.name, vm.id
                    )));
                }
                let state = if start {
                    VmState::Running
                } else {
                    VmState::Stopped
                };
                st.vm_mut(vid).ok_or_else(gone)?.state = state;
                if start {
                    Self::ready_attached(st, vid);
                }
                let vm = st.vm(vid).ok_or_else(gone)?;
                Ok(json!({ "virtualmachine": Self::vm_json(st, vm) }))
            }
            JobAction::DestroyVm { expunge } => self.destroy_vm(st, vid, *expunge),
            JobAction::CreateSnapshot { snapshot_id } => {
                let snap = st.snapshot(snapshot_id).cloned().ok_or_else(|| {
                    CsError::param(format!("Unable to find snapshot with ID: {snapshot_id}"))
                })?;
                if st.volume(&snap.volume_id).is_none() {
                    st.remove_snapshot(snapshot_id);
                    return Err(CsError::param(format!(
                        "Unable to find volume with ID: {}",
                        snap.volume_id
                    )));
                }
                self.devices
                    .take_snapshot(&snap.volume_id, snapshot_id)
                    .map_err(|e| internal(&e))?;
                let s = st
                    .snapshot_mut(snapshot_id)
                    .ok_or_else(|| CsError::internal("snapshot vanished"))?;
                s.backed_up = true;
                let s = st
                    .snapshot(snapshot_id)
                    .ok_or_else(|| CsError::internal("snapshot vanished"))?;
                Ok(json!({ "snapshot": Self::snapshot_json(st, s) }))
            }
            JobAction::DeleteSnapshot => {
                self.devices
                    .remove_snapshot(vid)
                    .map_err(|e| internal(&e))?;
                st.remove_snapshot(vid);
                Ok(json!({ "success": true }))
            }
            JobAction::RevertSnapshot => {
                // SnapshotManagerImpl.revertSnapshot: the volume must be detached or its VM stopped.
                let snap = st.snapshot(vid).cloned().ok_or_else(|| {
                    CsError::param(format!("Unable to find snapshot with ID: {vid}"))
                })?;
                let vol = st.volume(&snap.volume_id).ok_or_else(|| {
                    CsError::param(format!("Unable to find volume with ID: {}", snap.volume_id))
                })?;
                if let Some(att) = &vol.attachment {
                    if st
                        .vm(&att.vm_id)
                        .is_some_and(|v| v.state != VmState::Stopped)
                    {
                        return Err(CsError::param(
                            "The VM the specified disk is attached to is not in the shutdown state.",
                        ));
                    }
                }
                self.devices
                    .revert_snapshot(vid, &snap.volume_id)
                    .map_err(|e| internal(&e))?;
                Ok(json!({ "snapshot": Self::snapshot_json(st, &snap) }))
            }
            JobAction::CreateTags { volume_ids, tags } => {
                for id in volume_ids {
                    let vol = st.volume_mut(id).ok_or_else(gone)?;
                    for t in tags {
                        vol.tags.retain(|old| old.key != t.key);
                        vol.tags.push(t.clone());
                    }
                }
                Ok(json!({ "success": true }))
            }
            JobAction::DeleteTags { volume_ids, tags } => {
                for id in volume_ids {
                    let vol = st.volume_mut(id).ok_or_else(gone)?;
                    if tags.is_empty() {
                        vol.tags.clear();
                    } else {
                        vol.tags.retain(|t| {
                            !tags.iter().any(|(k, v)| {
                                *k == t.key && v.as_ref().is_none_or(|v| *v == t.value)
                            })
                        });
                    }
                }
                Ok(json!({ "success": true }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        Params(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn map_and_list_parameters() {
        let p = params(&[
            ("tags[1].key", "b"),
            ("Tags[0].Key", "a"),
            ("tags[0].value", "1"),
            ("tags[x].key", "ignored"),
            ("resourceids", "u1, u2,,u3"),
        ]);
        assert_eq!(
            p.map("tags"),
            vec![
                ("a".to_owned(), Some("1".to_owned())),
                ("b".to_owned(), None)
            ]
        );
        assert_eq!(p.list("resourceids"), vec!["u1", "u2", "u3"]);
        assert!(p.map("details").is_empty());
    }

    #[test]
    fn commands_are_case_sensitive() {
        assert!(Engine::knows("listVolumes"));
        assert!(!Engine::knows("listvolumes"));
        assert!(!Engine::knows("LISTVOLUMES"));
        assert!(eq_ci("Data-Disk", "data-disk"));
        assert!(contains_ci("Data-Disk-3", "DISK-3"));
    }
}
