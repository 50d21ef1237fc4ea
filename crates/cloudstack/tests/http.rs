//! The client against an in-process HTTP server that verifies every signature with `sign::verify`
//! and answers with scripted CloudStack bodies.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, State};
use axum::http::{Method as HttpMethod, StatusCode};
use axum::response::{IntoResponse, Response};
use cloudstack::{
    sign, Client, Config, CreateVolume, ErrorKind, JobPollPolicy, JobStatus, ListSnapshots,
    ListVms, ListVolumes, Method, RetryPolicy, Secret,
};
use serde_json::{json, Value};

const API_KEY: &str = "TESTAPIKEY";
const SECRET: &str = "TESTSECRET-not-real";

#[derive(Debug, Clone)]
struct Call {
    method: HttpMethod,
    /// The request's `Content-Type`, if any.
    content_type: Option<String>,
    command: String,
    params: Vec<(String, String)>,
}

impl Call {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone)]
enum Reply {
    Json(u16, Value),
    Raw(u16, &'static str),
    /// A job of command class `cmd` that is pending until the instant, then succeeds with the value.
    JobDoneAt(std::time::Instant, &'static str, Value),
    /// 429 with `Retry-After: SECS`.
    Throttled(u64),
}

#[derive(Default)]
struct ServerState {
    /// Replies per command, in order; the last one repeats.
    scripts: HashMap<String, VecDeque<Reply>>,
    calls: Vec<Call>,
    /// When each call arrived.
    call_times: Vec<std::time::Instant>,
    /// Requests refused for a bad key, signature or expiry.
    refused: usize,
}

#[derive(Clone)]
struct TestServer {
    state: Arc<Mutex<ServerState>>,
    url: String,
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn cs_error(command: &str, errorcode: u16, cserrorcode: u32, text: &str) -> Reply {
    Reply::Json(
        errorcode,
        json!({ format!("{}response", command.to_lowercase()):
            {"uuidList": [], "errorcode": errorcode, "cserrorcode": cserrorcode, "errortext": text} }),
    )
}

fn ok(body: Value) -> Reply {
    Reply::Json(200, body)
}

fn json_reply(status: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(status).expect("valid status");
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn api(
    State(state): State<Arc<Mutex<ServerState>>>,
    method: HttpMethod,
    headers: axum::http::HeaderMap,
    Form(params): Form<Vec<(String, String)>>,
) -> Response {
    let command = param(&params, "command").unwrap_or_default().to_owned();
    let unauthorized = || {
        state.lock().expect("state lock").refused += 1;
        json_reply(
            401,
            &json!({ format!("{}response", command.to_lowercase()):
                {"errorcode": 401, "errortext": "unable to verify user credentials and/or request signature"} }),
        )
    };
    let Some(sig) = param(&params, "signature").map(str::to_owned) else {
        return unauthorized();
    };
    if param(&params, "apiKey") != Some(API_KEY) {
        return unauthorized();
    }
    if param(&params, "signatureVersion") == Some("3") {
        let Some(expires) = param(&params, "expires") else {
            return unauthorized();
        };
        let Ok(expires) = chrono::DateTime::parse_from_str(expires, "%Y-%m-%dT%H:%M:%S%z") else {
            return unauthorized();
        };
        if expires <= chrono::Utc::now() {
            return unauthorized();
        }
    }
    let signed: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "signature")
        .cloned()
        .collect();
    if !sign::verify(SECRET, &signed, &sig) {
        return unauthorized();
    }
    let reply = {
        let mut st = state.lock().expect("state lock");
        st.calls.push(Call {
            method,
            content_type: headers
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            command: command.clone(),
            params: signed,
        });
        st.call_times.push(std::time::Instant::now());
        match st.scripts.get_mut(&command) {
            Some(q) if q.len() > 1 => q.pop_front(),
            Some(q) => q.front().cloned(),
            None => None,
        }
    };
    match reply {
        Some(Reply::Json(status, body)) => json_reply(status, &body),
        Some(Reply::Raw(status, text)) => (
            StatusCode::from_u16(status).expect("valid status"),
            text.to_owned(),
        )
            .into_response(),
        Some(Reply::JobDoneAt(at, cmd, result)) => {
            let jobid = param(&params, "jobid").unwrap_or_default();
            let done = std::time::Instant::now() >= at;
            json_reply(
                200,
                &json!({"queryasyncjobresultresponse": {"jobid": jobid, "cmd": cmd,
                    "jobstatus": u8::from(done), "jobprocstatus": 0, "jobresultcode": 0,
                    "jobresulttype": "object", "jobresult": if done { result } else { Value::Null }}}),
            )
        }
        Some(Reply::Throttled(secs)) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", secs.to_string())],
            "too many requests",
        )
            .into_response(),
        None => json_reply(
            431,
            &json!({"errorresponse": {"errorcode": 431, "errortext": format!("unscripted command {command}")}}),
        ),
    }
}

impl TestServer {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(ServerState::default()));
        let app = axum::Router::new()
            .route("/client/api", axum::routing::get(api).post(api))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        Self {
            state,
            url: format!("http://{addr}/client/api"),
        }
    }

    fn script(&self, command: &str, replies: Vec<Reply>) {
        self.state
            .lock()
            .expect("state lock")
            .scripts
            .insert(command.to_owned(), replies.into());
    }

    fn calls(&self) -> Vec<Call> {
        self.state.lock().expect("state lock").calls.clone()
    }

    /// Arrival times of the calls of `command`.
    fn times_of(&self, command: &str) -> Vec<std::time::Instant> {
        let st = self.state.lock().expect("state lock");
        st.calls
            .iter()
            .zip(&st.call_times)
            .filter(|(c, _)| c.command == command)
            .map(|(_, t)| *t)
            .collect()
    }

