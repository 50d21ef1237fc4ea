//! Runs one parsed command against the daemon: calls the API, waits for operations, prints tables or JSON.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::CommandFactory;
use serde::Serialize;
use uuid::Uuid;
use volume_api::{
    AttachVolumeRequest, ComponentStatus, CreateVolumeRequest, Health, HealthStatus, Operation,
    OperationStatus, SetApplianceRequest, TestFailoverCleanupRequest, VolumeStatus,
};

use crate::cli::{
    ApplianceCommand, Cli, CloudCommand, Command, ExportsCommand, OpsCommand, SnapshotsCommand,
    VolumesCommand, WaitArgs,
};
use crate::client::{Answer, Client, ClientErrorKind, OpsFilter};
use crate::error::CliError;
use crate::progress::{Mode, Progress};
use crate::render::{self, VmNames};

/// How often the spinner moves.
const SPINNER_TICK: Duration = Duration::from_millis(120);
/// How long past `--timeout` an answer still outstanding is awaited before the wait ends: a daemon that
/// accepts and never answers must not stretch the wait by a whole request's time limit.
const TIMEOUT_GRACE: Duration = Duration::from_secs(1);

/// Output settings of one invocation.
struct Out {
    json: bool,
    quiet: bool,
}

impl Out {
    /// Prints text for people: control characters from the daemon's answer are shown escaped
    /// ([`render::printable`]), line breaks kept.
    fn text(&self, s: &str) -> Result<(), CliError> {
        self.write(&render::printable(s, true))
    }

    /// Prints `s` as it is, ending it with a line break.
    fn write(&self, s: &str) -> Result<(), CliError> {
        let mut o = std::io::stdout().lock();
        let written = o
            .write_all(s.as_bytes())
            .and_then(|()| {
                if s.ends_with('\n') {
                    Ok(())
                } else {
                    o.write_all(b"\n")
                }
            })
            .and_then(|()| o.flush());
        quiet_on_closed_pipe(written)
    }

    fn json<T: Serialize>(&self, v: &T) -> Result<(), CliError> {
        // serde_json writes every control character in a string as an escape (`\u001b`).
        let s = serde_json::to_string_pretty(v).expect("invariant: JSON values always serialize");
        self.write(&s)
    }

    /// Prints a list: ids alone with `-q`, else as [`Out::show`] does.
    fn list<T>(
        &self,
        a: &Answer<Vec<T>>,
        id: impl Fn(&T) -> String,
        human: impl FnOnce(&[T]) -> String,
    ) -> Result<(), CliError> {
        if self.quiet {
            self.ids(a.value.iter().map(id))
        } else {
            self.show(a, |v| human(v))
        }
    }

    /// Prints ids one per line (`-q` for a list); nothing for none.
    fn ids(&self, ids: impl Iterator<Item = String>) -> Result<(), CliError> {
        let ids: Vec<String> = ids.collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.text(&ids.join("\n"))
    }

    /// Prints the raw answer with `--json`, nothing with `-q`, else the rendered text.
    fn show<T>(&self, a: &Answer<T>, human: impl FnOnce(&T) -> String) -> Result<(), CliError> {
        if self.quiet {
            Ok(())
        } else if self.json {
            self.json(&a.raw)
        } else {
            self.text(&human(&a.value))
        }
    }
}

/// A reader that went away (`volumectl … | head`) is not a failure of the command.
fn quiet_on_closed_pipe(r: std::io::Result<()>) -> Result<(), CliError> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(CliError::Output),
    }
}

