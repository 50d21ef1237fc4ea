//! Upgrade in place: what a predecessor left (its `device_mappings` rows in the hub and the cloud's
//! attachments to the appliance) becomes the daemon's, through the existing adoption (`repair` operations of
//! kind `adopt`): each is journaled and run like any operation, so an appliance volume's device is verified by
//! identity, size and "not in use by the appliance" before it is named and served, and a volume attached to
//! another VM is recorded as a remote attachment once CloudStack confirms it. A hub row that CloudStack
//! contradicts is rewritten from the daemon's state. Nothing is asked of CloudStack.

use std::collections::{BTreeMap, HashSet};

use uuid::Uuid;
use volume_api::RepairKind;

use super::Hub;
use crate::cloud::{Cloud, CloudError, CloudErrorKind, CloudVolume};
use crate::engine::Request;
use crate::store::{NewOperation, OsseaChange, Store, StoreError};

/// Why an import could not be planned or journaled.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read the daemon's database")]
    Store(#[from] StoreError),
    #[error("cannot read the hub's device_mappings")]
    Hub(#[from] super::HubError),
    #[error("cannot ask CloudStack about the appliance's volumes")]
    Cloud(#[source] CloudError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("the daemon is running (stop it first, or plan only with --dry-run)")]
    Running(#[source] crate::statedir::StateDirError),
    #[error("cannot set up the CloudStack client")]
    CloudClient(#[source] Box<crate::daemon::DaemonError>),
    #[error("cannot prepare the state directory")]
    StateDir(#[source] crate::statedir::StateDirError),
    #[error("the appliance's identity is needed to find its volumes")]
    Identity(#[source] crate::identity::IdentityError),
}

/// What the import does with one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ImportAction {
    /// Attached to the appliance and unmanaged: adopted (device verified, named, served).
    Adopt,
    /// Attached to another VM and unmanaged: recorded as a remote attachment.
    AdoptRemote,
    /// A hub row CloudStack contradicts (detached, another VM, gone): rewritten from the daemon's state.
    RewriteHubRow,
    /// Already managed by the daemon, or an adoption is already journaled.
    AlreadyManaged,
    /// Never adopted (the appliance's own root disk, an id that is not a volume id).
    Skip,
}

impl ImportAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Adopt => "adopt",
            Self::AdoptRemote => "adopt-remote",
            Self::RewriteHubRow => "rewrite-hub-row",
            Self::AlreadyManaged => "already-managed",
            Self::Skip => "skip",
        }
    }
}

/// One line of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportItem {
    pub volume_id: String,
    pub action: ImportAction,
    pub vm_id: Option<String>,
    pub detail: String,
}

/// What an import would do, volume by volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportPlan {
    pub items: Vec<ImportItem>,
}

impl ImportPlan {
    /// How many items have `action`.
    pub fn count(&self, action: ImportAction) -> usize {
        self.items.iter().filter(|i| i.action == action).count()
    }
}

/// Plans the import for the appliance `appliance`: reads the daemon's records, the cloud's attachments to
/// the appliance and (with a hub) the hub's mappings, and changes nothing.
pub async fn plan(
    store: &Store,
    cloud: &dyn Cloud,
    hub: Option<&Hub>,
    appliance: &str,
) -> Result<ImportPlan, ImportError> {
    let managed: HashSet<Uuid> = store
        .list_attachments(&Default::default())
        .await?
        .into_iter()
        .map(|a| a.volume_id)
        .collect();
    let queued: HashSet<Uuid> = store
        .unfinished_operations()
        .await?
        .into_iter()
        .filter_map(|o| o.volume_id)
        .collect();
    let mut items: BTreeMap<String, ImportItem> = BTreeMap::new();
    let on_appliance = cloud
        .volumes_of_vm(appliance)
        .await
        .map_err(ImportError::Cloud)?;
    for cv in &on_appliance {
        items.insert(
            cv.id.clone(),
            classify(cv, appliance, &managed, &queued, None),
        );
    }
    if let Some(hub) = hub {
        for mut m in hub.device_mappings().await? {
            // A volume id written in another spelling (upper case) is the same volume: one item, by the
            // id as CloudStack spells it.
            if let Ok(id) = Uuid::parse_str(m.volume_uuid.trim()) {
                m.volume_uuid = id.to_string();
            }
            if items.contains_key(&m.volume_uuid) {
                continue;
            }
            let item = match Uuid::parse_str(&m.volume_uuid) {
                Err(_) => ImportItem {
                    volume_id: m.volume_uuid.clone(),
                    action: ImportAction::Skip,
                    vm_id: Some(m.vm_id.clone()),
                    detail: "the hub row's volume_uuid is not a volume id; left as it is".into(),
                },
                Ok(_) => match cloud.get_volume(&m.volume_uuid).await {
                    Ok(Some(cv)) if cv.vm_id.is_some() => {
                        classify(&cv, appliance, &managed, &queued, Some(&m))
                    }
                    Ok(Some(_)) => ImportItem {
                        volume_id: m.volume_uuid.clone(),
                        action: ImportAction::RewriteHubRow,
                        vm_id: Some(m.vm_id.clone()),
                        detail: format!(
                            "the hub maps it to VM {} at {}, but CloudStack has it detached",
                            m.vm_id, m.device_path
                        ),
                    },
                    Ok(None) => gone(&m),
                    Err(e) if e.kind == CloudErrorKind::NotFound => gone(&m),
                    Err(e) => return Err(ImportError::Cloud(e)),
                },
            };
            items.insert(m.volume_uuid.clone(), item);
        }
        // Export rows of volumes without a mapping: the predecessor's nbd-server no longer serves them.
        for (volume, export_name) in hub.export_rows().await? {
            let Ok(id) = Uuid::parse_str(volume.trim()) else {
                continue;
            };
            let volume = id.to_string();
            if items.contains_key(&volume) {
                continue;
            }
            let stale = |what: &str| ImportItem {
                volume_id: volume.clone(),
                action: ImportAction::RewriteHubRow,
                vm_id: None,
                detail: format!("the hub has export {export_name:?} of it, but CloudStack {what}"),
            };
            let item = match cloud.get_volume(&volume).await {
                Ok(Some(cv)) if cv.vm_id.is_some() => {
                    classify(&cv, appliance, &managed, &queued, None)
                }
                Ok(Some(_)) => stale("has it detached"),
                Ok(None) => stale("does not know the volume"),
                Err(e) if e.kind == CloudErrorKind::NotFound => stale("does not know the volume"),
                Err(e) => return Err(ImportError::Cloud(e)),
            };
            items.insert(volume, item);
        }
    }
    Ok(ImportPlan {
        items: items.into_values().collect(),
    })
}

