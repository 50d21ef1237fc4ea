//! The CloudStack HTTP client: signed GET and POST (form) requests, retries with bounded backoff and
//! jitter, response unwrapping, the typed calls a volume service needs, paging and job waiting.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::{Config, JobPollPolicy, RetryPolicy, Secret};
use crate::decode;
use crate::error::{api_error_retryable, classify, Error, ErrorKind};
use crate::jobs::{self, JobBoard, Outcome};
use crate::sign;
use crate::types::{
    bytes_to_gib_rounded_up, AsyncJob, AsyncJobInfo, CreateVolume, DiskOffering, JobStatus,
    ListSnapshots, ListVms, ListVolumes, Snapshot, VirtualMachine, Volume, Zone,
};

/// Upper bound of pages fetched by one list call (protects against servers that ignore paging).
const MAX_PAGES: u32 = 10_000;

/// Largest answer body read: a page of 500 volumes is about 1 MiB, so anything near this is not CloudStack's,
/// and reading it whole could exhaust the daemon's memory.
pub const MAX_ANSWER: usize = 64 << 20;

/// Parameters the client sets itself; callers may not pass them.
const RESERVED_PARAMS: [&str; 6] = [
    "apikey",
    "command",
    "response",
    "signature",
    "signatureversion",
    "expires",
];

/// HTTP method of a request. CloudStack accepts both; mutating commands are sent as POST forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

impl Method {
    /// POST for commands that change state, GET for `list…`, `query…` and `get…` commands.
    pub fn for_command(command: &str) -> Self {
        let c = command.to_ascii_lowercase();
        if c.starts_with("list") || c.starts_with("query") || c.starts_with("get") {
            Self::Get
        } else {
            Self::Post
        }
    }
}

/// A CloudStack API client. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

pub(crate) struct ClientInner {
    http: reqwest::Client,
    url: reqwest::Url,
    api_key: String,
    secret: Secret,
    pub(crate) retry: RetryPolicy,
    signature_expiry: Option<Duration>,
    pub(crate) job_poll: JobPollPolicy,
    /// Items asked per page: the configured size, lowered for good once CloudStack refused it.
    page_size: AtomicU32,
    /// Jobs being waited for, polled by one shared task.
    pub(crate) jobs: JobBoard,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.url.as_str())
            .field("api_key", &self.inner.api_key)
            .field("secret_key", &self.inner.secret)
            .finish_non_exhaustive()
    }
}

/// What one CloudStack answer means: its HTTP status, `Retry-After` and body become the call's result or a
/// retryable error. An error object in the body wins over the status (CloudStack answers errors with 4xx and
/// 5xx statuses, and some proxies with 200).
pub(crate) fn interpret(
    command: &str,
    status: u16,
    retry_after: Option<Duration>,
    bytes: &[u8],
    attempts: u32,
) -> Attempt {
    let body: Option<Value> = serde_json::from_slice(bytes).ok();
    let api_error = body
        .as_ref()
        .and_then(|b| decode::error_in_body(command, b));
    if let Some(e) = api_error {
        let kind = classify(e.errorcode, e.cserrorcode, &e.errortext);
        let retry = api_error_retryable(e.errorcode, kind) || status == 429;
        let err = Error::Api {
            command: command.to_owned(),
            http_status: status,
            errorcode: e.errorcode,
            cserrorcode: e.cserrorcode,
            errortext: e.errortext,
            kind,
            attempts,
        };
        return if retry {
            Attempt::Retry(err, retry_after)
        } else {
            Attempt::Done(Err(err))
        };
    }
    if !(200..300).contains(&status) {
        let err = Error::Http {
            command: command.to_owned(),
            status,
            attempts,
        };
        let retry = status == 429 || (500..=599).contains(&status);
        return if retry {
            Attempt::Retry(err, retry_after)
        } else {
            Attempt::Done(Err(err))
        };
    }
    let Some(body) = body else {
        return Attempt::Done(Err(Error::Decode {
            command: command.to_owned(),
            what: "the body is not JSON".to_owned(),
            source: serde_json::from_slice::<Value>(bytes).err(),
        }));
    };
    Attempt::Done(decode::unwrap_response(command, &body))
}

