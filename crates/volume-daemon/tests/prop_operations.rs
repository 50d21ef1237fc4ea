//! Property test: random sequences of create / attach / detach / delete, submitted in rounds whose operations
//! run concurrently (different volumes in parallel, one volume's in submission order), some rounds with a cloud
//! fault injected through the simulator's fault handle. After every round the invariants must hold:
//! every operation is terminal, operations on one volume completed in the order they were submitted, the
//! database, the cloud and the NBD exports agree, and no device, stable name, by-id link or export is left
//! behind by a volume that is not attached to the appliance.
//!
//! Runs against the in-process simulator over real HTTP (loop devices when root, files otherwise); bounded to
//! a few cases so that it runs in CI in well under a minute.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::collections::HashMap;
use std::path::Path;

use cloudsim::FaultSpec;
use proptest::prelude::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{TestDaemon, GIB};
use uuid::Uuid;

/// Where an attach goes.
#[derive(Debug, Clone, Copy)]
enum Target {
    Appliance,
    Other(usize),
}

/// One request; volumes are named by their index among those created so far (modulo their number).
#[derive(Debug, Clone, Copy)]
enum Act {
    Create,
    Attach { vol: usize, to: Target, root: bool },
    Detach(usize),
    Delete(usize),
}

/// A cloud fault active during one round.
#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    /// The next job of this command fails.
    FailJob(&'static str),
    /// The next attach to the appliance makes no by-id link: the device never appears.
    SkipLink,
    /// The cloud reports every volume 1 GiB larger: the device fails verification.
    WrongSize,
    /// The next requests are throttled (HTTP 429) and retried by the client.
    Throttle,
}

#[derive(Debug, Clone)]
struct Round {
    acts: Vec<Act>,
    fault: Fault,
}

fn act() -> impl Strategy<Value = Act> {
    let target = prop_oneof![
        3 => Just(Target::Appliance),
        1 => Just(Target::Other(0)),
        1 => Just(Target::Other(1)),
    ];
    prop_oneof![
        2 => Just(Act::Create),
        4 => (0..4usize, target, prop::bool::weighted(0.2))
            .prop_map(|(vol, to, root)| Act::Attach { vol, to, root }),
        3 => (0..4usize).prop_map(Act::Detach),
        1 => (0..4usize).prop_map(Act::Delete),
    ]
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        6 => Just(Fault::None),
        1 => Just(Fault::FailJob("attachVolume")),
        1 => Just(Fault::FailJob("detachVolume")),
        1 => Just(Fault::FailJob("createVolume")),
        1 => Just(Fault::FailJob("deleteVolume")),
        1 => Just(Fault::SkipLink),
        1 => Just(Fault::WrongSize),
        1 => Just(Fault::Throttle),
    ]
}

fn rounds() -> impl Strategy<Value = Vec<Round>> {
    prop::collection::vec(
        (prop::collection::vec(act(), 1..5), fault())
            .prop_map(|(acts, fault)| Round { acts, fault }),
        1..5,
    )
}

/// Failure codes an operation may end with when no fault was injected: refusals by the rules, not breakage.
const RULE_CODES: [&str; 4] = [
    "conflict",
    "not_found",
    "cloud_limit_exceeded",
    "cloud_invalid_parameter",
];

struct Model {
    /// Volumes created and not deleted, in creation order.
    volumes: Vec<Uuid>,
    /// Volumes deleted so far.
    deleted: Vec<Uuid>,
}

impl Model {
    fn pick(&self, i: usize) -> Option<Uuid> {
        (!self.volumes.is_empty()).then(|| self.volumes[i % self.volumes.len()])
    }
}

async fn inject(d: &TestDaemon, f: Fault) {
    let faults = d.sim().faults();
    match f {
        Fault::None => {}
        Fault::FailJob(command) => faults.add(FaultSpec::FailJob {
            command: command.into(),
            count: 1,
            errorcode: 530,
            errortext: Some(format!("injected failure of {command}")),
        }),
        Fault::SkipLink => faults.add(FaultSpec::SkipLinkOnAttach {
            volume_id: None,
            count: 1,
        }),
        Fault::WrongSize => faults.add(FaultSpec::WrongSize {
            volume_id: None,
            delta_bytes: GIB as i64,
        }),
        Fault::Throttle => faults.add(FaultSpec::Throttle {
            count: 2,
            probability: None,
        }),
    }
}