fn gone(m: &super::HubMapping) -> ImportItem {
    ImportItem {
        volume_id: m.volume_uuid.clone(),
        action: ImportAction::RewriteHubRow,
        vm_id: Some(m.vm_id.clone()),
        detail: format!(
            "the hub maps it to VM {} at {}, but CloudStack does not know the volume",
            m.vm_id, m.device_path
        ),
    }
}

/// What to do with a volume CloudStack has attached to a VM.
fn classify(
    cv: &CloudVolume,
    appliance: &str,
    managed: &HashSet<Uuid>,
    queued: &HashSet<Uuid>,
    hub_row: Option<&super::HubMapping>,
) -> ImportItem {
    let vm = cv.vm_id.clone();
    let item = |action, detail: String| ImportItem {
        volume_id: cv.id.clone(),
        action,
        vm_id: vm.clone(),
        detail,
    };
    let Ok(id) = Uuid::parse_str(&cv.id) else {
        return item(
            ImportAction::Skip,
            "CloudStack's volume id is not a UUID".into(),
        );
    };
    let on_appliance = vm.as_deref() == Some(appliance);
    if on_appliance && (cv.device_id == Some(0) || cv.volume_type.as_deref() == Some("ROOT")) {
        return item(
            ImportAction::Skip,
            "the appliance's own root disk; never adopted".into(),
        );
    }
    if managed.contains(&id) {
        return item(
            ImportAction::AlreadyManaged,
            "the daemon already records its attachment".into(),
        );
    }
    if queued.contains(&id) {
        return item(
            ImportAction::AlreadyManaged,
            "an operation on it is already journaled; it runs at the next start".into(),
        );
    }
    let hub_note = match hub_row {
        Some(m) => format!(" (hub row: VM {} at {})", m.vm_id, m.device_path),
        None => String::new(),
    };
    let device = cv
        .device_id
        .map_or("unknown".to_string(), |d| d.to_string());
    if on_appliance {
        item(
            ImportAction::Adopt,
            format!(
                "{:?} attached to the appliance, device id {device}: its device is verified, named and served{hub_note}",
                cv.name
            ),
        )
    } else {
        item(
            ImportAction::AdoptRemote,
            format!(
                "{:?} attached to VM {}, device id {device}: recorded as a remote attachment{hub_note}",
                cv.name,
                vm.as_deref().unwrap_or("?")
            ),
        )
    }
}

/// Journals the plan: an `adopt` repair per volume to adopt (run by the engine: at the next start when
/// journaled by `volume-daemon import`, or right away at start-up with `hub_import_on_start`), and the
/// daemon's state of each contradicted hub row as a hub change (its `ossea_volumes` row marked `detached`
/// unless the daemon has the volume attached). Returns the ids of the journaled operations.
pub async fn journal(store: &Store, plan: &ImportPlan) -> Result<Vec<Uuid>, ImportError> {
    let mut seq = store.max_queue_seq().await?;
    let mut ops = Vec::new();
    for item in &plan.items {
        let Ok(volume_id) = Uuid::parse_str(&item.volume_id) else {
            continue;
        };
        match item.action {
            ImportAction::Adopt | ImportAction::AdoptRemote => {
                seq += 1;
                let req = Request::repair(volume_id, RepairKind::Adopt);
                let id = Uuid::new_v4();
                store
                    .insert_operation(&NewOperation {
                        id,
                        op_type: req.op_type(),
                        volume_id: Some(volume_id),
                        vm_id: None,
                        request: req.to_json(),
                        idempotency_key: None,
                        queue_seq: Some(seq),
                    })
                    .await?;
                ops.push(id);
            }
            ImportAction::RewriteHubRow => {
                // The hub's record of the volume follows too: `detached` unless the daemon has it attached.
                let ossea = match store.get_attachment(volume_id).await? {
                    Some(_) => OsseaChange::Attached,
                    None => OsseaChange::Detached,
                };
                store.record_hub_states(&[(volume_id, ossea)]).await?;
            }
            ImportAction::AlreadyManaged | ImportAction::Skip => {}
        }
    }
    Ok(ops)
}

