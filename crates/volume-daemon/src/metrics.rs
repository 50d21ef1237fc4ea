//! Prometheus metrics: operation counters and durations, device-appearance times, and per-export NBD counters,
//! rendered in the text exposition format for `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// One per-export series: name, type, help and how to read it from a snapshot.
type ExportSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&nbd::ExportSnapshot) -> u64,
);

/// Upper bounds (seconds) of the duration histograms.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    submitted: BTreeMap<&'static str, u64>,
    finished: BTreeMap<(&'static str, &'static str), u64>,
    durations: BTreeMap<&'static str, Histogram>,
    device_wait: Histogram,
    compensations: u64,
    resumed: u64,
    fenced: u64,
    /// Findings of the last reconcile by drift kind (every kind present, zero when none).
    drift: BTreeMap<&'static str, u64>,
    /// The hub projection's delivery state (only with `hub_database_url`).
    hub: Option<crate::hub::HubReport>,
}

/// The daemon's counters. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().expect("metrics lock poisoned"))
    }

    pub fn op_submitted(&self, op_type: &'static str) {
        self.with(|m| *m.submitted.entry(op_type).or_default() += 1);
    }

    pub fn op_finished(&self, op_type: &'static str, status: &'static str, took: Duration) {
        self.with(|m| {
            *m.finished.entry((op_type, status)).or_default() += 1;
            m.durations
                .entry(op_type)
                .or_default()
                .observe(took.as_secs_f64());
        });
    }

    pub fn device_appeared(&self, took: Duration) {
        self.with(|m| m.device_wait.observe(took.as_secs_f64()));
    }

    pub fn fenced(&self) {
        self.with(|m| m.fenced += 1);
    }

    /// Records the findings of the latest reconcile that were left unrepaired, by drift kind.
    pub fn set_drift(&self, findings: &[volume_api::Drift]) {
        self.with(|m| {
            m.drift = volume_api::DriftKind::ALL
                .iter()
                .map(|k| {
                    let n = findings
                        .iter()
                        .filter(|d| d.kind == *k && !d.applied)
                        .count() as u64;
                    (k.as_str(), n)
                })
                .collect();
        });
    }

    /// Records the hub projection's delivery state.
    pub fn set_hub(&self, report: &crate::hub::HubReport) {
        self.with(|m| m.hub = Some(report.clone()));
    }

    pub fn compensated(&self) {
        self.with(|m| m.compensations += 1);
    }

    pub fn resumed(&self) {
        self.with(|m| m.resumed += 1);
    }

    /// Renders everything, plus the live exports and the caller's values (gauges, or counters when the name
    /// ends in `_total`).
    pub fn render(&self, exports: &[nbd::ExportSnapshot], gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        let m = self.inner.lock().expect("metrics lock poisoned");
        out.push_str(
            "# HELP volume_daemon_operations_submitted_total Operations accepted, by type.\n",
        );
        out.push_str("# TYPE volume_daemon_operations_submitted_total counter\n");
        for (t, n) in &m.submitted {
            let _ = writeln!(
                out,
                "volume_daemon_operations_submitted_total{{type=\"{t}\"}} {n}"
            );
        }
        out.push_str("# HELP volume_daemon_operations_finished_total Operations that reached a terminal status.\n");
        out.push_str("# TYPE volume_daemon_operations_finished_total counter\n");
        for ((t, s), n) in &m.finished {
            let _ = writeln!(
                out,
                "volume_daemon_operations_finished_total{{type=\"{t}\",status=\"{s}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP volume_daemon_operation_duration_seconds Time from start to terminal status.\n",
        );
        out.push_str("# TYPE volume_daemon_operation_duration_seconds histogram\n");
        for (t, h) in &m.durations {
            h.render(
                &mut out,
                "volume_daemon_operation_duration_seconds",
                &format!("type=\"{t}\""),
            );
        }
        out.push_str("# HELP volume_daemon_device_appear_seconds Time for an attached volume's device to appear.\n");
        out.push_str("# TYPE volume_daemon_device_appear_seconds histogram\n");
        m.device_wait
            .render(&mut out, "volume_daemon_device_appear_seconds", "");
        out.push_str(
            "# HELP volume_daemon_compensations_total Attaches undone after a later step failed.\n",
        );
        out.push_str("# TYPE volume_daemon_compensations_total counter\n");
        let _ = writeln!(out, "volume_daemon_compensations_total {}", m.compensations);
        out.push_str(
            "# HELP volume_daemon_operations_resumed_total Operations resumed at start-up.\n",
        );
        out.push_str("# TYPE volume_daemon_operations_resumed_total counter\n");
        let _ = writeln!(out, "volume_daemon_operations_resumed_total {}", m.resumed);
        out.push_str("# HELP volume_daemon_exports_fenced_total Exports no longer served because their device vanished or stopped verifying.\n");
        out.push_str("# TYPE volume_daemon_exports_fenced_total counter\n");
        let _ = writeln!(out, "volume_daemon_exports_fenced_total {}", m.fenced);
        out.push_str(
            "# HELP volume_daemon_drift Unrepaired findings of the latest reconcile, by kind.\n",
        );
        out.push_str("# TYPE volume_daemon_drift gauge\n");
        for (k, n) in &m.drift {
            let _ = writeln!(out, "volume_daemon_drift{{kind=\"{k}\"}} {n}");
        }
        if let Some(h) = &m.hub {
            let schema_ok = h.schema.as_ref().is_some_and(|s| s.is_ok());
            let rows: [(&str, &str, &str, u64); 5] = [
                (
                    "volume_daemon_hub_pending_changes",
                    "gauge",
                    "Hub changes journaled and not yet applied to the hub.",
                    h.pending,
                ),
                (
                    "volume_daemon_hub_oldest_pending_seconds",
                    "gauge",
                    "Age of the oldest hub change not yet applied (0 when none).",
                    h.oldest_pending_secs,
                ),
                (
                    "volume_daemon_hub_delivered_total",
                    "counter",
                    "Hub changes applied to the hub since the daemon started.",
                    h.delivered_total,
                ),
                (
                    "volume_daemon_hub_delivery_failures_total",
                    "counter",
                    "Failed attempts to apply a hub change since the daemon started.",
                    h.failures_total,
                ),
                (
                    "volume_daemon_hub_schema_ok",
                    "gauge",
                    "1 when the hub's tables have every column the projection uses.",
                    u64::from(schema_ok),
                ),
            ];
            for (name, kind, help, v) in rows {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
                );
            }
        }
        drop(m);
        for (name, help, value) in gauges {
            // A caller's value is a gauge, or a counter it keeps itself when its name says so.
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let series: [ExportSeries; 5] = [
            (
                "volume_daemon_export_connections_open",
                "gauge",
                "Open NBD connections per export.",
                |e| e.counters.connections_current,
            ),
            (
                "volume_daemon_export_connections_total",
                "counter",
                "NBD connections accepted per export.",
                |e| e.counters.connections_total,
            ),
            (
                "volume_daemon_export_read_bytes_total",
                "counter",
                "Bytes read through each export since the daemon started (the API reports totals across restarts).",
                |e| e.counters.bytes_read,
            ),
            (
                "volume_daemon_export_written_bytes_total",
                "counter",
                "Bytes written through each export since the daemon started (the API reports totals across restarts).",
                |e| e.counters.bytes_written,
            ),
            (
                "volume_daemon_export_flushes_total",
                "counter",
                "Flushes per export.",
                |e| e.counters.flushes,
            ),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for e in exports {
                let _ = writeln!(out, "{name}{{export=\"{}\"}} {}", e.name, get(e));
            }
        }
        out
    }
}
