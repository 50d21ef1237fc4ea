//! `/health`: each component checked for real (database, cloud, appliance identity, privileges, NBD
//! listener, journal recovery); 200 only when the daemon can serve, 503 otherwise.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use volume_api::{
    ComponentHealth, ComponentStatus, Health, HealthComponent, HealthDetails, HealthStatus,
    IMPLEMENTATION_STATUS,
};

use super::AppState;

/// The detail of every component for a caller without the bearer token (when `api_token` is set).
const REDACTED: &str = "details need the bearer token";

/// How long `/health` waits for the cloud before calling it unreachable.
const CLOUD_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Start-up facts `/health` reports next to its live checks.
#[derive(Debug, Default)]
pub struct HealthState {
    ready: AtomicBool,
    facts: Mutex<BTreeMap<String, ComponentHealth>>,
    /// Why the latest write to the database (the lease's heartbeat) failed; `None` once one succeeds.
    write_failure: Mutex<Option<String>>,
    /// The NBD server's connection table, once it serves.
    nbd_connections: Mutex<Option<nbd::ConnectionProbe>>,
    /// The appliance volumes whose exports could not be restored at start-up, and why.
    restore_problems: Mutex<Vec<(uuid::Uuid, String)>>,
}

/// The `exports` component's detail when every appliance volume is served.
const EXPORTED: &str = "every appliance volume is exported";

/// How long a connection refused for a full NBD connection table keeps the `nbd` component degraded.
const REFUSED_RECENTLY: Duration = Duration::from_secs(60);