/// `volume-daemon import`: plans the import for the configured appliance and, unless `dry_run`, journals it
/// for the next start (the daemon must be stopped: its state directory is locked meanwhile). A dry run
/// changes nothing anywhere (a database that does not exist yet or was never migrated counts as empty).
pub async fn run(
    cfg: &crate::config::Config,
    dry_run: bool,
) -> Result<(ImportPlan, Vec<Uuid>), ImportError> {
    use std::sync::Arc;
    cfg.validate()?;
    let _lock = if dry_run {
        None
    } else {
        Some(crate::statedir::StateDirLock::acquire(&cfg.state_dir).map_err(ImportError::Running)?)
    };
    let url = cfg.effective_database_url();
    let fresh = crate::statedir::sqlite_path(&url).is_some_and(|p| !p.exists());
    let mut scratch = None;
    let mut store = if dry_run && fresh {
        let (s, guard) = scratch_store().await?;
        scratch = Some(guard);
        s
    } else {
        if !dry_run {
            crate::statedir::precreate_sqlite(&url).map_err(ImportError::StateDir)?;
        }
        let s = Store::connect(&url).await?;
        if !dry_run {
            s.migrate().await?;
            s
        } else if s.schema_versions().await.0.is_none() {
            s.close().await;
            let (s, guard) = scratch_store().await?;
            scratch = Some(guard);
            s
        } else {
            s
        }
    };
    let hub = cfg
        .hub_database_url
        .as_deref()
        .map(|u| Hub::new(u, 0))
        .transpose()?;
    if hub.is_some() && !dry_run {
        store.enable_hub_outbox();
    }
    let cloud: Arc<dyn Cloud> = Arc::new(crate::cloud::CloudStack::new(
        crate::daemon::cloud_client(cfg).map_err(|e| ImportError::CloudClient(Box::new(e)))?,
    ));
    let configured = match (&cfg.appliance_vm_id, &hub) {
        (Some(id), _) => Some((id.clone(), crate::identity::IdentitySource::Config)),
        (None, Some(h)) => super::appliance_identity(h)
            .await
            .map(|id| (id, crate::identity::IdentitySource::Hub)),
        (None, None) => None,
    };
    let identity = crate::identity::Identity::establish(
        configured,
        store.clone(),
        Arc::clone(&cloud),
        &crate::identity::DetectionSources::under(&cfg.sys_dir),
    )
    .await;
    let appliance = identity.require().await.map_err(ImportError::Identity)?;
    // The appliance's records, and for a real import its lease: a running daemon holds it, so the import
    // refuses to run beside one, and every write it journals is fenced like the daemon's.
    let store = match &_lock {
        None => store.reading_as(&appliance),
        Some(lock) => {
            let holder = crate::store::LeaseHolder {
                holder_id: lock.instance_id().map_err(ImportError::Running)?,
                host: rustix::system::uname()
                    .nodename()
                    .to_string_lossy()
                    .into_owned(),
                pid: std::process::id(),
            };
            let leased = store
                .acquire_lease(&appliance, &holder, cfg.lease_ttl())
                .await?;
            leased.claim_unowned().await?;
            leased
        }
    };
    let planned = plan(&store, cloud.as_ref(), hub.as_ref(), &appliance).await;
    let journaled = match (planned, dry_run) {
        (Ok(plan), true) => Ok((plan, Vec::new())),
        (Ok(plan), false) => journal(&store, &plan).await.map(|ops| (plan, ops)),
        (Err(e), _) => Err(e),
    };
    if !dry_run {
        store.release_lease().await?;
    }
    let (plan, ops) = journaled?;
    store.close().await;
    drop(scratch);
    Ok((plan, ops))
}

/// An empty, migrated scratch database (a SQLite file under the temp dir, removed when dropped): what a dry
/// run plans against before the daemon ever ran.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn scratch_store() -> Result<(Store, Scratch), ImportError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let path = std::env::temp_dir().join(format!(
        "volume-daemon-import-{}-{nanos}.db",
        std::process::id()
    ));
    let scratch = Scratch(path.clone());
    let s = Store::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?;
    s.migrate().await?;
    Ok((s, scratch))
}
