//! Decoding of CloudStack response bodies: the `<command>response` wrapper, error bodies, lists (with
//! `{}` as the empty list), asynchronous job kick-offs and job results.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::de::parse_bool;
use crate::error::Error;
use crate::types::{AsyncJob, JobError, JobStatus};

/// CloudStack's error fields found in a response object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiErrorBody {
    pub errorcode: u32,
    pub cserrorcode: Option<u32>,
    pub errortext: String,
}

fn decode_err(command: &str, what: impl Into<String>) -> Error {
    Error::Decode {
        command: command.to_owned(),
        what: what.into(),
        source: None,
    }
}

fn as_u32(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Strips the `<command lower-cased>response` wrapper. Accepts any single `…response` key as well
/// (e.g. `errorresponse`), since error bodies do not always use the command's name.
pub(crate) fn unwrap_response(command: &str, body: &Value) -> Result<Value, Error> {
    let Value::Object(map) = body else {
        return Err(decode_err(command, "the body is not a JSON object"));
    };
    let key = format!("{}response", command.to_ascii_lowercase());
    if let Some(inner) = map.get(&key) {
        return Ok(inner.clone());
    }
    let mut wrappers = map
        .iter()
        .filter(|(k, _)| k.to_ascii_lowercase().ends_with("response"));
    match (wrappers.next(), wrappers.next()) {
        (Some((_, inner)), None) => Ok(inner.clone()),
        _ => Err(decode_err(
            command,
            format!("no `{key}` object in the body"),
        )),
    }
}

/// The error fields of an unwrapped response object, when it is an error.
pub(crate) fn error_body(inner: &Value) -> Option<ApiErrorBody> {
    let obj = inner.as_object()?;
    let errorcode = obj.get("errorcode").and_then(as_u32)?;
    Some(ApiErrorBody {
        errorcode,
        cserrorcode: obj.get("cserrorcode").and_then(as_u32),
        errortext: obj.get("errortext").and_then(as_string).unwrap_or_default(),
    })
}

/// Finds the error fields anywhere CloudStack puts them: in the wrapper or at the top level.
pub(crate) fn error_in_body(command: &str, body: &Value) -> Option<ApiErrorBody> {
    unwrap_response(command, body)
        .ok()
        .and_then(|inner| error_body(&inner))
        .or_else(|| error_body(body))
}

/// A decoded page of a list response.
#[derive(Debug)]
pub(crate) struct Page<T> {
    pub items: Vec<T>,
    pub count: Option<u64>,
}

/// Decodes the list under `key` of an unwrapped list response. `{}` is the empty list; when `key` is
/// missing but exactly one array is present, that array is taken.
pub(crate) fn list<T: DeserializeOwned>(
    command: &str,
    inner: &Value,
    key: &str,
) -> Result<Page<T>, Error> {
    let empty = Map::new();
    let obj = match inner {
        Value::Object(m) => m,
        Value::Null => &empty,
        _ => return Err(decode_err(command, "the response is not a JSON object")),
    };
    let count = obj.get("count").and_then(|c| match c {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    });
    let array = match obj.get(key) {
        Some(Value::Array(a)) => Some(a),
        Some(Value::Null) | None => {
            let mut arrays = obj.values().filter_map(Value::as_array);
            match (arrays.next(), arrays.next()) {
                (Some(a), None) => Some(a),
                _ => None,
            }
        }
        Some(_) => return Err(decode_err(command, format!("`{key}` is not an array"))),
    };
    let mut items = Vec::new();
    for (i, item) in array
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let decoded = serde_path_to_error::deserialize(item).map_err(|e| Error::Decode {
            command: command.to_owned(),
            what: format!("`{key}[{i}].{}` is malformed", e.path()),
            source: Some(e.into_inner()),
        })?;
        items.push(decoded);
    }
    Ok(Page { items, count })
}

/// Decodes a single object (e.g. `jobresult.volume`).
pub(crate) fn object<T: DeserializeOwned>(
    command: &str,
    v: &Value,
    what: &str,
) -> Result<T, Error> {
    serde_path_to_error::deserialize(v).map_err(|e| Error::Decode {
        command: command.to_owned(),
        what: format!("`{what}.{}` is malformed", e.path()),
        source: Some(e.into_inner()),
    })
}

/// Decodes the answer to an asynchronous command: `{"jobid": …}` plus `id` for create-type commands.
pub(crate) fn async_job(command: &str, inner: &Value) -> Result<AsyncJob, Error> {
    let job_id = inner.get("jobid").and_then(as_string).ok_or_else(|| {
        decode_err(
            command,
            "no `jobid` in the answer to an asynchronous command",
        )
    })?;
    let resource_id = inner.get("id").and_then(as_string);
    Ok(AsyncJob {
        job_id,
        resource_id,
    })
}

