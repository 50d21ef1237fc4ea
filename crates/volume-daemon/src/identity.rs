//! The appliance's own identity: which CloudStack VM this daemon runs in. It comes from configuration, the
//! database (`PUT /api/v1/appliance`) or detection (DMI product UUID, cloud-init instance data), and is verified
//! against the cloud. An unknown or unverified identity fails every request that depends on it: an attach is
//! never silently treated as remote.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use tokio::sync::{watch, RwLock};

use crate::cloud::{Cloud, CloudError, CloudErrorKind};
use crate::store::{ApplianceRecord, Store};

/// Where an identity came from (the wire's `source`).
pub use volume_api::ApplianceSource as IdentitySource;

/// The current identity and what is known about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityState {
    pub vm_id: Option<String>,
    pub source: IdentitySource,
    pub verified: bool,
    pub vm_name: Option<String>,
    pub vm_state: Option<String>,
    pub problem: Option<String>,
}

/// Why the identity cannot be used. A failed CloudStack call is kept as the source.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the appliance VM identity is unknown: {0}")]
    Unknown(String),
    #[error("the appliance VM identity {vm_id} is not verified: VM {vm_id} does not exist in CloudStack")]
    Unverified { vm_id: String },
    #[error("the appliance VM identity {vm_id} is not verified: CloudStack lookup failed")]
    LookupFailed {
        vm_id: String,
        #[source]
        source: CloudError,
    },
    #[error("the appliance identity is set by {0} and cannot be changed through the API; change it there")]
    Fixed(&'static str),
    #[error("VM {0} does not exist in CloudStack; give the appliance's own VM id")]
    NoSuchVm(String),
    #[error("cannot verify VM {vm_id} with CloudStack")]
    CloudUnavailable {
        vm_id: String,
        #[source]
        source: CloudError,
    },
}

/// Where to look for the identity when configuration and database have none.
#[derive(Debug, Clone)]
pub struct DetectionSources {
    /// `/sys/class/dmi/id/product_uuid` under the configured sysfs root.
    pub dmi_product_uuid: PathBuf,
    /// cloud-init's `instance-data.json`.
    pub cloud_init_instance_data: PathBuf,
}

impl DetectionSources {
    pub fn under(sys_dir: &Path) -> Self {
        Self {
            dmi_product_uuid: sys_dir.join("class/dmi/id/product_uuid"),
            cloud_init_instance_data: PathBuf::from("/run/cloud-init/instance-data.json"),
        }
    }

    /// Candidate VM ids, most trusted first.
    pub fn candidates(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Ok(text) = std::fs::read_to_string(&self.cloud_init_instance_data) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(id) = v
                    .pointer("/v1/instance_id")
                    .or_else(|| v.pointer("/v1/instance-id"))
                    .and_then(|x| x.as_str())
                {
                    out.push((
                        id.to_string(),
                        self.cloud_init_instance_data.display().to_string(),
                    ));
                }
            }
        }
        if let Ok(text) = std::fs::read_to_string(&self.dmi_product_uuid) {
            let id = text.trim().to_ascii_lowercase();
            if !id.is_empty() {
                out.push((id, self.dmi_product_uuid.display().to_string()));
            }
        }
        out
    }
}

/// The identity holder shared by the engine and the API.
#[derive(Clone)]
pub struct Identity {
    state: Arc<RwLock<IdentityState>>,
    /// Whether the identity is verified now; follows every change of `state`.
    verified: Arc<watch::Sender<bool>>,
    cloud: Arc<dyn Cloud>,
    store: Store,
    fixed_by: Option<IdentitySource>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fixed_by", &self.fixed_by)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Establishes the identity: `configured` (config file or simulator) wins, then the database, then detection.
    /// Verification failures are recorded in the state (and reported by `/health`), not returned.
    pub async fn establish(
        configured: Option<(String, IdentitySource)>,
        store: Store,
        cloud: Arc<dyn Cloud>,
        detection: &DetectionSources,
    ) -> Self {
        let fixed_by = configured.as_ref().map(|(_, s)| *s);
        let state = Self::resolve(configured, Some(&store), cloud.as_ref(), detection).await;
        let (verified, _) = watch::channel(state.verified);
        Self {
            state: Arc::new(RwLock::new(state)),
            verified: Arc::new(verified),
            cloud,
            store,
            fixed_by,
        }
    }

