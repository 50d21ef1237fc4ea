//! Start-up and shutdown of the whole daemon: migrations, privilege preflight, the cloud, the appliance identity,
//! the NBD listener, exports and names re-created from the database, the journal resumed, then the API and the
//! readiness notification. Also the `check` report, which runs the same checks without serving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use volume_api::HealthComponent;

use crate::api::{self, AppState, HealthState};
use crate::cloud::{Cloud, CloudStack};
use crate::config::{Config, ConfigError, NbdTls};
use crate::devices::Devices;
use crate::engine::{Engine, EngineConfig, EngineError, Parts};
use crate::exports::Exports;
use crate::identity::{DetectionSources, Identity, IdentitySource};
use crate::metrics::Metrics;
use crate::sim::{self, Sim, SimError};
use crate::statedir::{self, StateDirError, StateDirLock};
use crate::store::{LeaseHolder, Store, StoreError, StoreErrorKind};

/// Start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error(
        "cannot open or migrate the database; check database_url and that the server is reachable"
    )]
    Store(#[source] StoreError),
    #[error("cannot build the CloudStack client; check cloudstack_url and cloudstack_ca_file")]
    CloudClient(#[source] cloudstack::Error),
    #[error("cannot listen on {addr} for {what}; pick another address or stop what uses it")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot take the appliance lease in the database")]
    Lease(#[source] StoreError),
    #[error("start-up recovery failed")]
    Recovery(#[source] EngineError),
    #[error("cannot set up the NBD server; check nbd_tls_certificates and nbd_budget_mib")]
    Nbd(#[source] nbd::NbdError),
    #[error("cannot set up the hub projection")]
    Hub(#[source] crate::hub::HubError),
    #[error("cannot journal the hub's state at start-up")]
    HubResync(#[source] StoreError),
}

/// A running daemon (API, NBD listener, engine and, with `--sim`, the simulator).
pub struct RunningDaemon {
    api_addr: SocketAddr,
    nbd_addr: SocketAddr,
    engine: Engine,
    health: Arc<HealthState>,
    sim: Option<Sim>,
    stop_api: Option<oneshot::Sender<()>>,
    stop_nbd: Option<oneshot::Sender<()>>,
    api_task: JoinHandle<()>,
    nbd_task: JoinHandle<()>,
    /// Saves export byte counters every [`COUNTER_SAVE_INTERVAL`].
    counters_task: JoinHandle<()>,
    watch_task: JoinHandle<()>,
    /// Renews the appliance lease every `lease_heartbeat_secs`.
    lease_task: JoinHandle<()>,
    /// Sends READY=1 once the appliance identity is verified.
    ready_task: JoinHandle<()>,
    /// Stops serving once the lease is lost.
    fence_task: JoinHandle<()>,
    /// Becomes `true` once the lease was lost and the exports are closed.
    fenced: watch::Receiver<bool>,
    /// The store bound to the appliance lease (released at shutdown).
    store: Store,
    /// Delivers the hub outbox (with `hub_database_url`).
    hub_task: Option<JoinHandle<()>>,
    /// Held until the daemon is dropped: one daemon per state directory.
    _state_lock: StateDirLock,
}

impl std::fmt::Debug for RunningDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningDaemon")
            .field("api_addr", &self.api_addr)
            .field("nbd_addr", &self.nbd_addr)
            .finish_non_exhaustive()
    }
}

/// How often the byte counters of live exports are saved (they survive a restart up to this much).
const COUNTER_SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// How long shutdown waits for running operations before leaving them to the next start.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen { what, addr, source })
}

/// The NBD server's limits and TLS policy from the configuration, as the server will take them: the TLS
/// certificates read and parsed, the limits validated. `serve` and `check` both go through here.
fn nbd_server_config(cfg: &Config) -> Result<nbd::ServerConfig, DaemonError> {
    let settings = match (&cfg.nbd_tls, &cfg.nbd_tls_certificates) {
        (NbdTls::Off, _) | (_, None) => None,
        (_, Some(dir)) => Some(std::sync::Arc::new(
            nbd::TlsSettings::from_dir(dir, cfg.nbd_tls_verify_peer).map_err(DaemonError::Nbd)?,
        )),
    };
    let tls = match (cfg.nbd_tls, settings) {
        (NbdTls::On, Some(s)) => nbd::Tls::On(s),
        (NbdTls::Require, Some(s)) => nbd::Tls::Require(s),
        _ => nbd::Tls::Off,
    };
    let config = nbd::ServerConfig {
        in_flight_budget: cfg.nbd_budget_mib << 20,
        idle_timeout: cfg.nbd_idle_timeout(),
        max_connections_per_client: cfg.nbd_max_connections_per_client,
        max_connections: cfg.nbd_max_connections,
        tls,
        ..nbd::ServerConfig::default()
    };
    config.validate().map_err(DaemonError::Nbd)?;
    Ok(config)
}

pub(crate) fn cloud_client(cfg: &Config) -> Result<cloudstack::Client, DaemonError> {
    cloudstack::Client::new(cloudstack::Config {
        url: cfg.cloudstack_url.clone().unwrap_or_default(),
        api_key: cfg
            .cloudstack_api_key
            .as_ref()
            .map(|s| s.expose().to_string())
            .unwrap_or_default(),
        secret_key: cfg.cloudstack_secret_key.clone().unwrap_or_default(),
        ca_file: cfg.cloudstack_ca_file.clone(),
        ..cloudstack::Config::default()
    })
    .map_err(DaemonError::CloudClient)
}

impl RunningDaemon {
    /// Starts everything; returns once the API serves and the journal is recovered.
    pub async fn start(mut cfg: Config) -> Result<Self, DaemonError> {
        // Before anything else (the simulator, the database, any listener): one daemon per state directory.
        let state_lock = StateDirLock::acquire(&cfg.state_dir)?;
        let holder_id = state_lock.instance_id()?;
        let sim = if cfg.sim.enabled {
            let s = sim::start(&mut cfg).await?;
            println!("cloudsim listening on {}", s.running.addr());
            // The simulator's credentials are no secret of anyone's: they are printed for a client to use.
            tracing::info!(
                api = %s.running.api_url(),
                api_key = cfg.sim.api_key.expose(),
                secret_key = cfg.sim.secret_key.expose(),
                appliance = s.running.appliance_vm_id(),
                "built-in CloudStack simulator started"
            );
            Some(s)
        } else {
            None
        };
        cfg.validate()?;
        // The TLS certificates are read before the database is opened and the lease taken: a configuration
        // serve cannot run with stops it before it touches anything (check reads them the same way).
        let mut nbd_config = nbd_server_config(&cfg)?;

        statedir::precreate_sqlite(&cfg.effective_database_url())?;
        let mut store = Store::connect(&cfg.effective_database_url())
            .await
            .map_err(DaemonError::Store)?;
        store.migrate().await.map_err(DaemonError::Store)?;
        // Before the store is shared: with a hub, every commit also journals its hub change.
        let hub = cfg
            .hub_database_url
            .as_deref()
            .map(|url| crate::hub::Hub::new(url, 0))
            .transpose()
            .map_err(DaemonError::Hub)?;
        let hub_wake = hub.as_ref().map(|_| store.enable_hub_outbox());

        let health = Arc::new(HealthState::default());
        let names_dir = cfg.effective_names_dir();
        let _ = std::fs::create_dir_all(&names_dir);
        let _ = std::fs::create_dir_all(&cfg.by_id_dir);
        let pre = blockdev::preflight::run(&cfg.by_id_dir, &names_dir, None);
        let missing: Vec<String> = pre
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| match &c.fix {
                Some(fix) => format!("{}: {} (fix: {fix})", c.name, c.detail),
                None => format!("{}: {}", c.name, c.detail),
            })
            .collect();
        let privileges_ok = missing.is_empty() || (cfg.allow_regular_files && sim.is_some());
        for m in &missing {
            tracing::warn!(check = %m, "privilege preflight");
        }
        health.set_fact(
            HealthComponent::Privileges,
            privileges_ok,
            if missing.is_empty() {
                "block devices, names directory, uevents and by-id watch all usable".to_string()
            } else if privileges_ok {
                format!(
                    "file-backed simulator mode; missing: {}",
                    missing.join("; ")
                )
            } else {
                missing.join("; ")
            },
        );

        let cloud: Arc<dyn Cloud> = Arc::new(CloudStack::new(cloud_client(&cfg)?));
        let configured = match (&sim, &cfg.appliance_vm_id) {
            (_, Some(id)) => Some((id.clone(), IdentitySource::Config)),
            (Some(s), None) => Some((
                s.running.appliance_vm_id().to_string(),
                IdentitySource::Simulator,
            )),
            (None, None) => match &hub {
                Some(h) => crate::hub::appliance_identity(h)
                    .await
                    .map(|id| (id, IdentitySource::Hub)),
                None => None,
            },
        };
        let identity = Identity::establish(
            configured,
            store.clone(),
            Arc::clone(&cloud),
            &DetectionSources::under(&cfg.sys_dir),
        )
        .await;

        // Before any write, recovery or listener: the appliance's lease. From here on every write of the store
        // checks its fencing token.
        let appliance_id = identity.current().await.vm_id.unwrap_or_default();
        let lease_asked = std::time::Instant::now();
        let store = store
            .acquire_lease(
                &appliance_id,
                &LeaseHolder {
                    holder_id,
                    host: rustix::system::uname()
                        .nodename()
                        .to_string_lossy()
                        .into_owned(),
                    pid: std::process::id(),
                },
                cfg.lease_ttl(),
            )
            .await
            .map_err(DaemonError::Lease)?;
        let lease = store
            .lease()
            .ok_or_else(|| DaemonError::Lease(StoreError::not_found("the lease just taken")))?;
        tracing::info!(appliance = %appliance_id, token = lease.token(), "appliance lease taken");
        // NBD writes are run only while the lease is surely held (see `write_window`).
        let fence = Arc::new(nbd::WriteFence::new(
            lease_asked + write_window(cfg.lease_ttl()),
        ));
        nbd_config.write_fence = Some(Arc::clone(&fence));
        health.set_fact(HealthComponent::Lease, true, lease.detail());
        let identity = identity.with_store(store.clone());
        let ready_identity = identity.clone();
        // Records without an owner stay readable and writable by every appliance until claimed; a row the
        // database refuses to change must not keep the daemon from serving.
        match store.claim_unowned().await {
            Ok((volumes, operations)) if volumes + operations > 0 => {
                tracing::info!(
                    volumes,
                    operations,
                    "records without an owner claimed for this appliance"
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "records without an owner not claimed; retried at next start");
            }
        }
        // What the previous run counted on each export becomes part of the totals of earlier runs.
        store
            .fold_export_run_bytes()
            .await
            .map_err(DaemonError::Store)?;
        let lease_task = tokio::spawn(heartbeat(
            store.clone(),
            cfg.lease_heartbeat(),
            Arc::clone(&health),
            fence,
        ));

        let nbd_listener = bind("NBD", cfg.nbd_listen).await?;
        let nbd_addr = nbd_listener
            .local_addr()
            .map_err(|source| DaemonError::Listen {
                what: "NBD",
                addr: cfg.nbd_listen,
                source,
            })?;
        let registry = nbd::Registry::new();
        let (stop_nbd, nbd_stop_rx) = oneshot::channel::<()>();
        let server =
            nbd::Server::try_new(registry.clone(), nbd_config).map_err(DaemonError::Nbd)?;
        health.set_nbd_connections(server.connection_probe());
        let nbd_task = tokio::spawn(async move {
            let stop = async move {
                let _ = nbd_stop_rx.await;
            };
            if let Err(e) = server.serve(nbd_listener, stop).await {
                tracing::error!(error = %crate::error_chain(&e), "NBD server stopped");
            }
        });
        println!("nbd listening on {nbd_addr}");
        health.set_fact(
            HealthComponent::Nbd,
            true,
            format!("listening on {nbd_addr}"),
        );

        let resolver = blockdev::Resolver::new(
            blockdev::sysfs::SysRoot::new(cfg.sys_dir.clone(), "/dev".into()),
            cfg.by_id_dir.clone(),
        )
        .allow_regular_files(cfg.allow_regular_files);
        let metrics = Arc::new(Metrics::default());
        let hub_store = store.clone();
        let hub_cloud = Arc::clone(&cloud);
        let engine = Engine::new(
            Parts {
                store: store.clone(),
                cloud,
                devices: Devices::new(resolver, names_dir),
                exports: Exports::new(registry, cfg.nbd_advertised_port.unwrap_or(nbd_addr.port())),
                identity,
                metrics: Arc::clone(&metrics),
            },
            EngineConfig {
                job_timeout: cfg.job_timeout(),
                snapshot_timeout: cfg.snapshot_timeout(),
                device_timeout: cfg.device_timeout(),
                drain_timeout: cfg.drain_timeout(),
                max_concurrent: cfg.max_concurrent_operations,
                nbd_default_clients: cfg.nbd_default_clients.clone(),
            },
        );

        // Exports and names first (they serve attached volumes), then the journal.
        let problems = engine
            .restore_appliance_volumes()
            .await
            .map_err(DaemonError::Recovery)?;
        health.set_restore_problems(problems);
        if let (true, Some(h)) = (cfg.hub_import_on_start, &hub) {
            let id = engine.appliance().await;
            let appliance = id.vm_id.filter(|_| id.verified);
            import_on_start(&hub_store, hub_cloud.as_ref(), h, appliance, &health).await;
        }
        if hub.is_some() {
            let (attached, detached) = crate::hub::resync(&hub_store)
                .await
                .map_err(DaemonError::HubResync)?;
            tracing::info!(
                attached,
                detached,
                "the hub is brought in line with the daemon's volumes"
            );
        }
        // Re-queued, not awaited: the API serves at once, new requests queue behind the resumed operations and
        // /health says recovery is in progress until they end.
        let resumed = engine.resume_all().await.map_err(DaemonError::Recovery)?;
        if resumed > 0 {
            tracing::info!(resumed, "unfinished operations re-queued");
        }
        engine.set_accepting(true);
        health.set_ready(true);

        let api_listener = bind("the REST API", cfg.listen).await?;
        let api_addr = api_listener
            .local_addr()
            .map_err(|source| DaemonError::Listen {
                what: "the REST API",
                addr: cfg.listen,
                source,
            })?;
        let app = api::router(AppState {
            engine: engine.clone(),
            health: Arc::clone(&health),
            api_token: cfg.api_token.clone(),
        });
        let (stop_api, api_stop_rx) = oneshot::channel::<()>();
        let limits = cfg.api_limits();
        let api_task = tokio::spawn(async move {
            let stop = async move {
                let _ = api_stop_rx.await;
            };
            api::serve(api_listener, app, limits, stop).await;
        });
        let counters_task = {
            let engine = engine.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(COUNTER_SAVE_INTERVAL).await;
                    engine.save_export_counters().await;
                }
            })
        };
        let hub_task = match (hub, hub_wake) {
            (Some(hub), Some(wake)) => {
                let hub = hub.with_nbd_port(cfg.nbd_advertised_port.unwrap_or(nbd_addr.port()));
                let (health, metrics) = (Arc::clone(&health), Arc::clone(&metrics));
                Some(tokio::spawn(crate::hub::outbox::run(
                    hub_store,
                    hub,
                    wake,
                    crate::hub::HubMonitor::default(),
                    move |r| {
                        health.set_component(HealthComponent::Hub, r.component());
                        metrics.set_hub(r);
                    },
                )))
            }
            _ => None,
        };
        let watch_task = tokio::spawn(crate::watch::run(
            engine.clone(),
            Arc::clone(&health),
            metrics,
            crate::watch::WatchConfig {
                by_id_dir: cfg.by_id_dir.clone(),
                reconcile_every: cfg.reconcile_interval(),
                repair: cfg.reconcile_repair,
            },
        ));
        let (fenced_tx, fenced) = watch::channel(false);
        let fence_task = {
            let engine = engine.clone();
            let health = Arc::clone(&health);
            let mut lost = lease.lost();
            tokio::spawn(async move {
                if lost.wait_for(|l| *l).await.is_err() {
                    return;
                }
                tracing::error!(
                    "the appliance lease is lost: no more operations, every export is closed, the daemon stops"
                );
                engine.set_accepting(false);
                health.set_ready(false);
                health.set_fact(
                    HealthComponent::Lease,
                    false,
                    "lost to another daemon (or not renewed in time): this daemon stops"
                        .to_string(),
                );
                engine.close_all_exports().await;
                fenced_tx.send_replace(true);
            })
        };
        println!("api listening on {api_addr}");
        let ready_task = tokio::spawn(notify_ready(
            ready_identity,
            format!("serving API on {api_addr}, NBD on {nbd_addr}"),
        ));
        Ok(Self {
            api_addr,
            nbd_addr,
            engine,
            health,
            sim,
            stop_api: Some(stop_api),
            stop_nbd: Some(stop_nbd),
            api_task,
            nbd_task,
            counters_task,
            watch_task,
            lease_task,
            ready_task,
            fence_task,
            fenced,
            store,
            hub_task,
            _state_lock: state_lock,
        })
    }

    /// Resolves once the appliance lease was lost (taken over by another daemon, or not renewed before it
    /// expired) and every export is closed: the caller then exits non-zero. Pending while the lease holds.
    pub async fn lease_lost(&self) {
        let mut rx = self.fenced.clone();
        if rx.wait_for(|f| *f).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    pub fn nbd_addr(&self) -> SocketAddr {
        self.nbd_addr
    }

    pub fn sim(&self) -> Option<&cloudsim::RunningSimulator> {
        self.sim.as_ref().map(|s| &s.running)
    }

    /// Stops accepting, lets running operations finish (bounded), drains and closes the exports, stops the
    /// listeners. The journal stays consistent: what did not finish resumes at the next start.
    pub async fn shutdown(mut self) {
        self.ready_task.abort();
        crate::sdnotify::stopping();
        self.health.set_ready(false);
        self.engine.shutdown(SHUTDOWN_GRACE).await;
        if let Some(tx) = self.stop_api.take() {
            let _ = tx.send(());
        }
        let _ = self.api_task.await;
        self.counters_task.abort();
        self.watch_task.abort();
        if let Some(t) = self.hub_task.take() {
            t.abort();
        }
        self.engine.save_export_counters().await;
        self.engine.close_all_exports().await;
        if let Some(tx) = self.stop_nbd.take() {
            let _ = tx.send(());
        }
        let _ = self.nbd_task.await;
        self.fence_task.abort();
        self.lease_task.abort();
        // The next daemon for this appliance need not wait for the lease to expire.
        if let Err(e) = self.store.release_lease().await {
            tracing::warn!(error = %crate::error_chain(&e), "appliance lease not released; it expires by itself");
        }
        if let Some(s) = self.sim.take() {
            s.running.shutdown().await;
        }
    }
}

