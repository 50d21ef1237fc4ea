//! The command-line grammar of `volumectl` (clap derive); shell completions are generated from it.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use uuid::Uuid;
use volume_api::{OperationStatus, OperationType, VolumeState};

use crate::render::parse_size;

/// Text appended to `volumectl --help`: the environment and the exit codes scripts can rely on.
pub const AFTER_LONG_HELP: &str = "\
Environment:
  VOLUMECTL_URL     daemon address (same as --url)
  VOLUMECTL_TOKEN   bearer token, the daemon's api_token (same as --token)

Output:
  Tables for people; --json prints the daemon's JSON answer (its fields and values as sent, pretty-printed,
  keys sorted), one document per command;
  -q prints only ids (for shell variables). Control characters in text from the daemon or the cloud are
  shown escaped (\\u{1b}) everywhere but in --json.
  Mutations (create, attach, detach, delete, adopt, snapshots create/revert/delete) wait for their operation and print it when it ends;
  with --no-wait they print only the operation id (the whole operation with --json).

Exit codes:
  0  success
  1  the operation failed or was cancelled; `health` found the daemon degraded or unhealthy
  2  usage error, or the daemon rejected the request as invalid (HTTP 400)
  3  not found: no such volume, operation or export (HTTP 404)
  4  refused: conflict with another operation or state, unknown VM, bad token (HTTP 401, 403, 409, 422)
  5  the daemon is unreachable (connection refused, timed out, DNS failure)
  6  the daemon failed (HTTP 5xx other than 503) or answered something volumectl cannot read
  7  the daemon is up but cannot serve the request now (HTTP 503: cloud or database down, identity unknown)
  8  gave up waiting: the operation is still running (see `volumectl ops wait ID`)
  130  interrupted (Ctrl-C) while waiting: the operation goes on in the daemon (see `volumectl ops wait ID`)

Tables fit the terminal's width (else $COLUMNS, else 100 columns), truncating long cells with '~';
--wide prints every cell in full.";