/// Runs `cli`; `Ok` means the command did what was asked.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let out = Out {
        json: cli.json,
        quiet: cli.quiet,
    };
    render::set_width((!cli.wide).then(render::terminal_width));
    if let Command::Completions { shell } = cli.command {
        let mut cmd = Cli::command();
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, "volumectl", &mut buf);
        let mut o = std::io::stdout().lock();
        return quiet_on_closed_pipe(o.write_all(&buf).and_then(|()| o.flush()));
    }
    let client = Client::new(&cli.url, cli.token.as_deref())?.with_page_size(cli.page_size);
    match cli.command {
        Command::Volumes(c) => volumes(&client, &out, c).await,
        Command::Ops(c) => ops(&client, &out, c).await,
        Command::Exports(c) => exports(&client, &out, c).await,
        Command::Appliance(c) => appliance(&client, &out, c).await,
        Command::Cloud(c) => cloud(&client, &out, c).await,
        Command::Snapshots(c) => snapshots(&client, &out, c).await,
        Command::Health => {
            let h = client.health().await?;
            out.show(&h, render::health_report)?;
            health_verdict(&h.value)
        }
        Command::Reconcile { apply } => {
            let r = client.reconcile(apply).await?;
            out.show(&r, render::reconcile_report)
        }
        Command::Adopt { volume_id, wait } => {
            let op = client
                .adopt_volume(volume_id, wait.idempotency_key.as_deref())
                .await?;
            finish_mutation(&client, &out, op, &wait).await
        }
        Command::CleanupTestFailover {
            volume_id,
            test_vm_id,
            delete_vm,
            force_clean,
            wait,
        } => {
            let oma_vm_id = client
                .appliance()
                .await?
                .value
                .vm_id
                .ok_or(CliError::NoAppliance)?;
            let req = TestFailoverCleanupRequest {
                test_vm_id,
                volume_id,
                oma_vm_id,
                delete_vm,
                force_clean,
            };
            let op = client
                .cleanup_test_failover(&req, wait.idempotency_key.as_deref())
                .await?;
            finish_mutation(&client, &out, op, &wait).await
        }
        Command::Completions { .. } => Ok(()),
    }
}

/// `health` succeeds only when the daemon is healthy and every component is `ok`: a `degraded` component
/// (drift found, the hub behind) needs attention although the daemon still answers 200.
fn health_verdict(h: &Health) -> Result<(), CliError> {
    if h.status != HealthStatus::Healthy {
        return Err(CliError::Unhealthy {
            status: h.status.to_string(),
        });
    }
    let not_ok: Vec<&str> = h
        .components
        .iter()
        .filter(|(_, c)| c.status != ComponentStatus::Ok)
        .map(|(name, _)| name.as_str())
        .collect();
    if not_ok.is_empty() {
        Ok(())
    } else {
        Err(CliError::Unhealthy {
            status: format!("degraded ({})", not_ok.join(", ")),
        })
    }
}

