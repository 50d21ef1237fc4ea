//! The hub projection end to end: a real MariaDB holding the hub's four tables, the simulator over real HTTP
//! and the daemon, with a TCP proxy in front of the hub for outages. Every write the daemon makes to the hub
//! is counted by triggers, so "exactly once" is checked, not assumed. Every test needs the MariaDB server
//! binaries (`ext_`).
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

#[path = "common/db.rs"]
mod db;
#[path = "common/hub.rs"]
mod hub;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Connection as _;
use sqlx::Row as _;
use uuid::Uuid;
use volume_daemon::config::{Config, Secret};
use volume_daemon::daemon::RunningDaemon;
use volume_daemon::store::{
    AttachTarget, AttachmentRecord, DiskRole, NewOperation, OpType, Store, VolumeRecord,
};

use hub::{Proxy, TestHub};

const GIB: u64 = 1 << 30;

/// The simulator, the hub behind its proxy and a state directory for the daemon.
struct Env {
    sim: cloudsim::RunningSimulator,
    hub: TestHub,
    proxy: Proxy,
    dir: tempfile::TempDir,
    /// The daemon's own database (SQLite under the state dir when `None`).
    db_url: Option<String>,
}

impl Env {
    async fn new() -> Self {
        Self::with_hub(TestHub::new().await).await
    }

    async fn with_hub(hub: TestHub) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut sc = cloudsim::SimConfig::new(dir.path().join("sim"), dir.path().join("by-id"));
        sc.listen = "127.0.0.1:0".parse().unwrap();
        sc.job_delay = Duration::from_millis(20);
        let sim = cloudsim::Simulator::start(sc).await.unwrap();
        let proxy = Proxy::start(hub.port()).await;
        Self {
            sim,
            hub,
            proxy,
            dir,
            db_url: None,
        }
    }

    fn appliance(&self) -> String {
        self.sim.appliance_vm_id().to_string()
    }

    fn other_vm(&self, i: usize) -> String {
        self.sim.other_vm_ids()[i].clone()
    }

    fn config(&self) -> Config {
        let mut cfg = Config {
            state_dir: self.dir.path().join("state"),
            listen: "127.0.0.1:0".parse().unwrap(),
            nbd_listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        cfg.cloudstack_url = Some(self.sim.api_url());
        cfg.cloudstack_api_key = Some(Secret::new(cloudsim::DEFAULT_API_KEY));
        cfg.cloudstack_secret_key = Some(Secret::new(cloudsim::DEFAULT_SECRET_KEY));
        cfg.by_id_dir = self.dir.path().join("by-id");
        cfg.allow_regular_files = !volume_daemon::sim::running_as_root();
        cfg.device_timeout_secs = 5;
        cfg.job_timeout_secs = 60;
        cfg.drain_timeout_secs = 5;
        cfg.reconcile_interval_secs = 0;
        cfg.database_url = self.db_url.clone();
        cfg.hub_database_url = Some(self.hub.url_via(self.proxy.addr));
        cfg
    }

    async fn start(&self) -> Daemon {
        self.start_with(|_| {}).await
    }

    async fn start_with(&self, f: impl FnOnce(&mut Config)) -> Daemon {
        let mut cfg = self.config();
        f(&mut cfg);
        let d = RunningDaemon::start(cfg).await.unwrap();
        Daemon {
            base: format!("http://{}", d.api_addr()),
            d: Some(d),
        }
    }

    fn cloud(&self) -> cloudstack::Client {
        cloudstack::Client::new(cloudstack::Config {
            url: self.sim.api_url(),
            api_key: cloudsim::DEFAULT_API_KEY.into(),
            secret_key: Secret::new(cloudsim::DEFAULT_SECRET_KEY),
            ..cloudstack::Config::default()
        })
        .unwrap()
    }

    fn custom_offering(&self) -> String {
        self.sim
            .disk_offerings()
            .into_iter()
            .find(|(_, _, gb)| gb.is_none())
            .unwrap()
            .0
    }

    /// A volume made directly in CloudStack (as a predecessor did), attached to `vm` when given.
    async fn cloud_volume(&self, name: &str, vm: Option<&str>, device_id: Option<u32>) -> Uuid {
        let cs = self.cloud();
        let made = cs
            .create_volume(&cloudstack::CreateVolume {
                name: name.into(),
                zone_id: self.sim.zone_id().into(),
                disk_offering_id: self.custom_offering(),
                size_bytes: Some(GIB),
            })
            .await
            .unwrap();
        cs.wait_job(&made.job_id, Duration::from_secs(30))
            .await
            .unwrap();
        let vol: Uuid = made.resource_id.unwrap().parse().unwrap();
        if let Some(vm) = vm {
            let job = cs
                .attach_volume(&vol.to_string(), vm, device_id)
                .await
                .unwrap();
            cs.wait_job(&job.job_id, Duration::from_secs(30))
                .await
                .unwrap();
        }
        vol
    }

    async fn stop(self) {
        self.sim.detach_all_devices();
        self.sim.shutdown().await;
    }
}

struct Daemon {
    d: Option<RunningDaemon>,
    base: String,
}

impl Daemon {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = reqwest::Client::new().request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let text = req.send().await.unwrap().text().await.unwrap();
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }

    async fn get(&self, path: &str) -> Value {
        self.send(reqwest::Method::GET, &format!("/api/v1{path}"), None)
            .await
    }

    async fn health(&self) -> Value {
        self.send(reqwest::Method::GET, "/health", None).await
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Submits and waits for the operation; panics unless it completed.
    async fn run_ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let op = self.send(method, &format!("/api/v1{path}"), body).await;
        let id = op["id"].as_str().unwrap_or_else(|| panic!("{path}: {op}"));
        let done = self.wait_op(id).await;
        assert_eq!(done["status"], "completed", "{path}: {done}");
        done
    }

    async fn wait_op(&self, id: &str) -> Value {
        for _ in 0..10 {
            let v = self.get(&format!("/operations/{id}?wait=30")).await;
            if matches!(v["status"].as_str(), Some("completed" | "failed")) {
                return v;
            }
        }
        panic!("operation {id} did not finish");
    }

    async fn post_ok(&self, path: &str, body: Value) -> Value {
        self.run_ok(reqwest::Method::POST, path, Some(body)).await
    }

    async fn create(&self, env: &Env, name: &str) -> Uuid {
        let op = self
            .post_ok(
                "/volumes",
                json!({"name": name, "size": GIB, "disk_offering_id": env.custom_offering(), "zone_id": env.sim.zone_id()}),
            )
            .await;
        op["response"]["volume_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    async fn stop(mut self) {
        if let Some(d) = self.d.take() {
            d.shutdown().await;
        }
    }
}

