//! Progress of an operation being waited for, on stderr: a spinner line redrawn in place on a terminal,
//! plain lines (one per change of status or step) otherwise, or nothing.

use std::io::Write;
use std::time::Instant;

use volume_api::Operation;

const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A spinner redrawn in place (stderr is a terminal).
    Spinner,
    /// One line per change (stderr is not a terminal).
    Lines,
    Silent,
}

/// Draws the progress of one operation.
#[derive(Debug)]
pub struct Progress {
    mode: Mode,
    started: Instant,
    frame: usize,
    state: String,
    last_printed: Option<String>,
    drawn: bool,
}

impl Progress {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            started: Instant::now(),
            frame: 0,
            state: String::new(),
            last_printed: None,
            drawn: false,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Records the operation's latest state.
    pub fn update(&mut self, op: &Operation) {
        self.state = crate::render::printable(&describe(op), false);
        match self.mode {
            Mode::Spinner => self.draw(),
            Mode::Lines => {
                if self.last_printed.as_deref() != Some(self.state.as_str()) {
                    let mut err = std::io::stderr().lock();
                    // Progress is best effort: a closed stderr must not fail the command.
                    let _ = writeln!(err, "{}", self.state);
                    self.last_printed = Some(self.state.clone());
                }
            }
            Mode::Silent => {}
        }
    }

    /// Advances the spinner.
    pub fn tick(&mut self) {
        if self.mode == Mode::Spinner {
            self.frame = (self.frame + 1) % FRAMES.len();
            self.draw();
        }
    }

    fn draw(&mut self) {
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{} {} ({:.1}s)",
            FRAMES[self.frame],
            self.state,
            self.started.elapsed().as_secs_f64()
        );
        let _ = err.flush();
        self.drawn = true;
    }

    /// Clears the spinner line.
    pub fn finish(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `operation 1234… (attach) executing: cloud_attach_job`.
pub fn describe(op: &Operation) -> String {
    let mut s = format!("operation {} ({}) {}", op.id, op.op_type(), op.status);
    if !op.status.is_terminal() {
        s.push_str(&format!(": {}", op.step));
    }
    if let Some(job) = op
        .cloudstack_job_id
        .as_deref()
        .filter(|_| !op.status.is_terminal())
    {
        s.push_str(&format!(" (cloud job {job})"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use uuid::Uuid;
    use volume_api::{OperationKind, OperationStatus, OperationStep, VolumeOperationRequest};

    #[test]
    fn descriptions_name_the_step_until_the_end() {
        let mut op = Operation {
            id: Uuid::nil(),
            kind: OperationKind::Detach {
                request: VolumeOperationRequest {
                    volume_id: Uuid::nil(),
                },
                response: None,
            },
            status: OperationStatus::Executing,
            volume_id: None,
            vm_id: None,
            error: None,
            error_code: None,
            step: OperationStep::CloudDetachJob,
            cloudstack_job_id: Some("job-1".into()),
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
            completed_at: None,
        };
        let d = describe(&op);
        assert!(
            d.ends_with("(detach) executing: cloud_detach_job (cloud job job-1)"),
            "{d}"
        );
        op.status = OperationStatus::Completed;
        assert!(describe(&op).ends_with("(detach) completed"));
    }
}