async fn volumes(client: &Client, out: &Out, c: VolumesCommand) -> Result<(), CliError> {
    match c {
        VolumesCommand::Create {
            name,
            size,
            disk_offering_id,
            zone_id,
            metadata,
            wait,
        } => {
            // Names are resolved when the cloud can be asked; otherwise the daemon judges the text given. A
            // daemon that cannot be reached (or does not answer) ends the command at once, not after each lookup.
            let zone_id = match client.cloud_zones().await {
                Ok(z) => by_id_or_name(&zone_id, z.value.iter().map(|z| (&z.id, &z.name))),
                Err(e) if e.kind() == ClientErrorKind::Unreachable => return Err(e.into()),
                Err(_) => zone_id,
            };
            let disk_offering_id = match client.cloud_offerings().await {
                Ok(o) => by_id_or_name(&disk_offering_id, o.value.iter().map(|o| (&o.id, &o.name))),
                Err(e) if e.kind() == ClientErrorKind::Unreachable => return Err(e.into()),
                Err(_) => disk_offering_id,
            };
            let req = CreateVolumeRequest {
                name,
                size,
                disk_offering_id,
                zone_id,
                metadata: (!metadata.is_empty()).then(|| metadata.into_iter().collect()),
            };
            let op = client
                .create_volume(&req, wait.idempotency_key.as_deref())
                .await?;
            finish_mutation(client, out, op, &wait).await
        }
        VolumesCommand::Attach {
            volume_id,
            vm_id,
            appliance,
            root,
            nbd_clients,
            wait,
        } => {
            let vm_id = match (vm_id, appliance) {
                (Some(v), _) => v,
                (None, _) => client
                    .appliance()
                    .await?
                    .value
                    .vm_id
                    .ok_or(CliError::NoAppliance)?,
            };
            let req = AttachVolumeRequest {
                vm_id,
                volume_id: None,
                nbd_clients: (!nbd_clients.is_empty()).then_some(nbd_clients),
            };
            let op = client
                .attach_volume(volume_id, &req, root, wait.idempotency_key.as_deref())
                .await?;
            finish_mutation(client, out, op, &wait).await
        }
        VolumesCommand::Detach { volume_id, wait } => {
            let op = client
                .detach_volume(volume_id, wait.idempotency_key.as_deref())
                .await?;
            finish_mutation(client, out, op, &wait).await
        }
        VolumesCommand::Delete { volume_id, wait } => {
            let op = client
                .delete_volume(volume_id, wait.idempotency_key.as_deref())
                .await?;
            finish_mutation(client, out, op, &wait).await
        }
        VolumesCommand::Show { volume_id } => {
            let v = client.volume(volume_id).await?;
            let names = vm_names(client, out).await;
            out.show(&v, |v| render::volume_detail(v, &names))
        }
        VolumesCommand::List { vm, state, name } => {
            // The daemon filters by state; the name and VM (which may be a VM's name) are matched here.
            let mut all = client.volumes(state).await?;
            let names = if out.json && vm.is_none() {
                VmNames::new()
            } else {
                cloud_vm_names(client).await
            };
            let vm_ids: Option<Vec<String>> = vm.map(|want| {
                let mut ids = vec![want.clone()];
                ids.extend(
                    names
                        .iter()
                        .filter(|(_, n)| n.eq_ignore_ascii_case(&want))
                        .map(|(id, _)| id.clone()),
                );
                ids
            });
            let name = name.map(|n| n.to_lowercase());
            let keep = |v: &VolumeStatus| {
                vm_ids.as_ref().is_none_or(|ids| {
                    v.attachment
                        .as_ref()
                        .is_some_and(|a| ids.contains(&a.vm_id))
                }) && state.is_none_or(|s| v.state == s)
                    && name
                        .as_ref()
                        .is_none_or(|n| v.name.to_lowercase().contains(n))
            };
            all.value.retain(|v| keep(v));
            if let serde_json::Value::Array(items) = &mut all.raw {
                items.retain(|raw| {
                    serde_json::from_value::<VolumeStatus>(raw.clone())
                        .map(|v| keep(&v))
                        .unwrap_or(false)
                });
            }
            out.list(
                &all,
                |v| v.volume_id.to_string(),
                |v| render::volumes_table(v, &names),
            )
        }
    }
}

/// The id `given` names: itself when it is an id, else the id of the one entry of that name (ignoring case).
/// Anything else is passed on as given, for the daemon to judge.
fn by_id_or_name<'a>(
    given: &str,
    entries: impl Iterator<Item = (&'a String, &'a String)> + Clone,
) -> String {
    if entries.clone().any(|(id, _)| id == given) {
        return given.to_string();
    }
    let mut named = entries.filter(|(_, name)| name.eq_ignore_ascii_case(given));
    match (named.next(), named.next()) {
        (Some((id, _)), None) => id.clone(),
        _ => given.to_string(),
    }
}

/// VM names by id for people's tables; empty for `--json` or when the cloud cannot be asked (ids alone
/// are shown then).
async fn vm_names(client: &Client, out: &Out) -> VmNames {
    if out.json || out.quiet {
        return VmNames::new();
    }
    cloud_vm_names(client).await
}

/// VM names by id as the cloud lists them; empty when it cannot be asked.
async fn cloud_vm_names(client: &Client) -> VmNames {
    match client.cloud_vms().await {
        Ok(vms) => vms.value.into_iter().map(|v| (v.id, v.name)).collect(),
        Err(_) => VmNames::new(),
    }
}

