//! Fault injection: the fault specifications (JSON shapes of `--fault` and `/sim/faults`), the shared
//! set of active faults, the decisions the simulator asks of it (deterministic under the seed), and the
//! actions taken behind the client's back (stop or start a VM, detach a volume).

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::ActionError;
use crate::model::{CsError, VmState};

/// What the cloud does when told to act behind the client's back; implemented by the engine.
pub(crate) trait Actions: Send + Sync + std::fmt::Debug {
    fn set_vm_state(&self, vm_id: &str, state: VmState) -> Result<serde_json::Value, CsError>;
    fn force_detach(&self, volume_id: &str) -> Result<serde_json::Value, CsError>;
    fn deploy_vm(&self, name: &str) -> Result<serde_json::Value, CsError>;
}

fn one() -> u32 {
    1
}

fn internal_error_code() -> u16 {
    530
}

fn ok_status() -> u16 {
    200
}

/// One fault. Command names match case-insensitively; `count` is how many times the fault fires
/// before it is used up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultSpec {
    /// Fail the next `count` calls of `command` with `errorcode` (also the HTTP status), `cserrorcode`, `errortext`.
    /// With `probability` each call fails with that probability (drawn from the seeded generator).
    FailCommand {
        command: String,
        #[serde(default = "one")]
        count: u32,
        #[serde(default = "internal_error_code")]
        errorcode: u16,
        #[serde(default)]
        cserrorcode: Option<u32>,
        #[serde(default)]
        errortext: Option<String>,
        #[serde(default)]
        probability: Option<f64>,
    },
    /// Carry out the next `count` calls of `command`, then answer each with HTTP `status` and `body` as given
    /// instead of CloudStack's answer: a proxy's error page after the management server acted, an internal
    /// error raised after the change was made, an empty or cut-off body.
    ReplaceAnswer {
        command: String,
        #[serde(default = "one")]
        count: u32,
        #[serde(default = "ok_status")]
        status: u16,
        #[serde(default)]
        body: String,
    },
    /// Answer the next `count` requests (any command) with HTTP 429.
    Throttle {
        #[serde(default = "one")]
        count: u32,
        #[serde(default)]
        probability: Option<f64>,
    },
    /// The answers to the next `count` calls of `command` come `delay_ms` late (a management server under load).
    SlowCommand {
        command: String,
        delay_ms: u64,
        #[serde(default = "one")]
        count: u32,
    },
    /// The next `count` jobs of `command` take `extra_delay_ms` longer.
    SlowJob {
        command: String,
        extra_delay_ms: u64,
        #[serde(default = "one")]
        count: u32,
    },
    /// The next `count` jobs of `command` fail (jobstatus 2) with `errorcode` and `errortext`.
    FailJob {
        command: String,
        #[serde(default = "one")]
        count: u32,
        #[serde(default = "internal_error_code")]
        errorcode: u16,
        #[serde(default)]
        errortext: Option<String>,
    },
    /// The next `count` detaches from the appliance (of `volume_id`, or any) leave the by-id link behind.
    KeepLinkOnDetach {
        #[serde(default)]
        volume_id: Option<String>,
        #[serde(default = "one")]
        count: u32,
    },
    /// The next `count` attaches to the appliance (of `volume_id`, or any) make no by-id link.
    SkipLinkOnAttach {
        #[serde(default)]
        volume_id: Option<String>,
        #[serde(default = "one")]
        count: u32,
    },
    /// Until cleared, listVolumes and job results report `size + delta_bytes` for `volume_id` (or every volume).
    WrongSize {
        #[serde(default)]
        volume_id: Option<String>,
        delta_bytes: i64,
    },
}