    fn calls_of(&self, command: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.command == command)
            .collect()
    }

    fn config(&self) -> Config {
        Config {
            retry: RetryPolicy {
                max_attempts: 4,
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(20),
            },
            job_poll: JobPollPolicy {
                initial: Duration::from_millis(5),
                max: Duration::from_millis(20),
                dense: Duration::from_millis(2),
            },
            ..Config::new(&self.url, API_KEY, Secret::new(SECRET))
        }
    }

    fn client(&self) -> Client {
        Client::new(self.config()).expect("client")
    }
}

fn volume_json(id: &str) -> Value {
    json!({"id": id, "name": format!("vol-{id}"), "state": "Ready", "size": 1073741824u64, "type": "DATADISK"})
}

#[tokio::test]
async fn list_zones_is_a_signed_get_with_signature_version_3() {
    let srv = TestServer::start().await;
    srv.script("listZones", vec![ok(fixture("listZones_default.json"))]);
    let zones = srv.client().list_zones().await.expect("listZones");
    assert_eq!(zones.len(), 1);
    assert_eq!(zones[0].id, "1");
    assert_eq!(zones[0].name, "Sydney");
    let calls = srv.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, HttpMethod::GET);
    assert_eq!(calls[0].param("response"), Some("json"));
    assert_eq!(calls[0].param("signatureVersion"), Some("3"));
    // `yyyy-MM-dd'T'HH:mm:ssZ` with a numeric offset, e.g. `2026-08-12T10:00:00+0000`.
    let expires = calls[0].param("expires").expect("expires").to_owned();
    assert_eq!(expires.len(), "2026-08-12T10:00:00+0000".len(), "{expires}");
    assert!(expires.ends_with("+0000"), "{expires}");
    let parsed = chrono::DateTime::parse_from_str(&expires, "%Y-%m-%dT%H:%M:%S%z")
        .expect("expires parses as yyyy-MM-ddTHH:mm:ssZ");
    let ahead = parsed.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(
        ahead > chrono::Duration::minutes(9) && ahead <= chrono::Duration::minutes(10),
        "expires {expires} is not about 10 minutes ahead"
    );
}

#[tokio::test]
async fn signature_version_2_without_expires_is_accepted() {
    let srv = TestServer::start().await;
    srv.script("listZones", vec![ok(json!({"listzonesresponse": {}}))]);
    let client = Client::new(Config {
        signature_expiry: None,
        ..srv.config()
    })
    .expect("client");
    assert!(client.list_zones().await.expect("listZones").is_empty());
    let calls = srv.calls();
    assert_eq!(calls[0].param("expires"), None);
    assert_eq!(calls[0].param("signatureVersion"), None);
}

#[tokio::test]
async fn wrong_secret_is_unauthorized_and_not_retried() {
    let srv = TestServer::start().await;
    srv.script("listZones", vec![ok(fixture("listZones_default.json"))]);
    let client = Client::new(Config {
        secret_key: Secret::new("wrong"),
        ..srv.config()
    })
    .expect("client");
    let err = client.list_zones().await.expect_err("must be refused");
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    assert_eq!(err.error_code(), Some(401));
    assert!(err
        .error_text()
        .is_some_and(|t| t.contains("unable to verify")));
    assert!(srv.calls().is_empty());
    assert_eq!(
        srv.state.lock().expect("state lock").refused,
        1,
        "a refused signature must not be retried"
    );
    assert!(
        !format!("{client:?}").contains("wrong"),
        "secret leaked in Debug"
    );
}

#[tokio::test]
async fn create_volume_posts_a_signed_form_and_rounds_size_up() {
    let srv = TestServer::start().await;
    srv.script(
        "createVolume",
        vec![ok(fixture("createVolume_default.json"))],
    );
    let name = "vol a+b/c=d&e~f*g é 日本";
    let job = srv
        .client()
        .create_volume(&CreateVolume {
            name: name.to_owned(),
            zone_id: "zone-1".to_owned(),
            disk_offering_id: "offering-1".to_owned(),
            size_bytes: Some(10 * cloudstack::GIB + 1),
        })
        .await
        .expect("createVolume");
    assert_eq!(job.job_id, "createvolumejob");
    assert_eq!(
        job.resource_id.as_deref(),
        Some("60338035-92fb-4d27-98d4-b60ad4b38b87")
    );
    let calls = srv.calls();
    assert_eq!(calls[0].method, HttpMethod::POST);
    // A servlet container decodes a form without a charset as ISO-8859-1.
    assert_eq!(
        calls[0].content_type.as_deref(),
        Some("application/x-www-form-urlencoded; charset=UTF-8")
    );
    assert_eq!(calls[0].param("name"), Some(name));
    assert_eq!(calls[0].param("size"), Some("11"));
    assert_eq!(calls[0].param("zoneid"), Some("zone-1"));
    assert_eq!(calls[0].param("diskofferingid"), Some("offering-1"));
}

#[tokio::test]
async fn attach_detach_delete() {
    let srv = TestServer::start().await;
    srv.script(
        "attachVolume",
        vec![ok(fixture("attachVolume_default.json"))],
    );
    srv.script(
        "detachVolume",
        vec![ok(fixture("detachVolume_default.json"))],
    );
    srv.script(
        "deleteVolume",
        vec![ok(fixture("deleteVolume_default.json"))],
    );
    let client = srv.client();
    let job = client
        .attach_volume("vol-1", "vm-1", Some(0))
        .await
        .expect("attach");
    assert_eq!(job.job_id, "attachvolumejob");
    client
        .attach_volume("vol-1", "vm-1", None)
        .await
        .expect("attach");
    assert_eq!(
        client.detach_volume("vol-1").await.expect("detach").job_id,
        "detachvolumejob"
    );
    client.delete_volume("vol-1").await.expect("delete");
    let attaches = srv.calls_of("attachVolume");
    assert_eq!(attaches[0].param("deviceid"), Some("0"));
    assert_eq!(attaches[0].param("virtualmachineid"), Some("vm-1"));
    assert_eq!(attaches[1].param("deviceid"), None);
    assert!(srv.calls().iter().all(|c| c.method == HttpMethod::POST));
    assert_eq!(srv.calls_of("deleteVolume")[0].param("id"), Some("vol-1"));
}