/// How often an appliance identity that is known but not verified is looked up again while READY=1 waits.
const IDENTITY_RETRY: Duration = Duration::from_secs(5);

/// Tells systemd the daemon is ready (`READY=1`, with `status`) once the appliance identity is verified, as the
/// unit promises: at once when start-up verified it; else when `PUT /api/v1/appliance` sets it or a lookup
/// (every [`IDENTITY_RETRY`], for an identity that is known) verifies it. Meanwhile the API serves (so the
/// identity can be set), `/health` answers 503 and systemd's status line says what is awaited.
async fn notify_ready(identity: Identity, status: String) {
    let mut verified = identity.verified();
    let mut waiting_said = false;
    loop {
        if *verified.borrow_and_update() {
            crate::sdnotify::ready(&status);
            tracing::info!(status = %status, "ready");
            return;
        }
        if !waiting_said {
            waiting_said = true;
            let problem = identity
                .current()
                .await
                .problem
                .unwrap_or_else(|| "unknown".into());
            tracing::warn!(problem = %problem, "READY=1 waits for the appliance identity to be verified (set appliance_vm_id, or volumectl appliance set)");
            crate::sdnotify::status(&format!(
                "waiting for the appliance identity to be verified: {problem}"
            ));
        }
        tokio::select! {
            changed = verified.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(IDENTITY_RETRY) => {
                if identity.current().await.vm_id.is_some() {
                    let _ = identity.verify().await;
                }
            }
        }
    }
}

