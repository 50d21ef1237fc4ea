//! Faults injected into the simulator: each ends in a failed operation with a clear error and kind, and the
//! cloud attachment undone (or never made), or a failed create's volume deleted. Also: transient cloud errors
//! are retried and do not fail anything; a change whose answer was lost, refused after acting or unreadable is
//! carried out once; job-status answers that say nothing are asked again; an older CloudStack's texts and a
//! small `default.page.size` are understood.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use cloudsim::FaultSpec;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{TestDaemon, GIB};
use uuid::Uuid;

async fn attach_appliance(d: &TestDaemon, vol: Uuid) -> Value {
    let (s, op) = d
        .post(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": d.appliance()}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    d.wait_op(&op).await
}

/// Cloud, database and export registry all say "not attached".
async fn assert_undone(d: &TestDaemon, vol: Uuid) {
    let (_, st) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(st["state"], "detached", "{st}");
    assert!(st["attachment"].is_null(), "{st}");
    assert!(
        st["cloudstack_data"]["virtualmachineid"].is_null(),
        "the cloud attachment must be undone: {st}"
    );
    let (_, exports) = d.get("/exports").await;
    assert_eq!(exports["count"], 0, "{exports}");
    let (s, _) = d.get(&format!("/volumes/{vol}/device")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attach_job_fails_the_operation_with_the_cloud_error() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("f1", GIB).await;
    d.sim().faults().add(FaultSpec::FailJob {
        command: "attachVolume".into(),
        count: 1,
        errorcode: 530,
        errortext: Some("Failed to attach volume: storage pool unreachable".into()),
    });
    let done = attach_appliance(&d, vol).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "cloud_job_failed", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("storage pool unreachable"),
        "the cloud's reason is passed on: {done}"
    );
    assert_undone(&d, vol).await;
    // The volume is usable afterwards.
    let ok = attach_appliance(&d, vol).await;
    assert_eq!(ok["status"], "completed", "{ok}");
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_appears_is_detached_again() {
    let d = TestDaemon::start_with(|c| c.device_timeout_secs = 2).await;
    let vol = d.create_volume("f2", GIB).await;
    d.sim().faults().add(FaultSpec::SkipLinkOnAttach {
        volume_id: Some(vol.to_string()),
        count: 1,
    });
    let done = attach_appliance(&d, vol).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "device_timeout", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(
        err.contains(&vol.simple().to_string()[..20]),
        "the error names the serial looked for: {err}"
    );
    assert!(
        err.contains("detached from the appliance"),
        "the error says how the undo went: {err}"
    );
    assert_undone(&d, vol).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_of_the_wrong_size_is_refused_and_detached_again() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("f3", GIB).await;
    d.sim().faults().add(FaultSpec::WrongSize {
        volume_id: Some(vol.to_string()),
        delta_bytes: 1 << 20,
    });
    let done = attach_appliance(&d, vol).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "device_mismatch", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(
        err.contains(&GIB.to_string()) && err.contains(&(GIB + (1 << 20)).to_string()),
        "the error names both sizes: {err}"
    );
    d.sim().faults().clear();
    assert_undone(&d, vol).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_cloud_errors_are_retried() {
    let d = TestDaemon::start().await;
    d.sim().faults().add(FaultSpec::Throttle {
        count: 2,
        probability: None,
    });
    d.sim().faults().add(FaultSpec::FailCommand {
        command: "createVolume".into(),
        count: 1,
        errorcode: 530,
        cserrorcode: Some(4250),
        errortext: Some("temporarily unavailable".into()),
        probability: None,
    });
    let vol = d.create_volume("f4", GIB).await;
    let (s, st) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(s, StatusCode::OK, "{st}");
    d.stop().await;
}

/// The ids of the volumes CloudStack has under `name`, asked with the real client.
async fn cloud_volumes_named(d: &TestDaemon, name: &str) -> Vec<String> {
    let client = cloudstack::Client::new(cloudstack::Config::new(
        d.sim().api_url(),
        "sim-api-key",
        cloudstack::Secret::new("sim-secret-key"),
    ))
    .unwrap();
    let q = cloudstack::ListVolumes {
        name: Some(name.to_owned()),
        list_all: true,
        ..cloudstack::ListVolumes::default()
    };
    client
        .list_volumes(&q)
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.name == name)
        .map(|v| v.id)
        .collect()
}

/// A change CloudStack carried out whose answer was lost to a server error (a proxy's 502 page, an internal
/// error raised after acting) is not sent again blindly: the operation checks the cloud and goes on with what
/// the first request did, so no second volume is made and no second job started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_answer_was_a_server_error_is_carried_out_once() {
    let d = TestDaemon::start().await;
    let bad_gateway = |command: &str| FaultSpec::ReplaceAnswer {
        command: command.into(),
        count: 1,
        status: 502,
        body: "<html><body><h1>502 Bad Gateway</h1></body></html>".into(),
    };
    let internal_error = |command: &str| {
        FaultSpec::ReplaceAnswer {
        command: command.into(),
        count: 1,
        status: 530,
        body: json!({ format!("{}response", command.to_lowercase()):
            {"uuidList": [], "errorcode": 530, "cserrorcode": 4250, "errortext": "Internal error executing command"} })
        .to_string(),
    }
    };
    for (name, fault) in [
        ("once-502", bad_gateway("createVolume")),
        ("once-530", internal_error("createVolume")),
    ] {
        d.sim().faults().add(fault);
        let vol = d.create_volume(name, GIB).await;
        assert_eq!(
            cloud_volumes_named(&d, name).await,
            vec![vol.to_string()],
            "one volume named {name}, the operation's"
        );
    }
    let vol = d.create_volume("once-attach", GIB).await;
    d.sim().faults().add(bad_gateway("attachVolume"));
    let done = attach_appliance(&d, vol).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (_, st) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(st["state"], "attached", "{st}");
    d.sim().faults().add(FaultSpec::ReplaceAnswer {
        command: "detachVolume".into(),
        count: 1,
        status: 534,
        body:
            json!({"detachvolumeresponse": {"uuidList": [], "errorcode": 534, "cserrorcode": 4380,
            "errortext": "Resource [Host:1] is unreachable: Host 1: Unable to reach the host"}})
            .to_string(),
    });
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    assert_undone(&d, vol).await;
    d.sim().faults().add(bad_gateway("deleteVolume"));
    d.delete_ok(vol).await;
    assert!(cloud_volumes_named(&d, "once-attach").await.is_empty());
    assert!(d.sim().faults().list().is_empty(), "every fault fired");
    d.stop().await;
}

/// An unreadable answer to createVolume (empty, cut off, a proxy's page with status 200) is a lost answer: the
/// operation adopts the volume CloudStack made instead of failing and leaving it behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_answer_to_create_volume_adopts_the_volume_made() {
    let d = TestDaemon::start().await;
    for (name, body) in [
        ("unread-empty", ""),
        ("unread-cut", r#"{"createvolumeresponse":{"id":""#),
        ("unread-html", "<html><body>maintenance</body></html>"),
    ] {
        d.sim().faults().add(FaultSpec::ReplaceAnswer {
            command: "createVolume".into(),
            count: 1,
            status: 200,
            body: body.into(),
        });
        let vol = d.create_volume(name, GIB).await;
        assert_eq!(
            cloud_volumes_named(&d, name).await,
            vec![vol.to_string()],
            "one volume named {name}, the operation's"
        );
    }
    d.stop().await;
}

/// CloudStack 4.13 and older refuse deleteVolume of a volume already removed with "Unable to aquire volume
/// with ID" (sic): the delete completes, the volume being gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_volume_an_older_cloudstack_no_longer_has_completes() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("gone-old", GIB).await;
    let client = cloudstack::Client::new(cloudstack::Config::new(
        d.sim().api_url(),
        "sim-api-key",
        cloudstack::Secret::new("sim-secret-key"),
    ))
    .unwrap();
    client.delete_volume(&vol.to_string()).await.unwrap();
    d.sim().faults().add(FaultSpec::FailCommand {
        command: "deleteVolume".into(),
        count: 1,
        errorcode: 431,
        cserrorcode: Some(4350),
        errortext: Some("Unable to aquire volume with ID: 42".into()),
        probability: None,
    });
    let done = d.delete_ok(vol).await;
    assert_eq!(
        done["response"]["message"], "volume was already gone from CloudStack",
        "{done}"
    );
    assert!(d.sim().faults().list().is_empty(), "the fault fired");
    d.stop().await;
}