#[tokio::test]
async fn throttled_then_success_is_retried() {
    let srv = TestServer::start().await;
    srv.script(
        "listVolumes",
        vec![
            cs_error(
                "listVolumes",
                429,
                4250,
                "The given command 'listVolumes' has reached the API limit",
            ),
            ok(fixture("listVolumes_default.json")),
        ],
    );
    let vols = srv
        .client()
        .list_volumes(&ListVolumes::default())
        .await
        .expect("retried to success");
    assert_eq!(vols.len(), 1);
    assert_eq!(srv.calls_of("listVolumes").len(), 2);
}

#[tokio::test]
async fn mutation_throttled_then_success_is_retried() {
    let srv = TestServer::start().await;
    srv.script(
        "attachVolume",
        vec![
            cs_error("attachVolume", 429, 4250, "API limit"),
            ok(fixture("attachVolume_default.json")),
        ],
    );
    let job = srv
        .client()
        .attach_volume("v", "m", None)
        .await
        .expect("retried to success");
    assert_eq!(job.job_id, "attachvolumejob");
    assert_eq!(srv.calls_of("attachVolume").len(), 2);
}

/// CloudStack, or a proxy in front of it, may have carried out a change it answered with a server error:
/// sending it again could make a second volume (or a second job), so the error goes back to the caller.
#[tokio::test]
async fn a_change_answered_with_a_server_error_is_not_sent_again() {
    let srv = TestServer::start().await;
    let client = srv.client();
    let create = CreateVolume {
        name: "once".to_owned(),
        zone_id: "zone-1".to_owned(),
        disk_offering_id: "offering-1".to_owned(),
        size_bytes: None,
    };
    srv.script(
        "createVolume",
        vec![
            Reply::Raw(502, "<html><body>502 Bad Gateway</body></html>"),
            ok(fixture("createVolume_default.json")),
        ],
    );
    let err = client.create_volume(&create).await.expect_err("502");
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    assert_eq!(srv.calls_of("createVolume").len(), 1, "sent once");

    srv.script(
        "attachVolume",
        vec![
            cs_error(
                "attachVolume",
                530,
                4250,
                "Internal error executing command",
            ),
            ok(fixture("attachVolume_default.json")),
        ],
    );
    let err = client.attach_volume("v", "m", None).await.expect_err("530");
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    assert_eq!(srv.calls_of("attachVolume").len(), 1, "sent once");

    srv.script(
        "deleteVolume",
        vec![
            cs_error("deleteVolume", 534, 4380, "storage temporarily unavailable"),
            ok(json!({"deletevolumeresponse": {"success": "true"}})),
        ],
    );
    let err = client.delete_volume("v").await.expect_err("534");
    assert_eq!(
        err.kind(),
        ErrorKind::Transient,
        "what became of it is unknown: {err}"
    );
    assert_eq!(srv.calls_of("deleteVolume").len(), 1, "sent once");

    // A read is sent again after the same answers.
    srv.script(
        "listVolumes",
        vec![
            Reply::Raw(502, "<html><body>502 Bad Gateway</body></html>"),
            cs_error("listVolumes", 530, 4250, "Internal error executing command"),
            ok(fixture("listVolumes_default.json")),
        ],
    );
    let vols = client
        .list_volumes(&ListVolumes::default())
        .await
        .expect("retried to success");
    assert_eq!(vols.len(), 1);
    assert_eq!(srv.calls_of("listVolumes").len(), 3);
}

/// An unreadable answer to a change is a lost answer (CloudStack may have carried it out): transient, not
/// sent again, and not a decoding failure the caller would give up on.
#[tokio::test]
async fn an_unreadable_answer_to_a_change_is_a_lost_answer() {
    let srv = TestServer::start().await;
    let client = srv.client();
    let create = CreateVolume {
        name: "once".to_owned(),
        zone_id: "zone-1".to_owned(),
        disk_offering_id: "offering-1".to_owned(),
        size_bytes: None,
    };
    for (i, body) in [
        "",
        r#"{"createvolumeresponse":{"id":"#,
        "<html><body>maintenance</body></html>",
        r#"{"createvolumeresponse":{}}"#,
    ]
    .into_iter()
    .enumerate()
    {
        srv.script("createVolume", vec![Reply::Raw(200, body)]);
        let err = client.create_volume(&create).await.expect_err(body);
        assert_eq!(err.kind(), ErrorKind::Transient, "{body:?}: {err}");
        assert!(err.to_string().contains("could not be read"), "{err}");
        assert_eq!(srv.calls_of("createVolume").len(), i + 1, "sent once");
    }
    srv.script("deleteVolume", vec![Reply::Raw(200, "")]);
    let err = client.delete_volume("v").await.expect_err("empty");
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    // A read's unreadable answer stays a decoding failure.
    srv.script("listZones", vec![Reply::Raw(200, "")]);
    let err = client.list_zones().await.expect_err("empty");
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
}

#[tokio::test]
async fn parameter_error_is_not_retried() {
    let srv = TestServer::start().await;
    srv.script(
        "attachVolume",
        vec![cs_error(
            "attachVolume",
            431,
            4350,
            "Please provide either a volume id, or a tuple(device id, instance id)",
        )],
    );
    let err = srv
        .client()
        .attach_volume("v", "m", None)
        .await
        .expect_err("431");
    assert_eq!(err.kind(), ErrorKind::InvalidParameter);
    assert_eq!(err.cs_error_code(), Some(4350));
    assert_eq!(srv.calls_of("attachVolume").len(), 1);
}