/// Command-line client of volume-daemon: volumes, operations, NBD exports, appliance identity, health.
#[derive(Debug, Parser)]
#[command(name = "volumectl", version, after_long_help = AFTER_LONG_HELP)]
pub struct Cli {
    /// Base URL of the daemon.
    #[arg(
        long,
        global = true,
        env = "VOLUMECTL_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    pub url: String,
    /// Bearer token (the daemon's api_token).
    #[arg(long, global = true, env = "VOLUMECTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only ids, for shell variables: one per line for lists, the new volume's id for
    /// `volumes create`, the NBD URL for `volumes attach --appliance`, nothing for other commands.
    #[arg(long, short = 'q', global = true, conflicts_with = "json")]
    pub quiet: bool,
    /// Print tables with every cell in full, however wide.
    #[arg(long, global = true)]
    pub wide: bool,
    /// Items per request when reading a whole listing (volumes, operations, exports are read page by page).
    #[arg(
        long,
        global = true,
        env = "VOLUMECTL_PAGE_SIZE",
        default_value_t = crate::client::PAGE,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    pub page_size: u32,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, attach, detach, delete and inspect volumes.
    #[command(subcommand)]
    Volumes(VolumesCommand),
    /// Inspect and wait for journaled operations.
    #[command(subcommand)]
    Ops(OpsCommand),
    /// NBD exports of volumes attached to the appliance, with connections and bytes written.
    #[command(subcommand)]
    Exports(ExportsCommand),
    /// The appliance VM identity the daemon uses.
    #[command(subcommand)]
    Appliance(ApplianceCommand),
    /// What the cloud offers: zones, disk offerings and VMs, with names and ids.
    #[command(subcommand)]
    Cloud(CloudCommand),
    /// CloudStack snapshots of a volume: list, take, revert a detached volume to one, delete.
    #[command(subcommand)]
    Snapshots(SnapshotsCommand),
    /// The daemon's health, per component; exits 1 unless healthy with every component ok.
    Health,
    /// Compare the database with the cloud, the devices and the exports; repair with --apply.
    Reconcile {
        /// Repair the drift found (default: only report it).
        #[arg(long)]
        apply: bool,
    },
    /// Take over a volume CloudStack has attached to the appliance but the daemon does not manage (e.g. one
    /// attached before an upgrade): its device is verified like any attach, then named and served. CloudStack
    /// is not asked to change anything.
    Adopt {
        volume_id: Uuid,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// After a test failover: detach a volume from its test VM (stopped first unless --force-clean), destroy the
    /// test VM with --delete-vm, and attach, name and export the volume on the appliance again, as one
    /// journaled operation.
    CleanupTestFailover {
        volume_id: Uuid,
        /// The test VM the volume is attached to.
        #[arg(long)]
        test_vm_id: String,
        /// Destroy (and expunge) the test VM once the volume is detached from it.
        #[arg(long)]
        delete_vm: bool,
        /// Detach without stopping the test VM first.
        #[arg(long)]
        force_clean: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Print a shell completion script, e.g. `volumectl completions bash > /etc/bash_completion.d/volumectl`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// How a mutation waits for its operation.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Print the operation id and return at once instead of waiting.
    #[arg(long)]
    pub no_wait: bool,
    /// Longest time to wait for the operation, e.g. 90s, 10m, 1h (0 waits forever).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Idempotency key: repeating a request with the same key returns the first operation.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum VolumesCommand {
    /// Create a volume in the cloud.
    Create {
        /// Volume name.
        #[arg(long)]
        name: String,
        /// Size: bytes, or with a unit (10G, 512MiB, 1T); rounded up to whole GiB by the daemon. Required for a
        /// custom-size offering; a fixed-size offering has its own size.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// CloudStack disk offering: its id or its name (`volumectl cloud offerings`).
        #[arg(long)]
        disk_offering_id: String,
        /// CloudStack zone: its id or its name (`volumectl cloud zones`).
        #[arg(long)]
        zone_id: String,
        /// Metadata entry KEY=VALUE (VALUE is read as JSON when it parses, else as a string); repeatable.
        #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        metadata: Vec<(String, serde_json::Value)>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Attach a volume to a VM: the appliance (exported over NBD) or another VM.
    Attach {
        volume_id: Uuid,
        /// Target VM id.
        #[arg(
            long,
            required_unless_present = "appliance",
            conflicts_with = "appliance"
        )]
        vm_id: Option<String>,
        /// Attach to the appliance VM the daemon runs on.
        #[arg(long)]
        appliance: bool,
        /// Attach as the VM's root disk (CloudStack device id 0).
        #[arg(long)]
        root: bool,
        /// Appliance only: a client identity (name in a verified NBD client certificate) that may open the
        /// export; repeat for several. Without it the daemon's nbd_default_clients apply.
        #[arg(long = "nbd-client", value_name = "NAME")]
        nbd_clients: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Detach a volume from its VM (closing its NBD export first when on the appliance).
    Detach {
        volume_id: Uuid,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Delete a volume (detaching it first when attached).
    Delete {
        volume_id: Uuid,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// A volume's real status: cloud state, attachment, device, export.
    Show { volume_id: Uuid },
    /// The volumes the daemon knows, optionally filtered.
    List {
        /// Only volumes attached to this VM (id or name).
        #[arg(long)]
        vm: Option<String>,
        /// Only volumes in this state: attached, detached or deleted.
        #[arg(long, value_parser = parse_volume_state)]
        state: Option<VolumeState>,
        /// Only volumes whose name contains this text (case-insensitive).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotsCommand {
    /// The cloud's snapshots of a volume; the one the volume record tracks is marked.
    List { volume_id: Uuid },
    /// Take a snapshot of a volume (journaled; the volume record tracks it).
    Create {
        volume_id: Uuid,
        /// The snapshot's name in CloudStack (CloudStack names it otherwise).
        #[arg(long)]
        name: Option<String>,
        /// The migration context the snapshot belongs to (`vm_context_id`).
        #[arg(long)]
        vm_context: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Revert a detached volume to one of its snapshots (an attached volume is refused: detach it first).
    Revert {
        volume_id: Uuid,
        snapshot_id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Delete one of a volume's snapshots.
    Delete {
        volume_id: Uuid,
        snapshot_id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum CloudCommand {
    /// The cloud's zones.
    Zones,
    /// The cloud's disk offerings: fixed size, or custom (create with --size).
    Offerings,
    /// The cloud's VMs, the appliance marked.
    Vms,
}

#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// One operation.
    Show { id: Uuid },
    /// Operations, newest first, optionally filtered.
    List {
        /// create, attach, detach, delete, repair, snapshot_create, snapshot_revert, snapshot_delete or
        /// test_failover_cleanup.
        #[arg(long = "type", value_parser = parse_op_type)]
        op_type: Option<OperationType>,
        /// pending, executing, completed, failed or cancelled.
        #[arg(long, value_parser = parse_op_status)]
        status: Option<OperationStatus>,
        #[arg(long)]
        volume_id: Option<Uuid>,
        #[arg(long)]
        vm_id: Option<String>,
        /// At most this many (1-1000).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
    },
    /// Wait until an operation ends; exits 1 when it failed.
    Wait {
        id: Uuid,
        /// Longest time to wait, e.g. 90s, 10m (0 waits forever).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn parse_op_type(s: &str) -> Result<OperationType, String> {
    OperationType::parse(s).ok_or_else(|| {
        let all: Vec<&str> = OperationType::ALL.iter().map(|t| t.as_str()).collect();
        format!("expected one of {}", all.join(", "))
    })
}

fn parse_volume_state(s: &str) -> Result<VolumeState, String> {
    VolumeState::parse(&s.to_ascii_lowercase())
        .ok_or_else(|| "expected one of attached, detached, deleted".to_string())
}

fn parse_op_status(s: &str) -> Result<OperationStatus, String> {
    OperationStatus::parse(s).ok_or_else(|| {
        "expected one of pending, executing, completed, failed, cancelled".to_string()
    })
}

#[derive(Debug, Subcommand)]
pub enum ExportsCommand {
    /// All exports with their connections and bytes written.
    List,
    /// The export of one volume.
    Show { volume_id: Uuid },
}

#[derive(Debug, Subcommand)]
pub enum ApplianceCommand {
    /// The appliance identity, where it came from and whether the cloud confirmed it.
    Show,
    /// Set the appliance VM id (refused when the configuration fixes it).
    Set { vm_id: String },
}

/// Parses `90`, `90s`, `10m`, `1h`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 10m or 1h"))?;
    let mult = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?}: use ms, s, m or h"
            ))
        }
    };
    let secs = n * mult;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a usable duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `KEY=VALUE`; VALUE as JSON when it parses, else as a string.
pub fn parse_key_value(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    let value =
        serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
    Ok((k.to_string(), value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn metadata_values_are_json_when_they_parse() {
        assert_eq!(
            parse_key_value("disk=3").unwrap(),
            ("disk".into(), serde_json::json!(3))
        );
        assert_eq!(
            parse_key_value("vm=web-1").unwrap(),
            ("vm".into(), serde_json::json!("web-1"))
        );
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("=x").is_err());
    }

    #[test]
    fn a_volume_state_filter_must_name_a_state() {
        for ok in ["attached", "Detached", "DELETED"] {
            assert!(
                Cli::try_parse_from(["volumectl", "volumes", "list", "--state", ok]).is_ok(),
                "{ok}"
            );
        }
        let e = Cli::try_parse_from(["volumectl", "volumes", "list", "--state", "attched"])
            .expect_err("a misspelt state is a usage error");
        assert!(e.to_string().contains("attached, detached, deleted"), "{e}");
    }

    #[test]
    fn attach_needs_a_target() {
        let id = "60338035-92fb-4d27-98d4-b60ad4b38b87";
        assert!(Cli::try_parse_from(["volumectl", "volumes", "attach", id]).is_err());
        assert!(Cli::try_parse_from(["volumectl", "volumes", "attach", id, "--appliance"]).is_ok());
        assert!(
            Cli::try_parse_from(["volumectl", "volumes", "attach", id, "--vm-id", "v"]).is_ok()
        );
        assert!(Cli::try_parse_from([
            "volumectl",
            "volumes",
            "attach",
            id,
            "--vm-id",
            "v",
            "--appliance"
        ])
        .is_err());
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes:"), "{help}");
        assert!(help.contains("5  the daemon is unreachable"), "{help}");
    }
}
