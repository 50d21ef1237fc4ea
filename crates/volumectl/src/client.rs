//! The HTTP client of the daemon's REST API: one method per endpoint, typed with the shared wire types of
//! `volume-api`, and [`ClientError`] classifying every failure for the exit code.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;
use volume_api::{
    Appliance, AttachVolumeRequest, CloudOffering, CloudVm, CloudZone, CreateVolumeRequest,
    ErrorBody, Export, ExportList, Health, Operation, ReconcileReport, ReconcileRequest,
    SetApplianceRequest, TestFailoverCleanupRequest, VolumeSnapshot, VolumeState, VolumeStatus,
    API_PREFIX, IDEMPOTENCY_KEY_HEADER,
};

/// Longest server-side wait asked for in one `GET /operations/{id}?wait=` request.
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(60);

/// A request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url:?} is not a usable daemon URL: give one like http://127.0.0.1:8090")]
    BadUrl { url: String },
    #[error("the token is not a valid HTTP header value: use the api_token from the daemon's configuration")]
    BadToken,
    #[error("cannot build the HTTP client")]
    Build(#[source] reqwest::Error),
    #[error("cannot reach the daemon at {url}: is volume-daemon running (systemctl status volume-daemon)? Point --url or VOLUMECTL_URL at its listen address")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered something that is not HTTP: point --url or VOLUMECTL_URL at the daemon's REST API address (its `listen`), not at its NBD port or another service")]
    NotHttp {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the daemon at {url} did not answer in time: it may be overloaded or stuck; check its log (journalctl -u volume-daemon)")]
    Timeout {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The daemon answered with an error body.
    #[error("{}", api_message(.status, .body))]
    Api { status: StatusCode, body: ErrorBody },
    #[error("the daemon answered {method} {path} with HTTP {status} and a body volumectl cannot read: is {url} a volume-daemon of a matching version?")]
    Unexpected {
        method: Method,
        path: String,
        url: String,
        status: StatusCode,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn api_message(status: &StatusCode, body: &ErrorBody) -> String {
    let mut m = body.error.clone();
    if let Some(f) = &body.field {
        m.push_str(&format!(" (field: {f})"));
    }
    if *status == StatusCode::UNAUTHORIZED {
        m.push_str("; pass --token or set VOLUMECTL_TOKEN");
    }
    m
}

/// Whether the peer answered, but with bytes that are no HTTP response (an NBD server's greeting, say).
fn answered_not_http(e: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        // A response that does not parse, or bytes that arrived before the request went out (hyper has
        // no predicate for the latter; its message is the stable text of its `UnexpectedMessage` kind).
        if c.downcast_ref::<hyper::Error>().is_some_and(|h| {
            h.is_parse() || h.to_string() == "received unexpected message from connection"
        }) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A stable classification of [`ClientError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientErrorKind {
    /// The command line or environment gave something unusable.
    Usage,
    Unreachable,
    /// The daemon refused the request as invalid (400).
    Invalid,
    NotFound,
    /// Conflict, unknown reference, or authentication (401, 403, 409, 422).
    Refused,
    /// The daemon cannot serve now (503).
    Unavailable,
    /// The daemon failed or answered nonsense.
    Server,
}

impl ClientError {
    pub fn kind(&self) -> ClientErrorKind {
        match self {
            Self::BadUrl { .. } | Self::BadToken => ClientErrorKind::Usage,
            Self::Build(_) => ClientErrorKind::Server,
            Self::Unreachable { .. } | Self::Timeout { .. } => ClientErrorKind::Unreachable,
            Self::Api { status, .. } => kind_of_status(*status),
            Self::Unexpected { .. } | Self::NotHttp { .. } => ClientErrorKind::Server,
        }
    }
}

/// Classifies an HTTP error status.
pub fn kind_of_status(status: StatusCode) -> ClientErrorKind {
    match status.as_u16() {
        400 => ClientErrorKind::Invalid,
        404 => ClientErrorKind::NotFound,
        401 | 403 | 409 | 422 => ClientErrorKind::Refused,
        503 => ClientErrorKind::Unavailable,
        _ => ClientErrorKind::Server,
    }
}

/// Query of `GET /operations`.
#[derive(Debug, Clone, Default)]
pub struct OpsFilter {
    pub op_type: Option<&'static str>,
    pub status: Option<&'static str>,
    pub volume_id: Option<Uuid>,
    pub vm_id: Option<String>,
    pub limit: Option<u32>,
}

/// An answer that is JSON both typed and raw: the raw value is what `--json` prints (pretty, keys sorted).
#[derive(Debug, Clone)]
pub struct Answer<T> {
    pub value: T,
    pub raw: serde_json::Value,
}

/// The daemon's REST API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    /// Items per page when reading a whole listing.
    page: u32,
}

impl Client {
    /// A client of the daemon at `url` (`http://host:port`, with or without `/api/v1`).
    pub fn new(url: &str, token: Option<&str>) -> Result<Self, ClientError> {
        let trimmed = url.trim().trim_end_matches('/');
        let trimmed = trimmed.strip_suffix(API_PREFIX).unwrap_or(trimmed);
        let parsed =
            reqwest::Url::parse(trimmed).map_err(|_| ClientError::BadUrl { url: url.into() })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(ClientError::BadUrl { url: url.into() });
        }
        let mut headers = HeaderMap::new();
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            let mut v =
                HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| ClientError::BadToken)?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("volumectl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self {
            http,
            base: trimmed.to_string(),
            page: PAGE,
        })
    }

    /// Reads whole listings `page` items at a time.
    pub fn with_page_size(mut self, page: u32) -> Self {
        self.page = page.max(1);
        self
    }

    async fn call<T: DeserializeOwned>(&self, c: Call<'_>) -> Result<Answer<T>, ClientError> {
        Ok(self.call_linked(c).await?.0)
    }

    /// Reads a whole listing page by page (the client's page size at a time), following each answer's
    /// `Link: <…>; rel="next"` header; `items` finds the page's array in an answer. The answer is the first
    /// page's with every later page's items appended (and `count`, where the body has one, set to the total).
    async fn all_pages<T: DeserializeOwned>(
        &self,
        path: &str,
        mut query: Vec<(&'static str, String)>,
        items: fn(&mut serde_json::Value) -> Option<&mut Vec<serde_json::Value>>,
    ) -> Result<Answer<T>, ClientError> {
        query.push(("limit", self.page.to_string()));
        let (first, mut next) = self
            .call_linked::<serde_json::Value>(Call {
                query,
                ..Call::new(Method::GET, path)
            })
            .await?;
        let mut raw = first.raw;
        let mut pages = 1;
        while let Some(target) = next {
            pages += 1;
            let (mut page, link) = self
                .call_linked::<serde_json::Value>(Call::new(Method::GET, target))
                .await?;
            let more = items(&mut page.raw).map(std::mem::take).unwrap_or_default();
            if let Some(all) = items(&mut raw) {
                all.extend(more);
            }
            next = link;
            if pages > MAX_PAGES {
                break;
            }
        }
        let total = items(&mut raw).map(|a| a.len());
        if let (Some(n), Some(obj)) = (total, raw.as_object_mut()) {
            if obj.contains_key("count") {
                obj.insert("count".into(), n.into());
            }
        }
        let value = serde_json::from_value(raw.clone()).map_err(|e| ClientError::Unexpected {
            method: Method::GET,
            path: path.to_string(),
            url: self.base.clone(),
            status: StatusCode::OK,
            source: Box::new(e),
        })?;
        Ok(Answer { value, raw })
    }

    /// [`Self::call`], also returning the target of the answer's `Link: <…>; rel="next"` header. `path` is
    /// below `/api/v1`, or a link target that already starts with it.
    async fn call_linked<T: DeserializeOwned>(
        &self,
        c: Call<'_>,
    ) -> Result<(Answer<T>, Option<String>), ClientError> {
        let Call {
            method,
            path,
            query,
            body,
            idempotency_key,
            timeout,
            accept_status,
        } = c;
        let path = path.as_str();
        let url = if path.starts_with(API_PREFIX) {
            format!("{}{path}", self.base)
        } else {
            format!("{}{API_PREFIX}{path}", self.base)
        };
        let mut req = self
            .http
            .request(method.clone(), &url)
            .query(&query)
            .timeout(timeout);
        if let Some(b) = &body {
            req = req.json(b);
        }
        if let Some(k) = idempotency_key {
            req = req.header(IDEMPOTENCY_KEY_HEADER, k);
        }
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        let next = resp
            .headers()
            .get_all(reqwest::header::LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(next_link);
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        let unexpected =
            |source: Box<dyn std::error::Error + Send + Sync>| ClientError::Unexpected {
                method: method.clone(),
                path: path.to_string(),
                url: self.base.clone(),
                status,
                source,
            };
        if status.is_success() || accept_status.contains(&status) {
            let raw: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| unexpected(Box::new(e)))?;
            let value = serde_json::from_value(raw.clone()).map_err(|e| unexpected(Box::new(e)))?;
            return Ok((Answer { value, raw }, next));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api { status, body }),
            Err(e) => Err(unexpected(Box::new(e))),
        }
    }

    fn transport(&self, e: reqwest::Error) -> ClientError {
        if answered_not_http(&e) {
            ClientError::NotHttp {
                url: self.base.clone(),
                source: e,
            }
        } else if e.is_timeout() {
            ClientError::Timeout {
                url: self.base.clone(),
                source: e,
            }
        } else {
            ClientError::Unreachable {
                url: self.base.clone(),
                source: e,
            }
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<Answer<T>, ClientError> {
        self.call(Call::new(Method::GET, path)).await
    }

    async fn mutate(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        key: Option<&str>,
    ) -> Result<Answer<Operation>, ClientError> {
        self.call(Call {
            body,
            idempotency_key: key,
            ..Call::new(method, path)
        })
        .await
    }

    pub async fn create_volume(
        &self,
        req: &CreateVolumeRequest,
        key: Option<&str>,
    ) -> Result<Answer<Operation>, ClientError> {
        self.mutate(Method::POST, "/volumes", Some(to_json(req)), key)
            .await
    }

    pub async fn attach_volume(
        &self,
        volume_id: Uuid,
        req: &AttachVolumeRequest,
        root: bool,
        key: Option<&str>,
    ) -> Result<Answer<Operation>, ClientError> {
        let verb = if root { "attach-root" } else { "attach" };
        self.mutate(
            Method::POST,
            &format!("/volumes/{volume_id}/{verb}"),
            Some(to_json(req)),
            key,
        )
        .await
    }

    pub async fn detach_volume(
        &self,
        volume_id: Uuid,
        key: Option<&str>,
    ) -> Result<Answer<Operation>, ClientError> {
        self.mutate(
            Method::POST,
            &format!("/volumes/{volume_id}/detach"),
            None,
            key,
        )
        .await
    }

    pub async fn adopt_volume(
        &self,
        volume_id: Uuid,
        key: Option<&str>,
    ) -> Result<Answer<Operation>, ClientError> {
        self.mutate(
            Method::POST,
            &format!("/volumes/{volume_id}/adopt"),
            None,
            key,
        )
        .await
    }

    /// `POST /cleanup/test-failover`.
    pub async fn cleanup_test_failover(
        &self,
        req: &TestFailoverCleanupRequest,
        key: Option<&str>,
    ) -> Result<Answer<Operation>, ClientError> {
        self.mutate(
            Method::POST,
            "/cleanup/test-failover",
            Some(to_json(req)),
            key,
        )
        .await
    }

    pub async fn delete_volume(
        &self,
        volume_id: Uuid,
        key: Option<&str>,
    ) -> Result<Answer<Operation>, ClientError> {
        self.mutate(Method::DELETE, &format!("/volumes/{volume_id}"), None, key)
            .await
    }

    /// `GET /volumes/{id}/snapshots`.
    pub async fn snapshots(
        &self,
        volume_id: Uuid,
    ) -> Result<Answer<Vec<VolumeSnapshot>>, ClientError> {
        self.get(&format!("/volumes/{volume_id}/snapshots")).await
    }

    pub async fn create_snapshot(
        &self,
        volume_id: Uuid,
        req: &volume_api::CreateSnapshotRequest,
        key: Option<&str>,
    ) -> Result<Answer<Operation>, ClientError> {
        self.mutate(
            Method::POST,
            &format!("/volumes/{volume_id}/snapshots"),
            Some(to_json(req)),
            key,
        )
        .await
    }

    pub async fn revert_snapshot(
        &self,
        volume_id: Uuid,
        snapshot_id: &str,
        key: Option<&str>,
    ) -> Result<Answer<Operation>, ClientError> {
        self.mutate(
            Method::POST,
            &format!(
                "/volumes/{volume_id}/snapshots/{}/revert",
                path_segment(snapshot_id)
            ),
            None,
            key,
        )
        .await
    }

    pub async fn delete_snapshot(
        &self,
        volume_id: Uuid,
        snapshot_id: &str,
        key: Option<&str>,
    ) -> Result<Answer<Operation>, ClientError> {
        self.mutate(
            Method::DELETE,
            &format!(
                "/volumes/{volume_id}/snapshots/{}",
                path_segment(snapshot_id)
            ),
            None,
            key,
        )
        .await
    }

    pub async fn volume(&self, volume_id: Uuid) -> Result<Answer<VolumeStatus>, ClientError> {
        self.get(&format!("/volumes/{volume_id}")).await
    }

    /// Every volume (in the given state, when one is given), read page by page.
    pub async fn volumes(
        &self,
        state: Option<VolumeState>,
    ) -> Result<Answer<Vec<VolumeStatus>>, ClientError> {
        let query = state
            .map(|s| ("state", s.to_string()))
            .into_iter()
            .collect();
        self.all_pages("/volumes", query, serde_json::Value::as_array_mut)
            .await
    }

    pub async fn operation(&self, id: Uuid) -> Result<Answer<Operation>, ClientError> {
        self.get(&format!("/operations/{id}")).await
    }

    /// `GET /operations/{id}?wait=` — returns when the operation ends or after `wait` (at most [`MAX_SERVER_WAIT`]).
    pub async fn wait_operation(
        &self,
        id: Uuid,
        wait: Duration,
    ) -> Result<Answer<Operation>, ClientError> {
        let wait = wait.min(MAX_SERVER_WAIT);
        self.call(Call {
            query: vec![("wait", format!("{:.3}", wait.as_secs_f64()))],
            timeout: wait + DEFAULT_TIMEOUT,
            ..Call::new(Method::GET, format!("/operations/{id}"))
        })
        .await
    }

    pub async fn operations(
        &self,
        filter: &OpsFilter,
    ) -> Result<Answer<Vec<Operation>>, ClientError> {
        let mut q = Vec::new();
        if let Some(t) = filter.op_type {
            q.push(("type", t.to_string()));
        }
        if let Some(s) = filter.status {
            q.push(("status", s.to_string()));
        }
        if let Some(v) = filter.volume_id {
            q.push(("volume_id", v.to_string()));
        }
        if let Some(v) = &filter.vm_id {
            q.push(("vm_id", v.clone()));
        }
        match filter.limit {
            Some(l) => {
                q.push(("limit", l.to_string()));
                self.call(Call {
                    query: q,
                    ..Call::new(Method::GET, "/operations")
                })
                .await
            }
            None => {
                self.all_pages("/operations", q, serde_json::Value::as_array_mut)
                    .await
            }
        }
    }

    pub async fn cloud_zones(&self) -> Result<Answer<Vec<CloudZone>>, ClientError> {
        self.get("/cloud/zones").await
    }

    pub async fn cloud_offerings(&self) -> Result<Answer<Vec<CloudOffering>>, ClientError> {
        self.get("/cloud/offerings").await
    }

    pub async fn cloud_vms(&self) -> Result<Answer<Vec<CloudVm>>, ClientError> {
        self.get("/cloud/vms").await
    }

    /// The daemon's host as the URL names it (where its NBD exports are served too).
    pub fn host(&self) -> String {
        reqwest::Url::parse(&self.base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| "127.0.0.1".into())
    }

    /// Every export, read page by page.
    pub async fn exports(&self) -> Result<Answer<ExportList>, ClientError> {
        self.all_pages("/exports", Vec::new(), |v| {
            v.get_mut("exports")
                .and_then(serde_json::Value::as_array_mut)
        })
        .await
    }

    pub async fn export(&self, volume_id: Uuid) -> Result<Answer<Export>, ClientError> {
        self.get(&format!("/exports/{volume_id}")).await
    }

    pub async fn appliance(&self) -> Result<Answer<Appliance>, ClientError> {
        self.get("/appliance").await
    }

    pub async fn set_appliance(
        &self,
        req: &SetApplianceRequest,
    ) -> Result<Answer<Appliance>, ClientError> {
        self.call(Call {
            body: Some(to_json(req)),
            ..Call::new(Method::PUT, "/appliance")
        })
        .await
    }

    /// `GET /api/v1/health`; a 503 still carries the health report and is returned as an answer.
    pub async fn health(&self) -> Result<Answer<Health>, ClientError> {
        self.call(Call {
            accept_status: &[StatusCode::SERVICE_UNAVAILABLE],
            ..Call::new(Method::GET, "/health")
        })
        .await
    }

    pub async fn reconcile(&self, apply: bool) -> Result<Answer<ReconcileReport>, ClientError> {
        self.call(Call {
            body: Some(to_json(&ReconcileRequest { apply })),
            timeout: RECONCILE_TIMEOUT,
            ..Call::new(Method::POST, "/reconcile")
        })
        .await
    }
}

/// One request: what [`Client::call`] sends and which statuses still carry an answer.
struct Call<'a> {
    method: Method,
    /// Below `/api/v1`.
    path: String,
    query: Vec<(&'static str, String)>,
    body: Option<serde_json::Value>,
    idempotency_key: Option<&'a str>,
    timeout: Duration,
    /// Non-2xx statuses whose body is the answer (e.g. 503 from `/health`).
    accept_status: &'static [StatusCode],
}

impl Call<'_> {
    fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            query: Vec::new(),
            body: None,
            idempotency_key: None,
            timeout: DEFAULT_TIMEOUT,
            accept_status: &[],
        }
    }
}

/// Items per page when volumectl reads a whole listing, unless told otherwise.
pub const PAGE: u32 = 500;
/// A listing longer than this many pages is cut off (a daemon that keeps answering with a next page).
const MAX_PAGES: usize = 100_000;

/// The target of the `rel="next"` link of one `Link` header value (RFC 8288: `<URL>; rel="next"`, several
/// links separated by commas).
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|link| {
        let (target, params) = link.trim().split_once('>')?;
        let target = target.strip_prefix('<')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim();
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| target.to_string())
    })
}

