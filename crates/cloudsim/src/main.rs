//! `cloudsim`: run the CloudStack simulator as its own process. Prints `listening on ADDR` as its first
//! line on stdout, serves until SIGTERM or SIGINT.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use cloudsim::{FaultSpec, SimConfig, Simulator};

/// CloudStack-compatible simulator.
#[derive(Debug, Parser)]
#[command(name = "cloudsim", version)]
struct Args {
    /// Address to serve on (`/client/api`); port 0 picks a free one.
    #[arg(long, default_value = cloudsim::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Directory of the state file and the volumes' backing files.
    #[arg(long)]
    state_dir: PathBuf,
    /// Directory where the `virtio-<serial>` links of appliance attachments are made.
    #[arg(long)]
    by_id_dir: PathBuf,
    /// API key clients must use.
    #[arg(long, default_value = cloudsim::DEFAULT_API_KEY)]
    api_key: String,
    /// Secret key clients sign with.
    #[arg(long, default_value = cloudsim::DEFAULT_SECRET_KEY, hide_default_value = true)]
    secret_key: String,
    /// Id of the appliance VM (generated and saved when absent).
    #[arg(long)]
    appliance_vm_id: Option<String>,
    /// How long each asynchronous job takes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    job_delay_ms: u64,
    /// Seed of generated ids and random fault decisions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A fault active from the start, as JSON (see README); repeatable.
    #[arg(long = "fault", value_parser = parse_fault)]
    faults: Vec<FaultSpec>,
    /// Back appliance attachments with the files themselves even when running as root.
    #[arg(long)]
    no_loop_devices: bool,
    /// CloudStack's `default.page.size`: the most items a list call returns, and the largest `pagesize`.
    #[arg(long, default_value_t = cloudsim::DEFAULT_PAGE_SIZE)]
    page_size: u64,
}

fn parse_fault(s: &str) -> Result<FaultSpec, String> {
    FaultSpec::parse(s).map_err(|e| format!("invalid fault JSON: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "cloudsim=info".into()),
        )
        .with_ansi(nbd::log_colour())
        .with_writer(|| nbd::LossyStderr)
        .init();
    let args = Args::parse();
    let mut cfg = SimConfig::new(args.state_dir, args.by_id_dir);
    cfg.listen = args.listen;
    cfg.api_key = args.api_key;
    cfg.secret_key = args.secret_key;
    cfg.appliance_vm_id = args.appliance_vm_id;
    cfg.job_delay = Duration::from_millis(args.job_delay_ms);
    cfg.seed = args.seed;
    cfg.faults = args.faults;
    cfg.page_size = args.page_size;
    if args.no_loop_devices {
        cfg.use_loop_devices = false;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let sim = Simulator::start(cfg)
        .await
        .context("starting the simulator")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", sim.addr()).context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
    }
    tracing::info!(
        api_url = %sim.api_url(),
        appliance_vm_id = sim.appliance_vm_id(),
        zone_id = sim.zone_id(),
        "ready"
    );
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
    }
    sim.shutdown().await;
    Ok(())
}
