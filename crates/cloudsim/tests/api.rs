//! The simulator over real HTTP: signatures, response shapes, the volume lifecycle, device slots,
//! persistence across restarts and every fault.

mod common;

use std::time::{Duration, Instant};

use cloudstack::GIB;
use common::{future_expiry, signed, Harness, KEY, SECRET};
use serde_json::json;

const UNAUTHORIZED: &str = "unable to verify user credentials and/or request signature";

#[tokio::test]
async fn bad_signature_unknown_key_and_missing_signature_are_401() {
    let h = Harness::start().await;
    for p in [
        signed(KEY, "wrong-secret", "listZones", &[], None),
        signed("other-key", SECRET, "listZones", &[], None),
        signed(KEY, SECRET, "listZones", &[], None)
            .into_iter()
            .filter(|(k, _)| k != "signature")
            .collect(),
    ] {
        let (status, body) = h.get_raw(&p).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["listzonesresponse"]["errorcode"], 401);
        assert_eq!(body["listzonesresponse"]["errortext"], UNAUTHORIZED);
    }
    // A tampered parameter breaks the signature too.
    let mut p = signed(KEY, SECRET, "listVolumes", &[("name", "a")], None);
    p[3].1 = "b".into();
    assert_eq!(h.get_raw(&p).await.0, 401);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn signature_versions_2_and_3_with_expiry() {
    let h = Harness::start().await;
    // Version 2: no expiry.
    let (status, body) = h
        .get_raw(&signed(KEY, SECRET, "listZones", &[], None))
        .await;
    assert_eq!(status, 200, "{body}");
    // Version 3, in the future (both `Z` and `+0000` forms).
    let (status, _) = h
        .get_raw(&signed(
            KEY,
            SECRET,
            "listZones",
            &[],
            Some(future_expiry()),
        ))
        .await;
    assert_eq!(status, 200);
    let later = (chrono::Utc::now() + chrono::Duration::minutes(5))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    assert_eq!(
        h.get_raw(&signed(KEY, SECRET, "listZones", &[], Some(later)))
            .await
            .0,
        200
    );
    // Version 3, expired or malformed.
    let past = (chrono::Utc::now() - chrono::Duration::minutes(1))
        .format("%Y-%m-%dT%H:%M:%S%z")
        .to_string();
    let (status, body) = h
        .get_raw(&signed(KEY, SECRET, "listZones", &[], Some(past)))
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["listzonesresponse"]["errortext"], UNAUTHORIZED);
    assert_eq!(
        h.get_raw(&signed(KEY, SECRET, "listZones", &[], Some("soon".into())))
            .await
            .0,
        401
    );
    // Values with reserved characters and non-ASCII text verify, by GET and by form POST.
    let p = signed(
        KEY,
        SECRET,
        "listVolumes",
        &[("name", "a+b/c=d&e f*~ Größe")],
        Some(future_expiry()),
    );
    assert_eq!(h.get_raw(&p).await.0, 200);
    let (status, body) = h.post_raw(&p).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"listvolumesresponse": {}}));
    h.sim.shutdown().await;
}