#[tokio::test]
async fn not_found_text_maps_to_not_found_and_get_returns_none() {
    let srv = TestServer::start().await;
    srv.script(
        "listVolumes",
        vec![cs_error(
            "listVolumes",
            431,
            4350,
            "Unable to find volume with id vol-x",
        )],
    );
    let client = srv.client();
    assert_eq!(client.get_volume("vol-x").await.expect("none"), None);
    let call = &srv.calls_of("listVolumes")[0];
    assert_eq!(call.param("id"), Some("vol-x"));
    assert_eq!(call.param("listall"), Some("true"));
    srv.script(
        "deleteVolume",
        vec![cs_error(
            "deleteVolume",
            431,
            4350,
            "Unable to find volume with id vol-x",
        )],
    );
    let err = client.delete_volume("vol-x").await.expect_err("not found");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(srv.calls_of("deleteVolume").len(), 1);
    // CloudStack 4.13 and older say it so (sic) for a volume already removed.
    srv.script(
        "deleteVolume",
        vec![cs_error(
            "deleteVolume",
            431,
            4350,
            "Unable to aquire volume with ID: 42",
        )],
    );
    let err = client.delete_volume("vol-x").await.expect_err("not found");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn internal_errors_are_retried_up_to_the_bound() {
    let srv = TestServer::start().await;
    srv.script(
        "listZones",
        vec![cs_error(
            "listZones",
            530,
            4345,
            "Internal error executing command",
        )],
    );
    let err = srv.client().list_zones().await.expect_err("exhausted");
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert_eq!(srv.calls_of("listZones").len(), 4);
}

#[tokio::test]
async fn gateway_errors_without_cloudstack_body_are_retried() {
    let srv = TestServer::start().await;
    srv.script(
        "listZones",
        vec![
            Reply::Raw(502, "<html>bad gateway</html>"),
            ok(fixture("listZones_default.json")),
        ],
    );
    assert_eq!(srv.client().list_zones().await.expect("retried").len(), 1);
    assert_eq!(srv.calls_of("listZones").len(), 2);

    srv.script("listDiskOfferings", vec![Reply::Raw(404, "not here")]);
    let err = srv.client().list_disk_offerings().await.expect_err("404");
    assert_eq!(err.kind(), ErrorKind::Other);
    assert_eq!(srv.calls_of("listDiskOfferings").len(), 1);
}

#[tokio::test]
async fn transport_errors_are_transient_after_retries() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let cfg = three_quick_attempts(format!("http://{closed}/client/api"));
    let err = Client::new(cfg)
        .expect("client")
        .list_zones()
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(err.to_string().contains("3 attempt"), "{err}");
}

#[tokio::test]
async fn empty_list_is_empty() {
    let srv = TestServer::start().await;
    srv.script("listVolumes", vec![ok(json!({"listvolumesresponse": {}}))]);
    srv.script(
        "listVirtualMachines",
        vec![ok(json!({"listvirtualmachinesresponse": {}}))],
    );
    let client = srv.client();
    assert!(client
        .list_volumes(&ListVolumes::default())
        .await
        .expect("list")
        .is_empty());
    assert_eq!(client.get_virtual_machine("vm-1").await.expect("get"), None);
}

#[tokio::test]
async fn all_pages_are_fetched() {
    let srv = TestServer::start().await;
    let page = |ids: &[&str], count: Option<u64>| {
        let mut inner = json!({"volume": ids.iter().map(|i| volume_json(i)).collect::<Vec<_>>()});
        if let Some(c) = count {
            inner["count"] = json!(c);
        }
        ok(json!({ "listvolumesresponse": inner }))
    };
    srv.script(
        "listVolumes",
        vec![
            page(&["a", "b"], Some(5)),
            page(&["c", "d"], Some(5)),
            page(&["e"], Some(5)),
        ],
    );
    let q = ListVolumes {
        virtualmachine_id: Some("vm-1".to_owned()),
        page_size: Some(2),
        ..ListVolumes::default()
    };
    let vols = srv.client().list_volumes(&q).await.expect("list");
    let ids: Vec<&str> = vols.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c", "d", "e"]);
    let calls = srv.calls_of("listVolumes");
    assert_eq!(calls.len(), 3);
    for (i, c) in calls.iter().enumerate() {
        assert_eq!(c.param("page"), Some((i + 1).to_string().as_str()));
        assert_eq!(c.param("pagesize"), Some("2"));
        assert_eq!(c.param("virtualmachineid"), Some("vm-1"));
    }

    // Without `count`, a short or empty page ends the listing.
    let srv = TestServer::start().await;
    srv.script(
        "listVolumes",
        vec![
            page(&["a", "b"], None),
            page(&["c", "d"], None),
            ok(json!({"listvolumesresponse": {}})),
        ],
    );
    let vols = srv.client().list_volumes(&q).await.expect("list");
    assert_eq!(vols.len(), 4);
    assert_eq!(srv.calls_of("listVolumes").len(), 3);
}

/// CloudStack refuses a page size above its `default.page.size`: the list is asked again in pages of the size
/// its refusal names, and later lists use that size from the start.
#[tokio::test]
async fn a_refused_page_size_falls_back_to_the_one_named_and_is_kept() {
    let srv = TestServer::start().await;
    let refusal = || {
        cs_error(
            "listVolumes",
            431,
            4350,
            "Page size can't exceed max allowed page size value: 2",
        )
    };
    let page = |ids: &[&str]| {
        ok(json!({ "listvolumesresponse":
            {"count": 3, "volume": ids.iter().map(|i| volume_json(i)).collect::<Vec<_>>()} }))
    };
    srv.script(
        "listVolumes",
        vec![refusal(), page(&["a", "b"]), page(&["c"])],
    );
    let client = srv.client();
    let vols = client
        .list_volumes(&ListVolumes::default())
        .await
        .expect("listed in smaller pages");
    let ids: Vec<&str> = vols.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    let sizes: Vec<Option<String>> = srv
        .calls_of("listVolumes")
        .iter()
        .map(|c| c.param("pagesize").map(str::to_owned))
        .collect();
    assert_eq!(
        sizes,
        [Some("500".into()), Some("2".into()), Some("2".into())]
    );
    srv.script("listZones", vec![ok(fixture("listZones_default.json"))]);
    client.list_zones().await.expect("zones");
    assert_eq!(srv.calls_of("listZones")[0].param("pagesize"), Some("2"));
}

