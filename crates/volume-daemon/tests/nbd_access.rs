//! Per-export NBD access: an appliance attach names the client identities that may open its export; over TLS
//! with verified client certificates, a client with another certificate neither lists nor opens it, and the
//! access is applied again after a restart. Needs nbdinfo (libnbd-bin); certificates come from the nbd
//! crate's test PKI (rcgen).
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

#[path = "../../nbd/tests/common/mod.rs"]
mod pki;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use support::call;
use uuid::Uuid;
use volume_daemon::config::{Config, NbdTls};
use volume_daemon::daemon::RunningDaemon;

fn tls_config(dir: &Path, pki: &pki::Pki) -> Config {
    let mut cfg = support::config(dir);
    cfg.nbd_tls = NbdTls::Require;
    cfg.nbd_tls_certificates = Some(pki.server_dir());
    cfg.nbd_tls_verify_peer = true;
    cfg
}

fn uri(addr: SocketAddr, name: &str, client: &Path) -> String {
    format!("nbds://{addr}/{name}?tls-certificates={}", client.display())
}

/// The export names `nbdinfo --list` shows the client (none when it cannot list at all).
fn listed(addr: SocketAddr, client: &Path) -> Vec<String> {
    let out = Command::new("nbdinfo")
        .arg("--list")
        .arg("--json")
        .arg(uri(addr, "", client))
        .output()
        .expect("nbdinfo runs (apt-get install libnbd-bin)");
    if !out.status.success() {
        // libnbd fails a listing without exports; that is "nothing listed" too.
        return Vec::new();
    }
    let l: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --list JSON");
    l["exports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["export-name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the client can open the export and read its size.
fn opens(addr: SocketAddr, name: &str, client: &Path) -> bool {
    Command::new("nbdinfo")
        .arg("--size")
        .arg(uri(addr, name, client))
        .output()
        .expect("nbdinfo runs")
        .status
        .success()
}

async fn wait_done(base: &str, op: &Value) -> Value {
    let id = op["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an operation: {op}"));
    call(
        base,
        reqwest::Method::GET,
        &format!("/operations/{id}?wait=60"),
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_an_export_admits_only_the_clients_its_attach_named_also_after_a_restart() {
    let pki = pki::Pki::new();
    let writer_a = pki.client("writer-a");
    let writer_b = pki.client("writer-b");
    let dir = tempfile::tempdir().unwrap();
    let first = RunningDaemon::start(tls_config(dir.path(), &pki))
        .await
        .unwrap();
    let base = format!("http://{}/api/v1", first.api_addr());
    let sim = first.sim().unwrap();
    let (zone, appliance) = (sim.zone_id().to_string(), sim.appliance_vm_id().to_string());
    let offering = support::custom_offering_of(sim);
    let mut volumes = Vec::new();
    for (name, clients) in [("for-a", Some(json!(["writer-a"]))), ("open", None)] {
        let op = call(
            &base,
            reqwest::Method::POST,
            "/volumes",
            Some(json!({"name": name, "size": support::GIB, "disk_offering_id": offering, "zone_id": zone})),
        )
        .await;
        let done = wait_done(&base, &op).await;
        let vol = Uuid::parse_str(done["response"]["volume_id"].as_str().unwrap()).unwrap();
        let mut body = json!({"vm_id": appliance});
        if let Some(c) = clients {
            body["nbd_clients"] = c;
        }
        let op = call(
            &base,
            reqwest::Method::POST,
            &format!("/volumes/{vol}/attach"),
            Some(body),
        )
        .await;
        let done = wait_done(&base, &op).await;
        assert_eq!(done["status"], "completed", "{done}");
        volumes.push(vol);
    }
    let (for_a, open) = (volumes[0], volumes[1]);
    let (name_a, name_open) = (
        volume_api::export_name(for_a),
        volume_api::export_name(open),
    );

    let check = |addr: SocketAddr| {
        let mut seen_by_a = listed(addr, &writer_a);
        seen_by_a.sort();
        let mut both = vec![name_a.clone(), name_open.clone()];
        both.sort();
        assert_eq!(
            seen_by_a, both,
            "writer-a lists its export and the open one"
        );
        assert_eq!(
            listed(addr, &writer_b),
            std::slice::from_ref(&name_open),
            "writer-b does not see writer-a's export"
        );
        assert!(opens(addr, &name_a, &writer_a), "writer-a opens its export");
        assert!(!opens(addr, &name_a, &writer_b), "writer-b cannot open it");
        assert!(
            opens(addr, &name_open, &writer_b),
            "an export without a list admits anyone"
        );
    };
    check(first.nbd_addr());
    let exports = call(&base, reqwest::Method::GET, "/exports", None).await;
    let by_name = |list: &Value, name: &str| {
        list["exports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["export_name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {list}"))
    };
    assert_eq!(
        by_name(&exports, &name_a)["nbd_clients"],
        json!(["writer-a"])
    );
    assert_eq!(by_name(&exports, &name_open)["nbd_clients"], json!([]));
    let st = call(
        &base,
        reqwest::Method::GET,
        &format!("/volumes/{for_a}"),
        None,
    )
    .await;
    assert_eq!(st["attachment"]["nbd_clients"], json!(["writer-a"]), "{st}");
    first.shutdown().await;

    // Restored at start-up with the same access.
    let second = RunningDaemon::start(tls_config(dir.path(), &pki))
        .await
        .unwrap();
    let base = format!("http://{}/api/v1", second.api_addr());
    let exports = call(&base, reqwest::Method::GET, "/exports", None).await;
    assert_eq!(by_name(&exports, &name_a)["status"], "active", "{exports}");
    assert_eq!(
        by_name(&exports, &name_a)["nbd_clients"],
        json!(["writer-a"])
    );
    check(second.nbd_addr());
    for vol in [for_a, open] {
        let op = call(
            &base,
            reqwest::Method::POST,
            &format!("/volumes/{vol}/detach"),
            Some(json!({})),
        )
        .await;
        assert_eq!(wait_done(&base, &op).await["status"], "completed");
    }
    if let Some(s) = second.sim() {
        s.detach_all_devices();
    }
    second.shutdown().await;
}