/// How long after a lease was asked for (taken or renewed) NBD writes may still run: its time to live,
/// less a margin for the clocks of this host and the database's running at slightly different rates. Past
/// it another daemon may hold the lease and serve the same devices, even if this one has not noticed yet
/// (its process was frozen, the heartbeat delayed): writes then get `ESHUTDOWN` until a renewal succeeds.
fn write_window(ttl: Duration) -> Duration {
    ttl.saturating_sub((ttl / 4).min(Duration::from_secs(2)))
}

/// Renews the store's appliance lease every `every`, and reports each renewal on `/health` (components
/// `lease` and `database`; the lease's detail names the appliance it is held for now). Marks the lease lost
/// (which stops the daemon) when a renewal finds it taken over, or when renewals keep failing until it
/// has expired, except while the database refuses them because its storage is full: no other daemon can
/// take the lease over while that lasts (a takeover is a write to the same database), so the daemon goes
/// on serving its exports and renews as soon as there is space, or stops if it then finds the lease taken.
async fn heartbeat(
    store: Store,
    every: Duration,
    health: Arc<HealthState>,
    fence: Arc<nbd::WriteFence>,
) {
    use volume_api::{ComponentHealth, ComponentStatus};
    let Some(lease) = store.lease() else {
        return;
    };
    let window = write_window(lease.ttl());
    let mut valid_until = chrono::Utc::now()
        + chrono::Duration::from_std(lease.ttl()).unwrap_or(chrono::Duration::zero());
    let mut failing_since: Option<chrono::DateTime<chrono::Utc>> = None;
    let mut expired_while_full = false;
    loop {
        tokio::time::sleep(every).await;
        let asked = std::time::Instant::now();
        match store.renew_lease().await {
            Ok(until) => {
                fence.extend_to(asked + window);
                valid_until = until;
                expired_while_full = false;
                if let Some(since) = failing_since.take() {
                    tracing::info!(%since, "appliance lease renewed again; the database takes writes");
                    health.set_write_failure(None);
                    if let Some(now_held) = store.lease() {
                        health.set_fact(HealthComponent::Lease, true, now_held.detail());
                    }
                }
            }
            Err(e) if e.kind() == StoreErrorKind::Fenced => {
                fence.close();
                tracing::error!(error = %crate::error_chain(&e), "appliance lease lost");
                return;
            }
            Err(e) => {
                let now = chrono::Utc::now();
                let since = *failing_since.get_or_insert(now);
                let cause = crate::error_chain(&e);
                let at = |t: chrono::DateTime<chrono::Utc>| {
                    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                };
                let (since, until) = (at(since), at(valid_until));
                health.set_write_failure(Some(format!("since {since}: {cause}")));
                let storage_full = e.is_storage_full();
                if now >= valid_until && !storage_full {
                    fence.close();
                    tracing::error!(error = %cause, "appliance lease expired without a renewal");
                    lease.mark_lost();
                    return;
                }
                if storage_full {
                    // No other daemon can take the lease over while the database takes no writes: the
                    // exports go on taking them.
                    fence.extend_to(std::time::Instant::now() + window);
                }
                let detail = if now < valid_until {
                    format!(
                        "not renewed since {since}; it expires at {until}, and the daemon then \
                         stops unless the database's storage is full: {cause}"
                    )
                } else {
                    format!(
                        "expired at {until}, not renewed since {since}: the database's storage is \
                         full, so no other daemon can take it over; exports are served, and the lease is \
                         renewed as soon as there is space: {cause}"
                    )
                };
                if now >= valid_until {
                    if !expired_while_full {
                        expired_while_full = true;
                        tracing::error!(error = %cause, "appliance lease expired while the database's storage is full; serving on and renewing as soon as there is space");
                    }
                } else {
                    tracing::warn!(error = %cause, "appliance lease not renewed; retrying");
                }
                health.set_component(
                    HealthComponent::Lease,
                    ComponentHealth {
                        status: ComponentStatus::Degraded,
                        detail,
                    },
                );
            }
        }
    }
}

