//! Delivery of the hub outbox: rows are applied to the hub one at a time in `seq` order and marked delivered
//! only after the hub committed them; a failure stops delivery at that row (nothing after it overtakes it)
//! and is retried with backoff until the hub answers. The state (pending rows, age of the oldest, last
//! error, the schema check) is published for `/health` (component `hub`) and the metrics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use volume_api::{ComponentHealth, ComponentStatus};

use super::{Hub, HubError, SchemaReport};
use crate::engine::failpoints;
use crate::store::{OutboxEntry, Store};

/// The first wait after a failed delivery; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// How often the published state is refreshed while nothing happens (the age of a pending row grows).
const REFRESH: Duration = Duration::from_secs(1);
/// Pending rows older than this make the component degraded even without an error.
const LAG_DEGRADED: Duration = Duration::from_secs(30);
/// Delivered rows are kept this long, then pruned.
const KEEP_DELIVERED: chrono::Duration = chrono::Duration::days(7);
/// Rows read per batch.
const BATCH: u32 = 100;

/// What the delivery reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubReport {
    /// `None` before the first check.
    pub schema: Option<SchemaReport>,
    pub pending: u64,
    pub oldest_pending_secs: u64,
    pub delivered_total: u64,
    pub failures_total: u64,
    pub last_error: Option<String>,
}

impl HubReport {
    /// The `/health` component: `ok` when in step, `degraded` (never failed: the daemon serves without
    /// the hub) when the tables differ, a delivery failed or changes wait longer than 30 s.
    pub fn component(&self) -> ComponentHealth {
        let mut problems = Vec::new();
        match &self.schema {
            Some(s) if !s.is_ok() => problems.push(format!(
                "the hub's tables differ, nothing is delivered until they are fixed: {}",
                s.problems.join("; ")
            )),
            _ => {}
        }
        if let Some(e) = &self.last_error {
            problems.push(format!("last delivery failed: {e}"));
        }
        let lagging = self.oldest_pending_secs >= LAG_DEGRADED.as_secs();
        let backlog = if self.pending == 0 {
            format!("in step ({} changes delivered)", self.delivered_total)
        } else {
            format!(
                "{} changes pending, the oldest for {} s ({} delivered)",
                self.pending, self.oldest_pending_secs, self.delivered_total
            )
        };
        let status = if problems.is_empty() && !lagging {
            ComponentStatus::Ok
        } else {
            ComponentStatus::Degraded
        };
        problems.insert(0, backlog);
        ComponentHealth {
            status,
            detail: problems.join("; "),
        }
    }
}

/// The shared view of the delivery's state.
#[derive(Debug, Clone, Default)]
pub struct HubMonitor(Arc<Mutex<HubReport>>);

impl HubMonitor {
    pub fn report(&self) -> HubReport {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut HubReport)) {
        if let Ok(mut r) = self.0.lock() {
            f(&mut r);
        }
    }
}