/// Decodes a `queryAsyncJobResult` answer into a [`JobStatus`].
pub(crate) fn job_status(command: &str, inner: &Value) -> Result<JobStatus, Error> {
    let status = inner
        .get("jobstatus")
        .and_then(as_u32)
        .ok_or_else(|| decode_err(command, "no numeric `jobstatus` in the job result"))?;
    let result = inner.get("jobresult").cloned().unwrap_or(Value::Null);
    match status {
        0 => Ok(JobStatus::Pending),
        1 => Ok(JobStatus::Succeeded(result)),
        2 => {
            let fields = error_body(&result);
            let result_code = inner
                .get("jobresultcode")
                .and_then(as_u32)
                .filter(|c| *c != 0);
            let errortext = fields
                .as_ref()
                .map(|f| f.errortext.clone())
                .filter(|t| !t.is_empty())
                .or_else(|| result.as_str().map(str::to_owned))
                .unwrap_or_else(|| "the job failed without an error text".to_owned());
            Ok(JobStatus::Failed(JobError {
                errorcode: fields
                    .as_ref()
                    .map(|f| f.errorcode)
                    .or(result_code)
                    .unwrap_or(530),
                cserrorcode: fields.and_then(|f| f.cserrorcode),
                errortext,
            }))
        }
        other => Err(decode_err(command, format!("unknown `jobstatus` {other}"))),
    }
}