/// `hub_import_on_start`: adopts what a predecessor left (journaled before the journal is resumed, so the
/// adoptions run with the resumed operations). A failure is reported (`/health` component `hub_import`,
/// degraded) and does not stop the daemon.
async fn import_on_start(
    store: &Store,
    cloud: &dyn Cloud,
    hub: &crate::hub::Hub,
    appliance: Option<String>,
    health: &HealthState,
) {
    use volume_api::{ComponentHealth, ComponentStatus};
    let outcome = match appliance {
        None => Err("the appliance identity is not verified; nothing is adopted".to_string()),
        Some(app) => match crate::hub::import::plan(store, cloud, Some(hub), &app).await {
            Err(e) => Err(crate::error_chain(&e)),
            Ok(plan) => crate::hub::import::journal(store, &plan)
                .await
                .map(|ops| (plan, ops))
                .map_err(|e| crate::error_chain(&e)),
        },
    };
    let component = match outcome {
        Ok((plan, ops)) => {
            use crate::hub::import::ImportAction as A;
            tracing::info!(
                adoptions = ops.len(),
                hub_rows_rewritten = plan.count(A::RewriteHubRow),
                "import at start-up journaled"
            );
            ComponentHealth {
                status: ComponentStatus::Ok,
                detail: format!(
                    "{} adoptions journaled, {} hub rows rewritten, {} already managed",
                    ops.len(),
                    plan.count(A::RewriteHubRow),
                    plan.count(A::AlreadyManaged)
                ),
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "import at start-up failed; run volume-daemon import --dry-run to see why");
            ComponentHealth {
                status: ComponentStatus::Degraded,
                detail: format!("import at start-up failed: {e}"),
            }
        }
    };
    health.set_component(HealthComponent::HubImport, component);
}

