//! Client configuration: endpoint, credentials (redacted in `Debug`), TLS trust, timeouts, retry and
//! job-polling policies.

use std::path::PathBuf;
use std::time::Duration;

/// A secret string. `Debug` prints `***`; the value is only reachable through [`Secret::expose`].
/// Deserializes from a plain string, so configuration files can hold one.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret value. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// Bounded exponential backoff with jitter for retried requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, including the first (1 = no retry).
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
    /// Upper bound of one delay (also for a server's `Retry-After`).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The delay before retry number `retry` (1-based): `initial * 2^(retry-1)` capped at `max_backoff`,
    /// then jittered uniformly into `[delay/2, delay]`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(30);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        jitter(base)
    }
}

/// Uniform jitter into `[d/2, d]`.
pub(crate) fn jitter(d: Duration) -> Duration {
    use rand::Rng as _;
    let half = d / 2;
    let extra_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    if extra_nanos == 0 {
        return d;
    }
    half + Duration::from_nanos(rand::thread_rng().gen_range(0..=extra_nanos))
}

/// How [`crate::Client::wait_job`] polls (the whole schedule is described in the `jobs` module): the
/// first poll is immediate, then the delay grows by half from `initial` up to `max` (±20 % jitter), with
/// polls at most every `dense` (down to every 2 ms for short jobs) around the learned duration of jobs of
/// the same command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPollPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub dense: Duration,
}

impl Default for JobPollPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
            dense: Duration::from_millis(10),
        }
    }
}

/// Configuration of a [`crate::Client`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The API endpoint, e.g. `https://cloud.example.com/client/api`.
    pub url: String,
    pub api_key: String,
    pub secret_key: Secret,
    /// A PEM file with extra root certificates to trust (in addition to the built-in and system roots).
    pub ca_file: Option<PathBuf>,
    /// Timeout of one HTTP request.
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// When set, requests use signature version 3 with `expires = now + signature_expiry`.
    pub signature_expiry: Option<Duration>,
    /// Polling of asynchronous jobs by `wait_job`.
    pub job_poll: JobPollPolicy,
    /// Page size used when listing (CloudStack's own default is 500). When CloudStack refuses it (its
    /// `default.page.size` is smaller: 431 "Page size can't exceed max allowed page size value: N"), the
    /// list is asked again with pages of N (or half the size, when the text names none), and every later
    /// list of the client uses that size; a warning is logged once.
    pub page_size: u32,
}

impl Config {
    /// A configuration with defaults: 30 s timeout, default retries, signature version 3 with a
    /// 10-minute expiry, default job polling, pages of 500.
    pub fn new(url: impl Into<String>, api_key: impl Into<String>, secret_key: Secret) -> Self {
        Self {
            url: url.into(),
            api_key: api_key.into(),
            secret_key,
            ca_file: None,
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            signature_expiry: Some(Duration::from_secs(600)),
            job_poll: JobPollPolicy::default(),
            page_size: 500,
        }
    }
}

impl Default for Config {
    /// The defaults of [`Config::new`] with an empty URL and empty credentials, to be filled in
    /// (`Client::new` rejects them while empty).
    fn default() -> Self {
        Self::new("", "", Secret::new(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted_in_debug() {
        let cfg = Config::new(
            "https://x/client/api",
            "KEY",
            Secret::new("very-secret-value"),
        );
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(shown.contains("***"));
        assert_eq!(cfg.secret_key.expose(), "very-secret-value");
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
        };
        for _ in 0..50 {
            let d1 = p.backoff(1);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d3 = p.backoff(3);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            let d20 = p.backoff(20);
            assert!(
                d20 >= Duration::from_millis(500) && d20 <= Duration::from_millis(1000),
                "{d20:?}"
            );
        }
    }
}
