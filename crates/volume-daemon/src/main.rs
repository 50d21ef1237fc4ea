//! The `volume-daemon` binary: `serve` (optionally with the built-in simulator) and `check`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use volume_daemon::config::{Config, Secret};
use volume_daemon::daemon::{self, RunningDaemon};

/// Owns the appliance's CloudStack volumes: creates, attaches, finds, names, serves over NBD, detaches and
/// deletes them, journaling every step.
#[derive(Debug, Parser)]
#[command(name = "volume-daemon", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM, SIGINT or SIGHUP (each shuts it down cleanly).
    Serve(ServeArgs),
    /// Check configuration, state directory, privileges, database, listeners, cloud and appliance identity
    /// without side effects; takes the same flags as `serve`; exits non-zero when any check fails.
    Check(ServeArgs),
    /// Adopt what a predecessor left (upgrade in place): the appliance's CloudStack attachments the daemon
    /// does not manage and the hub's device_mappings rows. Run with the daemon stopped; the adoptions run
    /// (each device verified, then named and exported) when it starts. --dry-run only lists them.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
struct ImportArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// List what would be adopted and change nothing (works while the daemon runs).
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct CommonArgs {
    /// TOML configuration file (every key also from VOLUME_DAEMON_<KEY>).
    #[arg(long, env = "VOLUME_DAEMON_CONFIG")]
    config: Option<PathBuf>,
    /// Database URL: sqlite://PATH?mode=rwc, postgres://…, mysql://… (default: SQLite under the state dir).
    #[arg(long)]
    database: Option<String>,
    /// Directory of the daemon's own files.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// CloudStack API endpoint (…/client/api).
    #[arg(long)]
    cloudstack_url: Option<String>,
    #[arg(long)]
    cloudstack_api_key: Option<String>,
    #[arg(long)]
    cloudstack_secret_key: Option<String>,
    /// The appliance VM's CloudStack id (detected when absent).
    #[arg(long)]
    appliance_vm_id: Option<String>,
    /// Directory of `virtio-<serial>` links.
    #[arg(long)]
    by_id_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// REST API address (default 127.0.0.1:8090).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// NBD address (default 127.0.0.1:10809).
    #[arg(long)]
    nbd_listen: Option<SocketAddr>,
    /// Run the built-in CloudStack simulator in-process and use it as the cloud.
    #[arg(long)]
    sim: bool,
    /// Simulator API address (default 127.0.0.1:8080).
    #[arg(long, requires = "sim")]
    sim_listen: Option<SocketAddr>,
    /// Simulator API key (default sim-api-key).
    #[arg(long, requires = "sim")]
    sim_api_key: Option<String>,
    /// Simulator secret key (default sim-secret-key).
    #[arg(long, requires = "sim")]
    sim_secret_key: Option<String>,
    /// Duration of the simulator's asynchronous jobs in milliseconds (default 200).
    #[arg(long, requires = "sim")]
    sim_job_delay_ms: Option<u64>,
}

fn load(common: &CommonArgs) -> anyhow::Result<Config> {
    let mut cfg = Config::load(common.config.as_deref(), std::env::vars())?;
    if let Some(v) = &common.database {
        cfg.database_url = Some(v.clone());
    }
    if let Some(v) = &common.state_dir {
        cfg.state_dir = v.clone();
    }
    if let Some(v) = &common.cloudstack_url {
        cfg.cloudstack_url = Some(v.clone());
    }
    if let Some(v) = &common.cloudstack_api_key {
        cfg.cloudstack_api_key = Some(Secret::new(v.clone()));
    }
    if let Some(v) = &common.cloudstack_secret_key {
        cfg.cloudstack_secret_key = Some(Secret::new(v.clone()));
    }
    if let Some(v) = &common.appliance_vm_id {
        cfg.appliance_vm_id = Some(v.clone());
    }
    if let Some(v) = &common.by_id_dir {
        cfg.by_id_dir = v.clone();
    }
    Ok(cfg)
}

