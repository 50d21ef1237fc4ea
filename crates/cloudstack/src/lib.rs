//! Apache CloudStack API client: request signing, typed calls, tolerant decoding, asynchronous jobs.

pub mod sign;