/// Delivers the outbox of `store` to `hub` until the task is aborted. `publish` is called with the state
/// after every change of it and at least every second.
pub async fn run(
    store: Store,
    hub: Hub,
    wake: Arc<Notify>,
    monitor: HubMonitor,
    publish: impl Fn(&HubReport) + Send + Sync + 'static,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut last_prune = std::time::Instant::now();
    loop {
        // The published backlog is refreshed while a delivery waits for the hub, so that a hub that stops
        // answering shows as changes pending, not as the state before.
        let outcome = {
            let delivery = deliver_pending(&store, &hub, &monitor);
            tokio::pin!(delivery);
            loop {
                tokio::select! {
                    outcome = &mut delivery => break outcome,
                    () = tokio::time::sleep(REFRESH) => {
                        refresh_backlog(&store, &monitor).await;
                        publish(&monitor.report());
                    }
                }
            }
        };
        refresh_backlog(&store, &monitor).await;
        publish(&monitor.report());
        if last_prune.elapsed() > Duration::from_secs(3600) {
            last_prune = std::time::Instant::now();
            if let Err(e) = store.prune_hub_outbox(Utc::now() - KEEP_DELIVERED).await {
                tracing::warn!(error = %crate::error_chain(&e), "pruning the hub outbox failed");
            }
        }
        match outcome {
            Ok(()) => {
                backoff = FIRST_BACKOFF;
                let _ = tokio::time::timeout(REFRESH, wake.notified()).await;
            }
            Err(()) => {
                // Refresh the published age while waiting out the backoff.
                let until = tokio::time::Instant::now() + backoff;
                while tokio::time::Instant::now() < until {
                    tokio::time::sleep(
                        REFRESH.min(until.saturating_duration_since(tokio::time::Instant::now())),
                    )
                    .await;
                    refresh_backlog(&store, &monitor).await;
                    publish(&monitor.report());
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn refresh_backlog(store: &Store, monitor: &HubMonitor) {
    if let Ok(b) = store.hub_backlog().await {
        let age = b
            .oldest_created_at
            .map(|t| (Utc::now() - t).num_seconds().max(0) as u64)
            .unwrap_or(0);
        monitor.update(|r| {
            r.pending = b.pending;
            r.oldest_pending_secs = age;
        });
    }
}

/// Delivers every pending row in order; `Err` after the first that could not be delivered (recorded on the
/// row and in the monitor).
async fn deliver_pending(store: &Store, hub: &Hub, monitor: &HubMonitor) -> Result<(), ()> {
    let schema = match monitor.report().schema {
        Some(s) if s.is_ok() => s,
        _ => match hub.check_schema().await {
            Ok(s) => {
                if s.is_ok() {
                    tracing::info!("the hub's tables are as expected; delivering changes");
                } else {
                    tracing::error!(problems = %s.problems.join("; "), "the hub's tables are not as expected; hub changes stay pending until they are fixed");
                }
                let ok = s.is_ok();
                monitor.update(|r| r.schema = Some(s.clone()));
                if !ok {
                    return Err(());
                }
                s
            }
            Err(e) => {
                fail(monitor, &e, None, store).await;
                return Err(());
            }
        },
    };
    loop {
        let batch = match store.pending_hub_changes(BATCH).await {
            Ok(b) => b,
            Err(e) => {
                let text = crate::error_chain(&e);
                tracing::warn!(error = %text, "reading the hub outbox failed");
                monitor.update(|r| r.last_error = Some(text));
                return Err(());
            }
        };
        if batch.is_empty() {
            return Ok(());
        }
        for entry in &batch {
            match deliver_one(store, hub, entry, schema.has_volume_context).await {
                Ok(()) => monitor.update(|r| {
                    r.delivered_total += 1;
                    r.last_error = None;
                }),
                Err(DeliveryError::Hub(e)) => {
                    if e.kind() == super::HubErrorKind::Unavailable {
                        // Tables dropped or altered meanwhile show here first: check them again next time.
                        monitor.update(|r| r.schema = None);
                    }
                    fail(monitor, &e, Some(entry), store).await;
                    return Err(());
                }
                Err(DeliveryError::Store(e)) => {
                    let text = crate::error_chain(&e);
                    tracing::warn!(seq = entry.seq, error = %text, "marking a hub change delivered failed; it is applied again (writing nothing) next time");
                    monitor.update(|r| {
                        r.failures_total += 1;
                        r.last_error = Some(text);
                    });
                    return Err(());
                }
            }
        }
    }
}

/// Why one row was not delivered.
#[derive(Debug)]
pub enum DeliveryError {
    Hub(HubError),
    Store(crate::store::StoreError),
}

/// Applies one row to the hub, then marks it delivered. A crash between the two leaves the row pending; it
/// is applied again at the next start and, the hub already holding it, writes nothing.
pub async fn deliver_one(
    store: &Store,
    hub: &Hub,
    entry: &OutboxEntry,
    volume_context: bool,
) -> Result<(), DeliveryError> {
    failpoints::hub_outbox(failpoints::HUB_OUTBOX_APPLY).map_err(DeliveryError::Store)?;
    let applied = hub
        .apply(&entry.change, volume_context)
        .await
        .map_err(DeliveryError::Hub)?;
    tracing::debug!(seq = entry.seq, volume = %entry.change.volume_id, writes = applied.writes, "hub change applied");
    failpoints::hub_outbox(failpoints::HUB_OUTBOX_MARK).map_err(DeliveryError::Store)?;
    store
        .mark_hub_change_delivered(entry.seq)
        .await
        .map_err(DeliveryError::Store)
}

async fn fail(monitor: &HubMonitor, e: &HubError, entry: Option<&OutboxEntry>, store: &Store) {
    let text = crate::error_chain(e);
    tracing::warn!(seq = entry.map(|e| e.seq), error = %text, "delivering to the hub failed; retrying");
    monitor.update(|r| {
        r.failures_total += 1;
        r.last_error = Some(text.clone());
    });
    if let Some(entry) = entry {
        let _ = store.note_hub_change_failed(entry.seq, &text).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_component_is_degraded_never_failed_and_says_why() {
        let ok_schema = Some(SchemaReport::default());
        let in_step = HubReport {
            schema: ok_schema.clone(),
            delivered_total: 4,
            ..HubReport::default()
        };
        let c = in_step.component();
        assert_eq!(c.status, ComponentStatus::Ok);
        assert_eq!(c.detail, "in step (4 changes delivered)");

        let outage = HubReport {
            schema: ok_schema.clone(),
            pending: 2,
            oldest_pending_secs: 3,
            last_error: Some("connection refused".into()),
            ..HubReport::default()
        };
        let c = outage.component();
        assert_eq!(c.status, ComponentStatus::Degraded);
        assert!(
            c.detail
                .starts_with("2 changes pending, the oldest for 3 s"),
            "{}",
            c.detail
        );
        assert!(c.detail.contains("connection refused"), "{}", c.detail);

        let lagging = HubReport {
            schema: ok_schema,
            pending: 1,
            oldest_pending_secs: 31,
            ..HubReport::default()
        };
        assert_eq!(lagging.component().status, ComponentStatus::Degraded);

        let differs = HubReport {
            schema: Some(SchemaReport {
                problems: vec!["table nbd_exports is missing".into()],
                has_volume_context: false,
            }),
            ..HubReport::default()
        };
        let c = differs.component();
        assert_eq!(c.status, ComponentStatus::Degraded);
        assert!(
            c.detail.contains("table nbd_exports is missing"),
            "{}",
            c.detail
        );
    }
}