#[tokio::test]
async fn list_shapes_match_cloudstack() {
    let h = Harness::start().await;
    let z = h.ok("listZones", &[]).await;
    assert_eq!(z["count"], 1);
    assert_eq!(z["zone"][0]["id"], h.sim.zone_id());
    let o = h.ok("listDiskOfferings", &[]).await;
    assert_eq!(o["count"], 2);
    let offers = h.sim.disk_offerings();
    assert_eq!(offers.len(), 2);
    assert!(offers.iter().any(|o| o.2 == Some(5)) && offers.iter().any(|o| o.2.is_none()));
    let custom = o["diskoffering"]
        .as_array()
        .expect("array")
        .iter()
        .find(|d| d["iscustomized"] == true)
        .expect("custom");
    assert_eq!(custom["disksize"], 0);
    let vms = h.ok("listVirtualMachines", &[("listall", "true")]).await;
    assert_eq!(vms["count"], 4);
    let ids: Vec<&str> = vms["virtualmachine"]
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v["id"].as_str().expect("id"))
        .collect();
    assert!(ids.contains(&h.sim.appliance_vm_id()));
    for other in h.sim.other_vm_ids() {
        assert!(ids.contains(&other.as_str()));
    }
    assert_eq!(h.sim.other_vm_ids().len(), 2);
    let one = h
        .ok("listVirtualMachines", &[("id", h.sim.appliance_vm_id())])
        .await;
    assert_eq!(one["count"], 1);
    assert_eq!(one["virtualmachine"][0]["state"], "Running");
    // Every VM has its ROOT volume at device 0.
    let roots = h.ok("listVolumes", &[("type", "ROOT")]).await;
    assert_eq!(roots["count"], 4);
    assert!(roots["volume"]
        .as_array()
        .expect("array")
        .iter()
        .all(|v| v["deviceid"] == 0 && v["state"] == "Ready"));
    assert_eq!(h.ok("listAsyncJobs", &[]).await, json!({}));
    // Unknown ids.
    let (status, body) = h.call("queryAsyncJobResult", &[("jobid", "nope")]).await;
    assert_eq!(status, 431, "{body}");
    assert_eq!(body["cserrorcode"], 4350);
    let (status, _) = h
        .call(
            "attachVolume",
            &[("virtualmachineid", h.sim.appliance_vm_id())],
        )
        .await;
    assert_eq!(status, 431);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn volume_lifecycle_with_the_rust_client() {
    let h = Harness::start().await;
    let mut cfg = cloudstack::Config::new(h.sim.api_url(), KEY, cloudstack::Secret::new(SECRET));
    cfg.job_poll.initial = Duration::from_millis(20);
    cfg.job_poll.max = Duration::from_millis(50);
    let client = cloudstack::Client::new(cfg).expect("client");
    assert_eq!(client.list_zones().await.expect("zones").len(), 1);
    let custom = h
        .sim
        .disk_offerings()
        .into_iter()
        .find(|o| o.2.is_none())
        .expect("custom")
        .0;
    let job = client
        .create_volume(&cloudstack::CreateVolume {
            name: "lifecycle".into(),
            zone_id: h.sim.zone_id().into(),
            disk_offering_id: custom,
            size_bytes: Some(GIB),
        })
        .await
        .expect("create");
    let id = job
        .resource_id
        .clone()
        .expect("createVolume returns the id");
    let vol = client
        .wait_volume_job(&job.job_id, Duration::from_secs(10))
        .await
        .expect("create job");
    assert_eq!(vol.id, id);
    assert_eq!(vol.state, "Allocated");
    assert_eq!(vol.size, GIB);
    let backing = h.backing_of(&id);
    assert_eq!(
        std::fs::metadata(&backing).expect("backing file").len(),
        GIB
    );

    let appliance = h.sim.appliance_vm_id().to_owned();
    let job = client
        .attach_volume(&id, &appliance, None)
        .await
        .expect("attach");
    let vol = client
        .wait_volume_job(&job.job_id, Duration::from_secs(10))
        .await
        .expect("attach job");
    assert_eq!(vol.state, "Ready");
    assert_eq!(vol.device_id, Some(1));
    assert_eq!(vol.virtualmachine_id.as_deref(), Some(appliance.as_str()));
    let link = h.link_of(&id);
    assert_eq!(std::fs::read_link(&link).expect("by-id link"), backing);

    let by_vm = client
        .list_volumes(&cloudstack::ListVolumes {
            virtualmachine_id: Some(appliance.clone()),
            volume_type: Some("DATADISK".into()),
            ..Default::default()
        })
        .await
        .expect("list by vm");
    assert_eq!(
        by_vm.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        vec![id.as_str()]
    );

    // Deleting an attached volume is refused like CloudStack does.
    let err = client
        .delete_volume(&id)
        .await
        .expect_err("attached volume cannot be deleted");
    assert!(err.to_string().contains("not attached to any VM"), "{err}");

    let job = client.detach_volume(&id).await.expect("detach");
    let vol = client
        .wait_volume_job(&job.job_id, Duration::from_secs(10))
        .await
        .expect("detach job");
    assert_eq!(vol.virtualmachine_id, None);
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "link removed on detach"
    );
    let jobs = client.list_async_jobs().await.expect("jobs");
    assert_eq!(jobs.len(), 3);

    client.delete_volume(&id).await.expect("delete");
    assert!(!backing.exists());
    assert!(client.get_volume(&id).await.expect("get").is_none());
    h.sim.shutdown().await;
}