fn config_err(reason: impl Into<String>) -> Error {
    Error::Config {
        reason: reason.into(),
        source: None,
    }
}

/// Whether a transport error is a TLS trust failure (an untrusted or mismatched certificate), which
/// retrying cannot fix. The TLS stack's error is only reachable through the source chain as text.
fn is_tls_failure(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string().to_ascii_lowercase();
        if text.contains("certificate") || text.contains("invalid peer") {
            return true;
        }
        source = s.source();
    }
    false
}

/// An unreadable answer to `command`, a change, is a lost answer: CloudStack may have acted on it.
fn unanswered(command: &str, e: Error) -> Error {
    if Method::for_command(command) == Method::Post && e.kind() == ErrorKind::Decode {
        Error::Unanswered {
            command: command.to_owned(),
            source: Box::new(e),
        }
    } else {
        e
    }
}

/// When `e` is CloudStack's refusal of a page size above its `default.page.size` (431 "Page size can't exceed
/// max allowed page size value: 100", `BaseListCmd.getPageSize`): the size it names, if it names one.
fn page_size_refusal(e: &Error) -> Option<Option<u32>> {
    let Error::Api {
        errorcode: 431,
        errortext,
        ..
    } = e
    else {
        return None;
    };
    if !errortext
        .to_ascii_lowercase()
        .contains("page size can't exceed max allowed page size")
    {
        return None;
    }
    Some(
        errortext
            .rsplit(':')
            .next()
            .and_then(|n| n.trim().parse::<u32>().ok())
            .filter(|n| *n > 0),
    )
}

/// A change answered with an error worth retrying (a 534 "host unreachable", a 530) that is not sent again: it is
/// transient, so that the caller checks what became of it before trying again, whatever the text suggests.
fn may_have_acted(mut e: Error) -> Error {
    if let Error::Api { kind, .. } = &mut e {
        *kind = ErrorKind::Transient;
    }
    e
}

/// Whether an error is CloudStack's API limit (or a proxy's) refusing a request before it was dispatched.
fn is_throttled(e: &Error) -> bool {
    match e {
        Error::Api {
            errorcode,
            http_status,
            ..
        } => *errorcode == 429 || *http_status == 429,
        Error::Http { status, .. } => *status == 429,
        _ => false,
    }
}

/// The outcome of one attempt: a final result, or an error worth retrying (with a server-suggested delay).
pub(crate) enum Attempt {
    Done(Result<Value, Error>),
    Retry(Error, Option<Duration>),
}