fn job_reply(status: u32, result: Value) -> Reply {
    ok(
        json!({"queryasyncjobresultresponse": {"jobid": "job-1", "jobstatus": status, "jobprocstatus": 0,
        "jobresultcode": if status == 2 { 530 } else { 0 }, "jobresulttype": "object", "jobresult": result}}),
    )
}

#[tokio::test]
async fn job_pending_then_success() {
    let srv = TestServer::start().await;
    srv.script(
        "queryAsyncJobResult",
        vec![
            job_reply(0, Value::Null),
            job_reply(0, Value::Null),
            ok(fixture("queryAsyncJobResult_attachvolumejob.json")),
        ],
    );
    let vol = srv
        .client()
        .wait_volume_job("job-1", Duration::from_secs(10))
        .await
        .expect("succeeds");
    assert_eq!(vol.id, "60338035-92fb-4d27-98d4-b60ad4b38b87");
    assert_eq!(vol.device_id, Some(5));
    let calls = srv.calls_of("queryAsyncJobResult");
    assert_eq!(calls.len(), 3);
    assert!(calls
        .iter()
        .all(|c| c.param("jobid") == Some("job-1") && c.method == HttpMethod::GET));
}

#[tokio::test]
async fn job_failure_carries_the_error_text() {
    let srv = TestServer::start().await;
    srv.script(
        "queryAsyncJobResult",
        vec![
            job_reply(0, Value::Null),
            job_reply(
                2,
                json!({"errorcode": 431, "cserrorcode": 4350, "errortext": "Please provide either a volume id, or a tuple(device id, instance id)"}),
            ),
        ],
    );
    let err = srv
        .client()
        .wait_job("job-1", Duration::from_secs(10))
        .await
        .expect_err("fails");
    assert_eq!(err.kind(), ErrorKind::JobFailed);
    assert_eq!(err.error_code(), Some(431));
    assert!(err
        .error_text()
        .is_some_and(|t| t.starts_with("Please provide")));
    assert_eq!(
        err.job_error().map(|e| e.kind()),
        Some(ErrorKind::InvalidParameter)
    );
}

/// An answer to a poll that does not say the job's state (empty, cut off, not JSON, a single refusal) is
/// asked again; the wait ends with the job, not with "still running" long before the deadline.
#[tokio::test]
async fn a_poll_answer_that_says_nothing_of_the_job_is_asked_again() {
    let srv = TestServer::start().await;
    srv.script(
        "queryAsyncJobResult",
        vec![
            Reply::Raw(200, ""),
            job_reply(0, Value::Null),
            Reply::Raw(200, r#"{"queryasyncjobresultresponse":{"jobid":""#),
            cs_error(
                "queryAsyncJobResult",
                401,
                4365,
                "unable to verify user credentials and/or request signature",
            ),
            Reply::Raw(200, "<?xml version=\"1.0\"?><queryasyncjobresultresponse/>"),
            cs_error(
                "queryAsyncJobResult",
                431,
                4350,
                "Unable to execute API command",
            ),
            job_reply(0, Value::Null),
            ok(fixture("queryAsyncJobResult_attachvolumejob.json")),
        ],
    );
    let vol = srv
        .client()
        .wait_volume_job("job-1", Duration::from_secs(10))
        .await
        .expect("the job's own outcome");
    assert_eq!(vol.device_id, Some(5));
    assert_eq!(srv.calls_of("queryAsyncJobResult").len(), 8);

    // Credentials refused poll after poll: the wait ends with that error, not at the deadline.
    srv.script(
        "queryAsyncJobResult",
        vec![cs_error(
            "queryAsyncJobResult",
            401,
            4365,
            "unable to verify user credentials and/or request signature",
        )],
    );
    let started = std::time::Instant::now();
    let err = srv
        .client()
        .wait_job("job-2", Duration::from_secs(30))
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn job_still_running_at_the_deadline_is_distinct() {
    let srv = TestServer::start().await;
    srv.script("queryAsyncJobResult", vec![job_reply(0, Value::Null)]);
    let client = srv.client();
    let started = std::time::Instant::now();
    let err = client
        .wait_job("job-1", Duration::from_millis(150))
        .await
        .expect_err("still running");
    assert_eq!(err.kind(), ErrorKind::JobStillRunning);
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(srv.calls_of("queryAsyncJobResult").len() >= 2);

    // Waiting again with the same id picks the job up where it is.
    srv.script(
        "queryAsyncJobResult",
        vec![job_reply(1, json!({"volume": volume_json("v1")}))],
    );
    let result = client
        .wait_job("job-1", Duration::from_secs(5))
        .await
        .expect("resumed");
    assert_eq!(result["volume"]["id"], "v1");
}

#[tokio::test]
async fn fixtures_through_the_client() {
    let srv = TestServer::start().await;
    srv.script(
        "listVirtualMachines",
        vec![ok(fixture("listVirtualMachines_default.json"))],
    );
    srv.script(
        "listDiskOfferings",
        vec![ok(fixture("listDiskOfferings_default.json"))],
    );
    let jobs = fixture("cloudstack-go-AsyncJobService.json")["listAsyncJobs"].clone();
    srv.script("listAsyncJobs", vec![ok(jobs)]);
    let client = srv.client();
    let vms = client
        .list_virtual_machines(&ListVms {
            list_all: true,
            ..ListVms::default()
        })
        .await
        .expect("vms");
    assert_eq!(vms.len(), 2);
    assert_eq!(
        srv.calls_of("listVirtualMachines")[0].param("listall"),
        Some("true")
    );
    assert_eq!(
        client
            .get_virtual_machine("2601")
            .await
            .expect("vm")
            .map(|v| v.state),
        Some("Starting".to_owned())
    );
    let offerings = client.list_disk_offerings().await.expect("offerings");
    assert_eq!(offerings[0].disk_size_gb, 10);
    let jobs = client.list_async_jobs().await.expect("jobs");
    assert_eq!(jobs[0].job_id, "6679e6b9-4bf2-4d83-b9f0-235fc1609227");
}

#[tokio::test]
async fn raw_request_unwraps_and_rejects_reserved_parameters() {
    let srv = TestServer::start().await;
    srv.script("listZones", vec![ok(fixture("listZones_default.json"))]);
    let client = srv.client();
    let v = client
        .request("listZones", &[("available", "true".to_owned())])
        .await
        .expect("raw");
    assert_eq!(v["zone"][0]["name"], "Sydney");
    assert_eq!(srv.calls()[0].param("available"), Some("true"));
    let err = client
        .request("listZones", &[("signature", "x".to_owned())])
        .await
        .expect_err("reserved");
    assert_eq!(err.kind(), ErrorKind::InvalidParameter);
    assert_eq!(srv.calls().len(), 1);
}

#[test]
fn config_errors() {
    let base = || {
        Config::new(
            "https://cloud.example/client/api",
            API_KEY,
            Secret::new(SECRET),
        )
    };
    assert_eq!(
        Client::new(Config {
            url: "not a url".into(),
            ..base()
        })
        .expect_err("url")
        .kind(),
        ErrorKind::Config
    );
    assert_eq!(
        Client::new(Config {
            url: "ftp://x/y".into(),
            ..base()
        })
        .expect_err("scheme")
        .kind(),
        ErrorKind::Config
    );
    assert_eq!(
        Client::new(Config {
            secret_key: Secret::new(""),
            ..base()
        })
        .expect_err("secret")
        .kind(),
        ErrorKind::Config
    );
    let missing = Config {
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..base()
    };
    assert_eq!(
        Client::new(missing).expect_err("ca").kind(),
        ErrorKind::Config
    );
    let dir = std::env::temp_dir().join(format!("cloudstack-ca-{}", std::process::id()));
    std::fs::write(&dir, "not a certificate").expect("write");
    let garbage = Config {
        ca_file: Some(dir.clone()),
        ..base()
    };
    let res = Client::new(garbage);
    std::fs::remove_file(&dir).expect("cleanup");
    assert_eq!(res.expect_err("garbage ca").kind(), ErrorKind::Config);
    assert!(Client::new(base()).is_ok());
}

/// A configuration for `url` that makes at most three attempts, a millisecond or two apart.
fn three_quick_attempts(url: String) -> Config {
    Config {
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        },
        ..Config::new(url, API_KEY, Secret::new(SECRET))
    }
}

/// A server that reads each request and closes the connection without answering; returns its URL and
/// the number of connections it saw.
async fn start_hang_up_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    start_raw_server(None).await
}