impl FaultSpec {
    /// Parses the JSON form used by `--fault` and `POST /sim/faults`.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[derive(Debug)]
struct Inner {
    faults: Vec<FaultSpec>,
    rng: StdRng,
}

/// The active faults, shared between the HTTP layer, the job runner and Rust callers.
#[derive(Debug, Clone)]
pub struct FaultHandle {
    inner: Arc<Mutex<Inner>>,
    actions: Arc<OnceLock<Weak<dyn Actions>>>,
}

fn same_command(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn matches_volume(filter: Option<&String>, volume_id: &str) -> bool {
    filter.is_none_or(|v| v == volume_id)
}

impl FaultHandle {
    /// A fault set drawing its random decisions from `seed`.
    pub fn new(seed: u64, faults: Vec<FaultSpec>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                faults,
                rng: StdRng::seed_from_u64(seed ^ 0xFA17),
            })),
            actions: Arc::new(OnceLock::new()),
        }
    }

    /// Connects the handle to the cloud it acts on.
    pub(crate) fn bind(&self, actions: Weak<dyn Actions>) {
        let _ = self.actions.set(actions);
    }

    fn act<T>(&self, f: impl FnOnce(&dyn Actions) -> Result<T, CsError>) -> Result<T, ActionError> {
        let actions = self
            .actions
            .get()
            .and_then(Weak::upgrade)
            .ok_or(ActionError::NotRunning)?;
        f(actions.as_ref()).map_err(|e| ActionError::Refused {
            errortext: e.errortext,
        })
    }

    /// Stops a VM at once, without a job, as if an operator or HA had done it.
    pub fn stop_vm(&self, vm_id: &str) -> Result<(), ActionError> {
        self.act(|a| a.set_vm_state(vm_id, VmState::Stopped))
            .map(drop)
    }

    /// Starts a VM at once, without a job.
    pub fn start_vm(&self, vm_id: &str) -> Result<(), ActionError> {
        self.act(|a| a.set_vm_state(vm_id, VmState::Running))
            .map(drop)
    }

    /// Detaches a volume at once, without a job and without CloudStack's checks (its device and link
    /// disappear as on a real detach).
    pub fn detach_volume(&self, volume_id: &str) -> Result<(), ActionError> {
        self.act(|a| a.force_detach(volume_id)).map(drop)
    }

    /// Adds a running KVM VM named `name` with its ROOT volume (as if deployed); returns the VM object.
    pub fn deploy_vm(&self, name: &str) -> Result<serde_json::Value, ActionError> {
        self.act(|a| a.deploy_vm(name))
    }

    /// Like [`FaultHandle::stop_vm`]/[`FaultHandle::start_vm`], returning the VM object (for `/sim/vms`).
    pub(crate) fn set_vm_state_json(
        &self,
        vm_id: &str,
        state: VmState,
    ) -> Result<serde_json::Value, ActionError> {
        self.act(|a| a.set_vm_state(vm_id, state))
    }

    /// Like [`FaultHandle::detach_volume`], returning the volume object (for `/sim/volumes`).
    pub(crate) fn detach_volume_json(
        &self,
        volume_id: &str,
    ) -> Result<serde_json::Value, ActionError> {
        self.act(|a| a.force_detach(volume_id))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a fault.
    pub fn add(&self, fault: FaultSpec) {
        self.lock().faults.push(fault);
    }

    /// Removes every fault.
    pub fn clear(&self) {
        self.lock().faults.clear();
    }

    /// The active faults with their remaining counts.
    pub fn list(&self) -> Vec<FaultSpec> {
        self.lock().faults.clone()
    }

    /// Finds the first fault `pick` accepts, lets it fire (decrementing its count, dropping it at zero)
    /// and returns what `pick` made of it.
    fn fire<T>(&self, mut pick: impl FnMut(&FaultSpec, &mut StdRng) -> Option<T>) -> Option<T> {
        let mut inner = self.lock();
        let Inner { faults, rng } = &mut *inner;
        let mut hit = None;
        for (i, f) in faults.iter().enumerate() {
            if let Some(v) = pick(f, rng) {
                hit = Some((i, v));
                break;
            }
        }
        let (i, value) = hit?;
        let used_up = match &mut faults[i] {
            FaultSpec::FailCommand { count, .. }
            | FaultSpec::ReplaceAnswer { count, .. }
            | FaultSpec::Throttle { count, .. }
            | FaultSpec::SlowCommand { count, .. }
            | FaultSpec::SlowJob { count, .. }
            | FaultSpec::FailJob { count, .. }
            | FaultSpec::KeepLinkOnDetach { count, .. }
            | FaultSpec::SkipLinkOnAttach { count, .. } => {
                *count = count.saturating_sub(1);
                *count == 0
            }
            FaultSpec::WrongSize { .. } => false,
        };
        if used_up {
            faults.remove(i);
        }
        Some(value)
    }

    fn chance(rng: &mut StdRng, p: Option<f64>) -> bool {
        match p {
            None => true,
            Some(p) => rng.gen_bool(p.clamp(0.0, 1.0)),
        }
    }

    /// Whether this request is answered with 429.
    pub(crate) fn take_throttle(&self) -> bool {
        self.fire(|f, rng| match f {
            FaultSpec::Throttle { count, probability }
                if *count > 0 && Self::chance(rng, *probability) =>
            {
                Some(())
            }
            _ => None,
        })
        .is_some()
    }

    /// The error this call of `command` fails with, if any.
    pub(crate) fn take_command_failure(&self, command: &str) -> Option<CsError> {
        self.fire(|f, rng| match f {
            FaultSpec::FailCommand {
                command: c,
                count,
                errorcode,
                cserrorcode,
                errortext,
                probability,
            } if *count > 0 && same_command(c, command) && Self::chance(rng, *probability) => {
                Some(CsError {
                    errorcode: *errorcode,
                    cserrorcode: cserrorcode.unwrap_or(4250),
                    errortext: errortext
                        .clone()
                        .unwrap_or_else(|| format!("Simulated failure of {command}")),
                })
            }
            _ => None,
        })
    }

    /// The HTTP status and body that replace the answer to this call of `command`, once it was carried out.
    pub(crate) fn take_answer_replacement(&self, command: &str) -> Option<(u16, String)> {
        self.fire(|f, _| match f {
            FaultSpec::ReplaceAnswer {
                command: c,
                count,
                status,
                body,
            } if *count > 0 && same_command(c, command) => Some((*status, body.clone())),
            _ => None,
        })
    }

    /// How late the answer to this call of `command` comes.
    pub(crate) fn take_command_delay(&self, command: &str) -> Duration {
        self.fire(|f, _| match f {
            FaultSpec::SlowCommand {
                command: c,
                delay_ms,
                count,
            } if *count > 0 && same_command(c, command) => Some(Duration::from_millis(*delay_ms)),
            _ => None,
        })
        .unwrap_or_default()
    }

    /// Extra delay for a job of `command` being submitted now.
    pub(crate) fn take_job_delay(&self, command: &str) -> Duration {
        self.fire(|f, _| match f {
            FaultSpec::SlowJob {
                command: c,
                extra_delay_ms,
                count,
            } if *count > 0 && same_command(c, command) => {
                Some(Duration::from_millis(*extra_delay_ms))
            }
            _ => None,
        })
        .unwrap_or_default()
    }

    /// The error a job of `command` finishing now fails with, if any.
    pub(crate) fn take_job_failure(&self, command: &str) -> Option<CsError> {
        self.fire(|f, _| match f {
            FaultSpec::FailJob {
                command: c,
                count,
                errorcode,
                errortext,
            } if *count > 0 && same_command(c, command) => Some(CsError {
                errorcode: *errorcode,
                cserrorcode: if *errorcode == 431 { 4350 } else { 9999 },
                errortext: errortext
                    .clone()
                    .unwrap_or_else(|| format!("Simulated failure of the {command} job")),
            }),
            _ => None,
        })
    }

    /// Whether detaching `volume_id` from the appliance leaves its link behind.
    pub(crate) fn take_keep_link(&self, volume_id: &str) -> bool {
        self.fire(|f, _| match f {
            FaultSpec::KeepLinkOnDetach {
                volume_id: v,
                count,
            } if *count > 0 && matches_volume(v.as_ref(), volume_id) => Some(()),
            _ => None,
        })
        .is_some()
    }

    /// Whether attaching `volume_id` to the appliance makes no link.
    pub(crate) fn take_skip_link(&self, volume_id: &str) -> bool {
        self.fire(|f, _| match f {
            FaultSpec::SkipLinkOnAttach {
                volume_id: v,
                count,
            } if *count > 0 && matches_volume(v.as_ref(), volume_id) => Some(()),
            _ => None,
        })
        .is_some()
    }

    /// The size reported for `volume_id` whose real size is `real`.
    pub(crate) fn reported_size(&self, volume_id: &str, real: u64) -> u64 {
        let inner = self.lock();
        for f in &inner.faults {
            if let FaultSpec::WrongSize {
                volume_id: v,
                delta_bytes,
            } = f
            {
                if matches_volume(v.as_ref(), volume_id) {
                    return real.saturating_add_signed(*delta_bytes);
                }
            }
        }
        real
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documented_shapes() {
        let f = FaultSpec::parse(
            r#"{"type":"fail_command","command":"attachVolume","count":2,"errorcode":431}"#,
        )
        .expect("parse");
        assert_eq!(
            f,
            FaultSpec::FailCommand {
                command: "attachVolume".into(),
                count: 2,
                errorcode: 431,
                cserrorcode: None,
                errortext: None,
                probability: None
            }
        );
        assert!(FaultSpec::parse(r#"{"type":"throttle"}"#).is_ok());
        assert_eq!(
            FaultSpec::parse(r#"{"type":"replace_answer","command":"createVolume","status":502}"#)
                .expect("parse"),
            FaultSpec::ReplaceAnswer {
                command: "createVolume".into(),
                count: 1,
                status: 502,
                body: String::new()
            }
        );
        assert!(FaultSpec::parse(r#"{"type":"wrong_size","delta_bytes":-4096}"#).is_ok());
        assert!(FaultSpec::parse(r#"{"type":"throttle","bogus":1}"#).is_err());
        assert!(FaultSpec::parse(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn counted_faults_fire_then_vanish() {
        let h = FaultHandle::new(1, vec![]);
        h.add(
            FaultSpec::parse(r#"{"type":"fail_command","command":"listZones","count":2}"#)
                .expect("parse"),
        );
        assert!(h.take_command_failure("listVolumes").is_none());
        assert_eq!(
            h.take_command_failure("LISTZONES").map(|e| e.errorcode),
            Some(530)
        );
        assert!(h.take_command_failure("listZones").is_some());
        assert!(h.take_command_failure("listZones").is_none());
        assert!(h.list().is_empty());
    }

    #[test]
    fn probabilistic_faults_repeat_under_the_same_seed() {
        let run = |seed| {
            let h = FaultHandle::new(
                seed,
                vec![FaultSpec::Throttle {
                    count: 1000,
                    probability: Some(0.5),
                }],
            );
            (0..64).map(|_| h.take_throttle()).collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }

    #[test]
    fn wrong_size_stays_until_cleared() {
        let h = FaultHandle::new(
            1,
            vec![FaultSpec::WrongSize {
                volume_id: Some("a".into()),
                delta_bytes: -10,
            }],
        );
        assert_eq!(h.reported_size("a", 100), 90);
        assert_eq!(h.reported_size("a", 100), 90);
        assert_eq!(h.reported_size("b", 100), 100);
        h.clear();
        assert_eq!(h.reported_size("a", 100), 100);
    }
}
