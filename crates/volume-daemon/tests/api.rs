//! The REST API end to end: a real daemon with the built-in simulator over real HTTP. Tests named `root_`
//! use real loop devices and real NBD clients (nbdcopy).
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{TestDaemon, GIB};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_problem_and_nothing_is_recorded() {
    let d = TestDaemon::start().await;
    let zone = d.zone();
    let off = d.custom_offering();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/volumes",
            json!({"name": "a", "size": 0, "disk_offering_id": off, "zone_id": zone}),
            "size",
        ),
        (
            "/volumes",
            json!({"name": "", "size": 1, "disk_offering_id": off, "zone_id": zone}),
            "name",
        ),
        (
            "/volumes",
            json!({"name": "a", "size": -1, "disk_offering_id": off, "zone_id": zone}),
            "size",
        ),
        (
            "/volumes",
            json!({"name": "a", "size": "big", "disk_offering_id": off, "zone_id": zone}),
            "size",
        ),
        (
            "/volumes",
            json!({"name": "a", "size": 1, "disk_offering_id": off}),
            "zone_id",
        ),
        (
            "/volumes",
            json!({"name": "a", "size": 1, "disk_offering_id": off, "zone_id": zone, "colour": 1}),
            "colour",
        ),
        (
            "/volumes/not-a-uuid/attach",
            json!({"vm_id": d.appliance()}),
            "volume_id",
        ),
        (
            "/volumes/60338035-92fb-4d27-98d4-b60ad4b38b87/attach",
            json!({}),
            "vm_id",
        ),
        (
            "/volumes/60338035-92fb-4d27-98d4-b60ad4b38b87/attach",
            json!({"vm_id": d.appliance(), "nbd_clients": ["writer-1", ""]}),
            "nbd_clients",
        ),
        (
            "/volumes/60338035-92fb-4d27-98d4-b60ad4b38b87/attach",
            json!({"vm_id": d.appliance(), "nbd_clients": ["wri\u{7}ter"]}),
            "nbd_clients",
        ),
        (
            "/volumes/60338035-92fb-4d27-98d4-b60ad4b38b87/attach",
            json!({"vm_id": d.appliance(), "nbd_clients": (0..65).map(|i| format!("w{i}")).collect::<Vec<_>>()}),
            "nbd_clients",
        ),
        (
            "/volumes/60338035-92fb-4d27-98d4-b60ad4b38b87/attach",
            json!({"vm_id": d.other_vm(0), "nbd_clients": ["writer-1"]}),
            "nbd_clients",
        ),
    ];
    for (path, body, field) in cases {
        let (s, v) = d.post(path, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path} {body}: {v}");
        assert_eq!(v["code"], "invalid_request", "{v}");
        assert!(
            v["field"].as_str() == Some(field) || v["error"].as_str().unwrap_or("").contains(field),
            "{path} {body}: expected the field {field} to be named: {v}"
        );
    }
    // Malformed JSON and a missing body.
    for raw in ["{\"name\": ", ""] {
        let resp = d
            .http
            .post(format!("{}/volumes", d.base))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "body {raw:?}");
        let v: Value = resp.json().await.unwrap();
        assert!(!v["error"].as_str().unwrap().is_empty());
    }
    // A valid body followed by anything but whitespace is no JSON document: refused, whatever it holds.
    let valid =
        json!({"name": "a", "size": GIB, "disk_offering_id": off, "zone_id": zone}).to_string();
    for tail in [" x", "]", "{}", " \u{0}", "\n{\"name\": \"b\"}"] {
        let resp = d
            .http
            .post(format!("{}/volumes", d.base))
            .header("content-type", "application/json")
            .body(format!("{valid}{tail}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "tail {tail:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["code"], "invalid_request", "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("trailing characters"),
            "tail {tail:?}: {v}"
        );
    }
    // A body over 1 MiB is a 413 with the limit in the message, whether the length is announced or streamed,
    // and also past the size where the HTTP layer's own default limit would have answered differently. The
    // server stops reading at the limit and closes after answering, so the body is sent by a task of its own
    // whose write errors are expected, while the answer is read.
    for len in [(1 << 20) + 1, (3 << 20) + 1] {
        for chunked in [false, true] {
            let (status, v) = raw_post(&d.base, "/volumes", len, chunked).await;
            assert_eq!(status, 413, "{len} bytes, chunked {chunked}: {v}");
            assert_eq!(v["code"], "invalid_request", "{v}");
            assert_eq!(
                v["error"], "request body is larger than 1048576 bytes; send at most 1048576",
                "{v}"
            );
        }
    }
    // A huge value in the path, a field or a field's name comes back cut, with its length: the answer stays
    // small whatever the caller sent.
    let huge = "z".repeat(900 << 10);
    let long_id = "9".repeat(8000);
    let huge_cases = [
        (format!("/volumes/{long_id}/detach"), json!({}), "volume_id"),
        (
            "/volumes".to_string(),
            json!({"name": "a", "size": huge, "disk_offering_id": off, "zone_id": zone}),
            "size",
        ),
        (
            "/volumes".to_string(),
            json!({"name": "a", "size": 1, "disk_offering_id": off, "zone_id": zone, huge.as_str(): 1}),
            "",
        ),
    ];
    for (path, body, field) in huge_cases {
        let (s, v) = d.post(&path, body).await;
        let path = &path[..path.len().min(48)];
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        let answer = v.to_string();
        assert!(
            answer.len() < 5000,
            "{path}: a {}-byte answer",
            answer.len()
        );
        let error = v["error"].as_str().unwrap();
        assert!(error.contains(" bytes)"), "{path}: {error}");
        if !field.is_empty() {
            assert_eq!(v["field"], field, "{path}: {v}");
        }
    }
    // Unknown volume: 404; unknown operation: 404.
    let (s, v) = d
        .post(
            "/volumes/60338035-92fb-4d27-98d4-b60ad4b38b87/detach",
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, _) = d
        .get("/operations/60338035-92fb-4d27-98d4-b60ad4b38b87")
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Nothing was journaled.
    let (s, ops) = d.get("/operations").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        ops,
        json!([]),
        "no operation may be recorded for refused requests"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_rounds_up_keeps_metadata_and_honours_idempotency_keys() {
    let d = TestDaemon::start().await;
    let body = json!({"name": "disk-0", "size": GIB + 1, "disk_offering_id": d.custom_offering(),
                      "zone_id": d.zone(), "metadata": {"vmware_disk": "scsi0:1"}});
    let send = || {
        d.http
            .post(format!("{}/volumes", d.base))
            .header("Idempotency-Key", "create-disk-0")
            .json(&body)
            .send()
    };
    let first: Value = send().await.unwrap().json().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["Idempotent-Replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(
        first["id"], again["id"],
        "a replay returns the same operation"
    );
    let done = d.wait_op(&first).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["type"], "create");
    let id = done["response"]["volume_id"].as_str().unwrap();
    assert_eq!(done["volume_id"], id);
    let (s, v) = d.get(&format!("/volumes/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["size"], 2 * GIB);
    assert_eq!(v["metadata"]["vmware_disk"], "scsi0:1");
    assert_eq!(v["state"], "detached");
    assert_eq!(v["cloudstack_data"]["size"], 2 * GIB);
    let (_, ops) = d.get("/operations?type=create").await;
    assert_eq!(
        ops.as_array().unwrap().len(),
        1,
        "the replay created nothing: {ops}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliance_attach_exports_and_detach_removes_the_export() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("app-0", GIB).await;
    let op = d
        .run_ok(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": d.appliance()}),
        )
        .await;
    let serial: String = vol.simple().to_string()[..20].to_string();
    let device_path = op["response"]["device_path"].as_str().unwrap();
    assert!(device_path.ends_with(&format!("virtio-{serial}")), "{op}");
    let (s, dev) = d.get(&format!("/volumes/{vol}/device")).await;
    assert_eq!(s, StatusCode::OK, "{dev}");
    assert_eq!(dev["operation_mode"], "oma");
    assert_eq!(dev["linux_state"], "present");
    assert_eq!(dev["size"], GIB);
    let link = dev["symlink_path"].as_str().unwrap();
    assert!(link.ends_with(&format!("vol{}", &serial[..8])), "{dev}");
    assert!(
        std::fs::symlink_metadata(link).is_ok(),
        "stable name {link} exists"
    );
    let (_, exports) = d.get("/exports").await;
    assert_eq!(exports["count"], 1, "{exports}");
    assert_eq!(
        exports["exports"][0]["export_name"],
        format!("migration-vol-{vol}")
    );
    assert_eq!(exports["exports"][0]["status"], "active");
    let (_, by_dev) = d.get(&format!("/devices/volume?path={device_path}")).await;
    assert_eq!(by_dev["volume_id"], vol.to_string(), "{by_dev}");
    let (_, vms) = d.get(&format!("/vms/{}/volumes", d.appliance())).await;
    assert_eq!(vms.as_array().unwrap().len(), 1);

    // Attaching again while attached is a conflict.
    let (s, v) = d
        .post(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": d.appliance()}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    let (_, exports) = d.get("/exports").await;
    assert_eq!(exports, json!({"exports": [], "count": 0}));
    assert!(
        std::fs::symlink_metadata(link).is_err(),
        "stable name removed"
    );
    let (s, _) = d.get(&format!("/volumes/{vol}/device")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    d.delete_ok(vol).await;
    d.stop().await;
}

/// Two attaches of one volume to one VM, the second submitted while the first runs (so its check passes, as a
/// detach could run between them): the second fails as a conflict and leaves the first's export and its
/// clients alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_second_attach_to_the_same_vm_is_a_conflict_that_keeps_the_export_and_its_clients()
{
    let d = TestDaemon::start().await;
    for (vm, name) in [
        (d.appliance(), "twice-app"),
        (d.other_vm(0), "twice-remote"),
    ] {
        let vol = d.create_volume(name, GIB).await;
        d.sim().faults().add(cloudsim::FaultSpec::SlowJob {
            command: "attachVolume".into(),
            extra_delay_ms: 1_500,
            count: 1,
        });
        let path = format!("/volumes/{vol}/attach");
        let (s, first) = d.post(&path, json!({"vm_id": vm})).await;
        assert_eq!(s, StatusCode::CREATED, "{first}");
        let (s, second) = d.post(&path, json!({"vm_id": vm})).await;
        assert_eq!(s, StatusCode::CREATED, "queued behind the first: {second}");
        let first = d.wait_op(&first).await;
        assert_eq!(first["status"], "completed", "{first}");
        let (_, before) = d.get(&format!("/volumes/{vol}")).await;
        let client = if vm == d.appliance() {
            let mut c = d.nbd_session(&first).await;
            c.write(0, &[0x5a; 4096], 0).await.unwrap();
            Some(c)
        } else {
            None
        };

        let second = d.wait_op(&second).await;
        assert_eq!(second["status"], "failed", "{second}");
        assert_eq!(second["error_code"], "conflict", "{second}");
        assert!(
            second["error"]
                .as_str()
                .unwrap()
                .contains(&format!("already attached to VM {vm}")),
            "{second}"
        );
        let (_, after) = d.get(&format!("/volumes/{vol}")).await;
        assert_eq!(after["attachment"], before["attachment"], "{after}");
        assert_eq!(after["state"], "attached", "{after}");
        if let Some(mut c) = client {
            // The same session goes on: the export was not served again under it.
            c.write(4096, &[0xa5; 4096], 0).await.unwrap();
            c.flush().await.unwrap();
            let back = c.read(0, 8192).await.unwrap();
            assert!(back[..4096].iter().all(|&b| b == 0x5a));
            assert!(back[4096..].iter().all(|&b| b == 0xa5));
            let (_, e) = d.get(&format!("/exports/{vol}")).await;
            assert_eq!(
                e["generation"], first["response"]["export_generation"],
                "{e}"
            );
        }
        d.delete_ok(vol).await;
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_root_and_data_attachments_are_listed_per_vm_and_delete_detaches_first() {
    let d = TestDaemon::start().await;
    let vm = d.other_vm(0);
    let root = d.create_volume("root", GIB).await;
    let a = d.create_volume("data-a", GIB).await;
    let b = d.create_volume("data-b", GIB).await;
    d.stop_vm_and_detach_its_root(&vm);
    let op = d
        .run_ok(
            &format!("/volumes/{root}/attach-root"),
            json!({"vm_id": vm}),
        )
        .await;
    assert_eq!(op["response"]["device_id"], 0, "{op}");
    for v in [a, b] {
        let op = d
            .run_ok(&format!("/volumes/{v}/attach"), json!({"vm_id": vm}))
            .await;
        assert_ne!(op["response"]["device_id"], 0);
        assert_ne!(op["response"]["device_id"], 3, "device id 3 is reserved");
    }
    let (_, list) = d.get(&format!("/vms/{vm}/volumes")).await;
    let ids: HashSet<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["volume_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, [root, a, b].iter().map(|u| u.to_string()).collect());
    let (_, exports) = d.get("/exports").await;
    assert_eq!(exports["count"], 0, "remote attachments are never exported");
    let (_, dev) = d.get(&format!("/volumes/{root}/device")).await;
    assert_eq!(dev["operation_mode"], "failover");
    assert_eq!(dev["disk_role"], "root");
    for v in [root, a, b] {
        let (s, op) = d
            .send(reqwest::Method::DELETE, &format!("/volumes/{v}"), None)
            .await;
        assert_eq!(s, StatusCode::CREATED, "{op}");
        let done = d.wait_op(&op).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["response"]["detached_from"], vm.as_str());
    }
    let (_, list) = d.get(&format!("/vms/{vm}/volumes")).await;
    assert_eq!(list, json!([]));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_volumes_two_hundred_parallel_operations_stay_consistent() {
    let d = TestDaemon::start_with(|c| c.sim.job_delay_ms = 5).await;
    let vms = [d.other_vm(0), d.other_vm(1)];
    let mut vols = Vec::new();
    let creates: Vec<_> = (0..50)
        .map(|i| {
            d.post(
                "/volumes",
                json!({"name": format!("c{i}"), "size": GIB, "disk_offering_id": d.custom_offering(), "zone_id": d.zone()}),
            )
        })
        .collect();
    for (s, op) in futures::future::join_all(creates).await {
        assert_eq!(s, StatusCode::CREATED, "{op}");
        let done = d.wait_op(&op).await;
        vols.push(Uuid::parse_str(done["response"]["volume_id"].as_str().unwrap()).unwrap());
    }
    // 200 operations: attach / detach rounds on every volume, alternating VMs, submitted all at once.
    let mut reqs = Vec::new();
    for round in 0..2 {
        for (i, v) in vols.iter().enumerate() {
            let vm = &vms[(i + round) % 2];
            reqs.push((format!("/volumes/{v}/attach"), json!({"vm_id": vm})));
            reqs.push((format!("/volumes/{v}/detach"), json!({})));
        }
    }
    assert_eq!(reqs.len(), 200);
    let mut ops = Vec::new();
    // Per volume the order of submission is the order of execution (FIFO); submit each volume's sequence in
    // order, all volumes concurrently.
    let per_volume: Vec<_> = vols
        .iter()
        .map(|v| {
            let mine: Vec<_> = reqs
                .iter()
                .filter(|(p, _)| p.contains(&v.to_string()))
                .cloned()
                .collect();
            let d = &d;
            async move {
                let mut out = Vec::new();
                for (p, b) in mine {
                    let (s, op) = d.post(&p, b).await;
                    out.push((s, op, p));
                }
                out
            }
        })
        .collect();
    for batch in futures::future::join_all(per_volume).await {
        ops.extend(batch);
    }
    let mut completed = 0;
    let mut refused = 0;
    for (s, op, p) in &ops {
        // An attach submitted while the previous detach is queued may be refused as a conflict (409) only when
        // the volume is attached at submission time; everything accepted must complete.
        if *s == StatusCode::CONFLICT {
            continue;
        }
        assert_eq!(*s, StatusCode::CREATED, "{p}: {op}");
        let done = d.wait_op(op).await;
        if done["status"] == "failed" {
            // Two VMs take at most 6 data disks each: the cloud refuses the rest, and says so.
            assert_eq!(done["error_code"], "cloud_limit_exceeded", "{p}: {done}");
            refused += 1;
        } else {
            assert_eq!(done["status"], "completed", "{p}: {done}");
            completed += 1;
        }
    }
    assert!(
        completed >= 100,
        "most operations must complete: {completed} (refused {refused})"
    );
    assert!(
        completed + refused >= 190,
        "accepted operations: {completed} + {refused}"
    );
    // Per volume, completed attaches and detaches alternate in completion order: nothing lost, doubled or
    // interleaved.
    let (_, all) = d.get("/operations?limit=1000").await;
    type Seq = Vec<(chrono::DateTime<chrono::FixedOffset>, String)>;
    let mut per_volume: std::collections::HashMap<String, Seq> = Default::default();
    for o in all.as_array().unwrap() {
        if o["type"] == "create" || o["status"] != "completed" {
            continue;
        }
        if o["type"] == "detach" && o["response"]["message"] != "volume detached" {
            continue; // the attach before it was refused: nothing to detach
        }
        per_volume
            .entry(o["volume_id"].as_str().unwrap().to_string())
            .or_default()
            .push((
                chrono::DateTime::parse_from_rfc3339(o["completed_at"].as_str().unwrap()).unwrap(),
                o["type"].as_str().unwrap().to_string(),
            ));
    }
    for (v, mut seq) in per_volume {
        seq.sort();
        for (i, (_, t)) in seq.iter().enumerate() {
            let expected = if i % 2 == 0 { "attach" } else { "detach" };
            assert_eq!(t, expected, "volume {v}: operations out of order: {seq:?}");
        }
    }
    // Final state: every volume detached, in the daemon and in the cloud.
    for v in &vols {
        let (_, st) = d.get(&format!("/volumes/{v}")).await;
        assert_eq!(st["state"], "detached", "{st}");
        assert!(st["cloudstack_data"]["virtualmachineid"].is_null(), "{st}");
    }
    for vm in &vms {
        let (_, list) = d.get(&format!("/vms/{vm}/volumes")).await;
        assert_eq!(list, json!([]));
    }
    d.stop().await;
}

fn require(tool: &str) {
    let ok = Command::new(tool).arg("--version").output().is_ok();
    assert!(
        ok,
        "{tool} is required for this test (apt-get install libnbd-bin); scripts/test installs it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_end_to_end_nbd_data_survives_detach_and_reattach() {
    support::require_root();
    require("nbdcopy");
    let d = TestDaemon::start().await;
    let vol = d.create_volume("e2e", 256 << 20).await;
    let app = d.appliance();
    let op = d
        .run_ok(&format!("/volumes/{vol}/attach"), json!({"vm_id": app}))
        .await;
    assert!(
        op["response"]["kernel_device"]
            .as_str()
            .unwrap()
            .starts_with("/dev/loop"),
        "{op}"
    );

    let data = d.dir.path().join("random.img");
    let mut bytes = vec![0u8; 256 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&data, &bytes).unwrap();
    let url = d.nbd_url(vol);
    let st = Command::new("nbdcopy")
        .arg(&data)
        .arg(&url)
        .status()
        .unwrap();
    assert!(st.success(), "nbdcopy into the export");
    let (_, exp) = d.get(&format!("/exports/{vol}")).await;
    assert!(exp["bytes_written"].as_u64().unwrap() >= 256 << 20, "{exp}");
    // A client sees which volume it opened, not the appliance's device paths.
    let info = Command::new("nbdinfo")
        .arg("--json")
        .arg(&url)
        .output()
        .unwrap();
    assert!(info.status.success(), "nbdinfo on the export");
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["exports"][0]["description"],
        format!("volume {vol}").as_str(),
        "{info}"
    );

    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    let st = Command::new("nbdinfo").arg(&url).output().unwrap();
    assert!(!st.status.success(), "the export is gone after detach");

    d.run_ok(&format!("/volumes/{vol}/attach"), json!({"vm_id": app}))
        .await;
    let back = d.dir.path().join("back.img");
    let st = Command::new("nbdcopy")
        .arg(&url)
        .arg(&back)
        .status()
        .unwrap();
    assert!(st.success(), "nbdcopy out of the export");
    let read = std::fs::read(&back).unwrap();
    assert_eq!(
        read.len() as u64,
        GIB,
        "the export has the volume's size (1 GiB)"
    );
    assert!(
        read[..256 << 20] == bytes[..],
        "data read back equals data written"
    );
    assert!(read[256 << 20..].iter().all(|b| *b == 0));
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;

    // The same volume becomes the root disk of another VM (stopped, its old root detached), with two
    // more data disks beside it.
    let vm = d.other_vm(0);
    d.stop_vm_and_detach_its_root(&vm);
    let op = d
        .run_ok(&format!("/volumes/{vol}/attach-root"), json!({"vm_id": vm}))
        .await;
    assert_eq!(op["response"]["device_id"], 0, "{op}");
    let mut all = vec![vol];
    for name in ["e2e-data-1", "e2e-data-2"] {
        let v = d.create_volume(name, GIB).await;
        d.run_ok(&format!("/volumes/{v}/attach"), json!({"vm_id": vm}))
            .await;
        all.push(v);
    }
    let (_, list) = d.get(&format!("/vms/{vm}/volumes")).await;
    let mut listed: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["volume_id"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    let mut want: Vec<String> = all.iter().map(|u| u.to_string()).collect();
    want.sort();
    assert_eq!(listed, want);
    let (_, exports) = d.get("/exports").await;
    assert_eq!(
        exports["count"], 0,
        "nothing is exported while attached elsewhere"
    );
    for v in all {
        d.delete_ok(v).await;
    }
    let (_, list) = d.get(&format!("/vms/{vm}/volumes")).await;
    assert_eq!(list, json!([]));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_drift_and_repairs_only_when_asked() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("drift", GIB).await;
    d.attach_to_appliance(vol).await;
    let (_, clean) = d.post("/reconcile", json!({})).await;
    assert_eq!(clean["drift"], json!([]), "{clean}");
    // Someone detaches the volume behind the daemon's back.
    d.detach_behind_the_daemons_back(vol).await;
    let (s, report) = d.post("/reconcile", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{report}");
    assert_eq!(report["dry_run"], true);
    let drift = &report["drift"][0];
    assert_eq!(drift["kind"], "attached_only_in_database", "{report}");
    assert_eq!(drift["action"], "forget_attachment", "{report}");
    assert_eq!(drift["applied"], false);
    assert!(drift["operation_id"].is_null(), "{report}");
    let (_, st) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(st["state"], "attached", "a dry run changes nothing: {st}");
    let (_, ops) = d.get("/operations?type=repair").await;
    assert_eq!(ops, json!([]), "a dry run journals nothing");
    let (_, fixed) = d.post("/reconcile", json!({"apply": true})).await;
    assert_eq!(fixed["drift"][0]["applied"], true, "{fixed}");
    // The repair is a journaled operation of its own, listed with the others.
    let repair_id = fixed["drift"][0]["operation_id"].as_str().unwrap();
    let (_, ops) = d.get("/operations?type=repair").await;
    assert_eq!(ops.as_array().unwrap().len(), 1, "{ops}");
    assert_eq!(ops[0]["id"], repair_id, "{ops}");
    assert_eq!(ops[0]["status"], "completed", "{ops}");
    assert_eq!(ops[0]["volume_id"], vol.to_string(), "{ops}");
    assert_eq!(ops[0]["request"]["repair"], "forget_attachment", "{ops}");
    assert_eq!(ops[0]["response"]["repair"], "forget_attachment", "{ops}");
    assert_eq!(ops[0]["step"], "export_removed", "{ops}");
    let (_, st) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(st["state"], "detached", "{st}");
    let (_, exports) = d.get("/exports").await;
    assert_eq!(exports["count"], 0);
    let (_, after) = d.post("/reconcile", json!({})).await;
    assert_eq!(after["drift"], json!([]), "{after}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_serves_an_unserved_export_again_through_a_repair_operation() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("unserved", GIB).await;
    d.attach_to_appliance(vol).await;
    let resp = d
        .send(reqwest::Method::DELETE, &format!("/exports/{vol}"), None)
        .await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
    let (_, fixed) = d.post("/reconcile", json!({"apply": true})).await;
    assert_eq!(fixed["dry_run"], false, "{fixed}");
    let drift = &fixed["drift"][0];
    assert_eq!(drift["kind"], "export_missing", "{fixed}");
    assert_eq!(drift["action"], "reexport", "{fixed}");
    assert_eq!(drift["applied"], true, "{fixed}");
    let (_, op) = d
        .get(&format!(
            "/operations/{}",
            drift["operation_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(op["type"], "repair", "{op}");
    assert_eq!(op["status"], "completed", "{op}");
    assert_eq!(op["response"]["repair"], "reexport", "{op}");
    let (_, export) = d.get(&format!("/exports/{vol}")).await;
    assert_eq!(export["status"], "active", "{export}");
    assert_eq!(
        export["generation"], op["response"]["export_generation"],
        "{export} {op}"
    );
    let (_, after) = d.post("/reconcile", json!({})).await;
    assert_eq!(after["drift"], json!([]), "{after}");
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.stop().await;
}

/// A reconcile with `apply` that saw a volume attached in the database and (a moment later) detached in
/// CloudStack journals `forget_attachment`; when a new attach ran before that repair's turn, the repair finds
/// the volume attached in CloudStack again and forgets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_attachment_repair_that_finds_the_volume_attached_again_forgets_nothing() {
    let d = TestDaemon::start_with(|c| c.reconcile_repair = false).await;
    let vol = d.create_volume("reattached", GIB).await;
    d.attach_to_appliance(vol).await;
    // The reconcile's look at the cloud answers late; the attach that follows the detach takes a while.
    d.sim().faults().add(cloudsim::FaultSpec::SlowCommand {
        command: "listVolumes".into(),
        delay_ms: 1_500,
        count: 1,
    });
    d.sim().faults().add(cloudsim::FaultSpec::SlowJob {
        command: "attachVolume".into(),
        extra_delay_ms: 2_000,
        count: 1,
    });
    let reconcile = {
        let (http, base) = (d.http.clone(), d.base.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{base}/reconcile"))
                .json(&json!({"apply": true}))
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    let (s, attach) = d
        .post(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": d.appliance()}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{attach}");
    let report = reconcile.await.unwrap();
    let drift = &report["drift"][0];
    assert_eq!(drift["kind"], "attached_only_in_database", "{report}");
    assert_eq!(drift["action"], "forget_attachment", "{report}");
    let attach = d.wait_op(&attach).await;
    assert_eq!(attach["status"], "completed", "{attach}");
    let (_, repair) = d
        .get(&format!(
            "/operations/{}?wait=30",
            drift["operation_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(repair["status"], "failed", "{repair}");
    assert_eq!(repair["error_code"], "conflict", "{repair}");
    let (_, v) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(v["state"], "attached", "{v}");
    assert_eq!(v["attachment"]["vm_id"], d.appliance(), "{v}");
    let (_, e) = d.get(&format!("/exports/{vol}")).await;
    assert_eq!(e["status"], "active", "{e}");
    assert_eq!(
        e["generation"], attach["response"]["export_generation"],
        "{e}"
    );
    let (_, after) = d.post("/reconcile", json!({})).await;
    assert_eq!(after["drift"], json!([]), "{after}");
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_openapi_and_appliance_endpoints() {
    let d = TestDaemon::start().await;
    let (s, h) = d.get("/health").await;
    assert_eq!(s, StatusCode::OK, "{h}");
    assert_eq!(h["status"], "healthy");
    for c in [
        "database",
        "cloudstack",
        "appliance_identity",
        "journal",
        "nbd",
        "privileges",
    ] {
        assert_eq!(h["components"][c]["status"], "ok", "{c}: {h}");
    }
    let root_health = reqwest::get(format!("http://{}/health", d.daemon().api_addr()))
        .await
        .unwrap();
    assert_eq!(root_health.status(), StatusCode::OK);
    let (_, app) = d.get("/appliance").await;
    assert_eq!(app["vm_id"], d.appliance());
    assert_eq!(app["source"], "simulator");
    assert_eq!(app["verified"], true);
    let (s, spec) = d.get("/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(spec["openapi"], "3.0.3");
    for p in [
        "/volumes",
        "/volumes/{id}/attach",
        "/operations/{id}",
        "/exports",
        "/reconcile",
    ] {
        assert!(spec["paths"][p].is_object(), "openapi lacks {p}");
    }
    let vol = d.create_volume("m", GIB).await;
    d.attach_to_appliance(vol).await;
    let text = reqwest::get(format!("http://{}/metrics", d.daemon().api_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("volume_daemon_ready 1"), "{text}");
    assert!(text.contains("volume_daemon_exports 1"), "{text}");
    assert!(
        text.contains(&format!(
            "volume_daemon_export_connections_open{{export=\"migration-vol-{vol}\"}} 0"
        )),
        "{text}"
    );
    // Every family typed once; counters (and only they) end in `_total`; no gauge shares its name with a
    // counter's family (OpenMetrics parses `x_total` as the family `x`).
    let mut types = std::collections::BTreeMap::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = l.split_once(' ').unwrap();
        assert!(types.insert(name, kind).is_none(), "{name} typed twice");
    }
    for (name, kind) in &types {
        match *kind {
            "counter" => assert!(name.ends_with("_total"), "counter {name}"),
            _ => assert!(!name.ends_with("_total"), "{kind} {name}"),
        }
        if let Some(family) = name.strip_suffix("_total") {
            assert!(!types.contains_key(family), "{family} and {name}");
        }
    }
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    let (s, _) = d.get("/no/such/thing").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    d.stop().await;
}

/// A JSON body's media type is matched in any letter case; another media type is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_media_type_is_matched_in_any_letter_case() {
    let d = TestDaemon::start().await;
    let valid = json!({"name": "a", "size": GIB, "disk_offering_id": d.custom_offering(), "zone_id": d.zone()})
        .to_string();
    for (ct, ok) in [
        ("APPLICATION/JSON", true),
        ("Application/Json; charset=UTF-8", true),
        ("text/plain", false),
    ] {
        let resp = d
            .http
            .post(format!("{}/volumes", d.base))
            .header("content-type", ct)
            .body(valid.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        if ok {
            assert_eq!(status, StatusCode::CREATED, "{ct}: {v}");
            d.wait_op(&v).await;
        } else {
            assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}: {v}");
            assert_eq!(v["code"], "invalid_request", "{v}");
        }
    }
    d.stop().await;
}

/// Refusals of the router and of path parameters have the shape of every other error answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_before_a_handler_runs_are_json_errors_too() {
    let d = TestDaemon::start().await;
    let cases = [
        (
            reqwest::Method::PUT,
            "/volumes",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            reqwest::Method::PATCH,
            "/health",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            reqwest::Method::GET,
            "/volumes/%ff",
            StatusCode::BAD_REQUEST,
        ),
        (
            reqwest::Method::GET,
            "/operations/%c3%28",
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (method, path, status) in cases {
        let r = d
            .http
            .request(method.clone(), format!("{}{path}", d.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("application/json"), "{method} {path}: {ct}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "invalid_request", "{method} {path}: {v}");
        assert!(!v["error"].as_str().unwrap().is_empty(), "{v}");
        // A path parameter that is not UTF-8 is named like any other bad field.
        if status == StatusCode::BAD_REQUEST {
            let want = if path.starts_with("/volumes") {
                "volume_id"
            } else {
                "id"
            };
            assert_eq!(v["field"], want, "{method} {path}: {v}");
        }
    }
    // A caller's value a library's refusal repeats is cut after 64 characters, in the message and the field.
    let long = "z".repeat(300);
    for body in [
        json!({ long.clone(): 1 }),
        json!({"name": "a", "size": long, "zone_id": "z", "disk_offering_id": "o"}),
    ] {
        let (s, v) = d.post("/volumes", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let error = v["error"].as_str().unwrap();
        assert!(error.contains("(300 bytes)") && error.len() < 400, "{v}");
        assert!(v["field"].as_str().unwrap_or("").len() < 100, "{v}");
    }
    // An unknown path is repeated cut after 64 characters, like any value of the caller's.
    let long = format!("/{}", "x".repeat(5000));
    let (s, v) = d.get(&long).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["code"], "not_found", "{v}");
    assert!(v["error"].as_str().unwrap().len() < 200, "{v}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_token_is_required_except_for_health() {
    let d =
        TestDaemon::start_with(|c| c.api_token = Some(volume_daemon::config::Secret::new("t0ken")))
            .await;
    let (s, v) = d.get("/operations").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["code"], "unauthorized");
    let (s, _) = d.get("/health").await;
    assert_eq!(s, StatusCode::OK);
    let ok = d
        .http
        .get(format!("{}/operations", d.base))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    // The scheme in any letter case, and more than one space before the token; the token itself exact.
    for (value, status) in [
        ("bearer t0ken", StatusCode::OK),
        ("BEARER  t0ken", StatusCode::OK),
        ("Bearer T0KEN", StatusCode::UNAUTHORIZED),
        ("Bearer t0ken1", StatusCode::UNAUTHORIZED),
        ("Basic t0ken", StatusCode::UNAUTHORIZED),
        ("Bearert0ken", StatusCode::UNAUTHORIZED),
    ] {
        let r = d
            .http
            .get(format!("{}/operations", d.base))
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "Authorization: {value}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_attach_follows_cloudstack_refused_while_running_or_rooted_then_device_0() {
    let d = TestDaemon::start().await;
    let vm = d.other_vm(1);
    let vol = d.create_volume("new-root", GIB).await;
    let attach_root = || async {
        let (status, op) = d
            .post(&format!("/volumes/{vol}/attach-root"), json!({"vm_id": vm}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{op}");
        d.wait_op(&op).await
    };

    // Running VM: CloudStack refuses it, and its reason and kind reach the operation.
    let op = attach_root().await;
    assert_eq!(op["status"], "failed", "{op}");
    assert_eq!(op["error_code"], "cloud_invalid_parameter", "{op}");
    assert!(op["error"].as_str().unwrap().contains("Stopped"), "{op}");

    // Stopped, but the old root is still attached.
    d.sim().faults().stop_vm(&vm).unwrap();
    let op = attach_root().await;
    assert_eq!(op["status"], "failed", "{op}");
    assert_eq!(op["error_code"], "cloud_invalid_parameter", "{op}");
    assert!(
        op["error"]
            .as_str()
            .unwrap()
            .contains("Vm already has root volume attached to it"),
        "{op}"
    );
    let (_, v) = d.get(&format!("/volumes/{vol}")).await;
    assert!(v["attachment"].is_null(), "nothing half-applied: {v}");

    // Old root detached: the volume becomes the root at device id 0.
    d.stop_vm_and_detach_its_root(&vm);
    let op = attach_root().await;
    assert_eq!(op["status"], "completed", "{op}");
    assert_eq!(op["response"]["device_id"], 0, "{op}");
    d.delete_ok(vol).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_offerings_take_no_size_and_custom_ones_need_one() {
    let d = TestDaemon::start().await;
    let (fixed, fixed_gb) = d
        .sim()
        .disk_offerings()
        .into_iter()
        .find_map(|(id, _, gb)| gb.map(|gb| (id, gb)))
        .expect("a fixed-size offering");
    let create = |name: &str, size: Option<u64>, offering: &str| {
        let mut body = json!({"name": name, "disk_offering_id": offering, "zone_id": d.zone()});
        if let Some(s) = size {
            body["size"] = json!(s);
        }
        body
    };

    // Fixed offering, no size: CloudStack is not sent one and the volume has the offering's size.
    let op = d.run_ok("/volumes", create("fixed-0", None, &fixed)).await;
    assert_eq!(op["response"]["size"], fixed_gb * GIB, "{op}");
    // Fixed offering, its own size: accepted too.
    let op = d
        .run_ok("/volumes", create("fixed-1", Some(fixed_gb * GIB), &fixed))
        .await;
    assert_eq!(op["response"]["size"], fixed_gb * GIB, "{op}");

    // Fixed offering, another size; custom offering, no size: 400 naming `size`, nothing recorded.
    for body in [
        create("bad-0", Some((fixed_gb + 1) * GIB), &fixed),
        create("bad-1", None, &d.custom_offering()),
    ] {
        let (s, v) = d.post("/volumes", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["field"], "size", "{v}");
    }
    // An unknown offering names `disk_offering_id`.
    let (s, v) = d
        .post("/volumes", create("bad-2", Some(GIB), "no-such-offering"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "disk_offering_id", "{v}");
    let (_, ops) = d.get("/operations").await;
    assert_eq!(ops.as_array().unwrap().len(), 2, "{ops}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_reports_the_clouds_state_and_cloud_listings_have_names() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("state-0", GIB).await;
    d.run_ok(
        &format!("/volumes/{vol}/attach"),
        json!({"vm_id": d.other_vm(0)}),
    )
    .await;
    let (s, dev) = d.get(&format!("/volumes/{vol}/device")).await;
    assert_eq!(s, StatusCode::OK, "{dev}");
    assert_eq!(dev["cloudstack_state"], "Ready", "{dev}");

    let (s, zones) = d.get("/cloud/zones").await;
    assert_eq!(s, StatusCode::OK, "{zones}");
    assert_eq!(zones[0]["id"], d.zone(), "{zones}");
    assert!(!zones[0]["name"].as_str().unwrap().is_empty(), "{zones}");
    let (_, offerings) = d.get("/cloud/offerings").await;
    let custom = offerings
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == d.custom_offering())
        .expect("the custom offering is listed");
    assert_eq!(custom["custom"], true, "{offerings}");
    assert_eq!(custom["size"], Value::Null, "{offerings}");
    assert!(
        offerings
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["custom"] == false && o["size"].as_u64().unwrap_or(0) > 0),
        "{offerings}"
    );
    let (_, vms) = d.get("/cloud/vms").await;
    let vms = vms.as_array().unwrap();
    let appliance: Vec<_> = vms.iter().filter(|v| v["appliance"] == true).collect();
    assert_eq!(appliance.len(), 1, "{vms:?}");
    assert_eq!(appliance[0]["id"], d.appliance());
    assert!(vms
        .iter()
        .any(|v| v["id"] == d.other_vm(0) && !v["name"].as_str().unwrap().is_empty()));
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.delete_ok(vol).await;
    d.stop().await;
}

/// The text of `/metrics`.
async fn metrics_text(d: &TestDaemon) -> String {
    reqwest::get(format!("http://{}/metrics", d.daemon().api_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_detached_behind_the_daemons_back_is_fenced_and_reported_within_seconds() {
    let d = TestDaemon::start_with(|c| c.reconcile_repair = false).await;
    let vol = d.create_volume("vanishing", GIB).await;
    d.attach_to_appliance(vol).await;
    let (_, e) = d.get(&format!("/exports/{vol}")).await;
    assert_eq!(e["status"], "active", "{e}");
    let (_, h) = d.get("/health").await;
    assert!(
        h["components"].get("drift").is_none(),
        "no reconcile ran yet: {h}"
    );
    assert!(!nbd_export_refused(&d.nbd_url(vol)).await, "served before");

    d.detach_behind_the_daemons_back(vol).await;
    let fenced_at = std::time::Instant::now();
    let mut last = Value::Null;
    while fenced_at.elapsed() < Duration::from_secs(10) {
        let (_, e) = d.get(&format!("/exports/{vol}")).await;
        let (_, h) = d.get("/health").await;
        if e["status"] == "inactive" && h["components"]["drift"]["status"] == "degraded" {
            last = h;
            break;
        }
        last = json!({"export": e, "health": h});
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        fenced_at.elapsed() < Duration::from_secs(10),
        "export not fenced or drift not reported: {last}"
    );
    // Drift needs attention, but the daemon still serves.
    let (s, h) = d.get("/health").await;
    assert_eq!(s, StatusCode::OK, "{h}");
    assert_eq!(h["status"], "healthy");
    let detail = h["components"]["drift"]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("attached_only_in_database volume {vol}")),
        "{detail}"
    );
    assert!(
        nbd_export_refused(&d.nbd_url(vol)).await,
        "a fenced export is not served"
    );
    let text = metrics_text(&d).await;
    assert!(
        text.contains("volume_daemon_exports_fenced_total 1"),
        "{text}"
    );
    assert!(
        text.contains("volume_daemon_drift{kind=\"attached_only_in_database\"} 1"),
        "{text}"
    );
    // The report-only run after a fence changed no record.
    let (_, st) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(st["state"], "attached", "{st}");
    d.stop().await;
}

/// The hub's emergency paths re-attach a volume CloudStack detached behind the daemon's back without a detach
/// first, as the predecessor allowed: the stale record is forgotten (export and name too) and the attach runs.
/// A record CloudStack still holds is a 409 as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_after_a_detach_behind_the_daemons_back_forgets_the_stale_record_and_attaches() {
    let d = TestDaemon::start_with(|c| c.reconcile_repair = false).await;
    let vol = d.create_volume("re-attached", GIB).await;
    // Remote, detached in CloudStack, then to the appliance: the predecessor's ReattachVolumeToOMA.
    d.run_ok(
        &format!("/volumes/{vol}/attach"),
        json!({"vm_id": d.other_vm(0)}),
    )
    .await;
    // Still attached in CloudStack: refused.
    let (s, v) = d
        .post(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": d.appliance()}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    d.detach_behind_the_daemons_back(vol).await;
    let done = d.attach_to_appliance(vol).await;
    let (_, st) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(st["attachment"]["vm_id"], d.appliance().as_str(), "{st}");
    assert!(!nbd_export_refused(&d.nbd_url(vol)).await, "served");
    let generation = done["response"]["export_generation"].clone();
    // Detached behind the daemon's back from the appliance (the export is fenced), then attached to the
    // appliance again: served under a new generation.
    d.detach_behind_the_daemons_back(vol).await;
    let again = d.attach_to_appliance(vol).await;
    assert_ne!(
        again["response"]["export_generation"], generation,
        "{again}"
    );
    assert!(!nbd_export_refused(&d.nbd_url(vol)).await, "served again");
    let (_, e) = d.get(&format!("/exports/{vol}")).await;
    assert_eq!(e["status"], "active", "{e}");
    // Detached behind its back, then attached to a remote VM: the appliance's export is gone.
    d.detach_behind_the_daemons_back(vol).await;
    d.run_ok(
        &format!("/volumes/{vol}/attach"),
        json!({"vm_id": d.other_vm(1)}),
    )
    .await;
    let (s, e) = d.get(&format!("/exports/{vol}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    assert!(
        nbd_export_refused(&d.nbd_url(vol)).await,
        "no longer served"
    );
    let (_, st) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(st["attachment"]["vm_id"], d.other_vm(1).as_str(), "{st}");
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.stop().await;
}

/// Whether an NBD client is refused the export at `url` (nbd://host:port/name).
async fn nbd_export_refused(url: &str) -> bool {
    let rest = url.strip_prefix("nbd://").unwrap();
    let (addr, name) = rest.split_once('/').unwrap();
    let hs = nbd::client::Handshake::connect(addr).await.unwrap();
    hs.go(name).await.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_reconcile_repairs_what_is_safe_and_health_says_so() {
    let d = TestDaemon::start_with(|c| c.reconcile_interval_secs = 1).await;
    let vol = d.create_volume("repaired", GIB).await;
    d.attach_to_appliance(vol).await;
    d.detach_behind_the_daemons_back(vol).await;
    let start = std::time::Instant::now();
    loop {
        let (_, st) = d.get(&format!("/volumes/{vol}")).await;
        let (_, h) = d.get("/health").await;
        if st["state"] == "detached" && h["components"]["drift"]["status"] == "ok" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "not repaired: {st} {h}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, exports) = d.get("/exports").await;
    assert_eq!(exports["count"], 0, "{exports}");
    let text = metrics_text(&d).await;
    assert!(
        text.contains("volume_daemon_drift{kind=\"attached_only_in_database\"} 0"),
        "{text}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_attached_to_the_appliance_before_the_daemon_knew_it_is_reported_and_adopted_on_request(
) {
    let d = TestDaemon::start_with(|c| c.reconcile_interval_secs = 1).await;
    // Made and attached to the appliance directly in CloudStack (e.g. by the daemon this one replaced).
    let cs = d.cloud_client();
    let made = cs
        .create_volume(&cloudstack::CreateVolume {
            name: "left-by-predecessor".into(),
            zone_id: d.zone(),
            disk_offering_id: d.custom_offering(),
            size_bytes: Some(GIB),
        })
        .await
        .unwrap();
    let vol: Uuid = made.resource_id.clone().unwrap().parse().unwrap();
    cs.wait_job(&made.job_id, Duration::from_secs(30))
        .await
        .unwrap();
    let job = cs
        .attach_volume(&vol.to_string(), &d.appliance(), None)
        .await
        .unwrap();
    cs.wait_job(&job.job_id, Duration::from_secs(30))
        .await
        .unwrap();

    let (_, report) = d.post("/reconcile", json!({})).await;
    let drift = report["drift"].as_array().unwrap();
    assert_eq!(
        drift.len(),
        1,
        "only the unmanaged data disk, never the appliance's root: {report}"
    );
    assert_eq!(drift[0]["kind"], "unknown_appliance_volume", "{report}");
    assert_eq!(drift[0]["action"], "adopt");
    assert_eq!(drift[0]["volume_id"], vol.to_string());
    // The scheduled reconcile reports it but never adopts on its own.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, h) = d.get("/health").await;
    assert_eq!(h["components"]["drift"]["status"], "degraded", "{h}");
    let (_, exports) = d.get("/exports").await;
    assert_eq!(exports["count"], 0, "{exports}");

    let op = d.run_ok(&format!("/volumes/{vol}/adopt"), json!({})).await;
    assert_eq!(op["type"], "repair", "{op}");
    assert_eq!(op["request"]["repair"], "adopt", "{op}");
    let (_, v) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(v["state"], "attached", "{v}");
    assert_eq!(v["attachment"]["vm_id"], d.appliance(), "{v}");
    let (_, e) = d.get(&format!("/exports/{vol}")).await;
    assert_eq!(e["status"], "active", "{e}");
    assert!(
        !nbd_export_refused(&d.nbd_url(vol)).await,
        "the adopted volume is served"
    );
    let (_, after) = d.post("/reconcile", json!({})).await;
    assert_eq!(after["drift"], json!([]), "{after}");
    // CloudStack was not asked to change anything.
    let cv = cs.get_volume(&vol.to_string()).await.unwrap().unwrap();
    assert_eq!(
        cv.virtualmachine_id.as_deref(),
        Some(d.appliance().as_str())
    );
    // Adopting what the daemon does not have on the appliance is refused with the reason.
    let other = d.create_volume("not-on-the-appliance", GIB).await;
    let (s, op) = d.post(&format!("/volumes/{other}/adopt"), json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let done = d.wait_op(&op).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("attach it instead"),
        "{done}"
    );
    d.stop().await;
}

/// `DELETE /exports/{id}` whose client gives up while the export drains (a reader that takes no replies keeps
/// requests in flight until the drain deadline) still finishes: the record is removed, the sessions are closed
/// and the export can be served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_removal_whose_client_gives_up_mid_drain_still_finishes() {
    let d = TestDaemon::start_with(|c| c.drain_timeout_secs = 2).await;
    let vol = d.create_volume("abandoned-delete", GIB).await;
    let attached = d.attach_to_appliance(vol).await;
    let mut stuck = d.nbd_session(&attached).await;
    // 64 MiB of READs whose replies are never read: they stay in flight.
    for i in 0..8u64 {
        stuck
            .send(nbd::proto::CMD_READ, 0, i << 23, 8 << 20, &[])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gave_up = d
        .http
        .delete(format!("{}/exports/{vol}", d.base))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(
        gave_up.as_ref().is_err_and(|e| e.is_timeout()),
        "the removal should still be draining: {gave_up:?}"
    );
    // After the drain deadline the removal has finished on its own.
    let mut last = Value::Null;
    for _ in 0..100 {
        let (s, e) = d.get(&format!("/exports/{vol}")).await;
        if s == StatusCode::NOT_FOUND {
            last = Value::Null;
            break;
        }
        last = e;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, Value::Null, "the export's record stayed");
    // What a finished removal leaves, and nothing else (no record left behind unserved).
    let (_, v) = d.post("/exports/validate", json!({})).await;
    let found = v["inconsistencies"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{v}");
    assert!(
        found[0]
            .as_str()
            .unwrap()
            .contains("attached to the appliance without an export record"),
        "{v}"
    );
    // The stuck session was closed: reading on finds the end of the stream.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if stuck.recv().await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the session stayed open");
    let (s, e) = d.post("/exports", json!({"volume_id": vol})).await;
    assert!(s.is_success(), "{e}");
    drop(d.nbd_session(&attached).await);
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.stop().await;
}

/// An adoption of a volume the daemon already has attached (to the appliance or to another VM) fails as a
/// conflict and changes nothing: the export is not served again under its clients, nor torn down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_a_volume_the_daemon_already_manages_is_a_conflict_that_changes_nothing() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("managed", GIB).await;
    let attached = d.attach_to_appliance(vol).await;
    let mut c = d.nbd_session(&attached).await;
    c.write(0, &[0x3c; 4096], 0).await.unwrap();
    let (_, before) = d.get(&format!("/volumes/{vol}")).await;

    let (s, op) = d.post(&format!("/volumes/{vol}/adopt"), json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let done = d.wait_op(&op).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "conflict", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("already attached"),
        "{done}"
    );
    let (_, after) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(after["attachment"], before["attachment"], "{after}");
    let (_, e) = d.get(&format!("/exports/{vol}")).await;
    assert_eq!(e["status"], "active", "{e}");
    assert_eq!(
        e["generation"], attached["response"]["export_generation"],
        "{e}"
    );
    c.write(4096, &[0xc3; 4096], 0).await.unwrap();
    c.flush().await.expect("the session goes on");
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0x3c; 4096]);
    drop(c);

    // The same for a volume attached to another VM.
    let remote = d.create_volume("managed-remote", GIB).await;
    d.run_ok(
        &format!("/volumes/{remote}/attach"),
        json!({"vm_id": d.other_vm(0)}),
    )
    .await;
    let (_, before) = d.get(&format!("/volumes/{remote}")).await;
    let (_, op) = d.post(&format!("/volumes/{remote}/adopt"), json!({})).await;
    let done = d.wait_op(&op).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "conflict", "{done}");
    let (_, after) = d.get(&format!("/volumes/{remote}")).await;
    assert_eq!(after["attachment"], before["attachment"], "{after}");
    d.delete_ok(remote).await;
    d.delete_ok(vol).await;
    d.stop().await;
}

/// POSTs a JSON body of `len` bytes (a string field padded out) over a raw connection, announced by length or
/// chunked, and returns the answer's status and JSON body. The body is written by its own task, so an answer
/// sent before the server read it all is read all the same.
async fn raw_post(base: &str, path: &str, len: usize, chunked: bool) -> (u16, Value) {
    use tokio::io::AsyncWriteExt;
    let url = reqwest::Url::parse(&format!("{base}{path}")).unwrap();
    let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let pad = len - r#"{"name": ""}"#.len();
    let body = format!(r#"{{"name": "{}"}}"#, "a".repeat(pad)).into_bytes();
    let framing = if chunked {
        "transfer-encoding: chunked".to_string()
    } else {
        format!("content-length: {len}")
    };
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{framing}\r\n\r\n",
        url.path()
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        for part in body.chunks(64 << 10) {
            if chunked {
                wr.write_all(format!("{:x}\r\n", part.len()).as_bytes())
                    .await?;
                wr.write_all(part).await?;
                wr.write_all(b"\r\n").await?;
            } else {
                wr.write_all(part).await?;
            }
        }
        if chunked {
            wr.write_all(b"0\r\n\r\n").await?;
        }
        // Returned, not dropped: closing the write side would end the request for the server.
        Ok::<_, std::io::Error>(wr)
    });
    let answer = support::raw::read_answer(&mut rd).await;
    writer.abort();
    (answer.status, answer.body)
}

/// `/health`'s `drift` is the latest reconcile's, also one asked for: once a reconcile with `apply` has
/// repaired what the scheduled one found, `/health` says so at once, not after the next scheduled run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_asked_for_replaces_the_drift_health_reports() {
    let d = TestDaemon::start_with(|c| c.reconcile_repair = false).await;
    let vol = d.create_volume("drift-mended", GIB).await;
    d.attach_to_appliance(vol).await;
    d.detach_behind_the_daemons_back(vol).await;
    let mut degraded = false;
    for _ in 0..200 {
        let (_, h) = d.get("/health").await;
        if h["components"]["drift"]["status"] == "degraded" {
            degraded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(degraded, "the fence's findings are reported");
    let (s, r) = d.post("/reconcile", json!({"apply": true})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let (_, h) = d.get("/health").await;
    assert_eq!(h["components"]["drift"]["status"], "ok", "{h}");
    assert!(
        h["components"]["drift"]["detail"]
            .as_str()
            .unwrap()
            .contains("1 repaired"),
        "{h}"
    );
    let text = metrics_text(&d).await;
    assert!(
        text.contains("volume_daemon_drift{kind=\"attached_only_in_database\"} 0"),
        "{text}"
    );
    d.stop().await;
}