/// A server over raw TCP: reads each request's head, then hangs up (`answer_len` `None`) or answers 200 with
/// a JSON string of `answer_len` bytes and no length (read until the connection closes). Returns its URL and
/// the number of connections it saw.
async fn start_raw_server(
    answer_len: Option<usize>,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let Some(len) = answer_len else {
                    return;
                };
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n\"";
                if tcp.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let block = vec![b'a'; 1 << 20];
                let mut sent = 0;
                while sent < len {
                    let n = block.len().min(len - sent);
                    if tcp.write_all(&block[..n]).await.is_err() {
                        return;
                    }
                    sent += n;
                }
                let _ = tcp.write_all(b"\"").await;
            });
        }
    });
    (format!("http://{addr}/client/api"), seen)
}

#[tokio::test]
async fn a_post_lost_after_sending_is_not_retried_but_a_get_is() {
    let (url, seen) = start_hang_up_server().await;
    let cfg = three_quick_attempts(url);
    let client = Client::new(cfg).expect("client");
    let err = client
        .attach_volume("v", "m", None)
        .await
        .expect_err("no answer");
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the POST may have been acted on"
    );
    let err = client.list_zones().await.expect_err("no answer");
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "a GET is retried"
    );
}

#[tokio::test]
async fn an_answer_over_the_bound_fails_without_being_read_whole_or_retried() {
    let (url, seen) = start_raw_server(Some(cloudstack::MAX_ANSWER + 1)).await;
    let cfg = three_quick_attempts(url);
    let client = Client::new(cfg).expect("client");
    let err = client
        .list_zones()
        .await
        .expect_err("an answer over the bound");
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
    assert!(err.to_string().contains("larger than 64 MiB"), "{err}");
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "not retried"
    );
    // Just under the bound is read (and is no CloudStack answer, so it fails to decode, differently).
    let (url, _) = start_raw_server(Some(cloudstack::MAX_ANSWER - 2)).await;
    let client = Client::new(Config::new(url, API_KEY, Secret::new(SECRET))).expect("client");
    let err = client
        .list_zones()
        .await
        .expect_err("not CloudStack's answer");
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
    assert!(!err.to_string().contains("larger than"), "{err}");
}

const ATTACH_CMD: &str = "org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd";

/// A client with the default job schedule and retry policy (the other tests shorten them).
fn default_poll_client(srv: &TestServer) -> Client {
    Client::new(Config {
        job_poll: JobPollPolicy::default(),
        retry: RetryPolicy::default(),
        ..srv.config()
    })
    .expect("client")
}

