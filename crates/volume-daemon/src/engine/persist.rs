//! Journal writes that survive a flaky database: each is retried a bounded number of times with backoff;
//! an operation whose failure cannot be journaled even then is recorded in memory as stuck, so that the
//! daemon goes on serving and `/health` names it, instead of retrying it forever.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use uuid::Uuid;

use super::failpoints;
use super::journal::{Entry, Step, COMMIT};
use super::{EngineError, Inner};
use crate::store::{OpError, OpStatus, OpType, StoreError, StoreErrorKind};

/// How often one journal write is tried before it counts as failed.
pub(super) const JOURNAL_ATTEMPTS: u32 = 5;
/// The wait before the second try; doubled before each further one (0.1 + 0.2 + 0.4 + 0.8 s in all).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Operations whose journal entry could not be written, with why (until the daemon restarts).
#[derive(Debug, Default)]
pub(super) struct StuckOperations(Mutex<BTreeMap<Uuid, String>>);

impl StuckOperations {
    pub(super) fn insert(&self, id: Uuid, why: String) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(id, why);
        }
    }

    pub(super) fn list(&self) -> Vec<(Uuid, String)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }
}

/// Whether trying the same write again may succeed (a missing or finished operation stays so, and a daemon
/// whose lease was taken over stays fenced: that is fatal, the daemon stops).
fn retryable(e: &StoreError) -> bool {
    !matches!(
        e.kind(),
        StoreErrorKind::NotFound | StoreErrorKind::Conflict | StoreErrorKind::Fenced
    )
}

/// `text` with every control character written as an escape (`\u{0}`), so that every database stores it.
pub(crate) fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl Inner {
    /// Runs the journal write `f` up to [`JOURNAL_ATTEMPTS`] times with doubling backoff.
    pub(super) async fn journal_write<T, F, Fut>(
        &self,
        what: &'static str,
        mut f: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < JOURNAL_ATTEMPTS && retryable(&e) => {
                    tracing::warn!(attempt, what, error = %crate::error_chain(&e), "journal write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The journal write of `step` (a stored step spelling, or `commit`) of an operation of `kind`: retried like
    /// every journal write, each attempt between the step's two fail points (see `failpoints`). Every step
    /// and commit an operation journals goes through here.
    pub(super) async fn journal_step<T, F, Fut>(
        &self,
        kind: OpType,
        step: &str,
        what: &'static str,
        mut f: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.journal_write(what, || failpoints::around(kind, step, f()))
            .await
    }

    /// Commits operation `op`: `f` is the one transaction that records its outcome and completes it. A retry
    /// that finds the operation already completed means an earlier attempt committed and only its answer was
    /// lost: the commit is done (nothing else completes an operation while its workflow runs).
    pub(super) async fn commit<R, S: Step, F, Fut>(
        &self,
        op: &Entry<R, S>,
        f: F,
    ) -> Result<(), EngineError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), StoreError>>,
    {
        match self
            .journal_step(S::KIND, COMMIT, "committing an operation", f)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == StoreErrorKind::Conflict => {
                let committed = self
                    .journal_write("reading an operation", || self.store.get_operation(op.id))
                    .await?
                    .is_some_and(|o| o.status == OpStatus::Completed);
                if committed {
                    tracing::info!(op = %op.id, "the commit was written; only its answer was lost");
                    Ok(())
                } else {
                    Err(e.into())
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Journals that operation `id` failed with `err`. When even that cannot be written, tries once more with
    /// a failure that says so (the cause itself may be what the database refuses), and else records the
    /// operation as stuck: it stays unfinished in the journal, is resumed at the next start, and `/health`
    /// names it meanwhile.
    pub(super) async fn journal_failure(&self, id: Uuid, err: &EngineError) {
        let op_err = err.to_op_error();
        let first = match self
            .journal_write("finishing a failed operation", || {
                self.store
                    .finish_operation(id, OpStatus::Failed, None, Some(&op_err))
            })
            .await
        {
            Ok(()) => return,
            Err(e) if e.kind() == StoreErrorKind::Conflict => return,
            // Nothing can be journaled any more; the operation stays unfinished for the lease's holder.
            Err(e) if e.kind() == StoreErrorKind::Fenced => {
                tracing::error!(op = %id, error = %crate::error_chain(&e), "operation not journaled: fenced");
                self.stuck.insert(id, crate::error_chain(&e));
                return;
            }
            Err(e) => e,
        };
        let fallback = OpError {
            code: op_err.code.clone(),
            message: format!(
                "the operation failed and its error could not be journaled ({})",
                printable(&crate::error_chain(&first))
            ),
        };
        match self
            .journal_write("finishing a failed operation", || {
                self.store
                    .finish_operation(id, OpStatus::Failed, None, Some(&fallback))
            })
            .await
        {
            Ok(()) => {}
            Err(e) if e.kind() == StoreErrorKind::Conflict => {}
            Err(e) => {
                let why = format!(
                    "failed ({}: {}) and the failure cannot be journaled: {}",
                    op_err.code,
                    op_err.message,
                    crate::error_chain(&e)
                );
                tracing::error!(op = %id, error = %why, "operation stuck; it resumes at next start");
                self.stuck.insert(id, why);
            }
        }
    }
}
