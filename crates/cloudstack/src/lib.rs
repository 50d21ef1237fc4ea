//! Apache CloudStack API client: request signing, typed calls, tolerant decoding, asynchronous jobs.
//!
//! Signing follows `ApiServer.verifyRequest` ([`sign`]); every call is signed with signature version 3
//! (`expires`) unless configured otherwise, sent as GET (queries) or a POST form (changes), retried with
//! bounded backoff when the failure may pass (a change only while it cannot have been acted on: throttled or
//! not connected), and decoded tolerantly (ids as numbers or strings,
//! booleans as strings, `{}` as the empty list, unknown fields ignored). An answer body over [`MAX_ANSWER`]
//! (64 MiB) is not read further: the call fails with a decode error, unretried.

mod client;
mod config;
mod de;
mod decode;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod jobs;
pub mod sign;
mod types;

pub use client::{Client, Method, MAX_ANSWER};
pub use config::{Config, JobPollPolicy, RetryPolicy, Secret};
pub use error::{classify, Error, ErrorKind};
pub use types::{
    bytes_to_gib_rounded_up, AsyncJob, AsyncJobInfo, CreateVolume, DiskOffering, JobError,
    JobStatus, ListSnapshots, ListVms, ListVolumes, Snapshot, VirtualMachine, Volume, Zone, GIB,
};
