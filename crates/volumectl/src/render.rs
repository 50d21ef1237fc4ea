//! Human output: aligned tables and key/value blocks built from the wire types, as pure functions returning
//! text, plus size parsing and formatting. `--json` output does not pass through here.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};
use volume_api::{
    Appliance, AttachTarget, CloudOffering, CloudVm, CloudZone, DiskRole, Export, ExportList,
    Health, Operation, OperationKind, OperationStatus, ReconcileReport, VolumeSnapshot,
    VolumeStatus,
};

/// Shown for an absent value.
const NONE: &str = "-";

/// A plain-text table: a header row and left-aligned columns separated by two spaces.
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are dropped. Control characters in a cell are shown
    /// escaped ([`printable`]), so a value cannot move the cursor, recolour the terminal or break the row.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells: Vec<String> = cells.iter().map(|c| printable(c, false)).collect();
        cells.resize(self.header.len(), String::new());
        self.rows.push(cells);
    }

    /// Renders at the width set by [`set_width`] (every cell in full when none is set).
    pub fn render(&self) -> String {
        self.render_fit(WIDTH.get().copied().flatten())
    }

    /// Renders within `width` columns when given: the widest columns are narrowed first (never below their
    /// header) and cells cut to fit end in `~`. `None` prints every cell in full.
    pub fn render_fit(&self, width: Option<usize>) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.width()).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.width());
            }
        }
        if let Some(limit) = width {
            let floor: Vec<usize> = self
                .header
                .iter()
                .map(|h| h.width().max(MIN_COLUMN))
                .collect();
            let gaps = 2 * widths.len().saturating_sub(1);
            while widths.iter().sum::<usize>() + gaps > limit {
                let widest = widths
                    .iter()
                    .enumerate()
                    .filter(|(i, w)| **w > floor[*i])
                    .max_by_key(|(_, w)| **w)
                    .map(|(i, _)| i);
                match widest {
                    Some(i) => widths[i] -= 1,
                    None => break,
                }
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let c = cut(c, *w);
                line.push_str(&c);
                if i + 1 < r.len() {
                    line.extend(std::iter::repeat_n(' ', w.saturating_sub(c.width())));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The narrowest a fitted column gets (or its header's width, when wider).
const MIN_COLUMN: usize = 6;

/// The table width of this invocation, set once at start; `None` prints every cell in full.
static WIDTH: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();

/// Sets the width tables fit into (`None`: every cell in full, as with `--wide`). Later calls are ignored.
pub fn set_width(width: Option<usize>) {
    let _ = WIDTH.set(width);
}

/// The width of the terminal on standard output, else `$COLUMNS`, else 100.
pub fn terminal_width() -> usize {
    let stdout = std::io::stdout();
    if let Ok(ws) = rustix::termios::tcgetwinsize(&stdout) {
        if ws.ws_col > 0 {
            return usize::from(ws.ws_col);
        }
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|c| *c > 0)
        .unwrap_or(100)
}

/// `s` cut to `width` terminal columns (a wide character, as in CJK text, takes two), the last one `~`
/// when something was cut.
fn cut(s: &str, width: usize) -> String {
    if s.width() <= width {
        return s.to_string();
    }
    let room = width.saturating_sub(1);
    let mut out = String::new();
    let mut used = 0;
    for ch in s.chars() {
        let w = ch.width().unwrap_or(0);
        if used + w > room {
            break;
        }
        used += w;
        out.push(ch);
    }
    // A wide character that did not fit leaves a column: fill it, so the column stays aligned.
    out.extend(std::iter::repeat_n(' ', room - used));
    out.push('~');
    out
}

/// Key/value lines with aligned values (control characters in a value escaped, see [`printable`]).
fn fields(pairs: &[(&str, String)]) -> String {
    // The key column includes the colon.
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(&format!(
            "{:width$}  {}\n",
            format!("{k}:"),
            printable(v, false)
        ));
    }
    out
}

/// `s` safe to print on a terminal: every control character (C0 and C1, DEL, ESC, and line breaks unless
/// `keep_newlines`) and every bidirectional override or isolate is replaced by its Rust escape (`\u{1b}`,
/// `\n`, `\u{202e}`), so text from the daemon or the cloud (a VM's name, CloudStack's error text) cannot send
/// escape sequences to the terminal or make what is shown differ from what is stored.
pub fn printable(s: &str, keep_newlines: bool) -> String {
    let unsafe_char = |c: char| {
        (c.is_control() && !(keep_newlines && c == '\n'))
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(unsafe_char) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| NONE.to_string())
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `1073741824` → `1 GiB`, `1536` → `1.5 KiB`, `512` → `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if (v - v.round()).abs() < 0.05 {
        format!("{:.0} {}", v.round(), UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses a size: plain bytes, or a number with `K|M|G|T|P` (optionally followed by `i`, `iB` or `B`), all
/// binary multiples (`10G` = `10GiB` = 10×2³⁰ bytes, as CloudStack sizes volumes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" | "kb" => 1 << 10,
        "m" | "mi" | "mib" | "mb" => 1 << 20,
        "g" | "gi" | "gib" | "gb" => 1 << 30,
        "t" | "ti" | "tib" | "tb" => 1 << 40,
        "p" | "pi" | "pib" | "pb" => 1 << 50,
        other => {
            return Err(format!(
                "unknown size unit {other:?}: use a number of bytes or K, M, G, T"
            ))
        }
    };
    let bytes = if let Ok(n) = num.parse::<u64>() {
        n.checked_mul(mult)
    } else {
        let f: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 10G or 1073741824"))?;
        let b = (f * mult as f64).ceil();
        (b.is_finite() && b >= 0.0 && b < u64::MAX as f64).then_some(b as u64)
    };
    match bytes {
        Some(0) => Err("size must be greater than zero".into()),
        Some(b) => Ok(b),
        None => Err(format!("{s:?} is too large")),
    }
}

/// VM names by id, as the cloud lists them (empty when it could not be asked).
pub type VmNames = HashMap<String, String>;

/// A VM as `name (id)`, or its id alone when its name is unknown.
pub fn vm_label(id: &str, names: &VmNames) -> String {
    match names.get(id) {
        Some(n) if !n.is_empty() => format!("{n} ({id})"),
        _ => id.to_string(),
    }
}

/// Where a volume is attached, in a few words.
fn attached_to(v: &VolumeStatus, names: &VmNames) -> String {
    match &v.attachment {
        None => NONE.into(),
        Some(a) if a.target == AttachTarget::Appliance => {
            format!("{} [appliance]", vm_label(&a.vm_id, names))
        }
        Some(a) if a.role == DiskRole::Root => format!("{} [root]", vm_label(&a.vm_id, names)),
        Some(a) => vm_label(&a.vm_id, names),
    }
}

pub fn volumes_table(vols: &[VolumeStatus], names: &VmNames) -> String {
    let mut t = Table::new(&[
        "VOLUME",
        "NAME",
        "SIZE",
        "STATE",
        "ATTACHED TO",
        "DEVICE",
        "EXPORT",
    ]);
    for v in vols {
        t.row(vec![
            v.volume_id.to_string(),
            v.name.clone(),
            human_bytes(v.size),
            v.state.to_string(),
            attached_to(v, names),
            opt(v.attachment.as_ref().and_then(|a| a.device_path.clone())),
            v.export
                .as_ref()
                .map(|e| e.status.to_string())
                .unwrap_or_else(|| NONE.into()),
        ]);
    }
    t.render()
}

pub fn volume_detail(v: &VolumeStatus, names: &VmNames) -> String {
    let cloud_state = v.cloudstack_data.as_ref().map(|d| d.state.clone());
    let mut pairs = vec![
        ("volume", v.volume_id.to_string()),
        ("name", v.name.clone()),
        (
            "size",
            format!("{} ({} bytes)", human_bytes(v.size), v.size),
        ),
        ("state", v.state.to_string()),
        ("disk offering", v.disk_offering_id.clone()),
        ("zone", v.zone_id.clone()),
        (
            "cloud state",
            match (&cloud_state, &v.cloudstack_error) {
                (Some(s), _) => s.to_string(),
                (None, Some(e)) => format!("unknown: {e}"),
                (None, None) => NONE.into(),
            },
        ),
        ("attached to", attached_to(v, names)),
    ];
    if let Some(a) = &v.attachment {
        pairs.push(("device id", opt(a.device_id)));
        pairs.push(("device path", opt(a.device_path.clone())));
        pairs.push(("kernel device", opt(a.kernel_device.clone())));
        pairs.push(("stable name", opt(a.symlink_path.clone())));
    }
    pairs.push(("linux state", opt(v.linux_state)));
    if let Some(p) = &v.linux_problem {
        pairs.push(("linux problem", p.clone()));
    }
    match &v.export {
        Some(e) => {
            pairs.push((
                "export",
                format!("{} ({}, port {})", e.export_name, e.status, e.port),
            ));
            pairs.push(("connections", e.connections.to_string()));
            pairs.push(("bytes written", human_bytes(e.bytes_written)));
        }
        None => pairs.push(("export", NONE.into())),
    }
    if v.metadata.as_object().is_some_and(|m| !m.is_empty()) {
        pairs.push(("metadata", v.metadata.to_string()));
    }
    if let Some(op) = &v.last_operation {
        pairs.push((
            "last operation",
            format!("{} {} {}", op.id, op.op_type(), op.status),
        ));
    }
    pairs.push(("created", time(v.created_at)));
    pairs.push(("updated", time(v.updated_at)));
    fields(&pairs)
}

pub fn operations_table(ops: &[Operation], names: &VmNames) -> String {
    let mut t = Table::new(&[
        "OPERATION",
        "TYPE",
        "STATUS",
        "VOLUME",
        "VM",
        "STEP",
        "CREATED",
        "ERROR",
    ]);
    for o in ops {
        t.row(vec![
            o.id.to_string(),
            o.op_type().to_string(),
            o.status.to_string(),
            opt(o.volume_id),
            opt(o.vm_id.as_deref().map(|id| vm_label(id, names))),
            o.step.to_string(),
            time(o.created_at),
            opt(o.error.clone()),
        ]);
    }
    t.render()
}

pub fn operation_detail(o: &Operation) -> String {
    let mut pairs = vec![
        ("operation", o.id.to_string()),
        ("type", o.op_type().to_string()),
        ("status", o.status.to_string()),
        ("volume", opt(o.volume_id)),
        ("vm", opt(o.vm_id.clone())),
        ("step", o.step.to_string()),
        ("cloudstack job", opt(o.cloudstack_job_id.clone())),
    ];
    if o.status == OperationStatus::Failed || o.error.is_some() {
        let err = match (&o.error, &o.error_code) {
            (Some(e), Some(c)) => format!("{e} [{c}]"),
            (Some(e), None) => e.clone(),
            (None, Some(c)) => format!("[{c}]"),
            (None, None) => NONE.into(),
        };
        pairs.push(("error", err));
    }
    if let Some(v) = o.response_volume_id() {
        pairs.push(("volume_id", v.to_string()));
    }
    if let Some(d) = o.response_device_path() {
        pairs.push(("device_path", d.to_string()));
    }
    if let Some(e) = o.response_export_name() {
        pairs.push(("export_name", e.to_string()));
    }
    if let OperationKind::Repair { request, .. } = &o.kind {
        pairs.push(("repair", request.repair.to_string()));
    }
    pairs.push(("created", time(o.created_at)));
    pairs.push(("updated", time(o.updated_at)));
    pairs.push(("completed", opt(o.completed_at.map(time))));
    fields(&pairs)
}

/// The one-line outcome of a finished mutation.
/// `nbd_host` is where the daemon runs, for the NBD URL of an appliance attachment.
pub fn operation_outcome(o: &Operation, nbd_host: &str) -> String {
    let subject = o.response_volume_id().or(o.volume_id);
    let mut s = format!("operation {} ({}) {}", o.id, o.op_type(), o.status);
    if let Some(v) = subject {
        s.push_str(&format!(": volume {v}"));
    }
    if let Some(d) = o.response_device_path() {
        s.push_str(&format!(", device {d}"));
    }
    if let OperationKind::Detach {
        response: Some(r), ..
    } = &o.kind
    {
        if r.vm_id.is_none() {
            s.push_str(": it was not attached, nothing to detach");
        }
    }
    if let OperationKind::SnapshotCreate {
        response: Some(r), ..
    }
    | OperationKind::SnapshotRevert {
        response: Some(r), ..
    }
    | OperationKind::SnapshotDelete {
        response: Some(r), ..
    } = &o.kind
    {
        s.push_str(&format!(", snapshot {}", r.snapshot_id));
    }
    if let Some(e) = &o.error {
        s.push_str(&format!(": {e}"));
    }
    if let OperationKind::Attach { .. } | OperationKind::TestFailoverCleanup { .. } = &o.kind {
        if let Some(url) = operation_subject(o, nbd_host) {
            s.push('\n');
            s.push_str(&url);
        }
    }
    s
}

/// What `-q` prints for a completed mutation: the export's NBD URL after an appliance attach (or a
/// test-failover clean-up), the volume's
/// id after a create, the snapshot's id after a snapshot create, nothing otherwise.
pub fn operation_subject(o: &Operation, nbd_host: &str) -> Option<String> {
    match &o.kind {
        OperationKind::Attach {
            response: Some(r), ..
        } => match (&r.export_name, r.nbd_port) {
            (Some(e), Some(p)) => Some(format!("nbd://{}:{p}/{e}", url_host(nbd_host))),
            _ => None,
        },
        OperationKind::TestFailoverCleanup {
            response: Some(r), ..
        } => Some(format!(
            "nbd://{}:{}/{}",
            url_host(nbd_host),
            r.nbd_port,
            r.export_name
        )),
        OperationKind::Create {
            response: Some(r), ..
        } => Some(r.volume_id.to_string()),
        OperationKind::SnapshotCreate {
            response: Some(r), ..
        } => Some(r.snapshot_id.clone()),
        _ => None,
    }
}

/// A host for a URL: IPv6 addresses in brackets.
fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

pub fn snapshots_table(snaps: &[VolumeSnapshot]) -> String {
    let mut t = Table::new(&["SNAPSHOT", "NAME", "STATE", "CREATED", "TRACKED"]);
    for s in snaps {
        t.row(vec![
            s.id.clone(),
            s.name.clone(),
            s.state.clone(),
            s.created.clone().unwrap_or_default(),
            if s.tracked { "yes" } else { "" }.to_string(),
        ]);
    }
    t.render()
}

pub fn zones_table(zones: &[CloudZone]) -> String {
    let mut t = Table::new(&["NAME", "ZONE"]);
    for z in zones {
        t.row(vec![z.name.clone(), z.id.clone()]);
    }
    t.render()
}

pub fn offerings_table(offerings: &[CloudOffering]) -> String {
    let mut t = Table::new(&["NAME", "OFFERING", "SIZE", "DESCRIPTION"]);
    for o in offerings {
        t.row(vec![
            o.name.clone(),
            o.id.clone(),
            match o.size {
                Some(b) => human_bytes(b),
                None => "custom (--size)".into(),
            },
            opt(o.description.clone()),
        ]);
    }
    t.render()
}

pub fn vms_table(vms: &[CloudVm]) -> String {
    let mut t = Table::new(&["NAME", "VM", "STATE", "ROLE"]);
    for v in vms {
        t.row(vec![
            v.name.clone(),
            v.id.clone(),
            v.state.to_string(),
            if v.appliance { "appliance" } else { NONE }.into(),
        ]);
    }
    t.render()
}

/// The client identities an export admits; `any` when it admits every client the TLS policy admits.
fn clients(names: &[String]) -> String {
    if names.is_empty() {
        "any".into()
    } else {
        names.join(",")
    }
}

pub fn exports_table(list: &ExportList) -> String {
    let mut t = Table::new(&[
        "EXPORT",
        "STATUS",
        "DEVICE",
        "PORT",
        "SIZE",
        "CONNS",
        "TOTAL",
        "WRITTEN",
        "READ",
        "LAST ACTIVITY",
        "CLIENTS",
    ]);
    for e in &list.exports {
        t.row(vec![
            e.export_name.clone(),
            e.status.to_string(),
            e.device_path.clone(),
            e.port.to_string(),
            human_bytes(e.size),
            e.connections.to_string(),
            e.total_connections.to_string(),
            human_bytes(e.bytes_written),
            human_bytes(e.bytes_read),
            opt(e.last_activity.map(time)),
            clients(&e.nbd_clients),
        ]);
    }
    let mut out = t.render();
    out.push_str(&format!("{} export(s)\n", list.count));
    out
}

pub fn export_detail(e: &Export) -> String {
    fields(&[
        ("export", e.export_name.clone()),
        ("volume", e.volume_id.to_string()),
        ("status", e.status.to_string()),
        ("device", e.device_path.clone()),
        ("port", e.port.to_string()),
        ("read only", e.read_only.to_string()),
        ("generation", e.generation.to_string()),
        (
            "size",
            format!("{} ({} bytes)", human_bytes(e.size), e.size),
        ),
        ("clients allowed", clients(&e.nbd_clients)),
        (
            "client identities",
            if e.client_identities.is_empty() {
                NONE.into()
            } else {
                e.client_identities.join(", ")
            },
        ),
        ("connections", e.connections.to_string()),
        ("total connections", e.total_connections.to_string()),
        (
            "peers",
            if e.peers.is_empty() {
                NONE.into()
            } else {
                e.peers.join(", ")
            },
        ),
        (
            "bytes written",
            format!("{} ({})", human_bytes(e.bytes_written), e.bytes_written),
        ),
        (
            "bytes read",
            format!("{} ({})", human_bytes(e.bytes_read), e.bytes_read),
        ),
        ("highest offset written", opt(e.highest_offset_written)),
        ("last activity", opt(e.last_activity.map(time))),
        ("created", time(e.created_at)),
    ])
}

pub fn appliance_detail(a: &Appliance) -> String {
    let mut pairs = vec![
        ("vm", opt(a.vm_id.clone())),
        ("source", a.source.to_string()),
        ("verified", a.verified.to_string()),
        ("name", opt(a.vm_name.clone())),
        ("state", opt(a.vm_state.clone())),
    ];
    if let Some(p) = &a.problem {
        pairs.push(("problem", p.clone()));
    }
    fields(&pairs)
}

pub fn health_report(h: &Health) -> String {
    let mut out = fields(&[
        ("status", h.status.to_string()),
        ("ready", h.ready.to_string()),
        ("version", format!("{} {}", h.service, h.version)),
    ]);
    let mut t = Table::new(&["COMPONENT", "STATUS", "DETAIL"]);
    for (name, c) in &h.components {
        t.row(vec![name.clone(), c.status.to_string(), c.detail.clone()]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

pub fn reconcile_report(r: &ReconcileReport) -> String {
    let mut out = format!(
        "{}: {} volume(s) checked, {} difference(s)\n",
        if r.dry_run { "dry run" } else { "applied" },
        r.checked_volumes,
        r.drift.len()
    );
    if !r.drift.is_empty() {
        let mut t = Table::new(&[
            "VOLUME",
            "KIND",
            "ACTION",
            "APPLIED",
            "OPERATION",
            "DETAIL",
            "HINT",
        ]);
        for d in &r.drift {
            t.row(vec![
                opt(d.volume_id),
                d.kind.to_string(),
                d.action.to_string(),
                if d.applied { "yes".into() } else { "no".into() },
                opt(d.operation_id),
                d.detail.clone(),
                d.hint.clone(),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
        if r.dry_run {
            out.push_str("\nrun `volumectl reconcile --apply` to repair what has an action\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;
    use volume_api::{
        ApplianceSource, AttachOperationRequest, AttachVolumeResponse, AttachmentInfo,
        CloudVolumeData, ComponentHealth, ComponentStatus, Drift, DriftAction, DriftKind,
        ErrorCode, ExportStatus, HealthStatus, LinuxState, OperationKind, OperationStep,
        SnapshotInfo, VolumeState,
    };
    use volume_api::{DetachVolumeResponse, VolumeOperationRequest};

    fn t0() -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH
    }

    fn vid() -> Uuid {
        Uuid::parse_str("60338035-92fb-4d27-98d4-b60ad4b38b87").unwrap()
    }

    fn volume() -> VolumeStatus {
        VolumeStatus {
            volume_id: vid(),
            name: "disk-0".into(),
            size: 10 << 30,
            disk_offering_id: "off".into(),
            zone_id: "zone".into(),
            metadata: json!({}),
            state: VolumeState::Attached,
            attachment: Some(AttachmentInfo {
                vm_id: "vm-app".into(),
                target: AttachTarget::Appliance,
                role: DiskRole::Data,
                device_id: Some(1),
                device_path: Some("/dev/disk/by-id/virtio-6033803592fb4d2798d4".into()),
                kernel_device: Some("vdb".into()),
                persistent_device_name: None,
                symlink_path: None,
                nbd_clients: Vec::new(),
            }),
            export: None,
            cloudstack_data: Some(CloudVolumeData {
                state: "Ready".into(),
                virtualmachineid: Some("vm-app".into()),
                deviceid: Some(1),
                size: 1 << 30,
                volume_type: Some("DATADISK".into()),
            }),
            cloudstack_error: None,
            linux_state: Some(LinuxState::Present),
            linux_problem: None,
            snapshot: SnapshotInfo::default(),
            last_operation: None,
            created_at: t0(),
            updated_at: t0(),
        }
    }

    #[test]
    fn tables_fit_the_width_by_cutting_the_widest_column() {
        let mut t = Table::new(&["ID", "NAME"]);
        t.row(vec!["a".repeat(40), "short".into()]);
        let out = t.render_fit(Some(30));
        for line in out.lines() {
            assert!(line.chars().count() <= 30, "{out}");
        }
        assert!(
            out.contains(&format!("{}~  short", "a".repeat(22))),
            "{out}"
        );
        // Wide: every cell in full.
        assert!(t.render_fit(None).contains(&"a".repeat(40)));
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("disk-ü 名前", false), "disk-ü 名前");
        assert_eq!(printable("a\u{1b}[31mb\u{7}", false), r"a\u{1b}[31mb\u{7}");
        assert_eq!(printable("a\nb\tc", false), r"a\nb\tc");
        assert_eq!(printable("a\nb\tc", true), "a\nb\\tc");
        assert_eq!(printable("\u{9b}2J\u{202e}x", true), r"\u{9b}2J\u{202e}x");
        let mut t = Table::new(&["NAME", "ID"]);
        t.row(vec!["x\u{1b}[2J\ny".into(), "1".into()]);
        let out = t.render_fit(None);
        assert_eq!(out, "NAME           ID\nx\\u{1b}[2J\\ny  1\n", "{out}");
    }

    #[test]
    fn tables_align_columns_and_trim_trailing_space() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["wide cell".into(), "x".into()]);
        t.row(vec!["y".into()]);
        assert_eq!(t.render_fit(None), "A          LONGER\nwide cell  x\ny\n");
    }

    #[test]
    fn wide_characters_take_two_columns_in_full_and_cut_cells() {
        let mut t = Table::new(&["NAME", "STATE"]);
        t.row(vec!["移行ディスク".into(), "attached".into()]);
        t.row(vec!["disk-1".into(), "detached".into()]);
        // Six wide characters are twelve columns: the next column starts at the same place on each line.
        assert_eq!(
            t.render_fit(None),
            "NAME          STATE\n移行ディスク  attached\ndisk-1        detached\n"
        );
        // Cut to fit 18 columns, the name column gets 8: three wide characters take six, and the column a
        // fourth cannot fill is a space before the mark, so the next column stays aligned.
        let out = t.render_fit(Some(18));
        assert_eq!(
            out, "NAME      STATE\n移行デ ~  attached\ndisk-1    detached\n",
            "{out}"
        );
        assert_eq!(cut("移行ディスク", 7), "移行デ~");
        for line in out.lines() {
            assert!(line.width() <= 18, "{out}");
        }
    }

    #[test]
    fn sizes_format_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10 GiB");
        assert_eq!(human_bytes(5 << 40), "5 TiB");
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1073741824").unwrap(), 1 << 30);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("0").is_err());
        assert!(parse_size("ten").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("99999999999P").is_err());
    }

    #[test]
    fn volume_table_shows_attachment_and_device() {
        let names = VmNames::from([("vm-app".to_string(), "appliance-1".to_string())]);
        let out = volumes_table(&[volume()], &names);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("VOLUME"));
        assert!(lines[1].contains("disk-0"));
        assert!(lines[1].contains("10 GiB"));
        assert!(
            lines[1].contains("appliance-1 (vm-app) [appliance]"),
            "{out}"
        );
        assert!(lines[1].contains("/dev/disk/by-id/virtio-6033803592fb4d2798d4"));
        // Columns line up: the SIZE header starts where the size cell starts.
        assert_eq!(lines[0].find("SIZE"), lines[1].find("10 GiB"));
    }

    #[test]
    fn volume_detail_reports_cloud_problems() {
        let mut v = volume();
        v.cloudstack_data = None;
        v.cloudstack_error = Some("cloud unreachable".into());
        let out = volume_detail(&v, &VmNames::new());
        assert!(out.contains("cloud state:"), "{out}");
        assert!(out.contains("unknown: cloud unreachable"), "{out}");
        assert!(out.contains("export:"), "{out}");
    }

    fn op(status: OperationStatus) -> Operation {
        Operation {
            id: Uuid::nil(),
            kind: OperationKind::Attach {
                request: AttachOperationRequest {
                    volume_id: vid(),
                    vm_id: "vm-app".into(),
                    device_id: None,
                    attach_as: None,
                    nbd_clients: None,
                },
                response: Some(AttachVolumeResponse {
                    volume_id: vid(),
                    vm_id: "vm-app".into(),
                    device_path: Some("/dev/disk/by-id/virtio-x".into()),
                    device_id: Some(1),
                    attach_as: None,
                    kernel_device: None,
                    persistent_device_name: None,
                    symlink_path: None,
                    export_name: None,
                    nbd_port: None,
                    export_generation: None,
                    device_appeared_ms: None,
                    message: "volume attached".into(),
                }),
            },
            status,
            volume_id: Some(vid()),
            vm_id: Some("vm-app".into()),
            error: (status == OperationStatus::Failed).then(|| "device never appeared".into()),
            error_code: (status == OperationStatus::Failed).then_some(ErrorCode::DeviceTimeout),
            step: OperationStep::Exported,
            cloudstack_job_id: None,
            created_at: t0(),
            updated_at: t0(),
            completed_at: None,
        }
    }

    #[test]
    fn operations_render_status_and_error() {
        let out = operations_table(
            &[op(OperationStatus::Completed), op(OperationStatus::Failed)],
            &VmNames::new(),
        );
        assert_eq!(out.lines().count(), 3);
        assert!(out.contains("device never appeared"));
        let d = operation_detail(&op(OperationStatus::Failed));
        assert!(d.contains("device never appeared [device_timeout]"), "{d}");
        let o = operation_outcome(&op(OperationStatus::Completed), "127.0.0.1");
        assert!(o.contains("(attach) completed"), "{o}");
        assert!(o.contains("device /dev/disk/by-id/virtio-x"), "{o}");
    }

    #[test]
    fn appliance_attach_prints_the_nbd_url_and_a_detach_of_nothing_says_so() {
        let mut a = op(OperationStatus::Completed);
        if let OperationKind::Attach {
            response: Some(r), ..
        } = &mut a.kind
        {
            r.export_name = Some("migration-vol-x".into());
            r.nbd_port = Some(10809);
        }
        let o = operation_outcome(&a, "::1");
        assert!(o.ends_with("\nnbd://[::1]:10809/migration-vol-x"), "{o}");
        let mut d = op(OperationStatus::Completed);
        d.kind = OperationKind::Detach {
            request: VolumeOperationRequest { volume_id: vid() },
            response: Some(DetachVolumeResponse {
                volume_id: vid(),
                device_path: String::new(),
                vm_id: None,
                message: "volume was not attached".into(),
            }),
        };
        let o = operation_outcome(&d, "127.0.0.1");
        assert!(o.contains("it was not attached, nothing to detach"), "{o}");
        assert!(!o.contains("device"), "{o}");
    }

    #[test]
    fn exports_show_connections_and_bytes_written() {
        let e = Export {
            export_name: volume_api::export_name(vid()),
            volume_id: vid(),
            device_path: "/dev/vdb".into(),
            port: 10809,
            status: ExportStatus::Active,
            read_only: false,
            generation: 1,
            size: 1 << 30,
            connections: 2,
            total_connections: 5,
            peers: vec!["127.0.0.1:5000".into()],
            nbd_clients: vec!["writer-1".into()],
            client_identities: vec!["writer-1".into()],
            bytes_read: 0,
            bytes_written: 3 << 20,
            highest_offset_written: Some(3 << 20),
            last_activity: None,
            created_at: t0(),
            updated_at: t0(),
        };
        let out = exports_table(&ExportList {
            exports: vec![e.clone()],
            count: 1,
        });
        assert!(out.contains("CONNS"), "{out}");
        assert!(out.contains("CLIENTS") && out.contains("writer-1"), "{out}");
        assert!(out.contains("3 MiB"), "{out}");
        assert!(out.ends_with("1 export(s)\n"), "{out}");
        let d = export_detail(&e);
        assert!(d.contains("bytes written:"), "{d}");
        assert!(d.contains("(3145728)"), "{d}");
    }

    #[test]
    fn health_and_reconcile_list_every_item() {
        let mut components = std::collections::BTreeMap::new();
        components.insert(
            "privileges".to_string(),
            ComponentHealth {
                status: ComponentStatus::Failed,
                detail: "cannot open /dev/vdb".into(),
            },
        );
        let h = Health {
            status: HealthStatus::Unhealthy,
            ready: false,
            service: "volume-daemon".into(),
            version: "0.1.0".into(),
            timestamp: t0(),
            components,
            cloudstack_health: "healthy".into(),
            database_health: "healthy".into(),
            device_monitor: "unhealthy".into(),
            details: volume_api::HealthDetails::default(),
        };
        let out = health_report(&h);
        assert!(
            out.contains("status:") && out.contains("unhealthy"),
            "{out}"
        );
        assert!(
            out.contains("privileges  failed  cannot open /dev/vdb"),
            "{out}"
        );
        let r = ReconcileReport {
            dry_run: true,
            checked_volumes: 3,
            drift: vec![Drift {
                volume_id: Some(vid()),
                kind: DriftKind::ExportMissing,
                detail: "not served".into(),
                action: DriftAction::Reexport,
                hint: "re-verify the device and serve the export again".into(),
                operation_id: None,
                applied: false,
            }],
        };
        let out = reconcile_report(&r);
        assert!(
            out.starts_with("dry run: 3 volume(s) checked, 1 difference(s)"),
            "{out}"
        );
        assert!(out.contains("export_missing"), "{out}");
        assert!(out.contains("reexport"), "{out}");
        assert!(out.contains("--apply"), "{out}");
    }

    #[test]
    fn appliance_shows_problem() {
        let out = appliance_detail(&Appliance {
            vm_id: None,
            source: ApplianceSource::Unknown,
            verified: false,
            vm_name: None,
            vm_state: None,
            problem: Some("set appliance_vm_id".into()),
        });
        assert!(
            out.contains("problem:") && out.contains("set appliance_vm_id"),
            "{out}"
        );
    }
}