#[tokio::test]
async fn volume_lifecycle_raw() {
    let h = Harness::start().await;
    let small = h
        .sim
        .disk_offerings()
        .into_iter()
        .find(|o| o.2 == Some(5))
        .expect("small")
        .0;
    let zone = h.sim.zone_id().to_owned();
    let r = h
        .ok(
            "createVolume",
            &[
                ("name", "raw"),
                ("zoneid", &zone),
                ("diskofferingid", &small),
            ],
        )
        .await;
    let id = r["id"].as_str().expect("id").to_owned();
    // Listed at once as Allocated.
    let v = h.volume(&id).await.expect("listed");
    assert_eq!(v["state"], "Allocated");
    assert_eq!(v["size"], 5u64 << 30);
    let job = h.wait_job(r["jobid"].as_str().expect("jobid")).await;
    assert_eq!(job["jobstatus"], 1);
    assert_eq!(job["jobresulttype"], "object");
    assert_eq!(job["jobinstancetype"], "Volume");
    assert_eq!(job["jobresult"]["volume"]["id"], id.as_str());
    // A fixed offering refuses a size; a custom one needs it.
    let (status, _) = h
        .call(
            "createVolume",
            &[("zoneid", &zone), ("diskofferingid", &small), ("size", "3")],
        )
        .await;
    assert_eq!(status, 431);
    let custom = h
        .sim
        .disk_offerings()
        .into_iter()
        .find(|o| o.2.is_none())
        .expect("custom")
        .0;
    let (status, body) = h
        .call(
            "createVolume",
            &[("zoneid", &zone), ("diskofferingid", &custom)],
        )
        .await;
    assert_eq!(status, 431, "{body}");

    let other = h.sim.other_vm_ids()[0].clone();
    let job = h.attach(&id, &other, None).await;
    assert_eq!(
        job["jobresult"]["volume"]["virtualmachineid"],
        other.as_str()
    );
    assert_eq!(job["jobresult"]["volume"]["state"], "Ready");
    // Remote attachments are bookkeeping only.
    assert!(std::fs::symlink_metadata(h.link_of(&id)).is_err());
    let (status, body) = h.call("deleteVolume", &[("id", &id)]).await;
    assert_eq!(
        (
            status,
            body["errorcode"].clone(),
            body["cserrorcode"].clone()
        ),
        (431, json!(431), json!(4350))
    );
    // Detach by VM and device id.
    let r = h
        .ok(
            "detachVolume",
            &[("virtualmachineid", &other), ("deviceid", "1")],
        )
        .await;
    assert_eq!(
        h.wait_job(r["jobid"].as_str().expect("jobid")).await["jobstatus"],
        1
    );
    // Detaching again fails in the job.
    let job = h.detach(&id).await;
    assert_eq!(job["jobstatus"], 2);
    assert_eq!(job["jobresultcode"], 431);
    assert_eq!(
        job["jobresult"],
        json!({"errorcode": 431, "cserrorcode": 4350, "errortext": "The specified volume is not attached to a VM."})
    );
    let del = h.ok("deleteVolume", &[("id", &id)]).await;
    assert_eq!(del, json!({"success": "true"}));
    assert!(h.volume(&id).await.is_none());
    h.sim.shutdown().await;
}

