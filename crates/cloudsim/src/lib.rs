//! A CloudStack-compatible simulator: the real wire protocol, file-backed volumes, loop-device attachments, fault injection.
//!
//! [`Simulator::start`] serves `/client/api` (CloudStack's request format, signature versions 2 and 3, its
//! response and error shapes), `/sim/faults` (fault injection) and `/sim/vms`, `/sim/volumes` (actions
//! behind the client's back); see the crate README for the rules and where they come from.
//! The cloud holds one zone, a fixed-size and a custom-size disk offering, three running KVM VMs (the
//! appliance and two others) and a stopped VMware VM, each with a ROOT volume. Volumes are sparse files
//! under `<state_dir>/volumes/`; attaching one to the appliance exposes it (loop device or the file) under
//! `<by_id_dir>/virtio-<serial>`. Every change is appended to `<state_dir>/state.log` (compacted into
//! `state.json`) and reloaded at start.

mod devices;
mod engine;
mod error;
mod faults;
mod http;
mod model;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use error::{ActionError, SimError, SimErrorKind};
pub use faults::{FaultHandle, FaultSpec};
pub use model::{virtio_serial, DEFAULT_PAGE_SIZE, MAX_DATA_VOLUMES};

/// Default API key.
pub const DEFAULT_API_KEY: &str = "sim-api-key";
/// Default secret key.
pub const DEFAULT_SECRET_KEY: &str = "sim-secret-key";
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default duration of an asynchronous job.
pub const DEFAULT_JOB_DELAY: Duration = Duration::from_millis(200);

/// How to run the simulator.
#[derive(Clone)]
pub struct SimConfig {
    /// Address to serve on; port 0 picks a free port (see [`RunningSimulator::addr`]).
    pub listen: SocketAddr,
    /// Where the state file and the volumes' backing files live.
    pub state_dir: PathBuf,
    /// Where the `virtio-<serial>` links of appliance attachments are made.
    pub by_id_dir: PathBuf,
    pub api_key: String,
    pub secret_key: String,
    /// The appliance VM's id; generated (from the seed) and saved when `None`.
    pub appliance_vm_id: Option<String>,
    /// How long each asynchronous job takes.
    pub job_delay: Duration,
    /// Seed of every generated id and every random fault decision.
    pub seed: u64,
    /// Back appliance attachments with loop devices (needs root); otherwise the link points at the file.
    pub use_loop_devices: bool,
    /// Faults active from the start.
    pub faults: Vec<FaultSpec>,
    /// CloudStack's `default.page.size`: the most items a list call returns, and the largest `pagesize`.
    pub page_size: u64,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("listen", &self.listen)
            .field("state_dir", &self.state_dir)
            .field("by_id_dir", &self.by_id_dir)
            .field("api_key", &self.api_key)
            .field("secret_key", &"<redacted>")
            .field("appliance_vm_id", &self.appliance_vm_id)
            .field("job_delay", &self.job_delay)
            .field("seed", &self.seed)
            .field("use_loop_devices", &self.use_loop_devices)
            .field("faults", &self.faults)
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl SimConfig {
    /// Defaults: listen on 127.0.0.1:8080, API key `sim-api-key`, secret `sim-secret-key`, jobs take
    /// 200 ms, seed 0, loop devices when running as root, no faults, pages of at most 500.
    pub fn new(state_dir: impl Into<PathBuf>, by_id_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("invariant: the default listen address parses"),
            state_dir: state_dir.into(),
            by_id_dir: by_id_dir.into(),
            api_key: DEFAULT_API_KEY.to_owned(),
            secret_key: DEFAULT_SECRET_KEY.to_owned(),
            appliance_vm_id: None,
            job_delay: DEFAULT_JOB_DELAY,
            seed: 0,
            use_loop_devices: rustix::process::geteuid().is_root(),
            faults: Vec::new(),
            page_size: DEFAULT_PAGE_SIZE,
        }
    }
}

/// Entry point.
#[derive(Debug)]
pub struct Simulator;