impl Client {
    /// Builds a client. Checks the URL (http or https, no query), the credentials and the CA file;
    /// TLS certificates are always verified.
    pub fn new(cfg: Config) -> Result<Self, Error> {
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| Error::Config {
            reason: format!("url {:?} is not a valid URL", cfg.url),
            source: Some(Box::new(e)),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(config_err(format!(
                "url {:?} must use http or https",
                cfg.url
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(config_err(format!(
                "url {:?} must not carry a query or fragment",
                cfg.url
            )));
        }
        if cfg.api_key.trim().is_empty() {
            return Err(config_err("api_key is empty"));
        }
        if cfg.secret_key.expose().is_empty() {
            return Err(config_err("secret_key is empty"));
        }
        if cfg.retry.max_attempts == 0 {
            return Err(config_err("retry.max_attempts must be at least 1"));
        }
        if cfg.page_size == 0 {
            return Err(config_err("page_size must be at least 1"));
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("cloudstack-rs/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|e| Error::Config {
                reason: format!("cannot read ca_file {}", path.display()),
                source: Some(Box::new(e)),
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| Error::Config {
                reason: format!("ca_file {} is not a PEM certificate bundle", path.display()),
                source: Some(Box::new(e)),
            })?;
            if certs.is_empty() {
                return Err(config_err(format!(
                    "ca_file {} holds no PEM certificate",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| Error::Config {
            reason: "cannot build the HTTP client".to_owned(),
            source: Some(Box::new(e)),
        })?;
        Ok(Self {
            inner: Arc::new(ClientInner {
                http,
                url,
                api_key: cfg.api_key,
                secret: cfg.secret_key,
                retry: cfg.retry,
                signature_expiry: cfg.signature_expiry,
                job_poll: cfg.job_poll,
                page_size: AtomicU32::new(cfg.page_size),
                jobs: JobBoard::default(),
            }),
        })
    }

    /// Sends `command` signed, with retries, and returns the unwrapped `<command>response` object.
    /// The method follows [`Method::for_command`].
    pub async fn request(&self, command: &str, params: &[(&str, String)]) -> Result<Value, Error> {
        self.request_with(Method::for_command(command), command, params)
            .await
    }

    /// Like [`Client::request`] with an explicit HTTP method.
    ///
    /// Retries (bounded exponential backoff with jitter, honouring `Retry-After`) happen for 429,
    /// 530/534 when transient, other 5xx, and transport errors. A command that changes something (any but
    /// `list…`, `query…` and `get…`, see [`Method::for_command`]) is sent again only when it cannot have
    /// been acted on: after a 429 (CloudStack's API limit refuses before dispatching) or a failure to
    /// connect. Once such a request reached the server, a 5xx, a 530/534 (a 534 too, whatever its text),
    /// a lost answer or an unreadable one ([`Error::Unanswered`]) goes back to the caller as kind
    /// [`ErrorKind::Transient`]; the caller has to check the cloud's state before sending it again, since
    /// CloudStack may have acted on it. Parameter, permission and limit errors are never retried.
    pub async fn request_with(
        &self,
        method: Method,
        command: &str,
        params: &[(&str, String)],
    ) -> Result<Value, Error> {
        if let Some((name, _)) = params
            .iter()
            .find(|(n, _)| RESERVED_PARAMS.contains(&n.to_ascii_lowercase().as_str()))
        {
            return Err(Error::InvalidInput {
                command: command.to_owned(),
                reason: format!("parameter `{name}` is set by the client itself"),
            });
        }
        let max = self.inner.retry.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            tracing::debug!(command, ?method, attempt, "CloudStack request");
            match self.attempt(method, command, params, attempt).await {
                Attempt::Done(result) => return result.map_err(|e| unanswered(command, e)),
                Attempt::Retry(err, _) if attempt >= max => return Err(err),
                Attempt::Retry(err, retry_after) => {
                    let mut delay = self.inner.retry.backoff(attempt);
                    if let Some(after) = retry_after {
                        delay = delay.max(after.min(self.inner.retry.max_backoff));
                    }
                    tracing::warn!(
                        command,
                        attempt,
                        kind = %err.kind(),
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        error = %err,
                        "CloudStack request failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    fn signed_query(&self, command: &str, params: &[(&str, String)]) -> String {
        let mut all: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        all.push(("apiKey".to_owned(), self.inner.api_key.clone()));
        all.push(("command".to_owned(), command.to_owned()));
        all.push(("response".to_owned(), "json".to_owned()));
        if let Some(expiry) = self.inner.signature_expiry {
            let expires = chrono::Utc::now()
                + chrono::Duration::from_std(expiry)
                    .unwrap_or_else(|_| chrono::Duration::seconds(600));
            all.push(("signatureVersion".to_owned(), "3".to_owned()));
            all.push(("expires".to_owned(), sign::format_expires(expires)));
        }
        let sig = sign::signature(self.inner.secret.expose(), &all);
        format!(
            "{}&signature={}",
            sign::canonical_query(&all),
            sign::encode_value(&sig)
        )
    }

    pub(crate) fn inner(&self) -> &Arc<ClientInner> {
        &self.inner
    }

    pub(crate) fn from_inner(inner: Arc<ClientInner>) -> Self {
        Self { inner }
    }

    /// One attempt of a request, without retries.
    pub(crate) async fn attempt(
        &self,
        method: Method,
        command: &str,
        params: &[(&str, String)],
        attempts: u32,
    ) -> Attempt {
        let read_only = Method::for_command(command) == Method::Get;
        let query = self.signed_query(command, params);
        let req = match method {
            Method::Get => {
                let mut url = self.inner.url.clone();
                url.set_query(Some(&query));
                self.inner.http.get(url)
            }
            Method::Post => self
                .inner
                .http
                .post(self.inner.url.clone())
                // Servlet containers decode a form without a charset as ISO-8859-1, which would garble
                // non-ASCII names; the signature is computed over the UTF-8 text.
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded; charset=UTF-8",
                )
                .body(query),
        };
        // reqwest's errors print the request URL, whose query holds the API key and signature: drop it.
        let transport = |source: reqwest::Error| Error::Transport {
            command: command.to_owned(),
            attempts,
            source: source.without_url(),
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if is_tls_failure(&e) => {
                return Attempt::Done(Err(Error::Tls {
                    command: command.to_owned(),
                    source: e.without_url(),
                }));
            }
            Err(e) => {
                // A change that reached the server may have been acted on: only retry when it never left.
                let retry = read_only || e.is_connect();
                let err = transport(e);
                return if retry {
                    Attempt::Retry(err, None)
                } else {
                    Attempt::Done(Err(err))
                };
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut resp = resp;
        let mut bytes = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) if bytes.len() + chunk.len() > MAX_ANSWER => {
                    return Attempt::Done(Err(Error::Decode {
                        command: command.to_owned(),
                        what: format!(
                            "the answer is larger than {} MiB, more than any CloudStack answer of this \
                             client; check that the URL names the CloudStack API",
                            MAX_ANSWER >> 20
                        ),
                        source: None,
                    }));
                }
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => {
                    let retry = read_only;
                    let err = transport(e);
                    return if retry {
                        Attempt::Retry(err, None)
                    } else {
                        Attempt::Done(Err(err))
                    };
                }
            }
        }
        match interpret(command, status, retry_after, &bytes, attempts) {
            // CloudStack (or a proxy behind it) may have acted on a change it answered with an error.
            Attempt::Retry(err, _) if !read_only && !is_throttled(&err) => {
                Attempt::Done(Err(may_have_acted(err)))
            }
            other => other,
        }
    }

    async fn list_all<T: DeserializeOwned>(
        &self,
        command: &str,
        key: &str,
        mut params: Vec<(&str, String)>,
        page_size: Option<u32>,
    ) -> Result<Vec<T>, Error> {
        let cap = self.inner.page_size.load(Ordering::Relaxed);
        let mut page_size = page_size.unwrap_or(cap).min(cap).max(1);
        params.push(("pagesize", String::new()));
        let size_idx = params.len() - 1;
        params.push(("page", String::new()));
        let page_idx = params.len() - 1;
        let mut all = Vec::new();
        'pages: loop {
            params[size_idx].1 = page_size.to_string();
            all.clear();
            for page in 1..=MAX_PAGES {
                params[page_idx].1 = page.to_string();
                let inner = match self.request_with(Method::Get, command, &params).await {
                    Ok(inner) => inner,
                    // CloudStack's default.page.size is smaller: list again with the size it names (or
                    // half), and keep it for every later list.
                    Err(e) => match page_size_refusal(&e) {
                        Some(named) if page_size > 1 => {
                            let smaller = named.filter(|n| *n < page_size).unwrap_or(page_size / 2);
                            let before = self.inner.page_size.fetch_min(smaller, Ordering::Relaxed);
                            if before > smaller {
                                tracing::warn!(
                                    command,
                                    refused = page_size,
                                    page_size = smaller,
                                    "CloudStack refuses pages this large (its default.page.size is smaller); \
                                     listing with smaller pages from now on"
                                );
                            }
                            page_size = smaller;
                            continue 'pages;
                        }
                        _ => return Err(e),
                    },
                };
                let decoded: decode::Page<T> = decode::list(command, &inner, key)?;
                let n = decoded.items.len();
                all.extend(decoded.items);
                let complete = decoded.count.is_some_and(|c| all.len() as u64 >= c);
                if n == 0 || n < page_size as usize || complete {
                    return Ok(all);
                }
            }
            break;
        }
        Err(Error::Decode {
            command: command.to_owned(),
            what: format!("more than {MAX_PAGES} pages; the server seems to ignore `page`"),
            source: None,
        })
    }

    async fn async_command(
        &self,
        command: &str,
        params: &[(&str, String)],
    ) -> Result<AsyncJob, Error> {
        let inner = self.request_with(Method::Post, command, params).await?;
        decode::async_job(command, &inner).map_err(|e| unanswered(command, e))
    }

    /// `createVolume`. Returns at once with the job id and the new volume's id.
    pub async fn create_volume(&self, p: &CreateVolume) -> Result<AsyncJob, Error> {
        let invalid = |reason: &str| Error::InvalidInput {
            command: "createVolume".to_owned(),
            reason: reason.to_owned(),
        };
        if p.name.is_empty() {
            return Err(invalid("name is empty"));
        }
        if p.zone_id.is_empty() || p.disk_offering_id.is_empty() {
            return Err(invalid("zone_id and disk_offering_id are required"));
        }
        let mut params = vec![
            ("name", p.name.clone()),
            ("zoneid", p.zone_id.clone()),
            ("diskofferingid", p.disk_offering_id.clone()),
        ];
        if let Some(bytes) = p.size_bytes {
            if bytes == 0 {
                return Err(invalid("size_bytes must be greater than zero"));
            }
            params.push(("size", bytes_to_gib_rounded_up(bytes).to_string()));
        }
        self.async_command("createVolume", &params).await
    }

    /// `attachVolume`; `device_id` `None` lets CloudStack choose the next free slot (0 = root disk).
    pub async fn attach_volume(
        &self,
        volume_id: &str,
        vm_id: &str,
        device_id: Option<u32>,
    ) -> Result<AsyncJob, Error> {
        let mut params = vec![
            ("id", volume_id.to_owned()),
            ("virtualmachineid", vm_id.to_owned()),
        ];
        if let Some(d) = device_id {
            params.push(("deviceid", d.to_string()));
        }
        self.async_command("attachVolume", &params).await
    }

    /// `detachVolume` by volume id.
    pub async fn detach_volume(&self, volume_id: &str) -> Result<AsyncJob, Error> {
        self.async_command("detachVolume", &[("id", volume_id.to_owned())])
            .await
    }

    /// `deleteVolume` (synchronous; the volume must be detached).
    pub async fn delete_volume(&self, volume_id: &str) -> Result<(), Error> {
        let command = "deleteVolume";
        let inner = self
            .request_with(Method::Post, command, &[("id", volume_id.to_owned())])
            .await?;
        match decode::success(command, &inner).map_err(|e| unanswered(command, e))? {
            (true, _) => Ok(()),
            (false, text) => Err(Error::Api {
                command: command.to_owned(),
                http_status: 200,
                errorcode: 530,
                cserrorcode: None,
                errortext: text.unwrap_or_else(|| "deleteVolume answered success=false".to_owned()),
                kind: ErrorKind::Other,
                attempts: 1,
            }),
        }
    }

    /// `listVolumes` with the given filters, all pages.
    pub async fn list_volumes(&self, q: &ListVolumes) -> Result<Vec<Volume>, Error> {
        let mut params = Vec::new();
        let opt = [
            ("id", &q.id),
            ("virtualmachineid", &q.virtualmachine_id),
            ("name", &q.name),
            ("keyword", &q.keyword),
            ("zoneid", &q.zone_id),
            ("type", &q.volume_type),
            ("state", &q.state),
        ];
        params.extend(
            opt.into_iter()
                .filter_map(|(k, v)| v.clone().map(|v| (k, v))),
        );
        if q.list_all {
            params.push(("listall", "true".to_owned()));
        }
        self.list_all("listVolumes", "volume", params, q.page_size)
            .await
    }

    /// One volume by id, across the domain; `None` when CloudStack does not know it.
    pub async fn get_volume(&self, id: &str) -> Result<Option<Volume>, Error> {
        let q = ListVolumes {
            id: Some(id.to_owned()),
            list_all: true,
            ..ListVolumes::default()
        };
        match self.list_volumes(&q).await {
            Ok(list) => Ok(list.into_iter().find(|v| v.id == id)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `createSnapshot` of a volume (asynchronous); `name` `None` lets CloudStack name it. Returns at once
    /// with the job id and the new snapshot's id.
    pub async fn create_snapshot(
        &self,
        volume_id: &str,
        name: Option<&str>,
    ) -> Result<AsyncJob, Error> {
        if volume_id.is_empty() {
            return Err(Error::InvalidInput {
                command: "createSnapshot".to_owned(),
                reason: "volume_id is empty".to_owned(),
            });
        }
        let mut params = vec![("volumeid", volume_id.to_owned())];
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            params.push(("name", n.to_owned()));
        }
        self.async_command("createSnapshot", &params).await
    }

    /// `revertSnapshot` (asynchronous): the volume's content becomes the snapshot's. CloudStack refuses it
    /// while the volume is attached to a VM that is not stopped.
    pub async fn revert_snapshot(&self, snapshot_id: &str) -> Result<AsyncJob, Error> {
        self.async_command("revertSnapshot", &[("id", snapshot_id.to_owned())])
            .await
    }

    /// `deleteSnapshot` (asynchronous).
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<AsyncJob, Error> {
        self.async_command("deleteSnapshot", &[("id", snapshot_id.to_owned())])
            .await
    }

    /// `listSnapshots` with the given filters, all pages.
    pub async fn list_snapshots(&self, q: &ListSnapshots) -> Result<Vec<Snapshot>, Error> {
        let mut params = Vec::new();
        let opt = [("id", &q.id), ("volumeid", &q.volume_id), ("name", &q.name)];
        params.extend(
            opt.into_iter()
                .filter_map(|(k, v)| v.clone().map(|v| (k, v))),
        );
        if q.list_all {
            params.push(("listall", "true".to_owned()));
        }
        self.list_all("listSnapshots", "snapshot", params, q.page_size)
            .await
    }

    /// Waits for a job whose result carries a snapshot (`createSnapshot`, `revertSnapshot`) and decodes it.
    pub async fn wait_snapshot_job(
        &self,
        job_id: &str,
        deadline: Duration,
    ) -> Result<Snapshot, Error> {
        let result = self.wait_job(job_id, deadline).await?;
        decode::object(
            "queryAsyncJobResult",
            &result["snapshot"],
            "jobresult.snapshot",
        )
    }

    /// `stopVirtualMachine` (asynchronous); `forced` stops the VM even when its guest does not shut down.
    pub async fn stop_virtual_machine(&self, vm_id: &str, forced: bool) -> Result<AsyncJob, Error> {
        let mut params = vec![("id", vm_id.to_owned())];
        if forced {
            params.push(("forced", "true".to_owned()));
        }
        self.async_command("stopVirtualMachine", &params).await
    }

    /// `destroyVirtualMachine` (asynchronous); a running VM is stopped first. With `expunge` the VM is removed
    /// at once (not kept `Destroyed` for recovery): its ROOT volume goes with it and its data volumes are
    /// detached and kept.
    pub async fn destroy_virtual_machine(
        &self,
        vm_id: &str,
        expunge: bool,
    ) -> Result<AsyncJob, Error> {
        let mut params = vec![("id", vm_id.to_owned())];
        if expunge {
            params.push(("expunge", "true".to_owned()));
        }
        self.async_command("destroyVirtualMachine", &params).await
    }

    /// Waits for a job whose result carries a VM (`stopVirtualMachine`, `destroyVirtualMachine`) and decodes it.
    pub async fn wait_vm_job(
        &self,
        job_id: &str,
        deadline: Duration,
    ) -> Result<VirtualMachine, Error> {
        let result = self.wait_job(job_id, deadline).await?;
        decode::object(
            "queryAsyncJobResult",
            &result["virtualmachine"],
            "jobresult.virtualmachine",
        )
    }

    /// `listVirtualMachines` with the given filters, all pages.
    pub async fn list_virtual_machines(&self, q: &ListVms) -> Result<Vec<VirtualMachine>, Error> {
        let mut params = Vec::new();
        let opt = [
            ("id", &q.id),
            ("name", &q.name),
            ("state", &q.state),
            ("zoneid", &q.zone_id),
        ];
        params.extend(
            opt.into_iter()
                .filter_map(|(k, v)| v.clone().map(|v| (k, v))),
        );
        if q.list_all {
            params.push(("listall", "true".to_owned()));
        }
        self.list_all("listVirtualMachines", "virtualmachine", params, q.page_size)
            .await
    }

    /// One VM by id, across the domain; `None` when CloudStack does not know it.
    pub async fn get_virtual_machine(&self, id: &str) -> Result<Option<VirtualMachine>, Error> {
        let q = ListVms {
            id: Some(id.to_owned()),
            list_all: true,
            ..ListVms::default()
        };
        match self.list_virtual_machines(&q).await {
            Ok(list) => Ok(list.into_iter().find(|v| v.id == id)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `listZones`, all pages.
    pub async fn list_zones(&self) -> Result<Vec<Zone>, Error> {
        self.list_all("listZones", "zone", Vec::new(), None).await
    }

    /// `listDiskOfferings`, all pages.
    pub async fn list_disk_offerings(&self) -> Result<Vec<DiskOffering>, Error> {
        self.list_all("listDiskOfferings", "diskoffering", Vec::new(), None)
            .await
    }

    /// `queryAsyncJobResult`: the current state of a job.
    pub async fn query_async_job(&self, job_id: &str) -> Result<JobStatus, Error> {
        let command = "queryAsyncJobResult";
        let inner = self
            .request_with(Method::Get, command, &[("jobid", job_id.to_owned())])
            .await?;
        decode::job_status(command, &inner)
    }

    /// `listAsyncJobs`: the account's recent jobs (to find jobs whose id was lost), all pages.
    pub async fn list_async_jobs(&self) -> Result<Vec<AsyncJobInfo>, Error> {
        self.list_all("listAsyncJobs", "asyncjobs", Vec::new(), None)
            .await
    }

    /// Waits until a job finishes or `deadline` has passed since the call; usable again with the same
    /// id after a restart. Returns the `jobresult` on success, [`ErrorKind::JobFailed`] (with the job's
    /// errortext) on failure and [`ErrorKind::JobStillRunning`] when it was still pending at the
    /// deadline. The polls are shared by every waiter of the client (see [`JobPollPolicy`]); a poll
    /// whose answer does not say the job's state (a server error, an unreadable body, a single refusal)
    /// is asked again until the deadline, where one last query answers (its error, when the cloud still
    /// fails, says the job's state is unknown). A job CloudStack does not know, or refusals of every poll
    /// of the job (`max_attempts` in a row), end the wait with that query's error before the deadline.
    pub async fn wait_job(&self, job_id: &str, deadline: Duration) -> Result<Value, Error> {
        let start = Instant::now();
        loop {
            let mut watch = jobs::watch(self, job_id);
            let left = deadline.saturating_sub(start.elapsed());
            let outcome = tokio::time::timeout(left, watch.rx.wait_for(Option::is_some))
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|o| o.clone());
            drop(watch);
            match outcome {
                Some(Outcome::Succeeded(result)) => return Ok(result),
                Some(Outcome::Failed(error)) => {
                    return Err(Error::JobFailed {
                        job_id: job_id.to_owned(),
                        error,
                    })
                }
                // Deadline passed, or polling met an error: one last query of our own says which.
                Some(Outcome::PollFailed) | None => match self.query_async_job(job_id).await? {
                    JobStatus::Succeeded(result) => return Ok(result),
                    JobStatus::Failed(error) => {
                        return Err(Error::JobFailed {
                            job_id: job_id.to_owned(),
                            error,
                        })
                    }
                    // The polls failed, but the job is known and still running: wait on.
                    JobStatus::Pending if start.elapsed() < deadline => {}
                    JobStatus::Pending => {
                        return Err(Error::JobStillRunning {
                            job_id: job_id.to_owned(),
                            waited: start.elapsed(),
                        })
                    }
                },
            }
        }
    }

    /// The duration learned for jobs of `cmd` (CloudStack's command class, e.g.
    /// `org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd`), once one has finished.
    pub fn learned_job_duration(&self, cmd: &str) -> Option<Duration> {
        self.inner.jobs.learned(cmd)
    }

    /// Waits for a job whose result carries a volume (`createVolume`, `attachVolume`, `detachVolume`)
    /// and decodes it.
    pub async fn wait_volume_job(&self, job_id: &str, deadline: Duration) -> Result<Volume, Error> {
        let result = self.wait_job(job_id, deadline).await?;
        decode::object("queryAsyncJobResult", &result["volume"], "jobresult.volume")
    }
}
