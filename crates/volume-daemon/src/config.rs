//! Daemon configuration: one TOML file, every key overridable by a `VOLUME_DAEMON_<KEY>` environment variable,
//! then by command-line flags (see the configuration reference in README.md). Secrets are redacted in `Debug`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Secrets (API keys, tokens) are the CloudStack client's redacted string type.
pub use cloudstack::Secret;

/// Errors while building the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The message never quotes the file's text (a refused value may be a secret): it names the key,
    /// the line and column, and what was expected.
    #[error("the configuration file {path} is not valid TOML for this daemon ({}line {line}, column {column}): {message}", key.as_ref().map(|k| format!("key {k}, ")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        /// The key whose value is refused, when the error points at a value.
        key: Option<String>,
        line: usize,
        column: usize,
        message: String,
    },
    /// A known variable whose value does not parse (none of them holds a secret, so the value is shown).
    #[error("environment variable {var} has an invalid value {value:?}: expected {expected}")]
    Env {
        var: String,
        value: String,
        expected: &'static str,
    },
    /// A `VOLUME_DAEMON_*` variable that names no key; its value is not shown (it may be a misspelt secret).
    #[error("environment variable {var} names no configuration key: remove it or correct its name (the keys are listed in the configuration reference in README.md)")]
    UnknownEnv { var: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The complete daemon configuration (all keys optional in the file; defaults below).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// REST API listen address. Default `127.0.0.1:8090`.
    pub listen: SocketAddr,
    /// NBD listen address. Default `127.0.0.1:10809`.
    pub nbd_listen: SocketAddr,
    /// Port advertised in export records (defaults to the NBD listener's port).
    pub nbd_advertised_port: Option<u16>,
    /// NBD TLS (nbdkit's `--tls`): `off`, `on` or `require`. A non-loopback `nbd_listen` requires `require`.
    pub nbd_tls: NbdTls,
    /// Directory with `server-cert.pem`, `server-key.pem` and `ca-cert.pem` (nbdkit's layout).
    pub nbd_tls_certificates: Option<PathBuf>,
    /// Require NBD client certificates signed by `ca-cert.pem`. A non-loopback `nbd_listen` requires it.
    pub nbd_tls_verify_peer: bool,
    /// The NBD client identities (names in verified client certificates: common name, DNS, e-mail or URI
    /// subject alternative names) an appliance export admits when its attach names none (`nbd_clients`).
    /// Empty (the default) admits every client that passes the server's TLS policy. Environment: a
    /// comma-separated list.
    pub nbd_default_clients: Vec<String>,
    /// Close NBD sessions without requests for this long; 0 never closes them.
    pub nbd_idle_timeout_secs: u64,
    /// MiB of NBD request data held at once over all connections (back-pressure beyond). At least 32.
    pub nbd_budget_mib: usize,
    /// NBD connections allowed at once from one client address (writers behind one SSH tunnel all come
    /// from 127.0.0.1 and share it). At least 1.
    pub nbd_max_connections_per_client: usize,
    /// NBD connections allowed at once over all clients; when full, a new one takes the place of the oldest
    /// still negotiating. At least 1.
    pub nbd_max_connections: usize,
    /// Database URL: `sqlite:PATH`, `postgres://…`, `mysql://…`/`mariadb://…`. Default: SQLite under `state_dir`.
    pub database_url: Option<String>,
    /// Directory for the daemon's own files. Default `/var/lib/volume-daemon`.
    pub state_dir: PathBuf,
    /// Directory of stable device names (`vol<hex>` links). Default `<state_dir>/names`.
    pub names_dir: Option<PathBuf>,
    /// Directory holding the `virtio-<serial>` links. Default `/dev/disk/by-id`.
    pub by_id_dir: PathBuf,
    /// Root of sysfs. Default `/sys`.
    pub sys_dir: PathBuf,
    /// The appliance VM's CloudStack id; detected when absent.
    pub appliance_vm_id: Option<String>,
    /// Bearer token required on the API; mandatory for a non-loopback `listen`.
    pub api_token: Option<Secret>,
    /// CloudStack API endpoint, e.g. `https://cloud.example/client/api`.
    pub cloudstack_url: Option<String>,
    pub cloudstack_api_key: Option<Secret>,
    pub cloudstack_secret_key: Option<Secret>,
    /// PEM file of extra CA certificates for the CloudStack endpoint.
    pub cloudstack_ca_file: Option<PathBuf>,
    /// Deadline for one CloudStack asynchronous job.
    pub job_timeout_secs: u64,
    /// Deadline for one CloudStack snapshot job (take, revert, delete): taking one copies the volume to
    /// secondary storage, hours for a large volume.
    pub snapshot_timeout_secs: u64,
    /// Deadline for an attached volume's device to appear.
    pub device_timeout_secs: u64,
    /// Deadline for in-flight NBD requests when an export is removed.
    pub drain_timeout_secs: u64,
    /// Open REST API connections at most (at the cap a new client takes the place of the connection idle
    /// longest; while all are busy, further clients wait to be accepted).
    pub api_max_connections: usize,
    /// A REST request's headers must arrive within this time of the connection being ready for one
    /// (bounds slow clients and idle keep-alive connections); a client that reads nothing of an answer
    /// for as long loses its connection.
    pub api_header_timeout_secs: u64,
    /// A REST request not answered in this time gets 503 (keep it above the longest `?wait=`, 300 s).
    pub api_request_timeout_secs: u64,
    /// Operations executing at once (per-volume and per-VM serialization apply within that).
    pub max_concurrent_operations: usize,
    /// Run the reconciler this often (seconds; 0: only after an export was fenced). Its findings show on
    /// `/health` (component `drift`) and in the metrics.
    pub reconcile_interval_secs: u64,
    /// Let the scheduled reconcile apply the repairs that have one safe outcome.
    pub reconcile_repair: bool,
    /// The appliance lease in the database lasts this long after the holder's last heartbeat; a daemon that
    /// stopped heartbeating for longer may be replaced by another one for the same appliance.
    pub lease_ttl_secs: u64,
    /// The holder renews its appliance lease this often; at most a third of `lease_ttl_secs`.
    pub lease_heartbeat_secs: u64,
    /// Accept a regular file where a block device is required (simulator without root only).
    pub allow_regular_files: bool,
    /// Log format: `text` or `json`.
    pub log_format: String,
    /// The migration platform's hub database (`mysql://USER:PASSWORD@HOST:PORT/DATABASE`). When set, the
    /// daemon keeps the hub's `device_mappings`, `nbd_exports` and `ossea_volumes` rows true (through an
    /// outbox in its own database) and reads the appliance identity from `ossea_configs` when
    /// `appliance_vm_id` is not set. Unset (the default): no hub.
    pub hub_database_url: Option<String>,
    /// At every start, before resuming the journal, adopt what a predecessor left: the appliance's
    /// CloudStack attachments the daemon does not manage and the hub's `device_mappings` rows (as
    /// `volume-daemon import` does). Needs `hub_database_url`. Default false.
    pub hub_import_on_start: bool,
    /// Built-in simulator settings (`serve --sim`).
    pub sim: SimSettings,
}