/// Decodes a `{"success": true|"true", "displaytext": …}` answer.
pub(crate) fn success(command: &str, inner: &Value) -> Result<(bool, Option<String>), Error> {
    let ok = inner
        .get("success")
        .and_then(parse_bool)
        .ok_or_else(|| decode_err(command, "no boolean `success` in the answer"))?;
    Ok((ok, inner.get("displaytext").and_then(as_string)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{AsyncJobInfo, DiskOffering, VirtualMachine, Volume, Zone};

    fn fixture(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
    }

    #[test]
    fn fixture_attach_detach_create_kickoffs() {
        let j = async_job(
            "attachVolume",
            &unwrap_response("attachVolume", &fixture("attachVolume_default.json"))
                .expect("wrapper"),
        )
        .expect("job");
        assert_eq!(
            j,
            AsyncJob {
                job_id: "attachvolumejob".into(),
                resource_id: None
            }
        );
        let j = async_job(
            "detachVolume",
            &unwrap_response("detachVolume", &fixture("detachVolume_default.json"))
                .expect("wrapper"),
        )
        .expect("job");
        assert_eq!(j.job_id, "detachvolumejob");
        let j = async_job(
            "createVolume",
            &unwrap_response("createVolume", &fixture("createVolume_default.json"))
                .expect("wrapper"),
        )
        .expect("job");
        assert_eq!(j.job_id, "createvolumejob");
        assert_eq!(
            j.resource_id.as_deref(),
            Some("60338035-92fb-4d27-98d4-b60ad4b38b87")
        );
    }

    #[test]
    fn fixture_delete_success_as_string() {
        let inner = unwrap_response("deleteVolume", &fixture("deleteVolume_default.json"))
            .expect("wrapper");
        assert_eq!(
            success("deleteVolume", &inner).expect("success"),
            (true, None)
        );
    }

    #[test]
    fn fixture_error_body() {
        let body = fixture("deployVirtualMachine_deployfail.json");
        let e = error_in_body("deployVirtualMachine", &body).expect("error fields");
        assert_eq!(e.errorcode, 431);
        assert_eq!(e.cserrorcode, None);
        assert_eq!(e.errortext, "Unable to find service offering: 104");
        assert_eq!(
            crate::error::classify(e.errorcode, e.cserrorcode, &e.errortext),
            crate::ErrorKind::NotFound
        );
    }

    #[test]
    fn fixture_list_disk_offerings() {
        let inner = unwrap_response(
            "listDiskOfferings",
            &fixture("listDiskOfferings_default.json"),
        )
        .expect("wrapper");
        let page: Page<DiskOffering> =
            list("listDiskOfferings", &inner, "diskoffering").expect("list");
        assert_eq!(page.count, Some(1));
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0].id, "6345e3b7-227e-4209-8f8c-1f94219696e6");
        assert_eq!(page.items[0].disk_size_gb, 10);
        assert!(!page.items[0].custom);
    }

    #[test]
    fn fixture_list_virtual_machines_numeric_ids() {
        let inner = unwrap_response(
            "listVirtualMachines",
            &fixture("listVirtualMachines_default.json"),
        )
        .expect("wrapper");
        let page: Page<VirtualMachine> =
            list("listVirtualMachines", &inner, "virtualmachine").expect("list");
        assert_eq!(page.count, None);
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.items[0].id, "2600");
        assert_eq!(page.items[0].state, "Running");
        assert_eq!(page.items[0].zone_id.as_deref(), Some("1"));
        assert_eq!(page.items[0].root_device_id, Some(0));
        assert_eq!(page.items[1].state, "Starting");
    }

    #[test]
    fn fixture_list_volumes() {
        let inner =
            unwrap_response("listVolumes", &fixture("listVolumes_default.json")).expect("wrapper");
        let page: Page<Volume> = list("listVolumes", &inner, "volume").expect("list");
        let v = &page.items[0];
        assert_eq!(v.id, "fe1ada16-57a0-40ae-b577-01a153690fb4");
        assert_eq!(v.size, 139264);
        assert_eq!(v.device_id, Some(0));
        assert_eq!(v.volume_type.as_deref(), Some("ROOT"));
        assert_eq!(
            v.virtualmachine_id.as_deref(),
            Some("3239ade9-fd25-405c-8eda-59f0313a3fb0")
        );
        assert_eq!(v.state, "Ready");
        assert_eq!(v.destroyed, Some(false));
    }

    #[test]
    fn fixture_list_zones() {
        let inner =
            unwrap_response("listZones", &fixture("listZones_default.json")).expect("wrapper");
        let page: Page<Zone> = list("listZones", &inner, "zone").expect("list");
        assert_eq!(
            page.items,
            vec![Zone {
                id: "1".into(),
                name: "Sydney".into()
            }]
        );
    }

    #[test]
    fn fixture_list_async_jobs() {
        let all = fixture("cloudstack-go-AsyncJobService.json");
        let body = all.get("listAsyncJobs").expect("listAsyncJobs entry");
        let inner = unwrap_response("listAsyncJobs", body).expect("wrapper");
        let page: Page<AsyncJobInfo> = list("listAsyncJobs", &inner, "asyncjobs").expect("list");
        assert_eq!(page.count, Some(1));
        assert_eq!(page.items[0].job_id, "6679e6b9-4bf2-4d83-b9f0-235fc1609227");
        assert_eq!(page.items[0].result_code, Some(0));
        assert_eq!(page.items[0].job_status, None);
    }

    #[test]
    fn fixture_job_results() {
        for (file, state, device) in [
            ("queryAsyncJobResult_attachvolumejob.json", "Ready", Some(5)),
            (
                "queryAsyncJobResult_createvolumejob.json",
                "Allocated",
                None,
            ),
        ] {
            let inner = unwrap_response("queryAsyncJobResult", &fixture(file)).expect("wrapper");
            let JobStatus::Succeeded(result) =
                job_status("queryAsyncJobResult", &inner).expect("status")
            else {
                panic!("{file}: expected success");
            };
            let v: Volume = object("queryAsyncJobResult", &result["volume"], "jobresult.volume")
                .expect("volume");
            assert_eq!(v.id, "60338035-92fb-4d27-98d4-b60ad4b38b87");
            assert_eq!(v.size, 10_737_418_240);
            assert_eq!(v.state, state);
            assert_eq!(v.device_id, device);
        }
    }

    #[test]
    fn empty_list_and_failed_job_shapes() {
        let inner = unwrap_response(
            "listVolumes",
            &serde_json::json!({"listvolumesresponse": {}}),
        )
        .expect("wrapper");
        let page: Page<Volume> = list("listVolumes", &inner, "volume").expect("list");
        assert!(page.items.is_empty());

        let body = serde_json::json!({"queryasyncjobresultresponse": {"jobstatus": 2, "jobprocstatus": 0,
            "jobresultcode": 530, "jobresulttype": "object",
            "jobresult": {"errorcode": 431, "errortext": "Please provide either a volume id, or a tuple(device id, instance id)"}}});
        let inner = unwrap_response("queryAsyncJobResult", &body).expect("wrapper");
        let JobStatus::Failed(err) = job_status("queryAsyncJobResult", &inner).expect("status")
        else {
            panic!("expected failure");
        };
        assert_eq!(err.errorcode, 431);
        assert_eq!(err.kind(), crate::ErrorKind::InvalidParameter);

        let pending =
            serde_json::json!({"queryasyncjobresultresponse": {"jobstatus": "0", "jobid": 24}});
        let inner = unwrap_response("queryAsyncJobResult", &pending).expect("wrapper");
        assert_eq!(
            job_status("queryAsyncJobResult", &inner).expect("status"),
            JobStatus::Pending
        );
    }

    #[test]
    fn wrapper_missing_is_a_decode_error() {
        let e =
            unwrap_response("listZones", &serde_json::json!({"foo": 1})).expect_err("no wrapper");
        assert_eq!(e.kind(), crate::ErrorKind::Decode);
    }
}