/// A job CloudStack does not know (purged, or another management server's) fails the attach with a cloud error
/// that says so, not with an internal error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_job_unknown_to_cloudstack_fails_saying_so() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("job-unknown", GIB).await;
    d.sim().faults().add(FaultSpec::SlowJob {
        command: "attachVolume".into(),
        extra_delay_ms: 3_000,
        count: 1,
    });
    d.sim().faults().add(FaultSpec::ReplaceAnswer {
        command: "queryAsyncJobResult".into(),
        count: 1_000,
        status: 431,
        body: json!({"queryasyncjobresultresponse": {"uuidList": [], "errorcode": 431, "cserrorcode": 4350,
            "errortext": "Unable to execute API command queryasyncjobresult due to invalid value. Invalid parameter \
                jobid value=7 due to incorrect long value format, or entity does not exist or due to incorrect \
                parameter annotation for the field in api cmd class."}})
        .to_string(),
    });
    let done = attach_appliance(&d, vol).await;
    d.sim().faults().clear();
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "cloud_not_found", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(err.contains("CloudStack does not know job"), "{err}");
    assert!(
        err.contains(&format!("reports volume {vol} not attached")),
        "{err}"
    );
    assert!(!err.contains("None") && !err.contains("Some("), "{err}");
    d.stop().await;
}