/// Submits one round (in order, without waiting in between), waits for every accepted operation and checks
/// what the operations themselves must satisfy.
async fn run_round(d: &TestDaemon, model: &mut Model, round: &Round) {
    inject(d, round.fault).await;
    let mut accepted: Vec<(Act, Value)> = Vec::new();
    for a in &round.acts {
        let (status, op) = match *a {
            Act::Create => {
                d.post(
                    "/volumes",
                    json!({"name": format!("p{}", model.volumes.len() + model.deleted.len()), "size": GIB,
                           "disk_offering_id": d.custom_offering(), "zone_id": d.zone()}),
                )
                .await
            }
            Act::Attach { vol, to, root } => {
                let Some(v) = model.pick(vol) else { continue };
                let vm = match to {
                    Target::Appliance => d.appliance(),
                    Target::Other(i) => d.other_vm(i),
                };
                let path = if root && matches!(to, Target::Other(_)) {
                    format!("/volumes/{v}/attach-root")
                } else {
                    format!("/volumes/{v}/attach")
                };
                d.post(&path, json!({ "vm_id": vm })).await
            }
            Act::Detach(i) => {
                let Some(v) = model.pick(i) else { continue };
                d.post(&format!("/volumes/{v}/detach"), json!({})).await
            }
            Act::Delete(i) => {
                let Some(v) = model.pick(i) else { continue };
                d.send(reqwest::Method::DELETE, &format!("/volumes/{v}"), None)
                    .await
            }
        };
        match status {
            StatusCode::CREATED => accepted.push((*a, op)),
            // Refused up front (attached elsewhere, already deleted): nothing journaled.
            StatusCode::CONFLICT | StatusCode::NOT_FOUND => {}
            other => panic!("{a:?}: unexpected answer {other}: {op}"),
        }
    }
    let mut done = Vec::new();
    for (a, op) in &accepted {
        let end = d.wait_op(op).await;
        let status = end["status"].as_str().unwrap();
        assert!(
            status == "completed" || status == "failed",
            "{a:?} ended {end}"
        );
        if status == "failed" && matches!(round.fault, Fault::None | Fault::Throttle) {
            let code = end["error_code"].as_str().unwrap_or_default();
            assert!(
                RULE_CODES.contains(&code),
                "{a:?} failed without an injected fault: {end}"
            );
        }
        done.push((*a, end));
    }
    d.sim().faults().clear();
    // Per volume, operations completed in submission order.
    let mut last: HashMap<String, String> = HashMap::new();
    for (a, end) in &done {
        let (Some(v), Some(at)) = (end["volume_id"].as_str(), end["completed_at"].as_str()) else {
            continue;
        };
        if let Some(prev) = last.get(v) {
            assert!(
                prev.as_str() <= at,
                "{a:?} on {v} completed at {at}, before the operation submitted ahead of it ({prev})"
            );
        }
        last.insert(v.to_string(), at.to_string());
    }
    // The model follows what completed.
    for (a, end) in &done {
        if end["status"] != "completed" {
            continue;
        }
        let id = || Uuid::parse_str(end["volume_id"].as_str().unwrap()).unwrap();
        match a {
            Act::Create => model.volumes.push(id()),
            Act::Delete(_) => {
                let v = id();
                model.volumes.retain(|x| *x != v);
                model.deleted.push(v);
            }
            _ => {}
        }
    }
    // Nothing is left unfinished.
    for status in ["pending", "executing"] {
        let (_, ops) = d.get(&format!("/operations?status={status}")).await;
        assert_eq!(ops, json!([]), "operations left {status}");
    }
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}

/// Database = cloud = exports, and nothing leaked.
async fn check_invariants(d: &TestDaemon, model: &Model) {
    let mut on_appliance = Vec::new();
    for v in &model.volumes {
        let (s, st) = d.get(&format!("/volumes/{v}")).await;
        assert_eq!(s, StatusCode::OK, "{st}");
        let cloud_vm = &st["cloudstack_data"]["virtualmachineid"];
        let att = &st["attachment"];
        assert!(
            st["cloudstack_error"].is_null(),
            "the cloud must know volume {v}: {st}"
        );
        if att.is_null() {
            assert_eq!(st["state"], "detached", "{st}");
            assert!(cloud_vm.is_null(), "cloud attached, database not: {st}");
            assert!(st["export"].is_null(), "export without attachment: {st}");
        } else {
            assert_eq!(st["state"], "attached", "{st}");
            assert_eq!(&att["vm_id"], cloud_vm, "database and cloud disagree: {st}");
            if att["target"] == "appliance" {
                assert_eq!(st["export"]["status"], "active", "{st}");
                assert_eq!(st["linux_state"], "present", "{st}");
                on_appliance.push(*v);
            } else {
                assert!(st["export"].is_null(), "remote volume exported: {st}");
            }
        }
    }
    for v in &model.deleted {
        let (_, st) = d.get(&format!("/volumes/{v}")).await;
        assert_eq!(st["state"], "deleted", "{st}");
        assert!(
            st["cloudstack_data"].is_null(),
            "deleted but in the cloud: {st}"
        );
    }
    let (_, exports) = d.get("/exports").await;
    let mut served: Vec<Uuid> = exports["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Uuid::parse_str(e["volume_id"].as_str().unwrap()).unwrap())
        .collect();
    served.sort();
    on_appliance.sort();
    assert_eq!(served, on_appliance, "exports: {exports}");
    let state = d.dir.path();
    assert_eq!(
        entries(&state.join("names")),
        on_appliance.len(),
        "stable names left behind"
    );
    assert_eq!(
        entries(&state.join("sim").join("by-id")),
        on_appliance.len(),
        "by-id links left behind"
    );
    for v in model.volumes.iter().chain(&model.deleted) {
        let file = state.join("sim").join("volumes").join(format!("{v}.img"));
        let loops = blockdev::loopdev::find_by_backing(&file).unwrap_or_default();
        let expected = usize::from(volume_sim::running_as_root() && on_appliance.contains(v));
        assert_eq!(loops.len(), expected, "loop devices of {v}: {loops:?}");
    }
}

use volume_daemon::sim as volume_sim;

async fn run_case(rounds: Vec<Round>) {
    let d = TestDaemon::start_with(|c| {
        c.sim.job_delay_ms = 5;
        c.device_timeout_secs = 1;
        c.drain_timeout_secs = 1;
    })
    .await;
    let mut model = Model {
        volumes: Vec::new(),
        deleted: Vec::new(),
    };
    for round in &rounds {
        run_round(&d, &mut model, round).await;
        check_invariants(&d, &model).await;
    }
    d.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 6,
        max_shrink_iters: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operation_sequences_keep_database_cloud_and_exports_in_step(rounds in rounds()) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run_case(rounds));
    }
}