#[tokio::test]
async fn waiters_of_one_job_share_its_polls() {
    let srv = TestServer::start().await;
    let done_at = std::time::Instant::now() + Duration::from_millis(300);
    srv.script(
        "queryAsyncJobResult",
        vec![Reply::JobDoneAt(
            done_at,
            ATTACH_CMD,
            json!({"volume": volume_json("v1")}),
        )],
    );
    let client = default_poll_client(&srv);
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.wait_job("job-1", Duration::from_secs(10)).await })
        })
        .collect();
    for w in waiters {
        let result = w.await.expect("join").expect("job succeeds");
        assert_eq!(result["volume"]["id"], "v1");
    }
    // One waiter polls about 0, 50, 125, 237, 406 ms: twenty waiters poll no more than one does.
    let polls = srv.calls_of("queryAsyncJobResult").len();
    assert!(
        (2..=8).contains(&polls),
        "20 waiters of one job made {polls} polls"
    );
}

#[tokio::test]
async fn a_job_is_noticed_soon_and_sooner_once_its_duration_is_learned() {
    let srv = TestServer::start().await;
    let client = default_poll_client(&srv);
    let mut lateness = Vec::new();
    for round in 0..3 {
        let started = std::time::Instant::now();
        let done_at = started + Duration::from_millis(200);
        srv.script(
            "queryAsyncJobResult",
            vec![Reply::JobDoneAt(
                done_at,
                ATTACH_CMD,
                json!({"volume": volume_json("v1")}),
            )],
        );
        client
            .wait_job(&format!("job-{round}"), Duration::from_secs(10))
            .await
            .expect("job succeeds");
        lateness.push(done_at.elapsed());
    }
    let learned = client
        .learned_job_duration(ATTACH_CMD)
        .expect("a duration is learned");
    // Each job's duration is learned as the middle of the gap between the poll that last found it pending
    // and the one that found it done, so each estimate is within half a gap of 200 ms. With the 50 ms
    // schedule (50, 75, 112 ms delays, each spread by up to 20 %) a gap around 200 ms is at most 135 ms:
    // an estimate, and so their average, is at least 200 - 68 ms.
    assert!(
        learned >= Duration::from_millis(130) && learned < Duration::from_millis(400),
        "learned {learned:?}"
    );
    // Without a learned duration the 50 ms schedule notices the job within about one delay; with it,
    // polls every 10 ms around 200 ms do. (Generous bounds: the machine may be loaded.)
    assert!(lateness[0] < Duration::from_millis(250), "{lateness:?}");
    assert!(lateness[2] < Duration::from_millis(60), "{lateness:?}");
}

#[tokio::test]
async fn a_throttling_cloud_pauses_every_poll() {
    let srv = TestServer::start().await;
    let done_at = std::time::Instant::now();
    srv.script(
        "queryAsyncJobResult",
        vec![
            Reply::Throttled(1),
            Reply::JobDoneAt(done_at, ATTACH_CMD, json!({"volume": volume_json("v1")})),
        ],
    );
    let client = default_poll_client(&srv);
    let started = std::time::Instant::now();
    let wait = |i: usize| {
        let c = client.clone();
        tokio::spawn(async move {
            c.wait_job(&format!("job-{i}"), Duration::from_secs(10))
                .await
        })
    };
    let mut waiters = vec![wait(0)];
    // The first poll is refused; waiters that come during the pause wait for it too.
    tokio::time::sleep(Duration::from_millis(30)).await;
    waiters.extend((1..5).map(wait));
    for w in waiters {
        w.await
            .expect("join")
            .expect("job succeeds after the pause");
    }
    let times = srv.times_of("queryAsyncJobResult");
    // The first poll was refused with Retry-After: 1; no poll is sent during the pause.
    let during_pause = times
        .iter()
        .filter(|t| t.duration_since(started) > Duration::from_millis(50))
        .filter(|t| t.duration_since(started) < Duration::from_millis(950))
        .count();
    assert_eq!(during_pause, 0, "polls during the pause: {times:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(times.len() <= 5 + 5, "{} polls", times.len());
}

#[tokio::test]
async fn transport_errors_never_show_the_signed_url() {
    // A port nothing listens on: every attempt fails to connect.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        l.local_addr().expect("addr").port()
    };
    let client = Client::new(Config {
        retry: RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
        },
        ..Config::new(
            format!("http://127.0.0.1:{port}/client/api"),
            API_KEY,
            Secret::new(SECRET),
        )
    })
    .expect("client");
    let err = client.list_zones().await.expect_err("nothing listens");
    assert_eq!(err.kind(), ErrorKind::Transient);
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    for secret in [API_KEY, "signature", "apiKey", "expires"] {
        assert!(!text.contains(secret), "{secret:?} shown in {text}");
    }
}