/// A CloudStack whose `default.page.size` is below the client's page size refuses its lists ("Page size can't
/// exceed max allowed page size value: 2"): the daemon lists in pages of the size named instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_with_a_small_page_size_is_listed_in_pages_it_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let mut sc = cloudsim::SimConfig::new(dir.path().join("sim"), dir.path().join("by-id"));
    sc.listen = "127.0.0.1:0".parse().unwrap();
    sc.job_delay = std::time::Duration::from_millis(20);
    sc.page_size = 2;
    let sim = cloudsim::Simulator::start(sc).await.unwrap();
    let mut cfg = support::config(&dir.path().join("state"));
    cfg.sim.enabled = false;
    cfg.cloudstack_url = Some(sim.api_url());
    cfg.cloudstack_api_key = Some(volume_daemon::config::Secret::new(
        cloudsim::DEFAULT_API_KEY,
    ));
    cfg.cloudstack_secret_key = Some(volume_daemon::config::Secret::new(
        cloudsim::DEFAULT_SECRET_KEY,
    ));
    cfg.by_id_dir = dir.path().join("by-id");
    cfg.allow_regular_files = !volume_daemon::sim::running_as_root();
    let d = volume_daemon::daemon::RunningDaemon::start(cfg)
        .await
        .expect("the daemon starts against a cloud with pages of 2");
    let base = format!("http://{}/api/v1", d.api_addr());
    let vms: Value = reqwest::get(format!("{base}/cloud/vms"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut listed: Vec<String> = vms
        .as_array()
        .unwrap_or_else(|| panic!("{vms}"))
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let mut want: Vec<String> = sim.vms().into_iter().map(|v| v.0).collect();
    want.sort();
    assert!(want.len() > 2, "more VMs than one page: {want:?}");
    assert_eq!(listed, want, "every VM, over several pages");
    d.shutdown().await;
    sim.shutdown().await;
}

/// A createVolume job that fails while CloudStack keeps the volume it made when the call was accepted: the
/// operation fails with the job's error and deletes that volume, which no one would otherwise know of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_job_leaves_no_volume_behind() {
    let d = TestDaemon::start().await;
    d.sim().faults().add(FaultSpec::FailJob {
        command: "createVolume".into(),
        count: 1,
        errorcode: 530,
        errortext: Some("Failed to create volume: primary storage full".into()),
    });
    let (s, op) = d
        .post(
            "/volumes",
            json!({"name": "create-fails", "size": GIB, "disk_offering_id": d.custom_offering(), "zone_id": d.zone()}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let done = d.wait_op(&op).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "cloud_job_failed", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(err.contains("primary storage full"), "{err}");
    assert!(err.contains("was deleted"), "{err}");
    assert!(
        cloud_volumes_named(&d, "create-fails").await.is_empty(),
        "no volume left in CloudStack"
    );
    d.stop().await;
}

/// A createVolume job still running at `job_timeout_secs` fails the create, and the volume CloudStack made
/// when it accepted the call is deleted: a failed create leaves no volume behind that no listing shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_job_outlives_the_timeout_leaves_no_volume_behind() {
    let d = TestDaemon::start_with(|c| c.job_timeout_secs = 1).await;
    d.sim().faults().add(FaultSpec::SlowJob {
        command: "createVolume".into(),
        extra_delay_ms: 3_000,
        count: 1,
    });
    let (s, op) = d
        .post(
            "/volumes",
            json!({"name": "create-slow", "size": GIB, "disk_offering_id": d.custom_offering(), "zone_id": d.zone()}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let done = d.wait_op(&op).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "cloud_job_timeout", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(err.contains("was deleted"), "{err}");
    // Also once the job has ended in the cloud.
    tokio::time::sleep(std::time::Duration::from_millis(3_500)).await;
    assert!(
        cloud_volumes_named(&d, "create-slow").await.is_empty(),
        "no volume left in CloudStack"
    );
    d.stop().await;
}

/// A job-status answer that says nothing (empty, cut off, a single refusal) does not end the wait: the job is
/// asked again and the operation ends with the job's own outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_status_answer_that_says_nothing_is_asked_again() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("poll-once", GIB).await;
    for body in [
        String::new(),
        r#"{"queryasyncjobresultresponse":{"jobid":""#.to_owned(),
    ] {
        d.sim().faults().add(FaultSpec::ReplaceAnswer {
            command: "queryAsyncJobResult".into(),
            count: 1,
            status: 200,
            body,
        });
    }
    d.sim().faults().add(FaultSpec::ReplaceAnswer {
        command: "queryAsyncJobResult".into(),
        count: 1,
        status: 401,
        body: json!({"queryasyncjobresultresponse": {"uuidList": [], "errorcode": 401,
            "errortext": "unable to verify user credentials and/or request signature"}})
        .to_string(),
    });
    let done = attach_appliance(&d, vol).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(d.sim().faults().list().is_empty(), "every fault fired");
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_appliance_identity_fails_appliance_requests_clearly() {
    let d = TestDaemon::start_with(|c| {
        c.appliance_vm_id = Some("00000000-0000-4000-8000-000000000000".into())
    })
    .await;
    let vol = d.create_volume("f5", GIB).await;
    let (s, v) = d
        .post(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": d.other_vm(0)}),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "never a silent remote attach: {v}"
    );
    assert_eq!(v["code"], "appliance_identity_unknown");
    let (s, h) = d.get("/health").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{h}");
    assert_eq!(h["components"]["appliance_identity"]["status"], "failed");
    // Setting it through the API is refused while the configuration fixes it.
    let (s, v) = d
        .send(
            reqwest::Method::PUT,
            "/appliance",
            Some(json!({"vm_id": d.appliance()})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    d.stop().await;
}

/// A detachVolume job still running at `job_timeout_secs` may yet detach the volume: the detach fails
/// without serving the volume again (a writer that went on would lose its disk mid-write when the job
/// ends), and the reconcile settles the attachment once the job has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detach_whose_job_outlives_the_timeout_does_not_serve_the_volume_again() {
    let d = TestDaemon::start_with(|c| c.job_timeout_secs = 2).await;
    let vol = d.create_volume("detach-slow", GIB).await;
    d.run_ok(
        &format!("/volumes/{vol}/attach"),
        json!({"vm_id": d.appliance()}),
    )
    .await;
    d.sim().faults().add(FaultSpec::SlowJob {
        command: "detachVolume".into(),
        extra_delay_ms: 4_000,
        count: 1,
    });
    let (s, op) = d.post(&format!("/volumes/{vol}/detach"), json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let done = d.wait_op(&op).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "cloud_job_timeout", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(
        err.contains("is not served again") && !err.contains("is served again"),
        "{err}"
    );
    let (_, export) = d.get(&format!("/exports/{vol}")).await;
    assert_ne!(export["status"], "active", "{export}");
    // The job ends with the volume detached; the reconcile forgets the attachment.
    tokio::time::sleep(std::time::Duration::from_millis(4_500)).await;
    let (s, r) = d.post("/reconcile", json!({"apply": true})).await;
    assert!(s.is_success(), "{r}");
    let mut settled = false;
    for _ in 0..100 {
        let (_, v) = d.get(&format!("/volumes/{vol}")).await;
        if v["attachment"].is_null() {
            settled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        settled,
        "the attachment is forgotten once CloudStack detached it"
    );
    d.stop().await;
}

/// An attachVolume job still running at `job_timeout_secs` may yet attach the volume: the error says so and
/// how to take the attachment over once the job has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_whose_job_outlives_the_timeout_says_how_to_take_it_over() {
    let d = TestDaemon::start_with(|c| c.job_timeout_secs = 1).await;
    let vol = d.create_volume("attach-slow", GIB).await;
    d.sim().faults().add(FaultSpec::SlowJob {
        command: "attachVolume".into(),
        extra_delay_ms: 3_000,
        count: 1,
    });
    let done = attach_appliance(&d, vol).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "cloud_job_timeout", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(
        err.contains("CloudStack may still attach")
            && err.contains(&format!("POST /api/v1/volumes/{vol}/adopt")),
        "{err}"
    );
    d.stop().await;
}

/// A delete detaches first; should CloudStack then refuse deleteVolume, the volume stays detached, as the
/// cloud has it: the daemon's records no longer say attached, and its export is not listed as one to serve
/// again (for a volume on the appliance and one on another VM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_refused_after_its_detach_leaves_the_volume_recorded_detached() {
    let d = TestDaemon::start().await;
    for (name, vm) in [
        ("delete-refused-app", d.appliance()),
        ("delete-refused-remote", d.other_vm(0)),
    ] {
        let vol = d.create_volume(name, GIB).await;
        d.run_ok(&format!("/volumes/{vol}/attach"), json!({"vm_id": vm}))
            .await;
        d.sim().faults().add(FaultSpec::FailCommand {
            command: "deleteVolume".into(),
            count: 1,
            errorcode: 431,
            cserrorcode: Some(4350),
            errortext: Some("volume is in use by a snapshot policy".into()),
            probability: None,
        });
        let (s, op) = d
            .send(reqwest::Method::DELETE, &format!("/volumes/{vol}"), None)
            .await;
        assert_eq!(s, StatusCode::CREATED, "{op}");
        let done = d.wait_op(&op).await;
        assert_eq!(done["status"], "failed", "{done}");
        let (_, v) = d.get(&format!("/volumes/{vol}")).await;
        assert!(v["attachment"].is_null(), "{name}: {v}");
        assert_eq!(v["state"], "detached", "{name}: {v}");
        let (_, on_vm) = d.get(&format!("/vms/{vm}/volumes")).await;
        assert!(!on_vm.to_string().contains(&vol.to_string()), "{on_vm}");
        let (s, export) = d.get(&format!("/exports/{vol}")).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{export}");
        // Deleting again completes.
        d.delete_ok(vol).await;
    }
    d.stop().await;
}