/// Settings of the built-in CloudStack simulator.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimSettings {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub api_key: Secret,
    pub secret_key: Secret,
    pub job_delay_ms: u64,
}

/// How the NBD server offers TLS (nbdkit's `--tls=off|on|require`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdTls {
    #[default]
    Off,
    On,
    Require,
}

impl std::str::FromStr for NbdTls {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "off" => Ok(NbdTls::Off),
            "on" => Ok(NbdTls::On),
            "require" => Ok(NbdTls::Require),
            _ => Err(()),
        }
    }
}

/// Documented defaults of the built-in simulator's credentials.
pub const SIM_DEFAULT_API_KEY: &str = "sim-api-key";
pub const SIM_DEFAULT_SECRET_KEY: &str = "sim-secret-key";

impl Default for SimSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: Secret::new(SIM_DEFAULT_API_KEY),
            secret_key: Secret::new(SIM_DEFAULT_SECRET_KEY),
            job_delay_ms: 200,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            nbd_listen: SocketAddr::from(([127, 0, 0, 1], 10809)),
            nbd_advertised_port: None,
            nbd_tls: NbdTls::Off,
            nbd_tls_certificates: None,
            nbd_tls_verify_peer: false,
            nbd_default_clients: Vec::new(),
            nbd_idle_timeout_secs: 0,
            nbd_budget_mib: 256,
            nbd_max_connections_per_client: 64,
            nbd_max_connections: nbd::ServerConfig::default().max_connections,
            database_url: None,
            state_dir: PathBuf::from("/var/lib/volume-daemon"),
            names_dir: None,
            by_id_dir: PathBuf::from("/dev/disk/by-id"),
            sys_dir: PathBuf::from("/sys"),
            appliance_vm_id: None,
            api_token: None,
            cloudstack_url: None,
            cloudstack_api_key: None,
            cloudstack_secret_key: None,
            cloudstack_ca_file: None,
            job_timeout_secs: 300,
            snapshot_timeout_secs: 21_600,
            device_timeout_secs: 60,
            drain_timeout_secs: 30,
            api_max_connections: 256,
            api_header_timeout_secs: 20,
            api_request_timeout_secs: 330,
            max_concurrent_operations: 16,
            reconcile_interval_secs: 300,
            reconcile_repair: true,
            lease_ttl_secs: 30,
            lease_heartbeat_secs: 5,
            allow_regular_files: false,
            log_format: "text".into(),
            hub_database_url: None,
            hub_import_on_start: false,
            sim: SimSettings::default(),
        }
    }
}

