//! CloudStack's rules over real HTTP: statuses of unknown and missing commands, paging and search,
//! offering sizes, VM states and ROOT volumes, per-hypervisor limits, detach errors as failed jobs,
//! snapshots, tags, the read commands clients call, actions behind the client's back and restarts.

mod common;

use common::Harness;
use serde_json::{json, Value};

const UNAUTHORIZED: &str = "unable to verify user credentials and/or request signature";

fn ids(list: &Value, key: &str) -> Vec<String> {
    list[key]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v["id"].as_str().expect("id").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn unknown_miscased_and_missing_commands_are_401_errorresponse() {
    let h = Harness::start().await;
    for params in [
        vec![("command", "frobnicate")],
        vec![("command", "listvolumes")],
        vec![("command", "LISTZONES")],
        vec![],
    ] {
        let (status, body) = h.call_raw(&params).await;
        assert_eq!(status, 401, "{params:?}: {body}");
        assert_eq!(body["errorresponse"]["errorcode"], 401, "{body}");
        assert_eq!(body["errorresponse"]["errortext"], UNAUTHORIZED);
    }
    // The exact name works.
    let (status, body) = h.call_raw(&[("command", "listZones")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["listzonesresponse"]["count"], 1);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn list_volumes_paging_and_case_insensitive_search() {
    let h = Harness::start_with(|c| c.page_size = 5).await;
    let mut made = Vec::new();
    for i in 0..7 {
        made.push(h.create_volume(&format!("Data-Disk-{i}"), 1).await);
    }
    // 7 data volumes + 4 ROOT volumes; without paging the default page size caps the answer.
    let all = h.ok("listVolumes", &[]).await;
    assert_eq!(all["count"], 11);
    assert_eq!(ids(&all, "volume").len(), 5);
    let unlimited = h.ok("listVolumes", &[("pagesize", "-1")]).await;
    assert_eq!(ids(&unlimited, "volume").len(), 11);
    let page3 = h
        .ok("listVolumes", &[("page", "3"), ("pagesize", "5")])
        .await;
    assert_eq!(page3["count"], 11);
    assert_eq!(ids(&page3, "volume").len(), 1);
    for (params, text) in [
        (
            vec![("pagesize", "5")],
            "\"page\" parameter is required when \"pagesize\" is specified",
        ),
        (
            vec![("page", "1")],
            "\"pagesize\" parameter is required when \"page\" is specified",
        ),
        (
            vec![("page", "1"), ("pagesize", "6")],
            "Page size can't exceed max allowed page size value: 5",
        ),
    ] {
        let (status, body) = h.call("listVolumes", &params).await;
        assert_eq!((status, body["errortext"].as_str()), (431, Some(text)));
    }
    // name: exact, case-insensitive; keyword: substring, case-insensitive.
    let by_name = h.ok("listVolumes", &[("name", "data-disk-3")]).await;
    assert_eq!(ids(&by_name, "volume"), vec![made[3].clone()]);
    let by_kw = h
        .ok("listVolumes", &[("keyword", "DISK"), ("pagesize", "-1")])
        .await;
    assert_eq!(ids(&by_kw, "volume"), made);
    assert_eq!(
        h.ok("listVolumes", &[("name", "data-disk")]).await,
        json!({})
    );
    h.sim.shutdown().await;
}

#[tokio::test]
async fn offering_size_limits_have_cloudstack_texts() {
    let h = Harness::start().await;
    let zone = h.sim.zone_id().to_owned();
    let offers = h.sim.disk_offerings();
    let small = offers
        .iter()
        .find(|o| o.2 == Some(5))
        .expect("small")
        .0
        .clone();
    let custom = offers
        .iter()
        .find(|o| o.2.is_none())
        .expect("custom")
        .0
        .clone();
    let listed = h.ok("listDiskOfferings", &[("id", &custom)]).await;
    assert_eq!(
        listed["diskoffering"][0]["customizeddiskofferingmaxsize"],
        1024
    );
    for (offering, size, text) in [
        (
            &small,
            Some("5"),
            "This disk offering does not allow custom size",
        ),
        (
            &custom,
            None,
            "This disk offering requires a custom size specified",
        ),
        (
            &custom,
            Some("1025"),
            "Volume size: 1025 GB is out of allowed range. Min: 1. Max: 1024",
        ),
        (
            &custom,
            Some("0"),
            "Volume size: 0 GB is out of allowed range. Min: 1. Max: 1024",
        ),
    ] {
        let mut p = vec![
            ("zoneid", zone.as_str()),
            ("diskofferingid", offering.as_str()),
        ];
        if let Some(s) = size {
            p.push(("size", s));
        }
        let (status, body) = h.call("createVolume", &p).await;
        assert_eq!(status, 431, "{body}");
        assert_eq!(body["errortext"], text);
        assert_eq!(body["cserrorcode"], 4350);
    }
    h.sim.shutdown().await;
}

#[tokio::test]
async fn root_disk_rules_follow_cloudstack() {
    let h = Harness::start().await;
    let vm = h.sim.other_vm_ids()[0].clone();
    let old_root = h.sim.root_volume_id(&vm).expect("every VM has a root");
    let new_root = h.create_volume("new-root", 2).await;
    // Running VM: attaching at device 0 and detaching its root both fail in the job, with 431.
    for job in [
        h.attach(&new_root, &vm, Some(0)).await,
        h.detach(&old_root).await,
    ] {
        assert_eq!(job["jobstatus"], 2, "{job}");
        assert_eq!(job["jobresultcode"], 431);
        assert_eq!(
            job["jobresult"],
            json!({"errorcode": 431, "cserrorcode": 4350,
                   "errortext": "Root volume detach can happen only when vm is in states: Stopped or Destroyed"})
        );
    }
    let job = h.vm_job("stopVirtualMachine", &vm).await;
    assert_eq!(job["jobresult"]["virtualmachine"]["state"], "Stopped");
    let listed = h.ok("listVirtualMachines", &[("id", &vm)]).await;
    assert_eq!(listed["virtualmachine"][0]["state"], "Stopped");
    // Stopped, but the old root is still there.
    let job = h.attach(&new_root, &vm, Some(0)).await;
    assert_eq!(job["jobresultcode"], 431);
    assert_eq!(
        job["jobresult"]["errortext"],
        "Vm already has root volume attached to it"
    );
    // Detaching the root of a stopped VM is allowed; the volume becomes a data disk.
    let job = h.detach(&old_root).await;
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert_eq!(job["jobresult"]["volume"]["type"], "DATADISK");
    let job = h.attach(&new_root, &vm, Some(0)).await;
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert_eq!(job["jobresult"]["volume"]["deviceid"], 0);
    assert_eq!(job["jobresult"]["volume"]["type"], "ROOT");
    assert_eq!(job["jobresult"]["volume"]["vmstate"], "Stopped");
    // Attached to a stopped VM, a new volume keeps no storage until the VM starts.
    assert_eq!(job["jobresult"]["volume"]["state"], "Allocated");
    h.vm_job("startVirtualMachine", &vm).await;
    let v = h.volume(&new_root).await.expect("listed");
    assert_eq!(
        (v["state"].as_str(), v["vmstate"].as_str()),
        (Some("Ready"), Some("Running"))
    );
    assert_eq!(
        h.sim.root_volume_id(&vm).as_deref(),
        Some(new_root.as_str())
    );
    h.sim.shutdown().await;
}

#[tokio::test]
async fn data_disk_limit_depends_on_the_hypervisor() {
    let h = Harness::start().await;
    let vms = h.sim.vms();
    let vmware = vms.iter().find(|v| v.3 == "VMware").expect("a VMware VM");
    assert_eq!(vmware.2, "Stopped");
    let listed = h
        .ok("listVirtualMachines", &[("hypervisor", "VMware")])
        .await;
    assert_eq!(ids(&listed, "virtualmachine"), vec![vmware.0.clone()]);
    // A KVM VM takes 6 data disks, the VMware VM more.
    for _ in 0..7 {
        let v = h.create_volume("many", 1).await;
        let job = h.attach(&v, &vmware.0, None).await;
        assert_eq!(job["jobstatus"], 1, "{job}");
    }
    let attached = h
        .ok(
            "listVolumes",
            &[("virtualmachineid", &vmware.0), ("type", "DATADISK")],
        )
        .await;
    assert_eq!(attached["count"], 7);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn detach_errors_are_failed_jobs() {
    let h = Harness::start().await;
    let vm = h.sim.other_vm_ids()[0].clone();
    let id = h.create_volume("d", 1).await;
    // Nothing at that slot: CloudStack's `findByInstanceAndDeviceId(…).get(0)` fails inside the job.
    let r = h
        .ok(
            "detachVolume",
            &[("virtualmachineid", &vm), ("deviceid", "5")],
        )
        .await;
    let job = h.wait_job(r["jobid"].as_str().expect("jobid")).await;
    assert_eq!(
        (job["jobstatus"].clone(), job["jobresultcode"].clone()),
        (json!(2), json!(530))
    );
    assert_eq!(job["jobresult"]["cserrorcode"], 9999);
    // Both an id and a slot: the parameter check also runs in the job.
    let r = h
        .ok("detachVolume", &[("id", &id), ("virtualmachineid", &vm)])
        .await;
    let job = h.wait_job(r["jobid"].as_str().expect("jobid")).await;
    assert_eq!(job["jobresultcode"], 431);
    assert_eq!(
        job["jobresult"]["errortext"],
        "Please provide either a volume id, or a tuple(device id, instance id)"
    );
    // An unknown id is refused by the API layer at once.
    let (status, body) = h
        .call(
            "detachVolume",
            &[("id", "00000000-0000-4000-8000-000000000000")],
        )
        .await;
    assert_eq!((status, body["cserrorcode"].clone()), (431, json!(4350)));
    h.sim.shutdown().await;
}

#[tokio::test]
async fn snapshots_create_list_revert_delete() {
    use std::os::unix::fs::FileExt as _;
    let h = Harness::start().await;
    let appliance = h.sim.appliance_vm_id().to_owned();
    let id = h.create_volume("snapme", 1).await;
    assert_eq!(h.attach(&id, &appliance, None).await["jobstatus"], 1);
    let backing = h.backing_of(&id);
    let write = |data: &[u8]| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&backing)
            .expect("open backing");
        f.write_all_at(data, 4096).expect("write");
    };
    let read = || {
        let f = std::fs::File::open(&backing).expect("open backing");
        let mut buf = [0u8; 8];
        f.read_exact_at(&mut buf, 4096).expect("read");
        buf
    };
    write(b"before!!");
    let r = h.ok("createSnapshot", &[("volumeid", &id)]).await;
    let snap = r["id"].as_str().expect("id").to_owned();
    let job = h.wait_job(r["jobid"].as_str().expect("jobid")).await;
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert_eq!(job["jobinstancetype"], "Snapshot");
    assert_eq!(job["jobresult"]["snapshot"]["state"], "BackedUp");
    assert_eq!(job["jobresult"]["snapshot"]["volumeid"], id.as_str());
    let listed = h.ok("listSnapshots", &[("volumeid", &id)]).await;
    assert_eq!(ids(&listed, "snapshot"), vec![snap.clone()]);
    write(b"after!!!");
    // Attached to a running VM: no revert.
    let r = h.ok("revertSnapshot", &[("id", &snap)]).await;
    let job = h.wait_job(r["jobid"].as_str().expect("jobid")).await;
    assert_eq!(job["jobresultcode"], 431, "{job}");
    assert_eq!(
        job["jobresult"]["errortext"],
        "The VM the specified disk is attached to is not in the shutdown state."
    );
    assert_eq!(&read(), b"after!!!");
    assert_eq!(h.detach(&id).await["jobstatus"], 1);
    let r = h.ok("revertSnapshot", &[("id", &snap)]).await;
    let job = h.wait_job(r["jobid"].as_str().expect("jobid")).await;
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert_eq!(&read(), b"before!!");
    let r = h.ok("deleteSnapshot", &[("id", &snap)]).await;
    assert_eq!(
        h.wait_job(r["jobid"].as_str().expect("jobid")).await["jobstatus"],
        1
    );
    assert_eq!(h.ok("listSnapshots", &[]).await, json!({}));
    assert!(!h
        .state_dir()
        .join("snapshots")
        .join(format!("{snap}.img"))
        .exists());
    h.sim.shutdown().await;
}

#[tokio::test]
async fn tags_on_volumes() {
    let h = Harness::start().await;
    let a = h.create_volume("tagged", 1).await;
    let b = h.create_volume("plain", 1).await;
    let r = h
        .ok(
            "createTags",
            &[
                ("resourceids", &a),
                ("resourcetype", "Volume"),
                ("tags[0].key", "migration"),
                ("tags[0].value", "wave-1"),
                ("tags[1].key", "owner"),
                ("tags[1].value", "ops"),
            ],
        )
        .await;
    assert_eq!(
        h.wait_job(r["jobid"].as_str().expect("jobid")).await["jobstatus"],
        1
    );
    let tags = h.ok("listTags", &[("resourceid", &a)]).await;
    assert_eq!(tags["count"], 2);
    assert_eq!(tags["tag"][0]["resourcetype"], "Volume");
    let v = h.volume(&a).await.expect("volume");
    assert_eq!(v["tags"][0]["key"], "migration");
    let by_tag = h
        .ok(
            "listVolumes",
            &[("tags[0].key", "migration"), ("tags[0].value", "wave-1")],
        )
        .await;
    assert_eq!(ids(&by_tag, "volume"), vec![a.clone()]);
    assert!(!ids(&by_tag, "volume").contains(&b));
    let r = h
        .ok(
            "deleteTags",
            &[
                ("resourceids", &a),
                ("resourcetype", "Volume"),
                ("tags[0].key", "owner"),
            ],
        )
        .await;
    assert_eq!(
        h.wait_job(r["jobid"].as_str().expect("jobid")).await["jobstatus"],
        1
    );
    assert_eq!(h.ok("listTags", &[]).await["count"], 1);
    let (status, _) = h
        .call(
            "createTags",
            &[("resourceids", &a), ("resourcetype", "Volume")],
        )
        .await;
    assert_eq!(status, 431);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn read_commands_clients_call() {
    let h = Harness::start().await;
    let so = h.ok("listServiceOfferings", &[]).await;
    assert_eq!(so["count"], 1);
    assert!(so["serviceoffering"][0]["memory"].as_u64().is_some());
    let (status, body) = h.call("listTemplates", &[]).await;
    assert_eq!(status, 431);
    assert_eq!(
        body["errortext"],
        "Unable to execute API command listtemplates due to missing parameter templatefilter"
    );
    let t = h
        .ok("listTemplates", &[("templatefilter", "executable")])
        .await;
    assert_eq!(t["template"][0]["format"], "QCOW2");
    let os = h.ok("listOsTypes", &[]).await;
    assert_eq!(os["ostype"][0]["id"], t["template"][0]["ostypeid"]);
    let net = h.ok("listNetworks", &[]).await;
    let vm = h
        .ok("listVirtualMachines", &[("id", h.sim.appliance_vm_id())])
        .await;
    assert_eq!(
        vm["virtualmachine"][0]["nic"][0]["networkid"],
        net["network"][0]["id"]
    );
    assert_eq!(h.ok("listPublicIpAddresses", &[]).await["count"], 1);
    assert_eq!(h.ok("listPortForwardingRules", &[]).await, json!({}));
    assert_eq!(h.ok("listIpForwardingRules", &[]).await, json!({}));
    assert_eq!(h.ok("listHypervisors", &[]).await["count"], 3);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn vm_stop_and_detach_behind_the_clients_back() {
    let h = Harness::start().await;
    let appliance = h.sim.appliance_vm_id().to_owned();
    let vm = h.sim.other_vm_ids()[1].clone();
    // From Rust.
    h.sim.faults().stop_vm(&vm).expect("stop");
    let listed = h.ok("listVirtualMachines", &[("id", &vm)]).await;
    assert_eq!(listed["virtualmachine"][0]["state"], "Stopped");
    h.sim.faults().start_vm(&vm).expect("start");
    assert!(matches!(
        h.sim.faults().stop_vm("no-such-vm"),
        Err(cloudsim::ActionError::Refused { .. })
    ));
    // Over HTTP.
    let url = format!("http://{}/sim/vms/{vm}/stop", h.sim.addr());
    let r = h.http.post(&url).send().await.expect("post");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["state"], "Stopped");
    // A volume vanishes from the appliance: no job, link and device gone.
    let id = h.create_volume("yanked", 1).await;
    assert_eq!(h.attach(&id, &appliance, None).await["jobstatus"], 1);
    assert!(std::fs::symlink_metadata(h.link_of(&id)).is_ok());
    let url = format!("http://{}/sim/volumes/{id}/detach", h.sim.addr());
    let r = h.http.post(&url).send().await.expect("post");
    assert_eq!(r.status(), 200);
    assert!(std::fs::symlink_metadata(h.link_of(&id)).is_err());
    assert!(h
        .volume(&id)
        .await
        .expect("vol")
        .get("virtualmachineid")
        .is_none());
    // Not attached any more: refused.
    assert_eq!(h.http.post(&url).send().await.expect("post").status(), 409);
    assert_eq!(h.attach(&id, &appliance, None).await["jobstatus"], 1);
    h.sim.faults().detach_volume(&id).expect("detach from Rust");
    assert!(std::fs::symlink_metadata(h.link_of(&id)).is_err());
    h.sim.shutdown().await;
}

#[tokio::test]
async fn restart_keeps_vm_states_snapshots_and_tags() {
    let h = Harness::start().await;
    let vm = h.sim.other_vm_ids()[0].clone();
    h.vm_job("stopVirtualMachine", &vm).await;
    let id = h.create_volume("kept", 1).await;
    let r = h.ok("createSnapshot", &[("volumeid", &id)]).await;
    let snap = r["id"].as_str().expect("id").to_owned();
    h.wait_job(r["jobid"].as_str().expect("jobid")).await;
    let r = h
        .ok(
            "createTags",
            &[
                ("resourceids", &id),
                ("resourcetype", "Volume"),
                ("tags[0].key", "k"),
                ("tags[0].value", "v"),
            ],
        )
        .await;
    h.wait_job(r["jobid"].as_str().expect("jobid")).await;
    let common::Harness { dir, sim, http } = h;
    sim.shutdown().await;
    let sim = cloudsim::Simulator::start(common::config(&dir))
        .await
        .expect("restart");
    let h = Harness { dir, sim, http };
    let listed = h.ok("listVirtualMachines", &[("id", &vm)]).await;
    assert_eq!(listed["virtualmachine"][0]["state"], "Stopped");
    assert_eq!(
        ids(&h.ok("listSnapshots", &[]).await, "snapshot"),
        vec![snap]
    );
    assert_eq!(h.volume(&id).await.expect("vol")["tags"][0]["value"], "v");
    h.sim.shutdown().await;
}

/// destroyVirtualMachine as `UserVmManagerImpl.destroyVm` and `VolumeOrchestrator.cleanupVolumes` do it: an
/// asynchronous job on the VM; without `expunge` the VM stays `Destroyed` with its volumes attached, with
/// `expunge` it is removed, its ROOT volume with it, and its data volumes are detached and kept. The change
/// survives a restart of the simulator.
#[tokio::test]
async fn destroy_virtual_machine_detaches_data_volumes_when_expunged() {
    let h = Harness::start().await;
    let (s, body) = h
        .call("destroyVirtualMachine", &[("id", "no-such-vm")])
        .await;
    assert_eq!(s, 431, "{body}");
    let faults = h.sim.faults();
    let test_vm = faults.deploy_vm("test-failover-1").expect("deploy")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let kept_vm = faults.deploy_vm("test-failover-2").expect("deploy")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let listed = h.ok("listVirtualMachines", &[("id", &test_vm)]).await;
    assert_eq!(listed["virtualmachine"][0]["state"], "Running", "{listed}");
    let root = h
        .sim
        .root_volume_id(&test_vm)
        .expect("a deployed VM has a root");
    let data = h.create_volume("failover-data", 1).await;
    assert_eq!(h.attach(&data, &test_vm, None).await["jobstatus"], 1);

    // Without expunge: Destroyed, volumes still attached, no new attachment, no stop or start.
    let other = h.create_volume("kept-data", 1).await;
    assert_eq!(h.attach(&other, &kept_vm, None).await["jobstatus"], 1);
    let job = h.vm_job("destroyVirtualMachine", &kept_vm).await;
    assert_eq!(job["jobresult"]["virtualmachine"]["state"], "Destroyed");
    assert_eq!(
        h.volume(&other).await.expect("kept")["virtualmachineid"],
        kept_vm
    );
    let late = h.create_volume("late", 1).await;
    let job = h.attach(&late, &kept_vm, None).await;
    assert_eq!(job["jobstatus"], 2, "{job}");
    assert_eq!(
        job["jobresult"]["errortext"],
        "Please specify a VM that is either running or stopped."
    );
    let r = h.ok("startVirtualMachine", &[("id", &kept_vm)]).await;
    let job = h.wait_job(r["jobid"].as_str().expect("jobid")).await;
    assert_eq!(job["jobstatus"], 2, "{job}");

    // With expunge: gone, its ROOT volume with it, its data volume detached and kept.
    let r = h
        .ok(
            "destroyVirtualMachine",
            &[("id", &test_vm), ("expunge", "true")],
        )
        .await;
    let job = h.wait_job(r["jobid"].as_str().expect("jobid")).await;
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert_eq!(job["jobinstancetype"], "VirtualMachine");
    assert_eq!(job["jobinstanceid"], test_vm);
    assert_eq!(
        job["cmd"],
        "org.apache.cloudstack.api.command.user.vm.DestroyVMCmd"
    );
    assert_eq!(job["jobresult"]["virtualmachine"]["id"], test_vm);
    let listed = h.ok("listVirtualMachines", &[("id", &test_vm)]).await;
    assert!(listed.get("virtualmachine").is_none(), "{listed}");
    assert!(
        h.volume(&root).await.is_none(),
        "the ROOT volume is expunged"
    );
    let v = h.volume(&data).await.expect("the data volume is kept");
    assert!(v.get("virtualmachineid").is_none(), "{v}");
    assert_eq!(v["state"], "Ready");
    // The VM id is unknown from now on.
    let (s, _) = h
        .call(
            "destroyVirtualMachine",
            &[("id", &test_vm), ("expunge", "true")],
        )
        .await;
    assert_eq!(s, 431);

    // The state survives a restart.
    let common::Harness { dir, sim, http } = h;
    sim.shutdown().await;
    let sim = cloudsim::Simulator::start(common::config(&dir))
        .await
        .expect("restart");
    let h = Harness { dir, sim, http };
    let listed = h.ok("listVirtualMachines", &[("id", &test_vm)]).await;
    assert!(listed.get("virtualmachine").is_none(), "{listed}");
    let listed = h.ok("listVirtualMachines", &[("id", &kept_vm)]).await;
    assert_eq!(listed["virtualmachine"][0]["state"], "Destroyed");
    assert!(h.volume(&root).await.is_none());
    assert!(h
        .volume(&data)
        .await
        .expect("kept")
        .get("virtualmachineid")
        .is_none());
    h.sim.shutdown().await;
}