    /// The identity as [`Identity::establish`] finds and verifies it, without keeping it: `store` is the
    /// database to read a stored identity from, `None` where there is none yet (`check` on a fresh install).
    pub async fn resolve(
        configured: Option<(String, IdentitySource)>,
        store: Option<&Store>,
        cloud: &dyn Cloud,
        detection: &DetectionSources,
    ) -> IdentityState {
        let mut state = IdentityState {
            vm_id: None,
            source: IdentitySource::Unknown,
            verified: false,
            vm_name: None,
            vm_state: None,
            problem: None,
        };
        if let Some((id, source)) = configured {
            state.vm_id = Some(id);
            state.source = source;
        } else if let Some(store) = store {
            match store.get_appliance().await {
                Ok(Some(rec)) => {
                    state.vm_id = Some(rec.vm_id);
                    state.source = IdentitySource::Database;
                }
                Ok(None) => {}
                Err(e) => {
                    state.problem = Some(format!(
                        "cannot read the stored identity: {}",
                        crate::error_chain(&e)
                    ));
                }
            }
        }
        if state.vm_id.is_none() && state.problem.is_none() {
            let candidates = detection.candidates();
            if candidates.is_empty() {
                state.problem = Some(
                    "not configured (appliance_vm_id), not stored (PUT /api/v1/appliance) and not detectable \
                     (no DMI product UUID or cloud-init instance data)"
                        .into(),
                );
            }
            for (id, from) in candidates {
                match cloud.get_vm(&id).await {
                    Ok(Some(_)) => {
                        tracing::info!(vm_id = %id, source = %from, "appliance identity detected");
                        state.vm_id = Some(id);
                        state.source = IdentitySource::Detected;
                        break;
                    }
                    Ok(None) => {
                        state.problem = Some(format!(
                            "detected VM id {id} (from {from}) does not exist in CloudStack"
                        ));
                    }
                    Err(e) => {
                        state.problem = Some(format!(
                            "cannot verify detected VM id {id} (from {from}): {}",
                            e.chain()
                        ));
                    }
                }
            }
        }
        if let Some(id) = state.vm_id.clone() {
            let outcome = cloud.get_vm(&id).await;
            let _ = record_lookup(&mut state, id, outcome);
        }
        state
    }