/// The longest duration any `*_secs` key takes: a year.
pub const MAX_SECS: u64 = 365 * 24 * 3600;
/// The most connections or concurrent operations any count key takes.
pub const MAX_COUNT: usize = 65_536;
/// The largest `nbd_budget_mib`: 1 TiB.
pub const MAX_BUDGET_MIB: usize = 1 << 20;
/// The longest simulated job: an hour.
pub const MAX_SIM_JOB_DELAY_MS: u64 = 3_600_000;

/// The environment-variable prefix.
pub const ENV_PREFIX: &str = "VOLUME_DAEMON_";

impl Config {
    /// Reads `path` (when given) over the defaults, then applies `VOLUME_DAEMON_*` variables from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| parse_error(p, &text, &e))?
            }
            None => Config::default(),
        };
        for (k, v) in env {
            // VOLUME_DAEMON_CONFIG names the file itself (the --config flag), not a key in it.
            if let Some(key) = k.strip_prefix(ENV_PREFIX).filter(|key| *key != "CONFIG") {
                cfg.apply_env(&key.to_ascii_lowercase(), &k, v)?;
            }
        }
        Ok(cfg)
    }

    fn apply_env(&mut self, key: &str, var: &str, value: String) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(
            var: &str,
            value: &str,
            expected: &'static str,
        ) -> Result<T, ConfigError> {
            value.parse().map_err(|_| ConfigError::Env {
                var: var.to_string(),
                value: value.to_string(),
                expected,
            })
        }
        let opt = |v: String| if v.is_empty() { None } else { Some(v) };
        match key {
            "listen" => self.listen = parse(var, &value, "an address like 127.0.0.1:8090")?,
            "nbd_listen" => {
                self.nbd_listen = parse(var, &value, "an address like 127.0.0.1:10809")?
            }
            "nbd_advertised_port" => {
                self.nbd_advertised_port = Some(parse(var, &value, "a port number")?)
            }
            "nbd_tls" => self.nbd_tls = parse(var, &value, "off, on or require")?,
            "nbd_tls_certificates" => self.nbd_tls_certificates = opt(value).map(PathBuf::from),
            "nbd_tls_verify_peer" => {
                self.nbd_tls_verify_peer = parse(var, &value, "true or false")?
            }
            "nbd_default_clients" => {
                self.nbd_default_clients = value
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "nbd_idle_timeout_secs" => self.nbd_idle_timeout_secs = parse(var, &value, "seconds")?,
            "nbd_budget_mib" => self.nbd_budget_mib = parse(var, &value, "MiB, at least 32")?,
            "nbd_max_connections_per_client" => {
                self.nbd_max_connections_per_client = parse(var, &value, "a positive number")?
            }
            "nbd_max_connections" => {
                self.nbd_max_connections = parse(var, &value, "a positive number")?
            }
            "database_url" => self.database_url = opt(value),
            "state_dir" => self.state_dir = PathBuf::from(value),
            "names_dir" => self.names_dir = opt(value).map(PathBuf::from),
            "by_id_dir" => self.by_id_dir = PathBuf::from(value),
            "sys_dir" => self.sys_dir = PathBuf::from(value),
            "appliance_vm_id" => self.appliance_vm_id = opt(value),
            "api_token" => self.api_token = opt(value).map(Secret::new),
            "cloudstack_url" => self.cloudstack_url = opt(value),
            "cloudstack_api_key" => self.cloudstack_api_key = opt(value).map(Secret::new),
            "cloudstack_secret_key" => self.cloudstack_secret_key = opt(value).map(Secret::new),
            "cloudstack_ca_file" => self.cloudstack_ca_file = opt(value).map(PathBuf::from),
            "job_timeout_secs" => self.job_timeout_secs = parse(var, &value, "seconds")?,
            "snapshot_timeout_secs" => self.snapshot_timeout_secs = parse(var, &value, "seconds")?,
            "device_timeout_secs" => self.device_timeout_secs = parse(var, &value, "seconds")?,
            "drain_timeout_secs" => self.drain_timeout_secs = parse(var, &value, "seconds")?,
            "api_max_connections" => {
                self.api_max_connections = parse(var, &value, "a positive number")?
            }
            "api_header_timeout_secs" => {
                self.api_header_timeout_secs = parse(var, &value, "seconds")?
            }
            "api_request_timeout_secs" => {
                self.api_request_timeout_secs = parse(var, &value, "seconds")?
            }
            "max_concurrent_operations" => {
                self.max_concurrent_operations = parse(var, &value, "a positive number")?
            }
            "reconcile_interval_secs" => {
                self.reconcile_interval_secs = parse(var, &value, "seconds")?
            }
            "reconcile_repair" => self.reconcile_repair = parse(var, &value, "true or false")?,
            "lease_ttl_secs" => self.lease_ttl_secs = parse(var, &value, "seconds")?,
            "lease_heartbeat_secs" => self.lease_heartbeat_secs = parse(var, &value, "seconds")?,
            "allow_regular_files" => {
                self.allow_regular_files = parse(var, &value, "true or false")?
            }
            "log_format" => self.log_format = value,
            "hub_database_url" => self.hub_database_url = opt(value),
            "hub_import_on_start" => {
                self.hub_import_on_start = parse(var, &value, "true or false")?
            }
            "sim_enabled" => self.sim.enabled = parse(var, &value, "true or false")?,
            "sim_listen" => self.sim.listen = parse(var, &value, "an address")?,
            "sim_api_key" => self.sim.api_key = Secret::new(value),
            "sim_secret_key" => self.sim.secret_key = Secret::new(value),
            "sim_job_delay_ms" => self.sim.job_delay_ms = parse(var, &value, "milliseconds")?,
            // Unknown variables with our prefix are a mistake worth reporting.
            _ => {
                return Err(ConfigError::UnknownEnv {
                    var: var.to_string(),
                })
            }
        }
        Ok(())
    }

    /// Checks cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback()
            && self
                .api_token
                .as_ref()
                .map(Secret::is_empty)
                .unwrap_or(true)
        {
            return Err(ConfigError::Invalid(format!(
                "listen address {} is not loopback: set api_token (VOLUME_DAEMON_API_TOKEN) or listen on 127.0.0.1",
                self.listen
            )));
        }
        // Durations past a year and counts past these maxima are mistakes, and the daemon's clocks and
        // semaphores cannot hold every u64; zero is refused where it would make every operation fail.
        for (key, value, min) in [
            ("job_timeout_secs", self.job_timeout_secs, 1),
            ("snapshot_timeout_secs", self.snapshot_timeout_secs, 1),
            ("device_timeout_secs", self.device_timeout_secs, 1),
            ("drain_timeout_secs", self.drain_timeout_secs, 1),
            ("api_header_timeout_secs", self.api_header_timeout_secs, 1),
            ("api_request_timeout_secs", self.api_request_timeout_secs, 1),
            ("reconcile_interval_secs", self.reconcile_interval_secs, 0),
            ("lease_ttl_secs", self.lease_ttl_secs, 0),
            ("lease_heartbeat_secs", self.lease_heartbeat_secs, 0),
            ("nbd_idle_timeout_secs", self.nbd_idle_timeout_secs, 0),
        ] {
            if !(min..=MAX_SECS).contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "{key} ({value}) must be between {min} and {MAX_SECS} (a year)"
                )));
            }
        }
        for (key, value, max) in [
            ("api_max_connections", self.api_max_connections, MAX_COUNT),
            (
                "max_concurrent_operations",
                self.max_concurrent_operations,
                MAX_COUNT,
            ),
            ("nbd_max_connections", self.nbd_max_connections, MAX_COUNT),
            (
                "nbd_max_connections_per_client",
                self.nbd_max_connections_per_client,
                MAX_COUNT,
            ),
            ("nbd_budget_mib", self.nbd_budget_mib, MAX_BUDGET_MIB),
        ] {
            if value > max {
                return Err(ConfigError::Invalid(format!(
                    "{key} ({value}) must be at most {max}"
                )));
            }
        }
        if self.api_max_connections == 0 {
            return Err(ConfigError::Invalid(
                "api_max_connections must be at least 1".into(),
            ));
        }
        if self.nbd_advertised_port == Some(0) {
            return Err(ConfigError::Invalid(
                "nbd_advertised_port must be a port from 1 to 65535 (leave it unset to advertise the listener's port)"
                    .into(),
            ));
        }
        if self.sim.job_delay_ms > MAX_SIM_JOB_DELAY_MS {
            return Err(ConfigError::Invalid(format!(
                "sim job delay ({} ms) must be at most {MAX_SIM_JOB_DELAY_MS} (an hour)",
                self.sim.job_delay_ms
            )));
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "state_dir is empty: name the directory for the daemon's own files (default /var/lib/volume-daemon)"
                    .into(),
            ));
        }
        if let Some(url) = &self.cloudstack_url {
            let scheme = url.split_once("://").map(|(s, _)| s);
            if !matches!(scheme, Some("http" | "https")) || url.len() <= "https://".len() {
                return Err(ConfigError::Invalid(format!(
                    "cloudstack_url {url:?} is not an http:// or https:// URL; use e.g. https://cloud.example/client/api"
                )));
            }
        }
        if self.lease_heartbeat_secs == 0
            || self.lease_heartbeat_secs.saturating_mul(3) > self.lease_ttl_secs
        {
            return Err(ConfigError::Invalid(format!(
                "lease_heartbeat_secs ({}) must be at least 1 and at most a third of lease_ttl_secs ({}), so \
                 that a late heartbeat or two does not lose the lease",
                self.lease_heartbeat_secs, self.lease_ttl_secs
            )));
        }
        let nbd_guarded = self.nbd_tls == NbdTls::Require && self.nbd_tls_verify_peer;
        if !(self.nbd_listen.ip().is_loopback() || nbd_guarded) {
            return Err(ConfigError::Invalid(format!(
                "nbd_listen address {} is not loopback: set nbd_tls = \"require\", nbd_tls_verify_peer = true and \
                 nbd_tls_certificates, or listen on 127.0.0.1 (e.g. behind an SSH tunnel)",
                self.nbd_listen
            )));
        }
        if self.nbd_tls != NbdTls::Off && self.nbd_tls_certificates.is_none() {
            return Err(ConfigError::Invalid(
                "nbd_tls is on or require: set nbd_tls_certificates to the directory holding server-cert.pem, \
                 server-key.pem and ca-cert.pem"
                    .into(),
            ));
        }
        if self.nbd_tls_verify_peer && self.nbd_tls == NbdTls::Off {
            return Err(ConfigError::Invalid(
                "nbd_tls_verify_peer needs nbd_tls = \"on\" or \"require\"".into(),
            ));
        }
        if let Err(e) = volume_api::check_nbd_clients(&self.nbd_default_clients) {
            return Err(ConfigError::Invalid(format!("nbd_default_clients: {e}")));
        }
        if self.nbd_budget_mib < 32 {
            return Err(ConfigError::Invalid(
                "nbd_budget_mib must be at least 32 (one largest NBD request)".into(),
            ));
        }
        if self.nbd_max_connections_per_client == 0 {
            return Err(ConfigError::Invalid(
                "nbd_max_connections_per_client must be at least 1".into(),
            ));
        }
        if self.nbd_max_connections == 0 {
            return Err(ConfigError::Invalid(
                "nbd_max_connections must be at least 1".into(),
            ));
        }
        if self.max_concurrent_operations == 0 {
            return Err(ConfigError::Invalid(
                "max_concurrent_operations must be at least 1".into(),
            ));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid(format!(
                "log_format {:?} is not one of text, json",
                self.log_format
            )));
        }
        if let Some(url) = &self.hub_database_url {
            if !(url.starts_with("mysql://") || url.starts_with("mariadb://")) {
                return Err(ConfigError::Invalid(format!(
                    "hub_database_url {:?} is not a MariaDB/MySQL URL; use mysql://USER:PASSWORD@HOST:PORT/DATABASE",
                    crate::store::redact_url(url)
                )));
            }
        }
        if self.hub_import_on_start && self.hub_database_url.is_none() {
            return Err(ConfigError::Invalid(
                "hub_import_on_start needs hub_database_url".into(),
            ));
        }
        if !self.sim.enabled && self.cloudstack_url.is_none() {
            return Err(ConfigError::Invalid(
                "no cloud configured: set cloudstack_url, cloudstack_api_key and cloudstack_secret_key, or run with --sim"
                    .into(),
            ));
        }
        if !self.sim.enabled
            && (self.cloudstack_api_key.is_none() || self.cloudstack_secret_key.is_none())
        {
            return Err(ConfigError::Invalid(
                "cloudstack_api_key and cloudstack_secret_key are required with cloudstack_url"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The database URL in effect.
    pub fn effective_database_url(&self) -> String {
        match &self.database_url {
            Some(u) => u.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.state_dir.join("volume-daemon.db").display()
            ),
        }
    }

    /// The stable-names directory in effect.
    pub fn effective_names_dir(&self) -> PathBuf {
        self.names_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("names"))
    }

    pub fn job_timeout(&self) -> Duration {
        Duration::from_secs(self.job_timeout_secs)
    }
    pub fn snapshot_timeout(&self) -> Duration {
        Duration::from_secs(self.snapshot_timeout_secs)
    }
    pub fn device_timeout(&self) -> Duration {
        Duration::from_secs(self.device_timeout_secs)
    }
    /// The REST listener's limits.
    pub(crate) fn api_limits(&self) -> crate::api::ListenerLimits {
        crate::api::ListenerLimits {
            max_connections: self.api_max_connections,
            header_timeout: Duration::from_secs(self.api_header_timeout_secs),
            request_timeout: Duration::from_secs(self.api_request_timeout_secs),
        }
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs)
    }
    pub fn lease_heartbeat(&self) -> Duration {
        Duration::from_secs(self.lease_heartbeat_secs)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
    pub fn reconcile_interval(&self) -> Option<Duration> {
        (self.reconcile_interval_secs > 0)
            .then(|| Duration::from_secs(self.reconcile_interval_secs))
    }
    pub fn nbd_idle_timeout(&self) -> Option<Duration> {
        (self.nbd_idle_timeout_secs > 0).then(|| Duration::from_secs(self.nbd_idle_timeout_secs))
    }
}