/// Deadline of one ordinary request.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of a reconcile run (it asks the cloud about every volume).
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(300);

/// A wire request type as JSON.
fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("invariant: wire request types always serialize")
}

/// A caller's text as one URL path segment: everything but unreserved characters percent-encoded.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_stable_kinds() {
        assert_eq!(
            kind_of_status(StatusCode::BAD_REQUEST),
            ClientErrorKind::Invalid
        );
        assert_eq!(
            kind_of_status(StatusCode::NOT_FOUND),
            ClientErrorKind::NotFound
        );
        assert_eq!(
            kind_of_status(StatusCode::CONFLICT),
            ClientErrorKind::Refused
        );
        assert_eq!(
            kind_of_status(StatusCode::UNAUTHORIZED),
            ClientErrorKind::Refused
        );
        assert_eq!(
            kind_of_status(StatusCode::UNPROCESSABLE_ENTITY),
            ClientErrorKind::Refused
        );
        assert_eq!(
            kind_of_status(StatusCode::SERVICE_UNAVAILABLE),
            ClientErrorKind::Unavailable
        );
        assert_eq!(
            kind_of_status(StatusCode::BAD_GATEWAY),
            ClientErrorKind::Server
        );
        assert_eq!(
            kind_of_status(StatusCode::INTERNAL_SERVER_ERROR),
            ClientErrorKind::Server
        );
    }

    #[test]
    fn the_next_link_is_found_among_links() {
        assert_eq!(
            next_link("</api/v1/volumes?limit=2&after=ab>; rel=\"next\"").as_deref(),
            Some("/api/v1/volumes?limit=2&after=ab")
        );
        assert_eq!(
            next_link("</a>; rel=\"prev\", </b>; rel=\"next\"").as_deref(),
            Some("/b")
        );
        assert_eq!(next_link("</a>; rel=\"prev\""), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn urls_are_normalized_and_checked() {
        let c = Client::new("http://127.0.0.1:8090/api/v1/", None).unwrap();
        assert_eq!(c.base, "http://127.0.0.1:8090");
        let c = Client::new("https://appliance:8443", Some("t")).unwrap();
        assert_eq!(c.base, "https://appliance:8443");
        assert!(matches!(
            Client::new("127.0.0.1:8090", None),
            Err(ClientError::BadUrl { .. })
        ));
        assert!(matches!(
            Client::new("ftp://x", None),
            Err(ClientError::BadUrl { .. })
        ));
        assert!(matches!(
            Client::new("http://x", Some("a\nb")),
            Err(ClientError::BadToken)
        ));
    }

    #[test]
    fn api_errors_show_the_field_and_how_to_authenticate() {
        let e = ClientError::Api {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody {
                error: "size must be positive".into(),
                code: volume_api::ErrorCode::InvalidRequest,
                field: Some("size".into()),
            },
        };
        assert_eq!(e.to_string(), "size must be positive (field: size)");
        let e = ClientError::Api {
            status: StatusCode::UNAUTHORIZED,
            body: ErrorBody {
                error: "missing or wrong bearer token".into(),
                code: volume_api::ErrorCode::Unauthorized,
                field: None,
            },
        };
        assert!(e.to_string().contains("VOLUMECTL_TOKEN"));
        assert_eq!(e.kind(), ClientErrorKind::Refused);
    }
}