#[tokio::test]
async fn device_id_rules() {
    let h = Harness::start().await;
    let vm = h.sim.other_vm_ids()[1].clone();
    let mut vols = Vec::new();
    for i in 0..8 {
        vols.push(h.create_volume(&format!("d{i}"), 1).await);
    }
    // A new ROOT only on a stopped VM whose old root is detached.
    let old_root = h.sim.root_volume_id(&vm).expect("root");
    assert_eq!(h.attach(&vols[0], &vm, Some(0)).await["jobstatus"], 2);
    h.vm_job("stopVirtualMachine", &vm).await;
    assert_eq!(h.detach(&old_root).await["jobstatus"], 1);
    let job = h.attach(&vols[0], &vm, Some(0)).await;
    assert_eq!(job["jobresult"]["volume"]["deviceid"], 0);
    assert_eq!(job["jobresult"]["volume"]["type"], "ROOT");
    h.vm_job("startVirtualMachine", &vm).await;
    // Next free slots skip 3.
    let mut slots = Vec::new();
    for v in &vols[1..4] {
        let job = h.attach(v, &vm, None).await;
        assert_eq!(job["jobresult"]["volume"]["type"], "DATADISK");
        slots.push(
            job["jobresult"]["volume"]["deviceid"]
                .as_u64()
                .expect("deviceid"),
        );
    }
    assert_eq!(slots, vec![1, 2, 4]);
    // 3 is reserved; a taken slot is refused.
    let job = h.attach(&vols[4], &vm, Some(3)).await;
    assert_eq!(job["jobstatus"], 2, "{job}");
    assert_eq!(job["jobresult"]["errorcode"], 530);
    assert_eq!(job["jobresultcode"], 530);
    assert_eq!(job["jobresult"]["cserrorcode"], 9999);
    let job = h.attach(&vols[4], &vm, Some(2)).await;
    assert_eq!(job["jobstatus"], 2);
    assert_eq!(
        job["jobresult"]["errortext"],
        format!("deviceId 2 is used by vm {vm}")
    );
    // A chosen free slot is honoured.
    assert_eq!(
        h.attach(&vols[4], &vm, Some(7)).await["jobresult"]["volume"]["deviceid"],
        7
    );
    for v in &vols[5..7] {
        assert_eq!(h.attach(v, &vm, None).await["jobstatus"], 1);
    }
    // Six data disks now: the seventh is refused with CloudStack's text.
    let job = h.attach(&vols[7], &vm, None).await;
    assert_eq!(job["jobstatus"], 2);
    assert_eq!(job["jobresult"]["errorcode"], 431);
    assert_eq!(
        job["jobresult"]["errortext"],
        "The specified VM already has the maximum number of data disks (6) attached. Please specify another VM."
    );
    // An attached volume cannot be attached again.
    let job = h
        .attach(&vols[1], &h.sim.other_vm_ids()[0].clone(), None)
        .await;
    assert_eq!(job["jobstatus"], 2);
    // listVolumes by VM with paging.
    let all = h.ok("listVolumes", &[("virtualmachineid", &vm)]).await;
    assert_eq!(all["count"], 7);
    let page = h
        .ok(
            "listVolumes",
            &[("virtualmachineid", &vm), ("page", "2"), ("pagesize", "5")],
        )
        .await;
    assert_eq!(page["count"], 7);
    assert_eq!(page["volume"].as_array().expect("array").len(), 2);
    let root = h
        .ok(
            "listVolumes",
            &[("virtualmachineid", &vm), ("type", "ROOT")],
        )
        .await;
    assert_eq!(root["count"], 1);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn restart_keeps_volumes_attachments_and_pending_jobs() {
    let h = Harness::start().await;
    let id = h.create_volume("persist", 1).await;
    let appliance = h.sim.appliance_vm_id().to_owned();
    assert_eq!(h.attach(&id, &appliance, None).await["jobstatus"], 1);
    let second = h.create_volume("pending", 1).await;
    // A slow job is still pending at shutdown.
    h.sim.faults().add(cloudsim::FaultSpec::SlowJob {
        command: "attachVolume".into(),
        extra_delay_ms: 300,
        count: 1,
    });
    let r = h
        .ok(
            "attachVolume",
            &[
                ("id", &second),
                ("virtualmachineid", h.sim.other_vm_ids()[0].as_str()),
            ],
        )
        .await;
    let pending_job = r["jobid"].as_str().expect("jobid").to_owned();
    let ids = (
        h.sim.appliance_vm_id().to_owned(),
        h.sim.zone_id().to_owned(),
        h.sim.other_vm_ids().to_vec(),
    );
    let Harness { dir, sim, http } = h;
    sim.shutdown().await;

    let mut cfg = common::config(&dir);
    cfg.seed = 99; // the saved state wins over a new seed
    let sim = cloudsim::Simulator::start(cfg).await.expect("restart");
    let h = Harness { dir, sim, http };
    assert_eq!(
        (
            h.sim.appliance_vm_id().to_owned(),
            h.sim.zone_id().to_owned(),
            h.sim.other_vm_ids().to_vec()
        ),
        ids
    );
    let v = h.volume(&id).await.expect("volume survives");
    assert_eq!(v["state"], "Ready");
    assert_eq!(v["virtualmachineid"], appliance.as_str());
    assert_eq!(
        std::fs::read_link(h.link_of(&id)).expect("link"),
        h.backing_of(&id)
    );
    let job = h.wait_job(&pending_job).await;
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert_eq!(h.volume(&second).await.expect("second")["deviceid"], 1);
    // The appliance id given must match the saved one.
    let mut cfg = common::config(&h.dir);
    cfg.appliance_vm_id = Some("00000000-0000-0000-0000-000000000000".into());
    let err = cloudsim::Simulator::start(cfg)
        .await
        .expect_err("mismatch refused");
    assert_eq!(err.kind(), cloudsim::SimErrorKind::State);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn fault_fail_command_over_http() {
    let h = Harness::start().await;
    let url = format!("http://{}/sim/faults", h.sim.addr());
    let r = h
        .http
        .post(&url)
        .body(r#"{"type":"fail_command","command":"listZones","count":2,"errorcode":530,"errortext":"zone db down"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let listed: serde_json::Value = h
        .http
        .get(&url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(listed["faults"][0]["type"], "fail_command");
    for _ in 0..2 {
        let (status, body) = h.call("listZones", &[]).await;
        assert_eq!(status, 530);
        assert_eq!(body["errortext"], "zone db down");
    }
    assert_eq!(h.call("listZones", &[]).await.0, 200);
    // Clearing over HTTP.
    h.http
        .post(&url)
        .body(r#"[{"type":"throttle","count":5}]"#)
        .send()
        .await
        .expect("post");
    assert_eq!(h.call("listZones", &[]).await.0, 429);
    assert_eq!(
        h.http.delete(&url).send().await.expect("delete").status(),
        200
    );
    assert_eq!(h.call("listZones", &[]).await.0, 200);
    // A bad shape is a 400.
    let r = h
        .http
        .post(&url)
        .body(r#"{"type":"nope"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn fault_throttle_and_start_time_faults() {
    let h = Harness::start_with(|c| {
        c.faults =
            vec![cloudsim::FaultSpec::parse(r#"{"type":"throttle","count":2}"#).expect("fault")];
    })
    .await;
    for _ in 0..2 {
        let (status, body) = h.call("listVirtualMachines", &[]).await;
        assert_eq!((status, body["errorcode"].clone()), (429, json!(429)));
    }
    assert_eq!(h.call("listVirtualMachines", &[]).await.0, 200);
    // Bad signatures are refused before throttling.
    h.sim.faults().add(cloudsim::FaultSpec::Throttle {
        count: 1,
        probability: None,
    });
    assert_eq!(
        h.get_raw(&signed(KEY, "bad", "listZones", &[], None))
            .await
            .0,
        401
    );
    assert_eq!(h.call("listZones", &[]).await.0, 429);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn fault_slow_job_and_fail_job() {
    let h = Harness::start().await;
    let id = h.create_volume("slow", 1).await;
    let vm = h.sim.other_vm_ids()[0].clone();
    h.sim.faults().add(cloudsim::FaultSpec::SlowJob {
        command: "attachVolume".into(),
        extra_delay_ms: 600,
        count: 1,
    });
    let started = Instant::now();
    let r = h
        .ok("attachVolume", &[("id", &id), ("virtualmachineid", &vm)])
        .await;
    let job = h.wait_job(r["jobid"].as_str().expect("jobid")).await;
    assert_eq!(job["jobstatus"], 1);
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "slow job finished after {:?}",
        started.elapsed()
    );

    h.sim.faults().add(cloudsim::FaultSpec::FailJob {
        command: "detachVolume".into(),
        count: 1,
        errorcode: 530,
        errortext: Some("agent timed out".into()),
    });
    let job = h.detach(&id).await;
    assert_eq!(job["jobstatus"], 2);
    assert_eq!(job["jobresultcode"], 530);
    assert_eq!(
        job["jobresult"],
        json!({"errorcode": 530, "cserrorcode": 9999, "errortext": "agent timed out"})
    );
    // Nothing changed; the next detach works.
    assert_eq!(
        h.volume(&id).await.expect("vol")["virtualmachineid"],
        vm.as_str()
    );
    assert_eq!(h.detach(&id).await["jobstatus"], 1);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn fault_links_kept_and_skipped() {
    let h = Harness::start().await;
    let appliance = h.sim.appliance_vm_id().to_owned();
    let a = h.create_volume("keep", 1).await;
    let b = h.create_volume("skip", 1).await;
    h.sim.faults().add(cloudsim::FaultSpec::KeepLinkOnDetach {
        volume_id: Some(a.clone()),
        count: 1,
    });
    h.sim.faults().add(cloudsim::FaultSpec::SkipLinkOnAttach {
        volume_id: None,
        count: 1,
    });
    // Skipped link: the attach succeeds, but no device link appears.
    assert_eq!(h.attach(&b, &appliance, None).await["jobstatus"], 1);
    assert!(std::fs::symlink_metadata(h.link_of(&b)).is_err());
    // Kept link: the detach succeeds, the link stays.
    assert_eq!(h.attach(&a, &appliance, None).await["jobstatus"], 1);
    assert!(std::fs::symlink_metadata(h.link_of(&a)).is_ok());
    assert_eq!(h.detach(&a).await["jobstatus"], 1);
    assert!(h
        .volume(&a)
        .await
        .expect("vol")
        .get("virtualmachineid")
        .is_none());
    assert!(
        std::fs::symlink_metadata(h.link_of(&a)).is_ok(),
        "link left behind"
    );
    // Both faults are used up.
    assert_eq!(h.detach(&b).await["jobstatus"], 1);
    assert_eq!(h.attach(&a, &appliance, None).await["jobstatus"], 1);
    assert_eq!(h.detach(&a).await["jobstatus"], 1);
    assert!(std::fs::symlink_metadata(h.link_of(&a)).is_err());
    assert!(h.sim.faults().list().is_empty());
    // Cleanup removes a leftover link too.
    h.sim.faults().add(cloudsim::FaultSpec::KeepLinkOnDetach {
        volume_id: None,
        count: 1,
    });
    assert_eq!(h.attach(&a, &appliance, None).await["jobstatus"], 1);
    assert_eq!(h.detach(&a).await["jobstatus"], 1);
    assert!(std::fs::symlink_metadata(h.link_of(&a)).is_ok());
    h.sim.detach_all_devices();
    assert!(std::fs::symlink_metadata(h.link_of(&a)).is_err());
    h.sim.shutdown().await;
}

#[tokio::test]
async fn fault_wrong_size() {
    let h = Harness::start().await;
    let id = h.create_volume("sized", 2).await;
    h.sim.faults().add(cloudsim::FaultSpec::WrongSize {
        volume_id: Some(id.clone()),
        delta_bytes: -(1 << 20),
    });
    let v = h.volume(&id).await.expect("vol");
    assert_eq!(v["size"], 2 * GIB - (1 << 20));
    assert_eq!(
        std::fs::metadata(h.backing_of(&id)).expect("file").len(),
        2 * GIB
    );
    let job = h.attach(&id, h.sim.other_vm_ids()[0].as_str(), None).await;
    assert_eq!(job["jobresult"]["volume"]["size"], 2 * GIB - (1 << 20));
    h.sim.faults().clear();
    assert_eq!(h.volume(&id).await.expect("vol")["size"], 2 * GIB);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn same_seed_gives_same_ids() {
    let a = Harness::start().await;
    let b = Harness::start().await;
    assert_eq!(a.sim.appliance_vm_id(), b.sim.appliance_vm_id());
    assert_eq!(a.create_volume("x", 1).await, b.create_volume("x", 1).await);
    let c = Harness::start_with(|c| c.seed = 8).await;
    assert_ne!(a.sim.appliance_vm_id(), c.sim.appliance_vm_id());
    for h in [a, b, c] {
        h.sim.shutdown().await;
    }
}

/// listAsyncJobs lists a job while it runs, in the shape CloudStack gives it (`jobstatus` 0, the command's
/// class in `cmd`, the volume as `jobinstancetype`/`jobinstanceid`, `created`, no result yet), and again with
/// its outcome once it ended: what a client needs to find a job whose id it lost.
#[tokio::test]
async fn list_async_jobs_shows_a_pending_job_with_its_command_and_volume() {
    let h = Harness::start().await;
    let id = h.create_volume("listed-job", 1).await;
    let vm = h.sim.other_vm_ids()[0].clone();
    h.sim.faults().add(cloudsim::FaultSpec::SlowJob {
        command: "attachVolume".into(),
        extra_delay_ms: 2_000,
        count: 1,
    });
    let r = h
        .ok("attachVolume", &[("id", &id), ("virtualmachineid", &vm)])
        .await;
    let jobid = r["jobid"].as_str().expect("jobid").to_owned();
    let listed = h.ok("listAsyncJobs", &[]).await;
    let jobs = listed["asyncjobs"].as_array().expect("asyncjobs array");
    assert_eq!(listed["count"], jobs.len(), "{listed}");
    let job = jobs
        .iter()
        .find(|j| j["jobid"] == jobid.as_str())
        .unwrap_or_else(|| panic!("the attach job is listed: {listed}"));
    assert_eq!(job["jobstatus"], 0, "{job}");
    assert_eq!(job["jobresultcode"], 0, "{job}");
    assert_eq!(job["jobprocstatus"], 0, "{job}");
    assert_eq!(
        job["cmd"],
        "org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd"
    );
    assert_eq!(job["jobinstancetype"], "Volume");
    assert_eq!(job["jobinstanceid"], id.as_str());
    assert!(job["created"].is_string(), "{job}");
    assert!(
        job["accountid"].is_string() && job["userid"].is_string(),
        "{job}"
    );
    assert!(job.get("jobresult").is_none(), "{job}");
    // The client decodes it.
    let client = cloudstack::Client::new(cloudstack::Config {
        url: h.sim.api_url(),
        api_key: KEY.into(),
        secret_key: cloudstack::Secret::new(SECRET),
        ..cloudstack::Config::default()
    })
    .expect("client");
    let info = client
        .list_async_jobs()
        .await
        .expect("jobs")
        .into_iter()
        .find(|j| j.job_id == jobid)
        .expect("decoded");
    assert_eq!(info.job_status, Some(0));
    assert_eq!(info.instance_type.as_deref(), Some("Volume"));
    assert_eq!(info.instance_id.as_deref(), Some(id.as_str()));
    // Once it ended, listed with its outcome.
    assert_eq!(h.wait_job(&jobid).await["jobstatus"], 1);
    let listed = h.ok("listAsyncJobs", &[]).await;
    let job = listed["asyncjobs"]
        .as_array()
        .expect("asyncjobs array")
        .iter()
        .find(|j| j["jobid"] == jobid.as_str())
        .expect("still listed")
        .clone();
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert_eq!(job["jobresult"]["volume"]["virtualmachineid"], vm.as_str());
    h.sim.shutdown().await;
}