async fn cloud(client: &Client, out: &Out, c: CloudCommand) -> Result<(), CliError> {
    match c {
        CloudCommand::Zones => out.list(
            &client.cloud_zones().await?,
            |z| z.id.clone(),
            render::zones_table,
        ),
        CloudCommand::Offerings => out.list(
            &client.cloud_offerings().await?,
            |o| o.id.clone(),
            render::offerings_table,
        ),
        CloudCommand::Vms => out.list(
            &client.cloud_vms().await?,
            |v| v.id.clone(),
            render::vms_table,
        ),
    }
}

async fn ops(client: &Client, out: &Out, c: OpsCommand) -> Result<(), CliError> {
    match c {
        OpsCommand::Show { id } => out.show(&client.operation(id).await?, render::operation_detail),
        OpsCommand::List {
            op_type,
            status,
            volume_id,
            vm_id,
            limit,
        } => {
            let filter = OpsFilter {
                op_type: op_type.map(|t| t.as_str()),
                status: status.map(|s| s.as_str()),
                volume_id,
                vm_id,
                limit,
            };
            let ops = client.operations(&filter).await?;
            let names = vm_names(client, out).await;
            out.list(
                &ops,
                |o| o.id.to_string(),
                |o| render::operations_table(o, &names),
            )
        }
        OpsCommand::Wait { id, timeout } => {
            let op = client.operation(id).await?;
            let done = wait_for(client, op, timeout, progress_mode(out)).await?;
            report_finished(out, &done, render::operation_detail)
        }
    }
}

async fn exports(client: &Client, out: &Out, c: ExportsCommand) -> Result<(), CliError> {
    match c {
        ExportsCommand::List => {
            let list = client.exports().await?;
            if out.quiet {
                // An export is named by its volume's id, as `exports show` takes it.
                out.ids(list.value.exports.iter().map(|e| e.volume_id.to_string()))
            } else {
                out.show(&list, render::exports_table)
            }
        }
        ExportsCommand::Show { volume_id } => {
            out.show(&client.export(volume_id).await?, render::export_detail)
        }
    }
}

async fn snapshots(client: &Client, out: &Out, c: SnapshotsCommand) -> Result<(), CliError> {
    match c {
        SnapshotsCommand::List { volume_id } => out.list(
            &client.snapshots(volume_id).await?,
            |s| s.id.clone(),
            render::snapshots_table,
        ),
        SnapshotsCommand::Create {
            volume_id,
            name,
            vm_context,
            wait,
        } => {
            let req = volume_api::CreateSnapshotRequest {
                name,
                vm_context_id: vm_context,
            };
            let op = client
                .create_snapshot(volume_id, &req, wait.idempotency_key.as_deref())
                .await?;
            finish_mutation(client, out, op, &wait).await
        }
        SnapshotsCommand::Revert {
            volume_id,
            snapshot_id,
            wait,
        } => {
            let op = client
                .revert_snapshot(volume_id, &snapshot_id, wait.idempotency_key.as_deref())
                .await?;
            finish_mutation(client, out, op, &wait).await
        }
        SnapshotsCommand::Delete {
            volume_id,
            snapshot_id,
            wait,
        } => {
            let op = client
                .delete_snapshot(volume_id, &snapshot_id, wait.idempotency_key.as_deref())
                .await?;
            finish_mutation(client, out, op, &wait).await
        }
    }
}

async fn appliance(client: &Client, out: &Out, c: ApplianceCommand) -> Result<(), CliError> {
    match c {
        ApplianceCommand::Show => out.show(&client.appliance().await?, render::appliance_detail),
        ApplianceCommand::Set { vm_id } => out.show(
            &client.set_appliance(&SetApplianceRequest { vm_id }).await?,
            render::appliance_detail,
        ),
    }
}