impl Simulator {
    /// Loads or creates the state, re-exposes the appliance's attachments, binds the listener and
    /// starts serving. Pending jobs from an earlier run resume.
    pub async fn start(cfg: SimConfig) -> Result<RunningSimulator, SimError> {
        let state_dir = cfg.state_dir.clone();
        std::fs::create_dir_all(&state_dir)
            .map_err(SimError::io("create directory", &state_dir))?;
        let devices = devices::Devices::new(&cfg.state_dir, &cfg.by_id_dir, cfg.use_loop_devices);
        devices.prepare()?;
        let faults = FaultHandle::new(cfg.seed, cfg.faults.clone());
        let engine = engine::Engine::open(
            &state_dir,
            || model::State::new(cfg.seed, cfg.appliance_vm_id.clone()),
            faults.clone(),
            devices,
            cfg.job_delay,
            cfg.page_size.max(1),
        )?;
        if let Some(requested) = &cfg.appliance_vm_id {
            let stored = engine.lock().st.appliance_vm_id.clone();
            if *requested != stored {
                return Err(SimError::ApplianceMismatch {
                    state_dir,
                    stored,
                    requested: requested.clone(),
                });
            }
        }
        let engine = Arc::new(engine);
        let weak: std::sync::Weak<dyn faults::Actions> = Arc::downgrade(&engine) as _;
        faults.bind(weak);
        engine.recover()?;

        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| SimError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let app = http::router(http::AppState {
            engine: Arc::clone(&engine),
            creds: Arc::new(http::Credentials {
                api_key: cfg.api_key.clone(),
                secret_key: cfg.secret_key.clone(),
            }),
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let shutdown = async {
                let _ = stop_rx.await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "simulator server stopped");
            }
        });
        let (appliance, others, zone) = {
            let g = engine.lock();
            let st = &g.st;
            let others = st
                .vms
                .iter()
                .filter(|v| v.id != st.appliance_vm_id)
                .filter(|v| v.hypervisor == model::Hypervisor::Kvm)
                .map(|v| v.id.clone())
                .collect();
            (st.appliance_vm_id.clone(), others, st.zone.id.clone())
        };
        tracing::info!(%addr, appliance_vm_id = %appliance, "CloudStack simulator listening");
        Ok(RunningSimulator {
            addr,
            engine,
            stop: Some(stop_tx),
            server,
            appliance,
            others,
            zone,
        })
    }
}

/// A serving simulator.
#[derive(Debug)]
pub struct RunningSimulator {
    addr: SocketAddr,
    engine: Arc<engine::Engine>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    appliance: String,
    others: Vec<String>,
    zone: String,
}

impl RunningSimulator {
    /// `http://ADDR/client/api` with the real bound address.
    pub fn api_url(&self) -> String {
        format!("http://{}/client/api", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The appliance VM's id.
    pub fn appliance_vm_id(&self) -> &str {
        &self.appliance
    }

    /// The ids of the two other KVM VMs (running at start).
    pub fn other_vm_ids(&self) -> &[String] {
        &self.others
    }

    /// `(id, name, state, hypervisor)` of every VM, the appliance first.
    pub fn vms(&self) -> Vec<(String, String, String, String)> {
        let g = self.engine.lock();
        g.st.vms
            .iter()
            .map(|v| {
                (
                    v.id.clone(),
                    v.name.clone(),
                    v.state.as_str().to_owned(),
                    v.hypervisor.as_str().to_owned(),
                )
            })
            .collect()
    }

    /// The id of the volume attached to `vm_id` at device 0, if any.
    pub fn root_volume_id(&self, vm_id: &str) -> Option<String> {
        let g = self.engine.lock();
        let root = g.st.attached_to(vm_id).find(|v| v.is_root());
        root.map(|v| v.id.clone())
    }

    /// The zone's id.
    pub fn zone_id(&self) -> &str {
        &self.zone
    }

    /// `(id, name, size in GB or None for the custom-size offering)` of each disk offering.
    pub fn disk_offerings(&self) -> Vec<(String, String, Option<u64>)> {
        let g = self.engine.lock();
        g.st.offerings
            .iter()
            .map(|o| (o.id.clone(), o.name.clone(), o.size_gb))
            .collect()
    }

    /// The live fault set, and the actions behind the client's back (`stop_vm`, `detach_volume`, …).
    pub fn faults(&self) -> FaultHandle {
        self.engine.faults.clone()
    }

    /// Stops serving and stops running jobs (pending jobs stay pending in the saved state). Loop devices
    /// and links stay as the state says, so a restart on the same directories finds them.
    pub async fn shutdown(mut self) {
        self.engine.stop();
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Err(e) = (&mut self.server).await {
            tracing::error!(error = %e, "simulator server task failed");
        }
    }

    /// Removes every loop device and by-id link this simulator made (for test cleanup); the saved state
    /// is left as it is.
    pub fn detach_all_devices(&self) {
        self.engine.detach_all_devices();
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            self.engine.stop();
            let _ = tx.send(());
        }
    }
}