#[tokio::test]
async fn snapshot_calls_decode_real_bodies() {
    let srv = TestServer::start().await;
    srv.script(
        "createSnapshot",
        vec![ok(fixture("createSnapshot_default.json"))],
    );
    srv.script(
        "deleteSnapshot",
        vec![ok(fixture("deleteSnapshot_default.json"))],
    );
    srv.script(
        "revertSnapshot",
        vec![ok(
            json!({"revertsnapshotresponse": {"jobid": "9c1d-revert"}}),
        )],
    );
    srv.script(
        "listSnapshots",
        vec![ok(fixture("listSnapshots_default.json"))],
    );
    srv.script(
        "queryAsyncJobResult",
        vec![
            ok(fixture("queryAsyncJobResult_createsnapshotjob.json")),
            ok(fixture("queryAsyncJobResult_deletesnapshotjob.json")),
        ],
    );
    let client = srv.client();
    let job = client
        .create_snapshot("fe1ada16-57a0-40ae-b577-01a153690fb4", Some("before-test"))
        .await
        .expect("createSnapshot");
    assert_eq!(job.job_id, "1300001");
    assert_eq!(job.resource_id.as_deref(), Some("190547"));
    let call = &srv.calls_of("createSnapshot")[0];
    assert_eq!(
        call.param("volumeid"),
        Some("fe1ada16-57a0-40ae-b577-01a153690fb4")
    );
    assert_eq!(call.param("name"), Some("before-test"));
    let snap = client
        .wait_snapshot_job(&job.job_id, Duration::from_secs(5))
        .await
        .expect("job result");
    assert_eq!(snap.id, "190547");
    assert_eq!(snap.volume_id, "fe1ada16-57a0-40ae-b577-01a153690fb4");
    assert_eq!(snap.state, "CreatedOnPrimary");
    assert_eq!(snap.volume_type.as_deref(), Some("ROOT"));
    assert_eq!(snap.snapshot_type.as_deref(), Some("MANUAL"));
    let list = client
        .list_snapshots(&ListSnapshots {
            volume_id: Some("89341".into()),
            list_all: true,
            ..ListSnapshots::default()
        })
        .await
        .expect("listSnapshots");
    assert_eq!(list.len(), 3);
    assert_eq!(list[0].id, "188402");
    assert_eq!(list[0].volume_id, "89341", "numeric ids decode as text");
    assert_eq!(list[0].state, "BackedUp");
    assert_eq!(list[0].created.as_deref(), Some("2014-09-17T19:55:48+0900"));
    let q = &srv.calls_of("listSnapshots")[0];
    assert_eq!(q.param("volumeid"), Some("89341"));
    assert_eq!(q.param("listall"), Some("true"));
    let del = client
        .delete_snapshot("188402")
        .await
        .expect("deleteSnapshot");
    assert_eq!(del.job_id, "1300002");
    assert_eq!(del.resource_id, None);
    assert_eq!(
        srv.calls_of("deleteSnapshot")[0].param("id"),
        Some("188402")
    );
    match client.query_async_job(&del.job_id).await.expect("job") {
        JobStatus::Succeeded(r) => assert_eq!(r["success"], true),
        other => panic!("the delete job finished: {other:?}"),
    }
    let rev = client
        .revert_snapshot("188401")
        .await
        .expect("revertSnapshot");
    assert_eq!(rev.job_id, "9c1d-revert");
    assert_eq!(
        srv.calls_of("revertSnapshot")[0].param("id"),
        Some("188401")
    );
    // Snapshot-changing calls are POST forms, the list a GET.
    assert_eq!(Method::for_command("revertSnapshot"), Method::Post);
    assert_eq!(Method::for_command("listSnapshots"), Method::Get);
}

/// stopVirtualMachine and destroyVirtualMachine as CloudStack answers them: a `{"jobid"}` kick-off, then the VM
/// under `jobresult.virtualmachine` (the shape of cloudstack-go's `VirtualMachineService.json` stop result).
#[tokio::test]
async fn vm_stop_and_destroy_decode_real_bodies() {
    let srv = TestServer::start().await;
    srv.script(
        "stopVirtualMachine",
        vec![ok(
            json!({"stopvirtualmachineresponse": {"jobid": "5c1e0d2b-stop"}}),
        )],
    );
    srv.script(
        "destroyVirtualMachine",
        vec![ok(
            json!({"destroyvirtualmachineresponse": {"jobid": "8a4f66c3-destroy"}}),
        )],
    );
    let vm = |state: &str| {
        json!({"id": "915d3c63-1f5b-4e0b-a3b2-0a6f1d2c7e11", "name": "test-vm-1",
               "displayname": "test-vm-1", "instancename": "i-2-104-VM", "state": state,
               "zoneid": "1128bd56-b4d9-4ac6-a7b9-c715b187ce11", "hypervisor": "KVM",
               "created": "2024-03-02T10:01:02+0000"})
    };
    let job = |id: &str, cmd: &str, state: &str| {
        ok(json!({"queryasyncjobresultresponse": {
            "accountid": "02c9bf08-6f36-44b1-a57f-df0708f90de4", "cmd": cmd, "created": "2024-03-02T10:05:00+0000",
            "completed": "2024-03-02T10:05:03+0000", "jobid": id, "jobinstanceid": "915d3c63-1f5b-4e0b-a3b2-0a6f1d2c7e11",
            "jobinstancetype": "VirtualMachine", "jobprocstatus": 0, "jobresultcode": 0, "jobresulttype": "object",
            "jobstatus": 1, "jobresult": {"virtualmachine": vm(state)}}}))
    };
    srv.script(
        "queryAsyncJobResult",
        vec![
            job(
                "5c1e0d2b-stop",
                "org.apache.cloudstack.api.command.user.vm.StopVMCmd",
                "Stopped",
            ),
            job(
                "8a4f66c3-destroy",
                "org.apache.cloudstack.api.command.user.vm.DestroyVMCmd",
                "Expunging",
            ),
        ],
    );
    let client = srv.client();
    let id = "915d3c63-1f5b-4e0b-a3b2-0a6f1d2c7e11";
    let stop = client
        .stop_virtual_machine(id, true)
        .await
        .expect("stopVirtualMachine");
    assert_eq!(stop.job_id, "5c1e0d2b-stop");
    let call = &srv.calls_of("stopVirtualMachine")[0];
    assert_eq!(call.param("id"), Some(id));
    assert_eq!(call.param("forced"), Some("true"));
    let stopped = client
        .wait_vm_job(&stop.job_id, Duration::from_secs(5))
        .await
        .expect("stop job");
    assert_eq!(stopped.state, "Stopped");
    assert_eq!(stopped.id, id);
    let destroy = client
        .destroy_virtual_machine(id, true)
        .await
        .expect("destroyVirtualMachine");
    assert_eq!(destroy.job_id, "8a4f66c3-destroy");
    let call = &srv.calls_of("destroyVirtualMachine")[0];
    assert_eq!(call.param("id"), Some(id));
    assert_eq!(call.param("expunge"), Some("true"));
    let gone = client
        .wait_vm_job(&destroy.job_id, Duration::from_secs(5))
        .await
        .expect("destroy job");
    assert_eq!(gone.state, "Expunging");
    assert_eq!(gone.instance_name.as_deref(), Some("i-2-104-VM"));
    assert_eq!(Method::for_command("destroyVirtualMachine"), Method::Post);
}