fn init_logging(format: &str) {
    let wanted = std::env::var("RUST_LOG").ok();
    let filter = tracing_subscriber::EnvFilter::new(nbd::log_filter(wanted.as_deref(), "info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(nbd::log_colour())
        .with_writer(|| nbd::LossyStderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The configuration `serve` (and `check`) run with: file and environment, then the flags.
fn serve_config(args: ServeArgs) -> anyhow::Result<Config> {
    let mut cfg = load(&args.common)?;
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.nbd_listen {
        cfg.nbd_listen = v;
    }
    if args.sim {
        cfg.sim.enabled = true;
        if args.common.state_dir.is_none()
            && args.common.config.is_none()
            && std::env::var_os("VOLUME_DAEMON_STATE_DIR").is_none()
        {
            // A fresh machine without a configuration: keep state in a user-writable place.
            cfg.state_dir = default_sim_state_dir();
        }
    }
    if let Some(v) = args.sim_listen {
        cfg.sim.listen = v;
    }
    if let Some(v) = args.sim_api_key {
        cfg.sim.api_key = Secret::new(v);
    }
    if let Some(v) = args.sim_secret_key {
        cfg.sim.secret_key = Secret::new(v);
    }
    if let Some(v) = args.sim_job_delay_ms {
        cfg.sim.job_delay_ms = v;
    }
    Ok(cfg)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = serve_config(args)?;
    init_logging(&cfg.log_format);
    // Only the crash test's build has fail points; `FAILPOINTS` arms them.
    #[cfg(feature = "failpoints")]
    volume_daemon::failpoints::arm_from_env().map_err(anyhow::Error::msg)?;
    tracing::info!(state_dir = %cfg.state_dir.display(), database = %volume_daemon::store::redact_url(&cfg.effective_database_url()), "starting");
    let mut stop = StopSignals::install()?;
    let daemon = RunningDaemon::start(cfg)
        .await
        .context("volume-daemon could not start")?;
    tokio::select! {
        () = stop.recv() => {}
        () = daemon.lease_lost() => anyhow::bail!(
            "the appliance lease was lost to another volume-daemon (or could not be renewed before it expired): \
             every export is closed and nothing more is written; check which daemon should serve this appliance"
        ),
    }
    tracing::info!("shutting down");
    daemon.shutdown().await;
    Ok(())
}

/// The state directory of `serve --sim` without configuration: `$XDG_STATE_HOME/volume-daemon-sim`, else
/// `~/.local/state/volume-daemon-sim`, else a directory under the system temp dir.
fn default_sim_state_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(x).join("volume-daemon-sim");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/state/volume-daemon-sim");
    }
    std::env::temp_dir().join("volume-daemon-sim")
}

/// The signals that stop the daemon: SIGTERM (systemd's stop), SIGINT (Ctrl-C) and SIGHUP (its terminal
/// closed). Each shuts down cleanly; the daemon has no configuration reload, so SIGHUP is no reload either
/// (restart to apply a changed configuration). Installed before start-up, so that a signal arriving
/// while the daemon starts stops it cleanly once it has started, instead of killing it.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }

    /// Waits for the first of them.
    async fn recv(&mut self) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        };
        tracing::info!(signal = name, "stop requested");
    }
}

async fn check(args: ServeArgs) -> anyhow::Result<bool> {
    let loaded = serve_config(args);
    init_logging("text");
    let lines = match loaded {
        Ok(cfg) => daemon::check(&cfg).await,
        // Nothing else can be checked without the configuration: its line says why it does not load.
        Err(e) => vec![daemon::CheckLine {
            name: "configuration".into(),
            ok: false,
            detail: format!("{e:#}"),
        }],
    };
    let width = lines.iter().map(|l| l.name.len()).max().unwrap_or(0);
    for l in &lines {
        say(format_args!(
            "{} {:width$}  {}",
            if l.ok { "ok  " } else { "FAIL" },
            l.name,
            one_line(&l.detail)
        ));
    }
    Ok(lines.iter().all(|l| l.ok))
}

/// `text` on one line, as a check line's detail: its non-empty lines joined with `: `.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

async fn import(args: ImportArgs) -> anyhow::Result<bool> {
    let cfg = load(&args.common)?;
    init_logging("text");
    let (plan, ops) = volume_daemon::hub::import::run(&cfg, args.dry_run)
        .await
        .context("import failed")?;
    for i in &plan.items {
        say(format_args!(
            "{:<16} {}  vm {}  {}",
            i.action.as_str(),
            i.volume_id,
            i.vm_id.as_deref().unwrap_or("-"),
            i.detail
        ));
    }
    use volume_daemon::hub::import::ImportAction as A;
    let summary = format!(
        "{} to adopt on the appliance, {} attached to other VMs, {} hub rows to rewrite, {} already managed, {} skipped",
        plan.count(A::Adopt),
        plan.count(A::AdoptRemote),
        plan.count(A::RewriteHubRow),
        plan.count(A::AlreadyManaged),
        plan.count(A::Skip)
    );
    if args.dry_run {
        say(format_args!("dry run: {summary}; nothing was changed"));
    } else {
        say(format_args!(
            "{summary}; {} adoptions journaled: they run when the daemon starts (watch GET /api/v1/operations?type=repair)",
            ops.len()
        ));
    }
    Ok(true)
}

/// Prints a line of a report on stdout. A reader that went away (`check | head -1`) ends the report, not
/// the command: the exit status still says whether the checks passed.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => serve(a).await.map(|()| true),
        Command::Check(a) => check(a).await,
        Command::Import(a) => import(a).await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_passwords_are_hidden() {
        assert_eq!(
            volume_daemon::store::redact_url("postgres://vd:s3cret@db:5432/vd"),
            "postgres://vd:***@db:5432/vd"
        );
        assert_eq!(
            volume_daemon::store::redact_url("sqlite:///x.db?mode=rwc"),
            "sqlite:///x.db?mode=rwc"
        );
    }

    #[test]
    fn check_details_are_one_line() {
        assert_eq!(
            one_line("cannot read the file f\n  No such file or directory (os error 2)\n\n"),
            "cannot read the file f: No such file or directory (os error 2)"
        );
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