impl HealthState {
    /// True once start-up recovery finished and until shutdown begins.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, on: bool) {
        self.ready.store(on, Ordering::SeqCst);
    }

    /// Records a component whose state is known from start-up (privileges, NBD listener).
    pub fn set_fact(&self, name: HealthComponent, ok: bool, detail: impl Into<String>) {
        if let Ok(mut f) = self.facts.lock() {
            f.insert(name.as_str().to_string(), component(ok, detail));
        }
    }

    /// Records a component reported by a background task (the reconciler's drift).
    pub fn set_component(&self, name: HealthComponent, c: ComponentHealth) {
        if let Ok(mut f) = self.facts.lock() {
            f.insert(name.as_str().to_string(), c);
        }
    }

    /// Records the outcome of the latest periodic write to the database (`None`: it succeeded).
    pub fn set_write_failure(&self, why: Option<String>) {
        if let Ok(mut w) = self.write_failure.lock() {
            *w = why;
        }
    }

    /// The appliance volumes whose exports start-up could not restore (empty: all were): the `exports`
    /// component stays failed while any of them is still attached to the appliance and not served.
    pub fn set_restore_problems(&self, problems: Vec<(uuid::Uuid, String)>) {
        if let Ok(mut p) = self.restore_problems.lock() {
            *p = problems;
        }
        self.set_fact(HealthComponent::Exports, true, EXPORTED);
    }

    fn restore_problems(&self) -> Vec<(uuid::Uuid, String)> {
        self.restore_problems
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    /// Where `/health` and `/metrics` read the NBD server's connection table from.
    pub fn set_nbd_connections(&self, probe: nbd::ConnectionProbe) {
        if let Ok(mut p) = self.nbd_connections.lock() {
            *p = Some(probe);
        }
    }

    /// The NBD server's connection table, once it serves.
    pub fn nbd_connections(&self) -> Option<nbd::ConnectionProbe> {
        self.nbd_connections.lock().ok().and_then(|p| p.clone())
    }

    fn write_failure(&self) -> Option<String> {
        self.write_failure.lock().ok().and_then(|w| w.clone())
    }

    fn facts(&self) -> BTreeMap<String, ComponentHealth> {
        self.facts.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

/// The `nbd` component: listening (`listening`, from start-up) and how full its connection table is. Degraded
/// while connections are being refused because every open one has a session: writers are kept out.
fn nbd_component(listening: &str, probe: &nbd::ConnectionProbe) -> ComponentHealth {
    let listening = listening.split("; ").next().unwrap_or(listening);
    let (open, max) = (probe.open(), probe.max());
    let refused_recently = probe
        .last_refused_full()
        .and_then(|at| at.elapsed().ok())
        .is_some_and(|ago| ago < REFUSED_RECENTLY);
    if refused_recently {
        ComponentHealth {
            status: ComponentStatus::Degraded,
            detail: format!(
                "{listening}; connection table full: {open} of {max} connections open, and new ones were \
                 refused in the last {}s because every open one has a session ({} refused since start); \
                 set nbd_idle_timeout_secs to close idle sessions, or raise nbd_max_connections",
                REFUSED_RECENTLY.as_secs(),
                probe.refused_full()
            ),
        }
    } else {
        component(
            true,
            format!("{listening}; {open} of {max} connections open"),
        )
    }
}

fn component(ok: bool, detail: impl Into<String>) -> ComponentHealth {
    ComponentHealth {
        status: if ok {
            ComponentStatus::Ok
        } else {
            ComponentStatus::Failed
        },
        detail: detail.into(),
    }
}

/// Builds the health report; `Health::ready` is false when any component failed.
pub async fn report(st: &AppState) -> Health {
    let engine = &st.engine;
    let mut components = st.health.facts();
    let db = engine.check_database().await;
    components.insert(
        HealthComponent::Database.as_str().into(),
        match db {
            Ok(_) => match st.health.write_failure() {
                None => component(true, "reachable"),
                Some(why) => component(false, format!("reads answer, but writes fail: {why}")),
            },
            Err(e) => component(false, crate::error_chain(&e)),
        },
    );
    let cloud = tokio::time::timeout(CLOUD_CHECK_TIMEOUT, engine.check_cloud()).await;
    components.insert(
        HealthComponent::Cloudstack.as_str().into(),
        match cloud {
            Ok(Ok(())) => component(true, "reachable"),
            Ok(Err(e)) => component(false, e.chain()),
            Err(_) => component(
                false,
                format!("no answer within {}s", CLOUD_CHECK_TIMEOUT.as_secs()),
            ),
        },
    );
    let id = engine.appliance().await;
    components.insert(
        HealthComponent::ApplianceIdentity.as_str().into(),
        match (&id.vm_id, id.verified) {
            (Some(vm), true) => component(true, format!("{vm} ({})", id.source.as_str())),
            (Some(vm), false) => component(
                false,
                format!(
                    "{vm} is not verified: {}",
                    id.problem.as_deref().unwrap_or("not checked yet")
                ),
            ),
            (None, _) => component(
                false,
                id.problem.clone().unwrap_or_else(|| {
                    "unknown: set appliance_vm_id or PUT /api/v1/appliance".into()
                }),
            ),
        },
    );
    let problems = st.health.restore_problems();
    if !problems.is_empty() {
        // Checked now: a volume start-up could not serve counts until it is served again or leaves.
        let component = match engine.still_unexported(&problems).await {
            Ok(left) if left.is_empty() => component(
                true,
                format!(
                    "{EXPORTED} ({} not restored at start-up are served again or detached)",
                    problems.len()
                ),
            ),
            // The daemon serves on (every other volume, every operation): one volume's export that could not
            // be restored needs attention, as the same drift found while running does, and is no reason to
            // take the daemon out of service.
            Ok(left) => ComponentHealth {
                status: ComponentStatus::Degraded,
                detail: left
                    .iter()
                    .map(|(v, m)| format!("{v}: {m}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            },
            Err(e) => component(false, crate::error_chain(&e)),
        };
        components.insert(HealthComponent::Exports.as_str().into(), component);
    }
    if let (Some(probe), Some(listening)) = (
        st.health.nbd_connections(),
        components.get_mut(HealthComponent::Nbd.as_str()),
    ) {
        *listening = nbd_component(&listening.detail, &probe);
    }
    let ready = st.health.is_ready();
    let stuck = engine.stuck_operations();
    components.insert(
        HealthComponent::Journal.as_str().into(),
        if !stuck.is_empty() {
            component(
                false,
                stuck
                    .iter()
                    .map(|(id, why)| format!("operation {id} is stuck: {why}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        } else if ready && engine.recovering() > 0 {
            component(
                false,
                format!(
                    "recovery in progress: {} resumed operations have not ended yet; new ones queue behind them",
                    engine.recovering()
                ),
            )
        } else {
            component(
                ready,
                if ready {
                    "recovered; accepting operations"
                } else {
                    "not accepting operations (starting up or shutting down)"
                },
            )
        },
    );
    // A degraded component (drift) needs attention but does not stop the daemon from serving.
    let all_ok = components
        .values()
        .all(|c| c.status != ComponentStatus::Failed);
    let summary = |name: HealthComponent| {
        match components.get(name.as_str()).map(|c| c.status) {
            Some(ComponentStatus::Ok) => "healthy",
            Some(ComponentStatus::Degraded) => "degraded",
            Some(ComponentStatus::Failed) => "unhealthy",
            None => "unknown",
        }
        .to_string()
    };
    let cloudstack_health = summary(HealthComponent::Cloudstack);
    let database_health = summary(HealthComponent::Database);
    let device_monitor = summary(HealthComponent::Privileges);
    let details = HealthDetails {
        implementation_status: IMPLEMENTATION_STATUS.into(),
        service: "volume-daemon".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    Health {
        cloudstack_health,
        database_health,
        device_monitor,
        details,
        status: if all_ok {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        },
        ready: all_ok,
        service: "volume-daemon".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        timestamp: chrono::Utc::now(),
        components,
    }
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "meta",
    responses(
        (status = 200, description = "every component ok (also at /health); without the bearer token (when `api_token` is set) each component's detail is withheld", body = Health),
        (status = 503, description = "a component failed: the daemon cannot serve", body = Health),
    )
)]
pub async fn health(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let mut h = report(&st).await;
    if !super::authorized(&st, &headers) {
        // Open to load balancers: the status of each component, never the text of an error (which may
        // name hosts, URLs or paths).
        for c in h.components.values_mut() {
            c.detail = REDACTED.into();
        }
    }
    let status = if h.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(h)).into_response()
}
