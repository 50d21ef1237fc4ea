//! How many SQL statements a read costs (counted from the database driver's statement log, `sqlx::query`):
//! `GET /volumes`, `GET /volumes/{id}`, `GET /vms/{id}/volumes` and a reconcile each read their volumes with
//! their attachments, exports and newest operations in one statement, whatever the number of volumes.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::sync::Mutex;

use serde_json::{json, Value};
use support::{TestDaemon, GIB};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::Layer;
use uuid::Uuid;

/// Every statement the driver logged since the last [`take`], in the order they finished.
static STATEMENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records the text of each statement the driver logs.
struct Statements;

#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if matches!(field.name(), "summary" | "db.statement") {
            self.0.push_str(value);
            self.0.push(' ');
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if matches!(field.name(), "summary" | "db.statement") {
            self.0.push_str(&format!("{value:?} "));
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Statements {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "sqlx::query" {
            let mut text = Text::default();
            event.record(&mut text);
            STATEMENTS.lock().unwrap().push(text.0);
        }
    }
}

fn take() -> Vec<String> {
    std::mem::take(&mut *STATEMENTS.lock().unwrap())
}

/// The statements `read` costs that read volumes, attachments or exports (the lease's heartbeat and other
/// background work touch none of them).
async fn volume_statements<F: std::future::Future<Output = Value>>(
    read: F,
) -> (Vec<String>, Value) {
    take();
    let body = read.await;
    let touching = take()
        .into_iter()
        .filter(|s| {
            ["volumes", "attachments", "exports"]
                .iter()
                .any(|t| s.contains(t))
        })
        .collect();
    (touching, body)
}

async fn get_ok(d: &TestDaemon, path: &str) -> Value {
    let (s, v) = d.get(path).await;
    assert!(s.is_success(), "GET {path}: {s} {v}");
    v
}

/// Statement counts of the four reads at the daemon's current number of volumes.
async fn counts(d: &TestDaemon, vm: &str, one: Uuid, volumes: usize) -> [usize; 4] {
    let (list, body) = volume_statements(get_ok(d, "/volumes")).await;
    assert!(body.as_array().is_some_and(|a| !a.is_empty()), "{body}");
    let (single, _) = volume_statements(get_ok(d, &format!("/volumes/{one}"))).await;
    let (of_vm, _) = volume_statements(get_ok(d, &format!("/vms/{vm}/volumes"))).await;
    let (reconcile, report) = volume_statements(async {
        let (s, v) = d.post("/reconcile", json!({})).await;
        assert!(s.is_success(), "reconcile: {s} {v}");
        v
    })
    .await;
    assert_eq!(
        report["drift"].as_array().map(Vec::len),
        Some(0),
        "a clean state: {report}"
    );
    assert_eq!(report["checked_volumes"], volumes, "{report}");
    assert_eq!(list.len(), 1, "GET /volumes: {list:#?}");
    assert_eq!(single.len(), 1, "GET /volumes/{{id}}: {single:#?}");
    assert_eq!(of_vm.len(), 1, "GET /vms/{{id}}/volumes: {of_vm:#?}");
    [list.len(), single.len(), of_vm.len(), reconcile.len()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_cost_the_same_statements_at_any_number_of_volumes() {
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(
            Statements.with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("sqlx::query", tracing::Level::TRACE),
            ),
        ),
    )
    .expect("the only subscriber of this test binary");
    let d = TestDaemon::start().await;
    let vm = d.other_vm(0);
    let mut small = [0; 4];
    let mut vols = Vec::new();
    let mut attached = Vec::new();
    for (n, attach) in [(3, 1), (12, 3)] {
        let start = vols.len();
        for i in 0..n {
            vols.push(d.create_volume(&format!("count-{}", start + i), GIB).await);
        }
        for v in &vols[start..start + attach] {
            d.run_ok(&format!("/volumes/{v}/attach"), json!({"vm_id": vm}))
                .await;
            attached.push(*v);
        }
        if start == 0 {
            small = counts(&d, &vm, vols[0], vols.len()).await;
        }
    }
    let large = counts(&d, &vm, vols[0], vols.len()).await;
    assert_eq!(
        small, large,
        "statements per read at 3 and at 15 volumes (list, one, of a VM, reconcile)"
    );

    // The VM's volumes: its four attachments in device order, with their volumes' names and sizes, the same
    // as the listing filtered by VM says.
    let of_vm = get_ok(&d, &format!("/vms/{vm}/volumes")).await;
    let of_vm = of_vm.as_array().unwrap();
    let mut want: Vec<String> = attached.iter().map(Uuid::to_string).collect();
    let mut got: Vec<String> = of_vm
        .iter()
        .map(|v| v["volume_id"].as_str().unwrap().to_string())
        .collect();
    let devices: Vec<u64> = of_vm
        .iter()
        .map(|v| v["device_id"].as_u64().unwrap())
        .collect();
    assert!(devices.windows(2).all(|w| w[0] < w[1]), "{devices:?}");
    let listed = get_ok(&d, &format!("/volumes?vm_id={vm}")).await;
    for v in of_vm {
        assert_eq!(v["vm_id"], vm.as_str());
        assert_eq!(v["size"], GIB);
        assert_eq!(v["state"], "attached");
        let l = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["volume_id"] == v["volume_id"])
            .unwrap_or_else(|| panic!("{v} is listed for the VM"));
        assert_eq!(v["name"], l["name"]);
        assert_eq!(v["device_id"], l["attachment"]["device_id"]);
    }
    got.sort();
    want.sort();
    assert_eq!(got, want);
    d.stop().await;
}
