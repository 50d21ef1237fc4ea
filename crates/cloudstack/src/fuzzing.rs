//! Harness for the fuzz target in `crates/cloudstack/fuzz` and its regression test: one CloudStack answer
//! (HTTP status and body, as a hostile or broken endpoint could send them) through the client's real
//! interpretation and every decoder the typed calls apply to it.
//!
//! Not a stable API; public only so the fuzz crate and the regression test can call it.

use serde_json::Value;

use crate::client::{interpret, Attempt};
use crate::decode;
use crate::types::{AsyncJobInfo, DiskOffering, JobStatus, Snapshot, VirtualMachine, Volume, Zone};
use crate::Error;

/// The commands whose answers are decoded, with the list key of the list commands.
pub const COMMANDS: [(&str, &str); 16] = [
    ("listVolumes", "volume"),
    ("listSnapshots", "snapshot"),
    ("listVirtualMachines", "virtualmachine"),
    ("listZones", "zone"),
    ("listDiskOfferings", "diskoffering"),
    ("listAsyncJobs", "asyncjobs"),
    ("createVolume", ""),
    ("attachVolume", ""),
    ("detachVolume", ""),
    ("deleteVolume", ""),
    ("queryAsyncJobResult", ""),
    ("createSnapshot", ""),
    ("deleteSnapshot", ""),
    ("revertSnapshot", ""),
    ("stopVirtualMachine", ""),
    ("destroyVirtualMachine", ""),
];

/// The fuzz input for an answer of `command` (one of [`COMMANDS`]) with `status` (100 to 599) and `body`.
pub fn input(status: u16, command: &str, body: &[u8]) -> Option<Vec<u8>> {
    let index = COMMANDS.iter().position(|(c, _)| *c == command)?;
    let mut out = (status.checked_sub(100)?).to_be_bytes().to_vec();
    out.push(u8::try_from(index).ok()?);
    out.extend_from_slice(body);
    Some(out)
}

/// Splits `data` into an HTTP status (first two bytes), a command (third byte) and a body (the rest), and
/// decodes that answer as the client would. Returns how many decoders took the answer without an error.
/// Panics only where the client would.
pub fn response(data: &[u8]) -> usize {
    let (status, command, body) = match data {
        [a, b, c, rest @ ..] => (
            100 + u16::from_be_bytes([*a, *b]) % 500,
            COMMANDS[usize::from(*c) % COMMANDS.len()],
            rest,
        ),
        _ => (200, COMMANDS[0], data),
    };
    let mut decoded = decode_answer(status, command, body);
    // A well-formed status with the same body, so that short inputs reach the decoders too.
    if status != 200 {
        decoded += decode_answer(200, command, body);
    }
    decoded
}

fn decode_answer(status: u16, (command, key): (&str, &str), body: &[u8]) -> usize {
    let inner = match interpret(command, status, None, body, 1) {
        Attempt::Done(Ok(v)) => v,
        Attempt::Done(Err(e)) | Attempt::Retry(e, _) => {
            shown(&e);
            return 0;
        }
    };
    let mut decoded = 0;
    let mut report = |r: Result<(), Error>| match r {
        Ok(()) => decoded += 1,
        Err(e) => shown(&e),
    };
    if !key.is_empty() {
        report(list::<Volume>(command, &inner, key));
        report(list::<Snapshot>(command, &inner, key));
        report(list::<VirtualMachine>(command, &inner, key));
        report(list::<Zone>(command, &inner, key));
        report(list::<DiskOffering>(command, &inner, key));
        report(list::<AsyncJobInfo>(command, &inner, key));
        return decoded;
    }
    report(decode::async_job(command, &inner).map(drop));
    report(decode::success(command, &inner).map(drop));
    // A finished job's result, as `wait_volume_job` and the snapshot and VM waits decode it (a job that is
    // not reported finished is decoded too, from whatever `jobresult` it carries).
    let result = match decode::job_status(command, &inner) {
        Ok(JobStatus::Succeeded(result)) => {
            report(Ok(()));
            result
        }
        other => {
            report(other.map(drop));
            inner.get("jobresult").cloned().unwrap_or(Value::Null)
        }
    };
    report(decode::object::<Volume>(command, &result["volume"], "jobresult.volume").map(drop));
    report(
        decode::object::<Snapshot>(command, &result["snapshot"], "jobresult.snapshot").map(drop),
    );
    report(
        decode::object::<VirtualMachine>(
            command,
            &result["virtualmachine"],
            "jobresult.virtualmachine",
        )
        .map(drop),
    );
    decoded
}

fn list<T: serde::de::DeserializeOwned>(
    command: &str,
    inner: &Value,
    key: &str,
) -> Result<(), Error> {
    decode::list::<T>(command, inner, key).map(drop)
}

/// Formats an error the way the daemon logs it (its whole chain), which must not panic either.
fn shown(e: &Error) {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&s.to_string());
        source = s.source();
    }
    std::hint::black_box(text);
    std::hint::black_box(e.kind());
}
