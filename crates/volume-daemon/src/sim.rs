//! `serve --sim`: starts the built-in CloudStack simulator in-process and points the configuration at it
//! (its API, credentials, appliance VM, by-id directory), so the daemon runs its real client against it.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;

/// The running simulator and what the daemon takes from it.
pub struct Sim {
    pub running: cloudsim::RunningSimulator,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("api_url", &self.running.api_url())
            .finish_non_exhaustive()
    }
}

/// The simulator failed to start.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot start the built-in CloudStack simulator on {listen}; pick another --sim-listen address"
)]
pub struct SimError {
    listen: std::net::SocketAddr,
    #[source]
    source: Box<cloudsim::SimError>,
}

/// Whether this process may create loop devices (the simulator backs appliance attachments with them).
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The simulator's by-id directory under the state dir (udev does not run here; the simulator makes the links).
pub fn by_id_dir(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("sim").join("by-id")
}

/// Starts the simulator and rewrites `cfg` to use it.
pub async fn start(cfg: &mut Config) -> Result<Sim, SimError> {
    let by_id = by_id_dir(cfg);
    let mut sc = cloudsim::SimConfig::new(cfg.state_dir.join("sim"), by_id.clone());
    sc.listen = cfg.sim.listen;
    sc.api_key = cfg.sim.api_key.expose().to_string();
    sc.secret_key = cfg.sim.secret_key.expose().to_string();
    sc.job_delay = Duration::from_millis(cfg.sim.job_delay_ms);
    sc.use_loop_devices = running_as_root();
    let running = cloudsim::Simulator::start(sc)
        .await
        .map_err(|source| SimError {
            listen: cfg.sim.listen,
            source: Box::new(source),
        })?;
    cfg.cloudstack_url = Some(running.api_url());
    cfg.cloudstack_api_key = Some(cfg.sim.api_key.clone());
    cfg.cloudstack_secret_key = Some(cfg.sim.secret_key.clone());
    cfg.by_id_dir = by_id;
    // Without root the simulator backs attachments with plain files; only then are they accepted.
    cfg.allow_regular_files = !running_as_root();
    Ok(Sim { running })
}