/// One line of the `check` report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// `volume-daemon check`: configuration, state directory, privileges, database, listeners, cloud and
/// identity, without serving anything and without side effects (it creates, migrates and binds
/// nothing that outlives it).
pub async fn check(cfg: &Config) -> Vec<CheckLine> {
    let mut out = Vec::new();
    let mut line = |name: &str, ok: bool, detail: String| {
        out.push(CheckLine {
            name: name.into(),
            ok,
            detail,
        })
    };
    // The NBD server's settings are loaded as serve loads them (TLS certificates read and parsed).
    match cfg
        .validate()
        .map_err(DaemonError::from)
        .and_then(|()| nbd_server_config(cfg))
    {
        Err(e) => line("configuration", false, crate::error_chain(&e)),
        Ok(_) => line("configuration", true, "valid".into()),
    }
    let holder = statedir::holder(&cfg.state_dir);
    if cfg.state_dir.is_dir() {
        line(
            "state directory",
            true,
            match &holder {
                Some(holder) => format!("{} (in use by {holder})", cfg.state_dir.display()),
                None => format!("{} (not in use)", cfg.state_dir.display()),
            },
        );
    } else {
        line(
            "state directory",
            true,
            format!(
                "{} does not exist yet; start creates it (0750)",
                cfg.state_dir.display()
            ),
        );
    }
    let names_dir = cfg.effective_names_dir();
    let by_id_dir = if cfg.sim.enabled {
        sim::by_id_dir(cfg)
    } else {
        cfg.by_id_dir.clone()
    };
    // The names probe creates (and removes) a link: where the directory does not exist yet, probe a
    // scratch directory instead, so that the state directory stays untouched.
    let scratch = (!names_dir.exists())
        .then(|| std::env::temp_dir().join(format!("volume-daemon-check-{}", std::process::id())));
    let probe_dir = match &scratch {
        Some(dir) => {
            let _ = std::fs::create_dir_all(dir);
            dir.clone()
        }
        None => names_dir.clone(),
    };
    let report = blockdev::preflight::run(&by_id_dir, &probe_dir, None);
    if let Some(dir) = &scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    for c in report.checks {
        let later = match c.name {
            "names_dir" if scratch.is_some() && c.ok => Some(&names_dir),
            "by_id_watch" if cfg.sim.enabled && !by_id_dir.exists() => Some(&by_id_dir),
            _ => None,
        };
        if let Some(dir) = later {
            line(
                &format!("privilege: {}", c.name),
                true,
                format!("{} does not exist yet; start creates it", dir.display()),
            );
            continue;
        }
        let detail = match &c.fix {
            Some(fix) if !c.ok => format!("{} (fix: {fix})", c.detail),
            _ => c.detail.clone(),
        };
        line(&format!("privilege: {}", c.name), c.ok, detail);
    }
    let sim_listener = cfg
        .sim
        .enabled
        .then_some(("simulator listener", cfg.sim.listen));
    for (name, addr) in [
        ("REST API listener", cfg.listen),
        ("NBD listener", cfg.nbd_listen),
    ]
    .into_iter()
    .chain(sim_listener)
    {
        // Bound and closed at once: whether serve could listen there now.
        match std::net::TcpListener::bind(addr) {
            Ok(_) => line(name, true, format!("{addr} is free")),
            // The daemon that holds the state directory is serving there.
            Err(e) if holder.is_some() && e.kind() == std::io::ErrorKind::AddrInUse => line(
                name,
                true,
                format!("{addr} is served by the running daemon"),
            ),
            Err(e) => line(name, false, format!("cannot listen on {addr}: {e}")),
        }
    }
    let hub = match cfg
        .hub_database_url
        .as_deref()
        .map(|u| crate::hub::Hub::new(u, 0))
    {
        None => None,
        Some(Err(e)) => {
            line("hub", false, crate::error_chain(&e));
            None
        }
        Some(Ok(h)) => {
            match h.check_schema().await {
                Ok(r) if r.is_ok() => line("hub", true, "reachable, tables as expected".into()),
                Ok(r) => line(
                    "hub",
                    false,
                    format!("the hub's tables differ: {}", r.problems.join("; ")),
                ),
                Err(e) => line("hub", false, crate::error_chain(&e)),
            }
            Some(h)
        }
    };
    let db_url = cfg.effective_database_url();
    let sqlite_missing = statedir::sqlite_path(&db_url).is_some_and(|p| !p.exists());
    let store = if sqlite_missing {
        line(
            "database",
            true,
            "the SQLite database does not exist yet; start creates it (0640) and migrates it"
                .into(),
        );
        None
    } else {
        match Store::connect(&db_url).await {
            Ok(s) => {
                let (found, known) = s.schema_versions().await;
                match found {
                    Some(f) if f > known => line(
                        "database",
                        false,
                        format!("schema version {f} is newer than this binary knows ({known}); run the newer binary"),
                    ),
                    Some(f) if f == known => line("database", true, format!("reachable, schema version {f}")),
                    _ => line(
                        "database",
                        true,
                        format!(
                            "reachable, schema version {}; start migrates it to {known}",
                            found.map_or_else(|| "none".to_owned(), |f| f.to_string())
                        ),
                    ),
                }
                Some(s)
            }
            Err(e) => {
                line("database", false, crate::error_chain(&e));
                None
            }
        }
    };
    if cfg.sim.enabled {
        line(
            "cloudstack",
            true,
            "the built-in simulator (started by serve --sim; its appliance is the identity)".into(),
        );
        return out;
    }
    if cfg.cloudstack_url.is_none() {
        line(
            "cloudstack",
            false,
            "cloudstack_url is not set (the simulator is only available with `serve --sim`)".into(),
        );
        return out;
    }
    let client = match cloud_client(cfg) {
        Ok(c) => c,
        Err(e) => {
            line("cloudstack", false, crate::error_chain(&e));
            return out;
        }
    };
    let cloud: Arc<dyn Cloud> = Arc::new(CloudStack::new(client));
    match cloud.ping().await {
        Ok(()) => line("cloudstack", true, "reachable, credentials accepted".into()),
        Err(e) => line("cloudstack", false, e.chain()),
    }
    // Verified against the cloud whether or not the database exists yet (a fresh install has no stored
    // identity, but a configured or detected one must exist in the cloud all the same).
    let configured = match (&cfg.appliance_vm_id, &hub) {
        (Some(id), _) => Some((id.clone(), IdentitySource::Config)),
        (None, Some(h)) => crate::hub::appliance_identity(h)
            .await
            .map(|id| (id, IdentitySource::Hub)),
        (None, None) => None,
    };
    let s = Identity::resolve(
        configured,
        store.as_ref(),
        cloud.as_ref(),
        &DetectionSources::under(&cfg.sys_dir),
    )
    .await;
    match (&s.vm_id, s.verified) {
        (Some(id), true) => line(
            "appliance identity",
            true,
            format!("{id} ({}), verified with CloudStack", s.source.as_str()),
        ),
        _ => line(
            "appliance identity",
            false,
            s.problem
                .unwrap_or_else(|| "unknown: set appliance_vm_id or PUT /api/v1/appliance".into()),
        ),
    }
    if let (Some(store), Some(id)) = (&store, &s.vm_id) {
        lease_line(&mut line, store, id).await;
    }
    out
}

/// The `check` line naming who holds the appliance's lease (a held lease is fine: `serve` says the rest).
async fn lease_line(line: &mut impl FnMut(&str, bool, String), store: &Store, appliance_id: &str) {
    let now = chrono::Utc::now();
    match store.lease_of(appliance_id).await {
        Ok(Some(l)) if l.expires_at > now => line(
            "appliance lease",
            true,
            format!(
                "held by pid {} on {} (token {}, last heartbeat {} s ago); serve exits unless that daemon stops",
                l.pid,
                l.host,
                l.token,
                (now - l.heartbeat_at).num_seconds().max(0)
            ),
        ),
        Ok(Some(l)) => line(
            "appliance lease",
            true,
            format!("free (last held by pid {} on {}, token {})", l.pid, l.host, l.token),
        ),
        Ok(None) => line("appliance lease", true, "never taken".into()),
        // A database without the lease table yet (start migrates it).
        Err(_) => line("appliance lease", true, "not readable yet; start migrates the database".into()),
    }
}
