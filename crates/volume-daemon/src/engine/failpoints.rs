//! Fault injection at every journal write: each step an operation journals, and its commit, has a fail point
//! just before and just after the write, named `KIND.STEP.before` and `KIND.STEP.after` (e.g.
//! `attach.cloud_attach_job.after`, `delete.commit.before`). [`all`] lists every one, derived from the step
//! types, so a test can drive each in turn and notice one that is never reached.
//!
//! The points are evaluated only in a build with the `failpoints` feature (the crash test's); the shipped
//! binary has none and [`around`] is the write alone. In such a build the `FAILPOINTS` environment variable
//! arms them at start-up (`NAME=ACTIONS;…`, the `fail` crate's syntax): `return(kill)` kills the daemon with
//! SIGKILL at that point, `return(panic)` panics there (a defect in the workflow), `return` (any other
//! argument) makes that attempt of the write fail with a database error, e.g. `FAILPOINTS='attach.cloud_attach_job.after=return(kill)'`, `FAILPOINTS='create.commit.before=1*return'`.
//!
//! The delivery of the hub outbox has two more points, [`HUB_OUTBOX_POINTS`] (not journal writes, so not in
//! [`all`]): before a change is applied to the hub, and after the hub committed it but before it is marked
//! delivered in the daemon's database.

use std::future::Future;

use super::journal::{
    AttachStep, CleanupStep, CreateStep, DeleteStep, DetachStep, RepairStep, SnapshotCreateStep,
    SnapshotDeleteStep, SnapshotRevertStep, Step, COMMIT,
};
use crate::store::{OpType, StoreError};

/// Where a fail point sits relative to its journal write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum At {
    Before,
    After,
}

impl At {
    fn as_str(self) -> &'static str {
        match self {
            Self::Before => "before",
            Self::After => "after",
        }
    }
}

/// The name of the fail point of `step` (a stored step spelling, or `commit`) of an operation of `kind`.
pub(crate) fn name(kind: OpType, step: &str, at: At) -> String {
    let step = volume_api::OperationStep::parse_stored(step)
        .map(|s| s.as_str())
        .unwrap_or(step);
    format!("{}.{step}.{}", kind.as_str(), at.as_str())
}

/// The steps each kind of operation journals, in order, ending with its commit.
pub fn journaled_steps() -> Vec<(OpType, Vec<&'static str>)> {
    fn of<S: Step>() -> (OpType, Vec<&'static str>) {
        let mut steps: Vec<&'static str> = S::WRITTEN.iter().map(|s| s.wire().as_str()).collect();
        steps.push(COMMIT);
        (S::KIND, steps)
    }
    vec![
        of::<CreateStep>(),
        of::<AttachStep>(),
        of::<DetachStep>(),
        of::<DeleteStep>(),
        of::<RepairStep>(),
        of::<SnapshotCreateStep>(),
        of::<SnapshotRevertStep>(),
        of::<SnapshotDeleteStep>(),
        of::<CleanupStep>(),
    ]
}

/// The fail points of the hub outbox's delivery, in the order one change passes them.
pub const HUB_OUTBOX_POINTS: [&str; 2] = [HUB_OUTBOX_APPLY, HUB_OUTBOX_MARK];
/// Before a change of the hub outbox is applied to the hub.
pub(crate) const HUB_OUTBOX_APPLY: &str = "hub_outbox.apply.before";
/// After the hub committed a change, before it is marked delivered.
pub(crate) const HUB_OUTBOX_MARK: &str = "hub_outbox.mark_delivered.before";

/// Every fail point, in workflow order: for each kind, each journaled step before and after its write.
pub fn all() -> Vec<String> {
    journaled_steps()
        .into_iter()
        .flat_map(|(kind, steps)| {
            steps
                .into_iter()
                .flat_map(move |step| [At::Before, At::After].map(|at| name(kind, step, at)))
        })
        .collect()
}