    /// The same identity, storing through `store` (the store bound to the appliance's lease).
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = store;
        self
    }

    /// Whether the identity is verified, now and at every change (a set through the API, a re-verification).
    pub fn verified(&self) -> watch::Receiver<bool> {
        self.verified.subscribe()
    }

    /// The state as it is now.
    pub async fn current(&self) -> IdentityState {
        self.state.read().await.clone()
    }

    /// Re-checks the current identity against the cloud; updates the state.
    pub async fn verify(&self) -> Result<String, IdentityError> {
        let id = {
            let s = self.state.read().await;
            match &s.vm_id {
                Some(id) => id.clone(),
                None => {
                    return Err(IdentityError::Unknown(
                        s.problem.clone().unwrap_or_else(|| "not set".into()),
                    ))
                }
            }
        };
        let outcome = self.cloud.get_vm(&id).await;
        let mut s = self.state.write().await;
        let result = record_lookup(&mut s, id, outcome);
        self.verified.send_replace(s.verified);
        result
    }

    /// The verified appliance VM id, re-verifying when the last check failed.
    pub async fn require(&self) -> Result<String, IdentityError> {
        {
            let s = self.state.read().await;
            if s.verified {
                if let Some(id) = &s.vm_id {
                    return Ok(id.clone());
                }
            }
        }
        self.verify().await
    }

    /// Sets the identity through the API: verified with the cloud first; then, on a store bound to a lease,
    /// the lease moves to the new identity ([`Store::move_lease`]: refused with `LeaseHeld` while another
    /// daemon holds that appliance's lease, and the records this daemon wrote go with it); then stored.
    pub async fn set(&self, vm_id: &str) -> Result<IdentityState, IdentitySetError> {
        if let Some(src) = self.fixed_by {
            return Err(IdentitySetError::Identity(IdentityError::Fixed(
                src.as_str(),
            )));
        }
        let vm = match self.cloud.get_vm(vm_id).await {
            Ok(Some(vm)) => vm,
            Ok(None) => {
                return Err(IdentitySetError::Identity(IdentityError::NoSuchVm(
                    vm_id.to_string(),
                )))
            }
            Err(e) if e.kind == CloudErrorKind::NotFound => {
                return Err(IdentitySetError::Identity(IdentityError::NoSuchVm(
                    vm_id.to_string(),
                )))
            }
            Err(e) => {
                return Err(IdentitySetError::Identity(
                    IdentityError::CloudUnavailable {
                        vm_id: vm_id.to_string(),
                        source: e,
                    },
                ))
            }
        };
        if self.store.lease().is_some() && self.store.owner() != vm_id {
            let lease = self.store.move_lease(vm_id).await.map_err(|e| match e {
                e @ crate::store::StoreError::LeaseHeld { .. } => IdentitySetError::LeaseHeld(e),
                e => IdentitySetError::Store(e),
            })?;
            tracing::info!(appliance = %vm_id, token = lease.token(), "appliance lease taken");
        }
        self.store
            .set_appliance(&ApplianceRecord {
                vm_id: vm_id.to_string(),
                source: IdentitySource::Database.as_str().to_string(),
                updated_at: Utc::now(),
            })
            .await
            .map_err(IdentitySetError::Store)?;
        let mut s = self.state.write().await;
        *s = IdentityState {
            vm_id: Some(vm_id.to_string()),
            source: IdentitySource::Database,
            verified: true,
            vm_name: Some(vm.name),
            vm_state: Some(vm.state),
            problem: None,
        };
        self.verified.send_replace(true);
        Ok(s.clone())
    }
}

/// Records in `s` what the cloud said about VM `id`, the current identity.
fn record_lookup(
    s: &mut IdentityState,
    id: String,
    outcome: Result<Option<crate::cloud::CloudVm>, CloudError>,
) -> Result<String, IdentityError> {
    match outcome {
        Ok(Some(vm)) => {
            s.verified = true;
            s.vm_name = Some(vm.name);
            s.vm_state = Some(vm.state);
            s.problem = None;
            Ok(id)
        }
        Ok(None) => {
            s.verified = false;
            s.problem = Some(format!("VM {id} does not exist in CloudStack"));
            Err(IdentityError::Unverified { vm_id: id })
        }
        Err(e) => {
            s.verified = false;
            s.problem = Some(format!("CloudStack lookup failed: {}", e.chain()));
            Err(IdentityError::LookupFailed {
                vm_id: id,
                source: e,
            })
        }
    }
}

/// Failure of [`Identity::set`].
#[derive(Debug, thiserror::Error)]
pub enum IdentitySetError {
    #[error(transparent)]
    Identity(IdentityError),
    #[error("cannot store the appliance identity")]
    Store(#[source] crate::store::StoreError),
    /// Another daemon holds the lease of the VM named: this one must not act for that appliance.
    #[error("the appliance identity is not changed")]
    LeaseHeld(#[source] crate::store::StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_reads_cloud_init_then_dmi() {
        let dir = tempfile::tempdir().unwrap();
        let dmi = dir.path().join("product_uuid");
        let ci = dir.path().join("instance-data.json");
        std::fs::write(&dmi, "4C4C4544-0000-1111-2222-333344445555\n").unwrap();
        let src = DetectionSources {
            dmi_product_uuid: dmi,
            cloud_init_instance_data: ci.clone(),
        };
        assert_eq!(
            src.candidates()[0].0,
            "4c4c4544-0000-1111-2222-333344445555"
        );
        std::fs::write(&ci, r#"{"v1":{"instance_id":"vm-from-cloud-init"}}"#).unwrap();
        let c = src.candidates();
        assert_eq!(c[0].0, "vm-from-cloud-init");
        assert_eq!(c.len(), 2);
    }
}