/// `error` of the file `path` holding `text`, without the excerpt of the file toml draws and without the
/// value a refused type or value quotes: either may be a secret.
fn parse_error(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let start = error.span().map_or(0, |s| s.start).min(text.len());
    let before = text.get(..start).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let message = error
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(without_value)
        .collect::<Vec<_>>()
        .join("; ");
    ConfigError::Parse {
        path: path.to_path_buf(),
        key: refused_key(text, error),
        line,
        column,
        message,
    }
}

/// A serde message about a refused value (`invalid type: integer `5`, expected a string`) with the value
/// left out (`invalid type: integer, expected a string`); any other message unchanged.
fn without_value(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((unexpected, expected)) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once(", expected "))
        {
            let kind = unexpected
                .split(' ')
                .take_while(|w| !w.starts_with(['`', '"', '\'']))
                .collect::<Vec<_>>()
                .join(" ");
            return format!("{prefix}{kind}, expected {expected}");
        }
    }
    message.to_string()
}

/// The key on the line where `error` points at a value (`key = value`): a refused value's message (a wrong
/// type, an unknown variant) does not name its key, and the value itself is not repeated (it may be a secret).
fn refused_key(text: &str, error: &toml::de::Error) -> Option<String> {
    let start = error.span()?.start;
    let line = text.get(..start)?.rsplit('\n').next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()).then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_and_secrets_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:9000\"\ncloudstack_url = \"https://c/client/api\"\ncloudstack_secret_key = \"s3cret\"\n",
        )
        .unwrap();
        let cfg = Config::load(
            Some(&p),
            vec![
                (
                    "VOLUME_DAEMON_LISTEN".to_string(),
                    "127.0.0.1:9001".to_string(),
                ),
                ("PATH".to_string(), "/bin".to_string()),
            ],
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 9001);
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }

    /// Every key the loader takes, read from the `Debug` output of the defaults (which names every field):
    /// the top-level keys, and the `[sim]` table's as `sim.KEY`.
    fn config_keys() -> Vec<String> {
        let mut keys = Vec::new();
        let mut in_sim = false;
        for l in format!("{:#?}", Config::default()).lines() {
            if let Some(k) = l.strip_prefix("        ").filter(|_| in_sim) {
                if let Some((k, _)) = k.split_once(": ").filter(|(k, _)| !k.starts_with(' ')) {
                    keys.push(format!("sim.{k}"));
                }
                continue;
            }
            in_sim = false;
            if let Some((k, _)) = l.strip_prefix("    ").and_then(|l| l.split_once(": ")) {
                if k == "sim" {
                    in_sim = true;
                } else if !k.starts_with(' ') {
                    keys.push(k.to_string());
                }
            }
        }
        keys
    }

    /// The `key = value` lines of a TOML text, commented out (`#key = value`) or not, as `(table.key, value,
    /// commented)`; `#[table]` and `[table]` lines open a table.
    fn assignments(text: &str) -> Vec<(String, String, bool)> {
        let mut table = String::new();
        let mut out = Vec::new();
        for l in text.lines() {
            let (body, commented) = match l.strip_prefix('#') {
                Some(rest) => (rest, true),
                None => (l, false),
            };
            if let Some(t) = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')) {
                table = format!("{t}.");
                continue;
            }
            if let Some((k, v)) = body.split_once(" = ").filter(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            }) {
                out.push((format!("{table}{k}"), v.to_string(), commented));
            }
        }
        out
    }

    /// The shipped example names every key the loader takes; each commented `#key = value` line shows the
    /// key's default unless it is marked `# example`; and with every line uncommented it still parses.
    #[test]
    fn the_example_configuration_names_every_key_with_its_default() {
        let example = include_str!("../../../deploy/volume-daemon.example.toml");
        let keys = config_keys();
        assert!(keys.len() > 30, "keys read from the Debug output: {keys:?}");
        assert!(keys.contains(&"sim.secret_key".to_string()), "{keys:?}");
        let found = assignments(example);
        for k in &keys {
            assert!(
                found.iter().any(|(f, _, _)| f == k),
                "the example configuration does not mention `{k}`"
            );
        }
        for (key, value, commented) in &found {
            assert!(
                keys.contains(key),
                "the example names `{key}`, which is no key"
            );
            if !commented || value.contains("# example") {
                continue;
            }
            let toml = match key.split_once('.') {
                Some((table, k)) => format!("[{table}]\n{k} = {value}\n"),
                None => format!("{key} = {value}\n"),
            };
            let parsed = toml::from_str::<Config>(&toml)
                .unwrap_or_else(|e| panic!("the example's `{key} = {value}` does not parse: {e}"));
            assert_eq!(
                parsed,
                Config::default(),
                "the example shows `{key} = {value}`, which is not the default: mark it `# example`"
            );
        }
        let uncommented: String = example
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| !k.contains(' '))
                        || (rest.starts_with('[') && rest.ends_with(']')) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        toml::from_str::<Config>(&uncommented).expect("the uncommented example parses");
    }

    /// README.md's configuration table has one row for every key the loader takes, and no other, and the
    /// environment takes each of them (`VOLUME_DAEMON_<KEY>`, `VOLUME_DAEMON_SIM_<KEY>` for `[sim]`), besides
    /// `VOLUME_DAEMON_CONFIG`, which names the file.
    #[test]
    fn the_readme_configuration_table_names_every_key() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README.md has a Configuration section");
        let mut documented = Vec::new();
        for row in section.lines().filter(|l| l.starts_with("| `")) {
            let cell = row.split('|').nth(1).unwrap_or_default();
            let spans: Vec<&str> = cell.split('`').skip(1).step_by(2).collect();
            for span in spans {
                match span.strip_prefix("[sim] ") {
                    Some(list) => documented.extend(list.split(", ").map(|k| format!("sim.{k}"))),
                    None => documented.push(span.to_string()),
                }
            }
        }
        let mut keys = config_keys();
        keys.sort();
        documented.sort();
        assert_eq!(
            documented, keys,
            "README.md's configuration table and the loader's keys"
        );
        for k in &keys {
            let var = format!("{ENV_PREFIX}{}", k.replace('.', "_").to_ascii_uppercase());
            if let Err(e) = Config::load(None, vec![(var.clone(), "x".into())]) {
                assert!(
                    !e.to_string().contains("a known key"),
                    "{var} is refused as unknown"
                );
            }
        }
        Config::load(
            None,
            vec![("VOLUME_DAEMON_CONFIG".into(), "/etc/x.toml".into())],
        )
        .expect("VOLUME_DAEMON_CONFIG names the file");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let err = Config::load(None, vec![("VOLUME_DAEMON_NOPE".into(), "1".into())]).unwrap_err();
        assert!(err.to_string().contains("VOLUME_DAEMON_NOPE"));
        let err =
            Config::load(None, vec![("VOLUME_DAEMON_LISTEN".into(), "x".into())]).unwrap_err();
        assert!(err.to_string().contains("127.0.0.1:8090"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "lsiten = \"127.0.0.1:1\"\n").unwrap();
        assert!(matches!(
            Config::load(Some(&p), Vec::new()),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn errors_never_quote_a_value_that_may_be_a_secret() {
        // A misspelt secret variable: the name is reported, the value is not.
        let err = Config::load(
            None,
            vec![(
                "VOLUME_DAEMON_CLOUDSTACK_SECRT_KEY".into(),
                "TopSecret123".into(),
            )],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("VOLUME_DAEMON_CLOUDSTACK_SECRT_KEY"), "{msg}");
        assert!(!msg.contains("TopSecret123"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        for (text, key, line) in [
            // An unterminated string: toml's excerpt of the line would show the secret.
            (
                "listen = \"127.0.0.1:1\"\ncloudstack_secret_key = \"TopSecret123\n",
                Some("cloudstack_secret_key"),
                2,
            ),
            // A value of the wrong type: serde's message quotes it.
            ("api_token = 123456789\n", Some("api_token"), 1),
            (
                "nbd_budget_mib = \"TopSecret123\"\n",
                Some("nbd_budget_mib"),
                1,
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let err = Config::load(Some(&p), Vec::new()).unwrap_err();
            let ConfigError::Parse {
                key: k, line: l, ..
            } = &err
            else {
                panic!("{err:?}")
            };
            let msg = format!("{err:#}");
            assert_eq!(k.as_deref(), key, "{msg}");
            assert_eq!(*l, line, "{msg}");
            assert!(
                !msg.contains("TopSecret123") && !msg.contains("123456789"),
                "{msg}"
            );
            assert!(
                msg.contains("c.toml") && msg.contains(&format!("line {line}")),
                "{msg}"
            );
        }
        std::fs::write(&p, "api_token = 123456789\n").unwrap();
        let msg = Config::load(Some(&p), Vec::new()).unwrap_err().to_string();
        assert!(
            msg.ends_with("invalid type: integer, expected a string"),
            "{msg}"
        );
    }

    #[test]
    fn durations_and_counts_are_bounded() {
        let sim = || {
            let mut c = Config::default();
            c.sim.enabled = true;
            c
        };
        sim().validate().unwrap();
        type Set = fn(&mut Config);
        let refused: [(&str, Set); 13] = [
            ("job_timeout_secs", |c| c.job_timeout_secs = 0),
            ("snapshot_timeout_secs", |c| c.snapshot_timeout_secs = 0),
            ("device_timeout_secs", |c| c.device_timeout_secs = 0),
            ("drain_timeout_secs", |c| c.drain_timeout_secs = 0),
            ("reconcile_interval_secs", |c| {
                c.reconcile_interval_secs = u64::MAX
            }),
            ("lease_ttl_secs", |c| {
                c.lease_ttl_secs = 9_223_372_036_854_775_807
            }),
            ("api_header_timeout_secs", |c| {
                c.api_header_timeout_secs = MAX_SECS + 1
            }),
            ("job_timeout_secs", |c| c.job_timeout_secs = u64::MAX),
            ("nbd_idle_timeout_secs", |c| {
                c.nbd_idle_timeout_secs = u64::MAX
            }),
            ("max_concurrent_operations", |c| {
                c.max_concurrent_operations = usize::MAX
            }),
            ("nbd_budget_mib", |c| c.nbd_budget_mib = usize::MAX),
            ("nbd_advertised_port", |c| c.nbd_advertised_port = Some(0)),
            ("state_dir", |c| c.state_dir = PathBuf::new()),
        ];
        for (key, set) in refused {
            let mut c = sim();
            set(&mut c);
            let msg = c.validate().unwrap_err().to_string();
            assert!(msg.contains(key), "{key}: {msg}");
        }
        let mut c = sim();
        c.reconcile_interval_secs = 0;
        c.nbd_idle_timeout_secs = MAX_SECS;
        c.validate().unwrap();
        for url in ["not a url", "ftp://x/client/api", "https://"] {
            let c = Config {
                cloudstack_url: Some(url.into()),
                cloudstack_api_key: Some(Secret::new("k")),
                cloudstack_secret_key: Some(Secret::new("s")),
                ..Config::default()
            };
            let msg = c.validate().unwrap_err().to_string();
            assert!(msg.contains("cloudstack_url"), "{url}: {msg}");
        }
    }

    #[test]
    fn non_loopback_needs_a_token() {
        let mut cfg = Config {
            listen: "0.0.0.0:8090".parse().unwrap(),
            ..Config::default()
        };
        cfg.sim.enabled = true;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("api_token"));
        cfg.api_token = Some(Secret::new("t"));
        cfg.validate().unwrap();
    }

    #[test]
    fn non_loopback_nbd_needs_tls_with_verified_peers() {
        let mut cfg = Config {
            nbd_listen: "0.0.0.0:10809".parse().unwrap(),
            ..Config::default()
        };
        cfg.sim.enabled = true;
        assert!(cfg.validate().unwrap_err().to_string().contains("nbd_tls"));
        cfg.nbd_tls = NbdTls::On;
        cfg.nbd_tls_verify_peer = true;
        cfg.nbd_tls_certificates = Some("/etc/volume-daemon/nbd-tls".into());
        assert!(
            cfg.validate().is_err(),
            "tls=on still lets clients in clear text"
        );
        cfg.nbd_tls = NbdTls::Require;
        cfg.nbd_tls_verify_peer = false;
        assert!(cfg.validate().is_err(), "unverified clients are not enough");
        cfg.nbd_tls_verify_peer = true;
        cfg.validate().unwrap();
        cfg.nbd_tls_certificates = None;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("nbd_tls_certificates"));
        let env = Config::load(
            None,
            vec![("VOLUME_DAEMON_NBD_TLS".into(), "sometimes".into())],
        )
        .unwrap_err();
        assert!(env.to_string().contains("off, on or require"));
    }

    #[test]
    fn default_nbd_clients_come_from_a_list_and_are_checked() {
        let mut cfg = Config::load(
            None,
            vec![(
                "VOLUME_DAEMON_NBD_DEFAULT_CLIENTS".into(),
                "writer-1, writer-2.example,".into(),
            )],
        )
        .unwrap();
        assert_eq!(cfg.nbd_default_clients, ["writer-1", "writer-2.example"]);
        cfg.sim.enabled = true;
        cfg.validate().unwrap();
        cfg.nbd_default_clients.push("bad\u{1b}name".into());
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("nbd_default_clients"));
    }

    #[test]
    fn the_nbd_connection_allowance_per_client_is_set_and_checked() {
        let mut cfg = Config::load(
            None,
            vec![(
                "VOLUME_DAEMON_NBD_MAX_CONNECTIONS_PER_CLIENT".into(),
                "256".into(),
            )],
        )
        .unwrap();
        assert_eq!(cfg.nbd_max_connections_per_client, 256);
        cfg.sim.enabled = true;
        cfg.validate().unwrap();
        cfg.nbd_max_connections_per_client = 0;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("nbd_max_connections_per_client"));
    }

    #[test]
    fn the_nbd_connection_limit_is_set_and_checked() {
        let defaults = Config::load(None, vec![]).unwrap();
        assert_eq!(defaults.nbd_max_connections, 512);
        let mut cfg = Config::load(
            None,
            vec![("VOLUME_DAEMON_NBD_MAX_CONNECTIONS".into(), "2048".into())],
        )
        .unwrap();
        assert_eq!(cfg.nbd_max_connections, 2048);
        cfg.sim.enabled = true;
        cfg.validate().unwrap();
        cfg.nbd_max_connections = 0;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("nbd_max_connections must be"), "{e}");
    }
}