/// Runs one attempt of the journal write of `step` between its two fail points.
pub(crate) async fn around<T>(
    kind: OpType,
    step: &str,
    write: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    hit(kind, step, At::Before)?;
    let v = write.await?;
    hit(kind, step, At::After)?;
    Ok(v)
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
fn hit(_kind: OpType, _step: &str, _at: At) -> Result<(), StoreError> {
    Ok(())
}

#[cfg(feature = "failpoints")]
fn hit(kind: OpType, step: &str, at: At) -> Result<(), StoreError> {
    eval(&name(kind, step, at))
}

/// Evaluates one of the [`HUB_OUTBOX_POINTS`]: `return` makes that attempt fail like a database error of the
/// daemon's own database.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hub_outbox(_point: &'static str) -> Result<(), StoreError> {
    Ok(())
}

/// Evaluates one of the [`HUB_OUTBOX_POINTS`]: `return` makes that attempt fail like a database error of the
/// daemon's own database.
#[cfg(feature = "failpoints")]
pub(crate) fn hub_outbox(point: &'static str) -> Result<(), StoreError> {
    eval(point)
}

#[cfg(feature = "failpoints")]
fn eval(point: &str) -> Result<(), StoreError> {
    match fail::eval(point, |arg| arg) {
        None => Ok(()),
        Some(Some(arg)) if arg == "kill" => {
            eprintln!("fail point {point} reached: killing the daemon");
            tracing::error!(point, "fail point reached: killing the daemon");
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            std::process::abort()
        }
        Some(Some(arg)) if arg == "panic" => {
            eprintln!("fail point {point} reached: panicking");
            panic!("fail point {point} reached")
        }
        Some(_) => {
            eprintln!("fail point {point} reached: the journal write fails");
            Err(StoreError::Query {
                action: "running a journal write with a fail point armed",
                source: sqlx::Error::Io(std::io::Error::other(format!(
                    "fail point {point} injected this failure"
                ))),
            })
        }
    }
}

/// Arms the fail points the `FAILPOINTS` environment variable names (`NAME=ACTIONS;…`). Points that do not
/// exist are refused, so that a misspelt name cannot make a test pass without injecting anything.
#[cfg(feature = "failpoints")]
pub fn arm_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    let mut known = all();
    known.extend(HUB_OUTBOX_POINTS.map(String::from));
    for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (point, actions) = item
            .split_once('=')
            .ok_or_else(|| format!("FAILPOINTS item {item:?} is not NAME=ACTIONS"))?;
        if !known.iter().any(|k| k == point) {
            return Err(format!(
                "FAILPOINTS names {point:?}, which is not a fail point; they are: {}",
                known.join(", ")
            ));
        }
        fail::cfg(point, actions).map_err(|e| format!("FAILPOINTS item {item:?}: {e}"))?;
        tracing::warn!(point, actions, "fail point armed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_points_around_each_written_step_and_its_commit() {
        let all = all();
        assert!(all.contains(&"create.cloud_create_sent.before".to_string()));
        assert!(all.contains(&"attach.compensate_detach_job.after".to_string()));
        assert!(all.contains(&"delete.commit.after".to_string()));
        assert!(all.contains(&"repair.export_removed.before".to_string()));
        assert!(all.contains(&"snapshot_create.cloud_snapshot_sent.after".to_string()));
        assert!(all.contains(&"snapshot_revert.cloud_revert_job.before".to_string()));
        assert!(all.contains(&"snapshot_delete.commit.after".to_string()));
        assert!(all.contains(&"test_failover_cleanup.cloud_destroy_job.after".to_string()));
        assert!(all.contains(&"test_failover_cleanup.compensate_detach_job.before".to_string()));
        // Steps only earlier versions wrote have none: nothing reaches them.
        assert!(!all.iter().any(|p| p.starts_with("attach.device_found.")));
        assert!(!all.iter().any(|p| p.starts_with("detach.cloud_detached.")));
        assert!(!all.iter().any(|p| HUB_OUTBOX_POINTS.contains(&p.as_str())));
        let unique: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
        assert_eq!(
            name(OpType::Attach, "compensating: detach failed", At::Before),
            "attach.compensating.before"
        );
    }
}