/// Waits until `f` holds, polling; panics after `secs`.
async fn until<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < end, "{what}: not reached in {secs} s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `/health` says the hub is in step after at least `delivered` changes (counted since the
/// daemon started), so that a state published before the last commit does not count.
async fn synced(d: &Daemon, delivered: u64) {
    let end = Instant::now() + Duration::from_secs(40);
    loop {
        let h = d.health().await;
        let c = &h["components"]["hub"];
        let n = c["detail"]
            .as_str()
            .and_then(|s| s.strip_prefix("in step ("))
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok());
        if c["status"] == "ok" && n.is_some_and(|n| n >= delivered) {
            return;
        }
        assert!(
            Instant::now() < end,
            "the hub not in step after {delivered} changes: {c}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_hub_rows_follow_attach_detach_root_attach_and_a_failover() {
    let env = Env::new().await;
    // The active configuration names the appliance; an inactive one names something else.
    env.hub
        .set_appliance(&env.appliance(), "00000000-0000-0000-0000-00000000dead")
        .await;
    let d = env.start().await;
    let app = d.get("/appliance").await;
    assert_eq!(app["source"], "hub", "{app}");
    assert_eq!(app["vm_id"], env.appliance(), "{app}");
    assert_eq!(app["verified"], true, "{app}");

    let a = d.create(&env, "disk-a").await;
    let b = d.create(&env, "disk-b").await;
    let (sa, sb) = (a.to_string(), b.to_string());
    env.hub.add_volume(&sa, "ctx-1").await;
    env.hub.add_volume(&sb, "ctx-1").await;
    synced(&d, 0).await;
    assert_eq!(env.hub.daemon_writes().await, 0, "create writes nothing");

    // Attach to the appliance: a mapping, an export row and the volume marked attached.
    d.post_ok(
        &format!("/volumes/{a}/attach"),
        json!({"vm_id": env.appliance()}),
    )
    .await;
    synced(&d, 1).await;
    let dev = d.get(&format!("/volumes/{a}/device")).await;
    let m = env.hub.mapping(&sa).await.expect("a mapping row");
    assert_eq!(m.vm_id, env.appliance());
    assert_eq!(m.operation_mode, "oma");
    assert_eq!(
        Some(m.device_path.as_str()),
        dev["device_path"].as_str(),
        "{dev}"
    );
    assert!(m.device_path.contains("virtio-"), "{m:?}");
    assert_eq!(m.cloudstack_state, "attached");
    assert_eq!(m.linux_state, "detected");
    assert_eq!(m.size, GIB as i64);
    assert_eq!(m.symlink_path.as_deref(), dev["symlink_path"].as_str());
    assert_eq!(
        m.persistent_device_name.as_deref(),
        dev["persistent_device_name"].as_str()
    );
    assert_eq!(m.vm_context_id.as_deref(), Some("ctx-1"));
    let ex = env.hub.exports(&sa).await;
    assert_eq!(ex.len(), 1, "{ex:?}");
    assert_eq!(ex[0].export_name, format!("migration-vol-{a}"));
    assert_eq!(ex[0].status, "active");
    assert_eq!(ex[0].device_mapping_uuid.as_deref(), Some(sa.as_str()));
    assert_eq!(ex[0].vm_context_id.as_deref(), Some("ctx-1"));
    let export = d.get(&format!("/exports/{a}")).await;
    assert_eq!(ex[0].port, export["port"].as_i64().unwrap(), "{export}");
    assert_eq!(
        env.hub.volume(&sa).await,
        (Some("attached".into()), Some(m.device_path.clone()))
    );
    assert_eq!(env.hub.writes("device_mappings", "INSERT").await, 1);
    assert_eq!(env.hub.writes("nbd_exports", "INSERT").await, 1);
    assert_eq!(env.hub.writes("ossea_volumes", "UPDATE").await, 1);

    // Failover: both data disks leave the appliance and go to another VM, then its root is swapped.
    d.post_ok(&format!("/volumes/{a}/detach"), json!({})).await;
    synced(&d, 2).await;
    assert_eq!(env.hub.mapping(&sa).await, None);
    assert!(env.hub.exports(&sa).await.is_empty());
    assert_eq!(env.hub.volume(&sa).await, (Some("detached".into()), None));
    let vm = env.other_vm(0);
    for v in [a, b] {
        d.post_ok(&format!("/volumes/{v}/attach"), json!({"vm_id": vm}))
            .await;
    }
    synced(&d, 4).await;
    let (ma, mb) = (
        env.hub.mapping(&sa).await.unwrap(),
        env.hub.mapping(&sb).await.unwrap(),
    );
    // Two data disks on one VM: the predecessor's `remote-vm-<vm>` would have collided here.
    assert_eq!(ma.device_path, format!("remote-vm-{vm}-vol-{a}"));
    assert_eq!(mb.device_path, format!("remote-vm-{vm}-vol-{b}"));
    for m in [&ma, &mb] {
        assert_eq!(m.vm_id, vm);
        assert_eq!(m.operation_mode, "failover");
        assert_eq!(m.linux_state, "n/a");
        assert_eq!(m.size, 0);
    }
    assert!(env.hub.exports(&sa).await.is_empty());
    assert_eq!(
        env.hub.volume(&sb).await,
        (Some("attached".into()), Some(mb.device_path.clone()))
    );
    // The hub flips operation_mode itself; the daemon keeps that while the attachment stays.
    sqlx::query("UPDATE device_mappings SET operation_mode = 'oma' WHERE volume_uuid = ?")
        .bind(&sb)
        .execute(&env.hub.pool)
        .await
        .unwrap();

    let root = d.create(&env, "os-disk").await;
    let sroot = root.to_string();
    let faults = env.sim.faults();
    faults.stop_vm(&vm).unwrap();
    if let Some(old) = env.sim.root_volume_id(&vm) {
        faults.detach_volume(&old).unwrap();
    }
    d.post_ok(
        &format!("/volumes/{root}/attach-root"),
        json!({"vm_id": vm}),
    )
    .await;
    synced(&d, 5).await;
    let mr = env.hub.mapping(&sroot).await.unwrap();
    assert_eq!(mr.device_path, format!("remote-vm-root-{vm}-vol-{root}"));
    assert_eq!(mr.cloudstack_device_id, Some(0));
    assert_eq!(mr.operation_mode, "failover");
    assert_eq!(
        env.hub.mapping(&sb).await.unwrap().operation_mode,
        "oma",
        "the hub's own change was kept"
    );

    // Failback of disk A to the appliance: its row returns to the appliance's device path.
    d.post_ok(&format!("/volumes/{a}/detach"), json!({})).await;
    d.post_ok(
        &format!("/volumes/{a}/attach"),
        json!({"vm_id": env.appliance()}),
    )
    .await;
    synced(&d, 7).await;
    let back = env.hub.mapping(&sa).await.unwrap();
    assert_eq!(back.operation_mode, "oma");
    assert_eq!(back.device_path, m.device_path);
    assert_eq!(env.hub.exports(&sa).await.len(), 1);

    // Delete of an attached volume: detached, then gone from the hub's mappings.
    d.run_ok(reqwest::Method::DELETE, &format!("/volumes/{a}"), None)
        .await;
    synced(&d, 8).await;
    assert_eq!(env.hub.mapping(&sa).await, None);
    assert!(env.hub.exports(&sa).await.is_empty());
    assert_eq!(env.hub.volume(&sa).await, (Some("detached".into()), None));

    let text = d.metrics().await;
    assert!(
        text.contains("volume_daemon_hub_pending_changes 0"),
        "{text}"
    );
    assert!(text.contains("volume_daemon_hub_schema_ok 1"), "{text}");
    assert!(
        !text.contains("volume_daemon_hub_delivered_total 0"),
        "{text}"
    );
    d.stop().await;
    env.stop().await;
}

/// A test failover ends with `POST /cleanup/test-failover`: the volume's row moves from the test VM
/// (`failover`, the remote placeholder) back to the appliance (`oma`, the by-id path), its export row
/// appears and the volume is marked attached there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_hub_rows_follow_a_test_failover_clean_up() {
    let env = Env::new().await;
    env.hub
        .set_appliance(&env.appliance(), "00000000-0000-0000-0000-00000000dead")
        .await;
    let d = env.start().await;
    let vol = d.create(&env, "tf-disk").await;
    let sv = vol.to_string();
    env.hub.add_volume(&sv, "ctx-tf").await;
    let test_vm = env.sim.faults().deploy_vm("test-failover").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.post_ok(&format!("/volumes/{vol}/attach"), json!({"vm_id": test_vm}))
        .await;
    synced(&d, 1).await;
    let m = env.hub.mapping(&sv).await.expect("a mapping row");
    assert_eq!(m.operation_mode, "failover");
    assert_eq!(m.device_path, format!("remote-vm-{test_vm}-vol-{vol}"));

    let done = d
        .post_ok(
            "/cleanup/test-failover",
            json!({"test_vm_id": test_vm, "volume_id": vol, "oma_vm_id": env.appliance(),
                   "delete_vm": true, "force_clean": false}),
        )
        .await;
    synced(&d, 2).await;
    let m = env.hub.mapping(&sv).await.expect("the mapping row");
    assert_eq!(m.vm_id, env.appliance());
    assert_eq!(m.operation_mode, "oma");
    assert_eq!(
        Some(m.device_path.as_str()),
        done["response"]["device_path"].as_str(),
        "{done}"
    );
    assert!(m.device_path.contains("virtio-"), "{m:?}");
    assert_eq!(m.linux_state, "detected");
    assert_eq!(m.vm_context_id.as_deref(), Some("ctx-tf"));
    let ex = env.hub.exports(&sv).await;
    assert_eq!(ex.len(), 1, "{ex:?}");
    assert_eq!(ex[0].export_name, format!("migration-vol-{vol}"));
    assert_eq!(ex[0].status, "active");
    assert_eq!(
        env.hub.volume(&sv).await,
        (Some("attached".into()), Some(m.device_path.clone()))
    );
    d.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_a_hub_outage_and_a_restart_delay_changes_that_then_arrive_once_and_in_order() {
    let env = Env::new().await;
    let d = env
        .start_with(|c| c.appliance_vm_id = Some(env.appliance()))
        .await;
    let v = d.create(&env, "disk").await;
    let sv = v.to_string();
    env.hub.add_volume(&sv, "ctx-9").await;
    synced(&d, 0).await;

    env.proxy.down();
    // Three changes of one volume during the outage; the hub must end with the last.
    d.post_ok(
        &format!("/volumes/{v}/attach"),
        json!({"vm_id": env.appliance()}),
    )
    .await;
    d.post_ok(&format!("/volumes/{v}/detach"), json!({})).await;
    let vm = env.other_vm(1);
    d.post_ok(&format!("/volumes/{v}/attach"), json!({"vm_id": vm}))
        .await;
    until(
        20,
        "the hub component degraded with pending changes",
        || async {
            let h = d.health().await;
            let c = &h["components"]["hub"];
            c["status"] == "degraded"
                && c["detail"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("3 changes pending"))
                && h["ready"] == true
        },
    )
    .await;
    let text = d.metrics().await;
    assert!(
        text.contains("volume_daemon_hub_pending_changes 3"),
        "{text}"
    );
    assert!(
        !text.contains("volume_daemon_hub_delivery_failures_total 0"),
        "{text}"
    );
    assert_eq!(env.hub.daemon_writes().await, 0);

    // The daemon stops (its commits are journaled, the hub never saw them) and starts again, still cut off.
    d.stop().await;
    let d = env
        .start_with(|c| c.appliance_vm_id = Some(env.appliance()))
        .await;
    until(20, "still pending after the restart", || async {
        let h = d.health().await;
        h["components"]["hub"]["detail"]
            .as_str()
            .is_some_and(|s| s.contains("changes pending"))
    })
    .await;
    assert_eq!(env.hub.daemon_writes().await, 0);

    env.proxy.up();
    synced(&d, 4).await;
    let m = env.hub.mapping(&sv).await.expect("the final mapping");
    assert_eq!(m.vm_id, vm);
    assert_eq!(m.device_path, format!("remote-vm-{vm}-vol-{v}"));
    assert!(env.hub.exports(&sv).await.is_empty());
    assert_eq!(
        env.hub.volume(&sv).await,
        (Some("attached".into()), Some(m.device_path.clone()))
    );
    // In order: the appliance mapping was inserted and removed before the remote one was inserted; each
    // change was applied once.
    assert_eq!(env.hub.writes("device_mappings", "INSERT").await, 2);
    assert_eq!(env.hub.writes("device_mappings", "DELETE").await, 1);
    assert_eq!(env.hub.writes("nbd_exports", "INSERT").await, 1);
    assert_eq!(env.hub.writes("nbd_exports", "DELETE").await, 1);
    assert_eq!(env.hub.writes("ossea_volumes", "UPDATE").await, 3);
    d.stop().await;
    env.stop().await;
}

/// One journaled attach, as an operation's commit writes it.
async fn commit_an_attach(store: &Store, vm: &str) -> Uuid {
    let volume = Uuid::new_v4();
    let now = chrono::Utc::now();
    store
        .upsert_volume(&VolumeRecord {
            id: volume,
            name: "v".into(),
            size_bytes: GIB,
            disk_offering_id: "o".into(),
            zone_id: "z".into(),
            metadata: json!({}),
            cloud_state: None,
            snapshot: Default::default(),
            created_at: now,
            updated_at: now,
            deleted_at: None,
        })
        .await
        .unwrap();
    let op = Uuid::new_v4();
    store
        .insert_operation(&NewOperation {
            id: op,
            op_type: OpType::Attach,
            volume_id: Some(volume),
            vm_id: Some(vm.into()),
            request: json!({}),
            idempotency_key: None,
            queue_seq: Some(1),
        })
        .await
        .unwrap();
    let att = AttachmentRecord {
        volume_id: volume,
        vm_id: vm.into(),
        target: AttachTarget::Remote,
        role: DiskRole::Data,
        device_id: Some(3),
        by_id_path: None,
        kernel_device: None,
        stable_name: None,
        export_generation: None,
        nbd_clients: Vec::new(),
        created_at: now,
        updated_at: now,
    };
    store
        .commit_attach(op, &att, None, &json!({}))
        .await
        .unwrap();
    volume
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_a_change_applied_to_the_hub_but_not_marked_delivered_is_not_applied_twice() {
    // The daemon's own journal in MariaDB too; the hub directly (no daemon: the crash is between two steps).
    let hub_db = TestHub::new().await;
    let own = db::mariadb().await;
    let mut store = Store::connect(&own.url).await.unwrap();
    store.migrate().await.unwrap();
    let _wake = store.enable_hub_outbox();
    let hub = volume_daemon::hub::Hub::new(&hub_db.db.url, 10809).unwrap();
    assert!(hub.check_schema().await.unwrap().is_ok());

    let vm = "7f1c2d3e-0000-4000-8000-000000000001";
    let volume = commit_an_attach(&store, vm).await;
    hub_db.add_volume(&volume.to_string(), "ctx-2").await;
    let pending = store.pending_hub_changes(10).await.unwrap();
    assert_eq!(pending.len(), 1, "the commit journaled its hub change");
    let entry = &pending[0];
    assert_eq!(entry.change.volume_id, volume);

    // Applied, then the daemon dies before marking it delivered.
    let applied = hub.apply(&entry.change, true).await.unwrap();
    assert_eq!(
        applied.writes, 2,
        "a mapping inserted and the volume marked attached"
    );
    let first = hub_db.mapping(&volume.to_string()).await.unwrap();
    let writes = hub_db.all_writes().await;
    // Meanwhile the hub changes the row itself (failover bookkeeping).
    sqlx::query("UPDATE device_mappings SET operation_mode = 'oma' WHERE volume_uuid = ?")
        .bind(volume.to_string())
        .execute(&hub_db.pool)
        .await
        .unwrap();

    // After the restart the row is still pending and is delivered again: nothing is written twice.
    let again = store.pending_hub_changes(10).await.unwrap();
    assert_eq!(again, pending);
    volume_daemon::hub::outbox::deliver_one(&store, &hub, &again[0], true)
        .await
        .unwrap();
    assert_eq!(
        hub_db.all_writes().await,
        writes + 1,
        "only the hub's own update"
    );
    let after = hub_db.mapping(&volume.to_string()).await.unwrap();
    assert_eq!(after.id, first.id, "the same row, not a new one");
    assert_eq!(after.operation_mode, "oma", "the hub's change is kept");
    assert_eq!(after.device_path, format!("remote-vm-{vm}-vol-{volume}"));
    assert_eq!(after.vm_context_id.as_deref(), Some("ctx-2"));
    assert!(store.pending_hub_changes(10).await.unwrap().is_empty());
    assert_eq!(store.hub_backlog().await.unwrap().pending, 0);
    // Marking it again changes nothing either.
    store.mark_hub_change_delivered(entry.seq).await.unwrap();
    assert!(store.pending_hub_changes(10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_missing_hub_tables_are_reported_never_created_and_changes_wait_for_them() {
    // A hub without nbd_exports.
    let tables: Vec<&str> = hub::TABLES
        .iter()
        .copied()
        .filter(|t| !t.contains("CREATE TABLE nbd_exports"))
        .collect();
    let env = Env::with_hub(TestHub::with_tables(&tables).await).await;
    let d = env
        .start_with(|c| c.appliance_vm_id = Some(env.appliance()))
        .await;
    until(20, "the missing table reported", || async {
        let h = d.health().await;
        let c = &h["components"]["hub"];
        c["status"] == "degraded"
            && c["detail"]
                .as_str()
                .is_some_and(|s| s.contains("table nbd_exports is missing"))
            && h["ready"] == true
    })
    .await;
    let v = d.create(&env, "disk").await;
    d.post_ok(
        &format!("/volumes/{v}/attach"),
        json!({"vm_id": env.appliance()}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.hub.all_writes().await,
        0,
        "nothing is delivered to a hub that differs"
    );
    let tables_now: Vec<String> = sqlx::query_scalar("SHOW TABLES")
        .fetch_all(&env.hub.pool)
        .await
        .unwrap();
    assert!(
        !tables_now.iter().any(|t| t == "nbd_exports"),
        "{tables_now:?}"
    );
    let text = d.metrics().await;
    assert!(text.contains("volume_daemon_hub_schema_ok 0"), "{text}");

    // The operator creates the table: the pending change is delivered.
    let create = hub::TABLES
        .iter()
        .find(|t| t.contains("CREATE TABLE nbd_exports"))
        .unwrap();
    sqlx::query(create).execute(&env.hub.pool).await.unwrap();
    until(40, "the change delivered after the fix", || async {
        !env.hub.exports(&v.to_string()).await.is_empty()
    })
    .await;
    synced(&d, 1).await;
    d.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_an_identity_in_the_hub_that_the_cloud_does_not_know_is_not_used() {
    let env = Env::new().await;
    env.hub
        .set_appliance("00000000-0000-0000-0000-00000000beef", &env.appliance())
        .await;
    let d = env.start().await;
    let app = d.get("/appliance").await;
    assert_eq!(app["source"], "hub", "{app}");
    assert_eq!(app["verified"], false, "{app}");
    let h = d.health().await;
    assert_eq!(
        h["components"]["appliance_identity"]["status"], "failed",
        "{h}"
    );
    d.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_an_upgrade_in_place_adopts_the_predecessors_rows_and_attachments() {
    let mut env = Env::new().await;
    let own = db::mariadb().await;
    env.db_url = Some(own.url.clone());
    env.hub.set_appliance(&env.appliance(), "").await;
    let app = env.appliance();
    let vm = env.other_vm(0);
    // What the predecessor left: a volume on the appliance with its mapping and export rows, one on another
    // VM with the old placeholder, a row the cloud contradicts, and an appliance volume without a row.
    let p1 = env.cloud_volume("p1", Some(&app), None).await;
    let p2 = env.cloud_volume("p2", Some(&vm), None).await;
    let p3 = env.cloud_volume("p3", None, None).await;
    let p4 = env.cloud_volume("p4", Some(&app), None).await;
    for (v, vm_id, mode, path) in [
        (
            p1,
            app.as_str(),
            "oma",
            "/dev/disk/by-id/virtio-old-p1".to_string(),
        ),
        (p2, vm.as_str(), "failover", format!("remote-vm-{vm}")),
        (p3, app.as_str(), "oma", "/dev/vdz".to_string()),
    ] {
        env.hub.add_volume(&v.to_string(), "ctx-up").await;
        sqlx::query(
            "INSERT INTO device_mappings (vm_context_id, volume_uuid, vm_id, operation_mode, device_path, \
             cloudstack_state, linux_state, size) VALUES ('ctx-up', ?, ?, ?, ?, 'attached', 'detected', 0)",
        )
        .bind(v.to_string())
        .bind(vm_id)
        .bind(mode)
        .bind(path)
        .execute(&env.hub.pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO nbd_exports (volume_id, export_name, port, device_path, config_path, status) \
         VALUES (?, ?, 10809, '/dev/disk/by-id/virtio-old-p1', '/etc/nbd-server/conf.d/x.conf', 'active')",
    )
    .bind(p1.to_string())
    .bind(format!("migration-vol-{p1}"))
    .execute(&env.hub.pool)
    .await
    .unwrap();
    let before = env.hub.all_writes().await;

    // The dry run lists what would be adopted and changes nothing (not even the daemon's database).
    let cfg = env.config();
    let (plan, ops) = volume_daemon::hub::import::run(&cfg, true).await.unwrap();
    assert!(ops.is_empty());
    use volume_daemon::hub::import::ImportAction as A;
    let action = |v: Uuid| {
        plan.items
            .iter()
            .find(|i| i.volume_id == v.to_string())
            .map(|i| i.action)
    };
    assert_eq!(action(p1), Some(A::Adopt), "{plan:?}");
    assert_eq!(action(p2), Some(A::AdoptRemote), "{plan:?}");
    assert_eq!(action(p3), Some(A::RewriteHubRow), "{plan:?}");
    assert_eq!(action(p4), Some(A::Adopt), "{plan:?}");
    assert!(
        plan.items.iter().any(|i| i.action == A::Skip),
        "the appliance's own root disk is listed and skipped: {plan:?}"
    );
    assert_eq!(env.hub.all_writes().await, before);
    let probe = Store::connect(&own.url).await.unwrap();
    assert_eq!(
        probe.schema_versions().await.0,
        None,
        "the dry run did not migrate"
    );
    probe.close().await;

    // The real import journals the adoptions; the daemon runs them at start.
    let (plan2, ops) = volume_daemon::hub::import::run(&cfg, false).await.unwrap();
    assert_eq!(plan2, plan);
    assert_eq!(ops.len(), 3);
    let d = env.start().await;
    for id in &ops {
        let done = d.wait_op(&id.to_string()).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    synced(&d, 4).await;
    for v in [p1, p4] {
        let vol = d.get(&format!("/volumes/{v}")).await;
        assert_eq!(vol["state"], "attached", "{vol}");
        let e = d.get(&format!("/exports/{v}")).await;
        assert_eq!(e["status"], "active", "{e}");
        let m = env.hub.mapping(&v.to_string()).await.unwrap();
        let dev = d.get(&format!("/volumes/{v}/device")).await;
        assert_eq!(Some(m.device_path.as_str()), dev["device_path"].as_str());
        let ex = env.hub.exports(&v.to_string()).await;
        assert_eq!(ex.len(), 1, "{ex:?}");
        assert_eq!(
            ex[0].device_mapping_uuid.as_deref(),
            Some(v.to_string().as_str())
        );
    }
    let listed = d.get(&format!("/vms/{vm}/volumes")).await;
    assert!(listed.to_string().contains(&p2.to_string()), "{listed}");
    assert_eq!(
        env.hub.mapping(&p2.to_string()).await.unwrap().device_path,
        format!("remote-vm-{vm}-vol-{p2}")
    );
    assert_eq!(
        env.hub.mapping(&p3.to_string()).await,
        None,
        "the contradicted row is gone"
    );
    let report = d
        .send(reqwest::Method::POST, "/api/v1/reconcile", Some(json!({})))
        .await;
    assert_eq!(report["drift"], json!([]), "{report}");
    // Importing again finds everything managed.
    d.stop().await;
    let (third, ops) = volume_daemon::hub::import::run(&cfg, false).await.unwrap();
    assert!(ops.is_empty(), "{third:?}");
    assert_eq!(third.count(A::AlreadyManaged), 3, "{third:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_hub_rows_follow_attach_and_detach_with_the_daemons_database_on_postgresql() {
    // The daemon's journal and its outbox in PostgreSQL; the hub, as always, in MariaDB.
    let mut env = Env::new().await;
    let own = db::postgres().await;
    env.db_url = Some(own.url.clone());
    let d = env
        .start_with(|c| c.appliance_vm_id = Some(env.appliance()))
        .await;
    let a = d.create(&env, "pg-a").await;
    let b = d.create(&env, "pg-b").await;
    let (sa, sb) = (a.to_string(), b.to_string());
    env.hub.add_volume(&sa, "ctx-pg").await;
    env.hub.add_volume(&sb, "ctx-pg").await;
    synced(&d, 0).await;

    let vm = env.other_vm(0);
    d.post_ok(
        &format!("/volumes/{a}/attach"),
        json!({"vm_id": env.appliance()}),
    )
    .await;
    d.post_ok(&format!("/volumes/{b}/attach"), json!({"vm_id": vm}))
        .await;
    synced(&d, 2).await;
    let dev = d.get(&format!("/volumes/{a}/device")).await;
    let ma = env
        .hub
        .mapping(&sa)
        .await
        .expect("a mapping of the appliance volume");
    assert_eq!(ma.vm_id, env.appliance());
    assert_eq!(ma.operation_mode, "oma");
    assert_eq!(Some(ma.device_path.as_str()), dev["device_path"].as_str());
    assert_eq!(ma.vm_context_id.as_deref(), Some("ctx-pg"));
    let ex = env.hub.exports(&sa).await;
    assert_eq!(ex.len(), 1, "{ex:?}");
    assert_eq!(ex[0].export_name, format!("migration-vol-{a}"));
    assert_eq!(ex[0].device_mapping_uuid.as_deref(), Some(sa.as_str()));
    let mb = env
        .hub
        .mapping(&sb)
        .await
        .expect("a mapping of the remote volume");
    assert_eq!(mb.vm_id, vm);
    assert_eq!(mb.operation_mode, "failover");
    assert_eq!(mb.device_path, format!("remote-vm-{vm}-vol-{b}"));
    assert!(env.hub.exports(&sb).await.is_empty());
    assert_eq!(
        env.hub.volume(&sa).await,
        (Some("attached".into()), Some(ma.device_path.clone()))
    );

    for v in [a, b] {
        d.post_ok(&format!("/volumes/{v}/detach"), json!({})).await;
    }
    synced(&d, 4).await;
    for s in [&sa, &sb] {
        assert_eq!(env.hub.mapping(s).await, None);
        assert!(env.hub.exports(s).await.is_empty());
        assert_eq!(env.hub.volume(s).await, (Some("detached".into()), None));
    }
    for (tbl, op, n) in [
        ("device_mappings", "INSERT", 2),
        ("device_mappings", "DELETE", 2),
        ("nbd_exports", "INSERT", 1),
        ("nbd_exports", "DELETE", 1),
        ("ossea_volumes", "UPDATE", 4),
    ] {
        assert_eq!(env.hub.writes(tbl, op).await, n, "{op}s of {tbl}");
    }
    assert_eq!(
        env.hub.daemon_writes().await,
        10,
        "nothing but the writes above"
    );
    d.stop().await;

    // The outbox rows are PostgreSQL's: four changes, each delivered.
    let pg = sqlx::PgPool::connect(&own.url).await.unwrap();
    let (all, delivered): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(delivered_at) FROM hub_outbox")
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!((all, delivered), (4, 4));
    pg.close().await;
    env.stop().await;
}

/// What a predecessor left for the import tests: a volume on the appliance with its mapping and export rows,
/// one on another VM with the old placeholder, and a row the cloud contradicts (the volume is detached).
/// Returns the three volumes.
async fn predecessor_rows(env: &Env) -> (Uuid, Uuid, Uuid) {
    let app = env.appliance();
    let vm = env.other_vm(0);
    let p1 = env.cloud_volume("p1", Some(&app), None).await;
    let p2 = env.cloud_volume("p2", Some(&vm), None).await;
    let p3 = env.cloud_volume("p3", None, None).await;
    for (v, vm_id, mode, path) in [
        (
            p1,
            app.as_str(),
            "oma",
            "/dev/disk/by-id/virtio-old-p1".to_string(),
        ),
        (p2, vm.as_str(), "failover", format!("remote-vm-{vm}")),
        (p3, app.as_str(), "oma", "/dev/vdz".to_string()),
    ] {
        env.hub.add_volume(&v.to_string(), "ctx-up").await;
        sqlx::query(
            "INSERT INTO device_mappings (vm_context_id, volume_uuid, vm_id, operation_mode, device_path, \
             cloudstack_state, linux_state, size) VALUES ('ctx-up', ?, ?, ?, ?, 'attached', 'detected', 0)",
        )
        .bind(v.to_string())
        .bind(vm_id)
        .bind(mode)
        .bind(path)
        .execute(&env.hub.pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO nbd_exports (volume_id, export_name, port, device_path, config_path, status) \
         VALUES (?, ?, 10809, '/dev/disk/by-id/virtio-old-p1', '/etc/nbd-server/conf.d/x.conf', 'active')",
    )
    .bind(p1.to_string())
    .bind(format!("migration-vol-{p1}"))
    .execute(&env.hub.pool)
    .await
    .unwrap();
    (p1, p2, p3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_import_on_start_adopts_the_predecessors_rows_and_attachments_once() {
    let env = Env::new().await;
    env.hub.set_appliance(&env.appliance(), "").await;
    let vm = env.other_vm(0);
    let (p1, p2, p3) = predecessor_rows(&env).await;

    // `hub_import_on_start`: no `volume-daemon import`, the daemon adopts at start.
    // The advertised NBD port stays the same across the restart, as on an appliance.
    let on_start = |c: &mut Config| {
        c.hub_import_on_start = true;
        c.nbd_advertised_port = Some(10809);
    };
    let d = env.start_with(on_start).await;
    let h = d.health().await;
    let c = &h["components"]["hub_import"];
    assert_eq!(c["status"], "ok", "{h}");
    assert_eq!(
        c["detail"], "2 adoptions journaled, 1 hub rows rewritten, 0 already managed",
        "{h}"
    );
    let ops = d.get("/operations?type=repair").await;
    let ops = ops.as_array().unwrap().clone();
    assert_eq!(ops.len(), 2, "{ops:?}");
    for op in &ops {
        let done = d.wait_op(op["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["request"]["repair"], "adopt", "{done}");
    }
    synced(&d, 3).await;

    // The appliance volume: named, served, and its hub rows rewritten to the daemon's device path.
    let vol = d.get(&format!("/volumes/{p1}")).await;
    assert_eq!(vol["state"], "attached", "{vol}");
    let e = d.get(&format!("/exports/{p1}")).await;
    assert_eq!(e["status"], "active", "{e}");
    let dev = d.get(&format!("/volumes/{p1}/device")).await;
    let m1 = env.hub.mapping(&p1.to_string()).await.unwrap();
    assert_eq!(Some(m1.device_path.as_str()), dev["device_path"].as_str());
    assert_eq!(m1.operation_mode, "oma");
    let ex = env.hub.exports(&p1.to_string()).await;
    assert_eq!(ex.len(), 1, "one export row, not a second: {ex:?}");
    assert_eq!(ex[0].export_name, format!("migration-vol-{p1}"));
    assert_eq!(
        ex[0].device_mapping_uuid.as_deref(),
        Some(p1.to_string().as_str())
    );
    // The remote one: recorded, with the unique placeholder.
    let vol = d.get(&format!("/volumes/{p2}")).await;
    assert_eq!(vol["attachment"]["vm_id"], vm, "{vol}");
    assert_eq!(
        env.hub.mapping(&p2.to_string()).await.unwrap().device_path,
        format!("remote-vm-{vm}-vol-{p2}")
    );
    // The contradicted row: gone.
    assert_eq!(env.hub.mapping(&p3.to_string()).await, None);
    let report = d
        .send(reqwest::Method::POST, "/api/v1/reconcile", Some(json!({})))
        .await;
    assert_eq!(report["drift"], json!([]), "{report}");
    let writes = env.hub.daemon_writes().await;
    d.stop().await;

    // The next start finds everything managed: nothing is journaled or written again.
    let d = env.start_with(on_start).await;
    let h = d.health().await;
    assert_eq!(
        h["components"]["hub_import"]["detail"],
        "0 adoptions journaled, 0 hub rows rewritten, 2 already managed",
        "{h}"
    );
    // The start re-queues both attachments for the hub; applied again, they write nothing.
    synced(&d, 2).await;
    let ops = d.get("/operations?type=repair").await;
    assert_eq!(ops.as_array().unwrap().len(), 2, "{ops}");
    assert_eq!(env.hub.daemon_writes().await, writes);
    d.stop().await;
    env.stop().await;
}

/// Runs `volume-daemon check` against the environment's simulator with `hub_url`; its exit code and stdout.
fn run_check(env: &Env, hub_url: &str) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_volume-daemon"));
    cmd.arg("check")
        .args(["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(env.dir.path().join("state"))
        .args(["--cloudstack-url", &env.sim.api_url()])
        .args(["--cloudstack-api-key", cloudsim::DEFAULT_API_KEY])
        .args(["--cloudstack-secret-key", cloudsim::DEFAULT_SECRET_KEY])
        .args(["--appliance-vm-id", &env.appliance()])
        .arg("--by-id-dir")
        .arg(env.dir.path().join("by-id"))
        .env("VOLUME_DAEMON_HUB_DATABASE_URL", hub_url)
        .env("RUST_LOG", "error");
    if !volume_daemon::sim::running_as_root() {
        cmd.env("VOLUME_DAEMON_ALLOW_REGULAR_FILES", "true");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The `hub` line of a check report.
fn hub_line(report: &str) -> &str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("hub"))
        .unwrap_or_else(|| panic!("no hub line in:\n{report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_check_reports_the_hub_good_missing_different_and_unreachable() {
    let env = Env::new().await;
    let url = env.hub.url_via(env.proxy.addr);
    let (code, report) = run_check(&env, &url);
    let line = hub_line(&report);
    assert!(
        line.starts_with("ok ") && line.ends_with("reachable, tables as expected"),
        "{report}"
    );
    assert_eq!(code, Some(0), "every check passes:\n{report}");

    // A column of another type and a missing column: each named, the exit code says the check failed.
    sqlx::query("ALTER TABLE device_mappings MODIFY cloudstack_device_id varchar(16)")
        .execute(&env.hub.pool)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE nbd_exports DROP COLUMN config_path")
        .execute(&env.hub.pool)
        .await
        .unwrap();
    let (code, report) = run_check(&env, &url);
    let line = hub_line(&report);
    assert!(line.starts_with("FAIL"), "{report}");
    assert!(
        line.contains("the hub's tables differ")
            && line.contains("column device_mappings.cloudstack_device_id is varchar")
            && line.contains("column nbd_exports.config_path is missing"),
        "{report}"
    );
    assert_eq!(code, Some(1), "{report}");
    // Nothing was created or changed by the check.
    let cols: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() \
         AND table_name = 'nbd_exports' AND column_name = 'config_path'",
    )
    .fetch_one(&env.hub.pool)
    .await
    .unwrap();
    assert_eq!(cols, 0);

    // A missing table.
    let bare = TestHub::with_tables(&hub::TABLES[..1]).await;
    let (code, report) = run_check(&env, &bare.db.url);
    let line = hub_line(&report);
    assert!(line.starts_with("FAIL"), "{report}");
    for t in ["device_mappings", "nbd_exports", "ossea_volumes"] {
        assert!(line.contains(&format!("table {t} is missing")), "{report}");
    }
    assert_eq!(code, Some(1), "{report}");

    // An unreachable hub.
    env.proxy.down();
    let (code, report) = run_check(&env, &url);
    let line = hub_line(&report);
    assert!(
        line.starts_with("FAIL")
            && line.contains("check that it is reachable and hub_database_url"),
        "{report}"
    );
    assert_eq!(code, Some(1), "{report}");
    env.stop().await;
}

/// A hub that answers nothing (a table lock held by the platform, a stalled server): the operations go on,
/// `/health` shows the changes pending (then degraded) instead of the state before, and once the hub answers
/// again the change arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_a_hub_that_stops_answering_shows_pending_changes_and_then_catches_up() {
    let env = Env::new().await;
    let d = env
        .start_with(|c| c.appliance_vm_id = Some(env.appliance()))
        .await;
    let v = d.create(&env, "disk").await;
    let sv = v.to_string();
    env.hub.add_volume(&sv, "ctx-7").await;
    synced(&d, 0).await;

    // The platform locks the tables the daemon writes; every statement of the daemon waits.
    let mut locker =
        sqlx::MySqlConnection::connect(&env.hub.db.url.replacen("mariadb://", "mysql://", 1))
            .await
            .unwrap();
    sqlx::query("LOCK TABLES device_mappings WRITE, nbd_exports WRITE, ossea_volumes WRITE")
        .execute(&mut locker)
        .await
        .unwrap();
    let started = Instant::now();
    d.post_ok(
        &format!("/volumes/{v}/attach"),
        json!({"vm_id": env.appliance()}),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the attach waited for the hub"
    );
    until(10, "the change shown pending", || async {
        let h = d.health().await;
        h["components"]["hub"]["detail"]
            .as_str()
            .is_some_and(|s| s.starts_with("1 changes pending"))
    })
    .await;
    until(60, "the hub component degraded", || async {
        d.health().await["components"]["hub"]["status"] == "degraded"
    })
    .await;
    assert_eq!(env.hub.daemon_writes().await, 0);

    sqlx::query("UNLOCK TABLES")
        .execute(&mut locker)
        .await
        .unwrap();
    synced(&d, 1).await;
    let m = env.hub.mapping(&sv).await.expect("the mapping");
    assert_eq!(m.vm_id, env.appliance());
    assert_eq!(env.hub.exports(&sv).await.len(), 1);
    assert_eq!(env.hub.writes("device_mappings", "INSERT").await, 1);
    assert_eq!(env.hub.writes("nbd_exports", "INSERT").await, 1);
    assert_eq!(env.hub.writes("ossea_volumes", "UPDATE").await, 1);
    d.stop().await;
    env.stop().await;
}

/// Thirty volumes created and eighteen attached (to the appliance and to other VMs) at once, then half detached
/// and some deleted at once during an outage: the hub ends with exactly the daemon's attachments, and a restart
/// writes nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_thirty_concurrent_volumes_and_an_outage_leave_the_hub_rows_true() {
    let env = Env::new().await;
    let d = env
        .start_with(|c| {
            c.appliance_vm_id = Some(env.appliance());
            c.nbd_advertised_port = Some(10809);
        })
        .await;
    let n = 30;
    let vols: Vec<Uuid> = futures::future::join_all((0..n).map(|i| {
        let (d, env) = (&d, &env);
        async move { d.create(env, &format!("c'o\"n é{i}")).await }
    }))
    .await;
    for v in &vols {
        env.hub.add_volume(&v.to_string(), "ctx-c").await;
    }
    // At most six data disks per VM: the first 18 attached, a third to the appliance, the rest to the two others.
    let others = env.sim.other_vm_ids();
    let attached = 18;
    let target = |i: usize| {
        if i % 3 == 0 {
            env.appliance()
        } else {
            others[i % 3 - 1].clone()
        }
    };
    futures::future::join_all(vols.iter().enumerate().take(attached).map(|(i, v)| {
        let d = &d;
        let vm = target(i);
        async move {
            d.post_ok(&format!("/volumes/{v}/attach"), json!({"vm_id": vm}))
                .await;
        }
    }))
    .await;
    env.proxy.down();
    futures::future::join_all(
        vols.iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(i, v)| {
                let d = &d;
                async move {
                    if i < attached {
                        d.post_ok(&format!("/volumes/{v}/detach"), json!({})).await;
                    }
                    if i % 4 == 0 {
                        d.run_ok(reqwest::Method::DELETE, &format!("/volumes/{v}"), None)
                            .await;
                    }
                }
            }),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.proxy.up();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let h = d.health().await;
        if h["components"]["hub"]["status"] == "ok"
            && h["components"]["hub"]["detail"]
                .as_str()
                .is_some_and(|s| s.starts_with("in step"))
        {
            break;
        }
        assert!(Instant::now() < end, "{h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, v) in vols.iter().enumerate() {
        let sv = v.to_string();
        let m = env.hub.mapping(&sv).await;
        let ex = env.hub.exports(&sv).await;
        let vol = env.hub.volume(&sv).await;
        if i >= attached {
            assert_eq!(m, None, "{i}");
            assert_eq!(vol, (Some("creating".into()), None), "{i}");
        } else if i % 2 == 0 {
            assert_eq!(m, None, "{i}");
            assert!(ex.is_empty(), "{i}");
            assert_eq!(vol, (Some("detached".into()), None), "{i}");
        } else {
            let m = m.unwrap_or_else(|| panic!("{i} mapping"));
            assert_eq!(m.vm_id, target(i), "{i}");
            if i % 3 == 0 {
                assert_eq!(ex.len(), 1, "{i}");
                assert_eq!(m.operation_mode, "oma");
            } else {
                assert!(ex.is_empty(), "{i}");
                assert_eq!(m.operation_mode, "failover");
            }
            assert_eq!(vol.0.as_deref(), Some("attached"), "{i}");
            assert_eq!(vol.1.as_deref(), Some(m.device_path.as_str()), "{i}");
        }
    }
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM device_mappings")
        .fetch_one(&env.hub.pool)
        .await
        .unwrap();
    assert_eq!(total, 9);
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nbd_exports")
        .fetch_one(&env.hub.pool)
        .await
        .unwrap();
    assert_eq!(total, 3);
    // A restart re-queues every attachment; nothing changes.
    let writes = env.hub.daemon_writes().await;
    d.stop().await;
    let d = env
        .start_with(|c| {
            c.appliance_vm_id = Some(env.appliance());
            c.nbd_advertised_port = Some(10809);
        })
        .await;
    synced(&d, 9).await;
    assert_eq!(env.hub.daemon_writes().await, writes);
    d.stop().await;
    env.stop().await;
}

/// A start-up whose hub holds `ossea_configs` locked (the identity source `hub` gets no answer) is not held
/// by it for ever: the read is given up and the daemon serves (the identity then comes from elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_a_start_is_not_held_by_a_hub_that_does_not_answer() {
    let env = Env::new().await;
    env.hub.set_appliance(&env.appliance(), "").await;
    let mut locker =
        sqlx::MySqlConnection::connect(&env.hub.db.url.replacen("mariadb://", "mysql://", 1))
            .await
            .unwrap();
    sqlx::query("LOCK TABLES ossea_configs WRITE")
        .execute(&mut locker)
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(60), env.start())
        .await
        .expect("the daemon started while the hub did not answer");
    until(10, "the hub component published", || async {
        d.health().await["components"]["hub"].is_object()
    })
    .await;
    sqlx::query("UNLOCK TABLES")
        .execute(&mut locker)
        .await
        .unwrap();
    d.stop().await;
    env.stop().await;
}

/// An import lists each volume once, whatever the spelling of its id in the hub, and a volume whose row
/// CloudStack contradicts (detached there, or gone) is marked `detached` in the hub's `ossea_volumes`, as a
/// detach does, not left `attached` at the predecessor's device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_an_import_lists_each_volume_once_and_marks_contradicted_volumes_detached() {
    let env = Env::new().await;
    env.hub.set_appliance(&env.appliance(), "").await;
    let app = env.appliance();
    let p1 = env.cloud_volume("p1", Some(&app), None).await;
    let p3 = env.cloud_volume("p3", None, None).await;
    let gone = Uuid::new_v4();
    for (v, path) in [
        (p1.to_string().to_uppercase(), "/dev/vdb"),
        (p3.to_string(), "/dev/vdc"),
        (gone.to_string(), "/dev/vdd"),
    ] {
        env.hub.add_volume(&v, "ctx-up").await;
        sqlx::query(
            "UPDATE ossea_volumes SET status = 'attached', device_path = ? WHERE volume_id = ?",
        )
        .bind(path)
        .bind(&v)
        .execute(&env.hub.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO device_mappings (vm_context_id, volume_uuid, vm_id, operation_mode, device_path, \
             cloudstack_state, linux_state, size) VALUES ('ctx-up', ?, ?, 'oma', ?, 'attached', 'detected', 0)",
        )
        .bind(&v)
        .bind(&app)
        .bind(path)
        .execute(&env.hub.pool)
        .await
        .unwrap();
    }
    let cfg = env.config();
    use volume_daemon::hub::import::ImportAction as A;
    let (plan, _) = volume_daemon::hub::import::run(&cfg, true).await.unwrap();
    let of = |v: Uuid| -> Vec<A> {
        plan.items
            .iter()
            .filter(|i| i.volume_id.eq_ignore_ascii_case(&v.to_string()))
            .map(|i| i.action)
            .collect()
    };
    assert_eq!(of(p1), vec![A::Adopt], "{plan:#?}");
    assert_eq!(of(p3), vec![A::RewriteHubRow], "{plan:#?}");
    assert_eq!(of(gone), vec![A::RewriteHubRow], "{plan:#?}");

    let (again, ops) = volume_daemon::hub::import::run(&cfg, false).await.unwrap();
    assert_eq!(again, plan);
    assert_eq!(ops.len(), 1);
    let d = env
        .start_with(|c| c.nbd_advertised_port = Some(10809))
        .await;
    let done = d.wait_op(&ops[0].to_string()).await;
    assert_eq!(done["status"], "completed", "{done}");
    synced(&d, 3).await;
    let m = env
        .hub
        .mapping(&p1.to_string())
        .await
        .expect("p1's mapping");
    assert_eq!(m.vm_id, app);
    assert_eq!(
        env.hub
            .volume(&p1.to_string().to_uppercase())
            .await
            .0
            .as_deref(),
        Some("attached")
    );
    for v in [p3, gone] {
        assert_eq!(env.hub.mapping(&v.to_string()).await, None);
        assert_eq!(
            env.hub.volume(&v.to_string()).await,
            (Some("detached".into()), None),
            "{v}"
        );
    }
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM device_mappings")
        .fetch_one(&env.hub.pool)
        .await
        .unwrap();
    assert_eq!(total, 1);
    d.stop().await;
    env.stop().await;
}

/// An `nbd_exports` row the predecessor left for a volume without a mapping (its export is no longer served
/// by anyone) is listed by the import and removed, whether CloudStack has the volume detached or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_an_import_removes_export_rows_of_volumes_without_a_mapping() {
    let env = Env::new().await;
    env.hub.set_appliance(&env.appliance(), "").await;
    let detached = env.cloud_volume("detached", None, None).await;
    let gone = Uuid::new_v4();
    for v in [detached, gone] {
        env.hub.add_volume(&v.to_string(), "ctx-up").await;
        sqlx::query(
            "INSERT INTO nbd_exports (volume_id, export_name, port, device_path, config_path, status) \
             VALUES (?, ?, 10809, '/dev/vdx', '', 'active')",
        )
        .bind(v.to_string())
        .bind(format!("migration-vol-{v}"))
        .execute(&env.hub.pool)
        .await
        .unwrap();
    }
    let cfg = env.config();
    use volume_daemon::hub::import::ImportAction as A;
    let (plan, _) = volume_daemon::hub::import::run(&cfg, true).await.unwrap();
    for v in [detached, gone] {
        let item = plan
            .items
            .iter()
            .find(|i| i.volume_id == v.to_string())
            .unwrap_or_else(|| panic!("{v} listed: {plan:#?}"));
        assert_eq!(item.action, A::RewriteHubRow, "{plan:#?}");
        assert!(item.detail.contains("export"), "{item:?}");
    }
    let (again, ops) = volume_daemon::hub::import::run(&cfg, false).await.unwrap();
    assert_eq!(again, plan);
    assert!(ops.is_empty());
    let d = env.start().await;
    synced(&d, 2).await;
    for v in [detached, gone] {
        assert!(env.hub.exports(&v.to_string()).await.is_empty(), "{v}");
        assert_eq!(
            env.hub.volume(&v.to_string()).await,
            (Some("detached".into()), None)
        );
    }
    d.stop().await;
    env.stop().await;
}

/// A hub may declare its integer columns UNSIGNED (`information_schema.DATA_TYPE` says `int` either way): the
/// daemon reads them as well as signed ones, so an attached volume's rows stay in step across a restart and
/// a re-created export, instead of every later change waiting behind one that cannot be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_hub_integer_columns_declared_unsigned_are_kept_in_step() {
    let env = Env::new().await;
    for alter in [
        "ALTER TABLE device_mappings MODIFY cloudstack_device_id int unsigned DEFAULT NULL, \
         MODIFY size bigint unsigned NOT NULL",
        "ALTER TABLE nbd_exports MODIFY port bigint unsigned NOT NULL",
    ] {
        sqlx::query(alter).execute(&env.hub.pool).await.unwrap();
    }
    env.hub.set_appliance(&env.appliance(), "").await;
    let d = env.start().await;
    let vol = d.create(&env, "unsigned").await;
    let other = d.create(&env, "unsigned-2").await;
    d.post_ok(
        &format!("/volumes/{vol}/attach"),
        json!({"vm_id": env.appliance()}),
    )
    .await;
    synced(&d, 1).await;
    // The export re-created: the existing rows are read and compared.
    let removed = d
        .send(
            reqwest::Method::DELETE,
            &format!("/api/v1/exports/{vol}"),
            None,
        )
        .await;
    assert_eq!(removed["removed"], true, "{removed}");
    let made = d
        .send(
            reqwest::Method::POST,
            "/api/v1/exports",
            Some(json!({"volume_id": vol})),
        )
        .await;
    assert!(made["export_name"].is_string(), "{made}");
    d.stop().await;
    // A restart re-reads every row; a later change of another volume is delivered behind it.
    let d = env.start().await;
    d.post_ok(
        &format!("/volumes/{other}/attach"),
        json!({"vm_id": env.appliance()}),
    )
    .await;
    synced(&d, 2).await;
    let h = d.health().await;
    assert_eq!(h["components"]["hub"]["status"], "ok", "{h}");
    for v in [vol, other] {
        let row = sqlx::query(
            "SELECT CAST(size AS SIGNED) AS size, CAST(cloudstack_device_id AS SIGNED) AS dev \
             FROM device_mappings WHERE volume_uuid = ?",
        )
        .bind(v.to_string())
        .fetch_one(&env.hub.pool)
        .await
        .unwrap();
        assert_eq!(row.get::<i64, _>("size"), GIB as i64);
        assert!(row.get::<Option<i64>, _>("dev").is_some());
        let port: i64 = sqlx::query_scalar(
            "SELECT CAST(port AS SIGNED) FROM nbd_exports WHERE volume_id = ? AND status = 'active'",
        )
        .bind(v.to_string())
        .fetch_one(&env.hub.pool)
        .await
        .unwrap();
        assert!(port > 0);
    }
    d.stop().await;
    env.stop().await;
}

/// The hub's `datetime` columns hold the hub server's local time (`NOW()` as the hub and the predecessor
/// write it), also when that is not UTC: the daemon does not set its hub sessions to UTC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_hub_datetime_columns_are_written_in_the_hub_servers_time_zone() {
    let env = Env::new().await;
    // The server's zone for new sessions; put back before the end (the server is shared by this binary's tests,
    // none of which reads these columns).
    sqlx::query("SET GLOBAL time_zone = '+05:30'")
        .execute(&env.hub.pool)
        .await
        .unwrap();
    env.hub.set_appliance(&env.appliance(), "").await;
    let d = env.start().await;
    let vol = d.create(&env, "zoned").await;
    env.hub.add_volume(&vol.to_string(), "ctx-tz").await;
    d.post_ok(
        &format!("/volumes/{vol}/attach"),
        json!({"vm_id": env.appliance()}),
    )
    .await;
    synced(&d, 1).await;
    sqlx::query("SET GLOBAL time_zone = SYSTEM")
        .execute(&env.hub.pool)
        .await
        .unwrap();
    // Seconds between each column and the server's local time now (+05:30), read on this pool's UTC session.
    let local_now = "CONVERT_TZ(UTC_TIMESTAMP(3), '+00:00', '+05:30')";
    for (what, sql) in [
        (
            "ossea_volumes.updated_at",
            format!("SELECT TIMESTAMPDIFF(SECOND, updated_at, {local_now}) FROM ossea_volumes WHERE volume_id = ?"),
        ),
        (
            "nbd_exports.created_at",
            format!("SELECT TIMESTAMPDIFF(SECOND, created_at, {local_now}) FROM nbd_exports WHERE volume_id = ?"),
        ),
        (
            "nbd_exports.updated_at",
            format!("SELECT TIMESTAMPDIFF(SECOND, updated_at, {local_now}) FROM nbd_exports WHERE volume_id = ?"),
        ),
    ] {
        let age: i64 = sqlx::query_scalar(&sql)
            .bind(vol.to_string())
            .fetch_one(&env.hub.pool)
            .await
            .unwrap();
        assert!(
            (0..120).contains(&age),
            "{what} is {age} s behind the hub's local time"
        );
    }
    d.stop().await;
    env.stop().await;
}

/// A predecessor's `nbd_exports` row without `volume_id` (NULL, or the column's default '') under a volume's
/// export name is that volume's: an attach takes it over with `volume_id` set (the hub looks rows up by
/// both), a detach removes it, and an import removes one of a volume CloudStack no longer has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_export_rows_without_a_volume_id_are_taken_over_and_removed() {
    let env = Env::new().await;
    env.hub.set_appliance(&env.appliance(), "").await;
    let d = env.start().await;
    let null_row = d.create(&env, "null-row").await;
    let empty_row = d.create(&env, "empty-row").await;
    let gone = Uuid::new_v4();
    for (v, volume_id) in [
        (null_row, None),
        (empty_row, Some("")),
        (gone, None::<&str>),
    ] {
        sqlx::query(
            "INSERT INTO nbd_exports (volume_id, vm_disk_id, export_name, port, device_path, config_path, status) \
             VALUES (?, 7, ?, 10809, '/dev/vdx', '', 'active')",
        )
        .bind(volume_id)
        .bind(format!("migration-vol-{v}"))
        .execute(&env.hub.pool)
        .await
        .unwrap();
    }
    for v in [null_row, empty_row] {
        d.post_ok(
            &format!("/volumes/{v}/attach"),
            json!({"vm_id": env.appliance()}),
        )
        .await;
    }
    synced(&d, 2).await;
    for v in [null_row, empty_row] {
        let rows = env.hub.exports(&v.to_string()).await;
        assert_eq!(rows.len(), 1, "{v}: {rows:?}");
        assert_eq!(rows[0].export_name, format!("migration-vol-{v}"));
        // The hub's own column is kept.
        let disk: Option<i64> =
            sqlx::query_scalar("SELECT vm_disk_id FROM nbd_exports WHERE export_name = ?")
                .bind(format!("migration-vol-{v}"))
                .fetch_one(&env.hub.pool)
                .await
                .unwrap();
        assert_eq!(disk, Some(7), "{v}");
    }
    // Detach: the row goes, even where the hub has no cascade from the mapping.
    sqlx::query("ALTER TABLE nbd_exports DROP FOREIGN KEY fk_nbd_device")
        .execute(&env.hub.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE nbd_exports SET volume_id = NULL WHERE export_name = ?")
        .bind(format!("migration-vol-{null_row}"))
        .execute(&env.hub.pool)
        .await
        .unwrap();
    d.post_ok(&format!("/volumes/{null_row}/detach"), json!({}))
        .await;
    synced(&d, 3).await;
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nbd_exports WHERE export_name = ?")
        .bind(format!("migration-vol-{null_row}"))
        .fetch_one(&env.hub.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    d.stop().await;
    // The import finds the row of a volume CloudStack does not have by its export name, and removes it.
    let cfg = env.config();
    let (plan, _) = volume_daemon::hub::import::run(&cfg, false).await.unwrap();
    let item = plan
        .items
        .iter()
        .find(|i| i.volume_id == gone.to_string())
        .unwrap_or_else(|| panic!("{gone} listed: {plan:#?}"));
    assert_eq!(
        item.action,
        volume_daemon::hub::import::ImportAction::RewriteHubRow,
        "{plan:#?}"
    );
    let d = env.start().await;
    synced(&d, 1).await;
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nbd_exports WHERE export_name = ?")
        .bind(format!("migration-vol-{gone}"))
        .fetch_one(&env.hub.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    d.stop().await;
    env.stop().await;
}

/// At every start the hub is brought in line with every volume the daemon holds: a mapping row put in by
/// hand (or left by a predecessor) for a volume the daemon has detached is removed, as an attached
/// volume's row edited by hand is written back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_a_start_removes_hub_rows_of_volumes_the_daemon_has_detached() {
    let env = Env::new().await;
    let d = env.start().await;
    let vol = d.create(&env, "detached-stale").await;
    d.stop().await;
    sqlx::query(
        "INSERT INTO device_mappings (volume_uuid, vm_id, operation_mode, cloudstack_device_id, device_path, \
         cloudstack_state, linux_state, size) VALUES (?, ?, 'oma', 1, '/dev/vdb', 'attached', 'detected', 1)",
    )
    .bind(vol.to_string())
    .bind(env.appliance())
    .execute(&env.hub.pool)
    .await
    .unwrap();
    let d = env.start().await;
    synced(&d, 1).await;
    assert!(env.hub.mapping(&vol.to_string()).await.is_none());
    d.stop().await;
    env.stop().await;
}