/// Progress on a terminal; plain lines for people reading a log; nothing for scripts reading JSON.
fn progress_mode(out: &Out) -> Mode {
    if std::io::stderr().is_terminal() {
        Mode::Spinner
    } else if out.json {
        Mode::Silent
    } else {
        Mode::Lines
    }
}

/// After a mutation was accepted: print its id (`--no-wait`) or wait for it and print how it ended.
async fn finish_mutation(
    client: &Client,
    out: &Out,
    op: Answer<Operation>,
    wait: &WaitArgs,
) -> Result<(), CliError> {
    if wait.no_wait {
        return if out.json {
            out.json(&op.raw)
        } else {
            out.text(&op.value.id.to_string())
        };
    }
    let done = wait_for(client, op, wait.timeout, progress_mode(out)).await?;
    let host = client.host();
    if out.quiet && done.value.status == OperationStatus::Completed {
        if let Some(id) = render::operation_subject(&done.value, &host) {
            out.text(&id)?;
        }
        return Ok(());
    }
    report_finished(out, &done, |o| render::operation_outcome(o, &host))
}

/// Prints a finished operation; a failed or cancelled one is an error (exit 1) printed once, on standard
/// error (with `--json` the operation is also printed on standard output, for scripts).
fn report_finished(
    out: &Out,
    done: &Answer<Operation>,
    human: impl FnOnce(&Operation) -> String,
) -> Result<(), CliError> {
    match done.value.status {
        OperationStatus::Completed => out.show(done, human),
        _ => {
            if out.json {
                out.json(&done.raw)?;
            }
            Err(CliError::OperationFailed(Box::new(done.value.clone())))
        }
    }
}

/// Long-polls the operation until it ends or `timeout` passes (`0` = no limit), showing progress.
async fn wait_for(
    client: &Client,
    first: Answer<Operation>,
    timeout: Duration,
    mode: Mode,
) -> Result<Answer<Operation>, CliError> {
    let started = Instant::now();
    let deadline = (!timeout.is_zero()).then(|| started + timeout + TIMEOUT_GRACE);
    let id: Uuid = first.value.id;
    let mut progress = Progress::new(mode);
    let mut cur = first;
    // Ctrl-C ends the wait, not the operation: the daemon goes on with it. Registered before the first
    // progress line, so a Ctrl-C after it is always caught.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(CliError::Signal)?;
    loop {
        progress.update(&cur.value);
        if cur.value.status.is_terminal() {
            progress.finish();
            return Ok(cur);
        }
        let remaining = if timeout.is_zero() {
            Duration::MAX
        } else {
            timeout.saturating_sub(started.elapsed())
        };
        if remaining.is_zero() {
            progress.finish();
            return Err(CliError::WaitTimedOut {
                id,
                status: cur.value.status.as_str(),
                waited: shown_duration(started.elapsed()),
            });
        }
        // Short polls keep the spinner's text current; long polls keep log lines few.
        let slice = if progress.mode() == Mode::Spinner {
            Duration::from_secs(1)
        } else {
            crate::client::MAX_SERVER_WAIT
        }
        .min(remaining);
        let fut = client.wait_operation(id, slice);
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(SPINNER_TICK);
        cur = loop {
            tokio::select! {
                r = &mut fut => break r.map_err(|source| CliError::WaitFailed { id, source })?,
                _ = tick.tick() => progress.tick(),
                _ = interrupt.recv() => {
                    progress.finish();
                    return Err(CliError::Interrupted { id });
                }
                () = until(deadline) => {
                    progress.finish();
                    return Err(CliError::WaitTimedOut {
                        id,
                        status: cur.value.status.as_str(),
                        waited: shown_duration(started.elapsed()),
                    });
                }
            }
        };
    }
}

/// Sleeps until `deadline`; never ends without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// A waited time as the timeout message shows it: whole seconds, or milliseconds below a second (`500ms`, not
/// `0ns`).
fn shown_duration(d: Duration) -> Duration {
    if d < Duration::from_secs(1) {
        Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    } else {
        Duration::from_secs(d.as_secs())
    }
}
