//! The watch on the world behind the daemon's back: device events (the by-id directory and kernel uevents,
//! with a rescan every few seconds) fence the export of an appliance volume whose device vanished, and the
//! periodic reconcile compares database, cloud, devices and exports, repairs what is safe to repair (when
//! configured) and reports what is left on `/health` (component `drift`) and in the metrics. A fence also
//! runs the reconcile at once, as a report only: repairs happen on the schedule.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use volume_api::{ComponentHealth, ComponentStatus, HealthComponent, ReconcileReport};

use crate::api::HealthState;
use crate::engine::Engine;
use crate::metrics::Metrics;

/// How often the devices of served volumes are checked when no event arrives.
pub(crate) const DEVICE_RESCAN: Duration = Duration::from_secs(2);

/// How many findings `/health` spells out; the rest are counted.
const SHOWN: usize = 5;

/// What the watch does.
#[derive(Debug, Clone)]
pub(crate) struct WatchConfig {
    pub by_id_dir: PathBuf,
    /// Run the reconciler this often; `None` only after a fence.
    pub reconcile_every: Option<Duration>,
    /// Apply the reconciler's safe repairs.
    pub repair: bool,
}

/// Runs until aborted.
pub(crate) async fn run(
    engine: Engine,
    health: Arc<HealthState>,
    metrics: Arc<Metrics>,
    cfg: WatchConfig,
) {
    let mut events = blockdev::DeviceEvents::open(&cfg.by_id_dir);
    let mut next_reconcile = cfg.reconcile_every.map(|every| Instant::now() + every);
    loop {
        let wait = next_reconcile
            .map(|at| at.saturating_duration_since(Instant::now()))
            .map_or(DEVICE_RESCAN, |left| left.min(DEVICE_RESCAN));
        events.next(wait).await;
        let fenced = match engine.fence_vanished().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot check the devices of served volumes");
                Vec::new()
            }
        };
        let due = next_reconcile.is_some_and(|at| Instant::now() >= at);
        // After a fence the findings are reported at once; repairs wait for the scheduled run.
        if !fenced.is_empty() || due {
            reconcile_once(&engine, &health, &metrics, cfg.repair && due).await;
            next_reconcile = cfg.reconcile_every.map(|every| Instant::now() + every);
        }
    }
}

/// One reconcile; its findings go to `/health` and the metrics.
pub(crate) async fn reconcile_once(
    engine: &Engine,
    health: &HealthState,
    metrics: &Metrics,
    repair: bool,
) {
    match crate::reconcile::run_scheduled(engine, repair).await {
        Ok(report) => publish(health, metrics, &report),
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "periodic reconcile failed");
            health.set_component(
                HealthComponent::Drift,
                ComponentHealth {
                    status: ComponentStatus::Degraded,
                    detail: "the last reconcile could not run; see the daemon's log".into(),
                },
            );
        }
    }
}

/// Makes a reconcile's findings the ones `/health` (component `drift`) and the metrics show: the latest
/// reconcile's, scheduled or asked for.
pub(crate) fn publish(health: &HealthState, metrics: &Metrics, report: &ReconcileReport) {
    metrics.set_drift(&report.drift);
    health.set_component(HealthComponent::Drift, drift_component(report));
}

/// The `/health` component for a reconcile: ok without unrepaired findings, degraded with them.
fn drift_component(report: &ReconcileReport) -> ComponentHealth {
    let at = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
    let left: Vec<_> = report.drift.iter().filter(|d| !d.applied).collect();
    let repaired = report.drift.len() - left.len();
    if left.is_empty() {
        return ComponentHealth {
            status: ComponentStatus::Ok,
            detail: format!(
                "no drift at {at} ({} volumes checked, {repaired} repaired)",
                report.checked_volumes
            ),
        };
    }
    let mut shown: Vec<String> = left
        .iter()
        .take(SHOWN)
        .map(|d| match d.volume_id {
            Some(v) => format!("{} volume {v}", d.kind.as_str()),
            None => d.kind.as_str().to_string(),
        })
        .collect();
    if left.len() > SHOWN {
        shown.push(format!("and {} more", left.len() - SHOWN));
    }
    ComponentHealth {
        status: ComponentStatus::Degraded,
        detail: format!(
            "{} unrepaired findings at {at} ({repaired} repaired): {}; see volumectl reconcile",
            left.len(),
            shown.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;
    use volume_api::{Drift, DriftAction, DriftKind};

    fn drift(kind: DriftKind, applied: bool) -> Drift {
        Drift {
            volume_id: Some(Uuid::nil()),
            kind,
            detail: "d".into(),
            action: DriftAction::ForgetAttachment,
            hint: "h".into(),
            operation_id: None,
            applied,
        }
    }

    #[test]
    fn health_shows_unrepaired_findings_only() {
        let clean = ReconcileReport {
            dry_run: false,
            checked_volumes: 3,
            drift: vec![drift(DriftKind::ExportMissing, true)],
        };
        let c = drift_component(&clean);
        assert_eq!(c.status, ComponentStatus::Ok);
        assert!(c.detail.contains("1 repaired"), "{}", c.detail);
        let dirty = ReconcileReport {
            dry_run: true,
            checked_volumes: 9,
            drift: (0..7)
                .map(|_| drift(DriftKind::AttachedOnlyInDatabase, false))
                .collect(),
        };
        let c = drift_component(&dirty);
        assert_eq!(c.status, ComponentStatus::Degraded);
        assert!(
            c.detail.starts_with("7 unrepaired findings")
                && c.detail.contains(
                    "attached_only_in_database volume 00000000-0000-0000-0000-000000000000"
                )
                && c.detail.contains("and 2 more"),
            "{}",
            c.detail
        );
    }
}
