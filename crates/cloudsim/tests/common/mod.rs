//! Shared test harness: a simulator on port 0 in a temporary directory, and a raw signed HTTP client.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cloudsim::{RunningSimulator, SimConfig, Simulator};
use cloudstack::sign::{encode_value, signature};
use serde_json::Value;

pub const KEY: &str = "test-key";
pub const SECRET: &str = "test-secret";

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub sim: RunningSimulator,
    pub http: reqwest::Client,
}

/// A configuration in `dir` on port 0 with plain files (no loop devices) and short jobs.
pub fn config(dir: &tempfile::TempDir) -> SimConfig {
    let mut cfg = SimConfig::new(dir.path().join("state"), dir.path().join("by-id"));
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.api_key = KEY.into();
    cfg.secret_key = SECRET.into();
    cfg.job_delay = Duration::from_millis(50);
    cfg.use_loop_devices = false;
    cfg.seed = 7;
    cfg
}

/// Builds the parameters of a request signed with `secret`; `expires` switches to signature version 3.
pub fn signed(
    key: &str,
    secret: &str,
    command: &str,
    params: &[(&str, &str)],
    expires: Option<String>,
) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = vec![
        ("apiKey".into(), key.into()),
        ("command".into(), command.into()),
        ("response".into(), "json".into()),
    ];
    p.extend(
        params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    if let Some(e) = expires {
        p.push(("signatureVersion".into(), "3".into()));
        p.push(("expires".into(), e));
    }
    let sig = signature(secret, &p);
    p.push(("signature".into(), sig));
    p
}

pub fn encode(params: &[(String, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", encode_value(k), encode_value(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn future_expiry() -> String {
    (chrono::Utc::now() + chrono::Duration::minutes(10))
        .format("%Y-%m-%dT%H:%M:%S%z")
        .to_string()
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut SimConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(&dir);
        f(&mut cfg);
        let sim = Simulator::start(cfg).await.expect("simulator starts");
        Self {
            dir,
            sim,
            http: reqwest::Client::new(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn by_id_dir(&self) -> PathBuf {
        self.dir.path().join("by-id")
    }

    pub fn link_of(&self, volume_id: &str) -> PathBuf {
        self.by_id_dir().join(format!(
            "virtio-{}",
            cloudsim::virtio_serial(volume_id).expect("uuid")
        ))
    }

    pub fn backing_of(&self, volume_id: &str) -> PathBuf {
        self.state_dir()
            .join("volumes")
            .join(format!("{volume_id}.img"))
    }

    /// Sends already-built parameters by GET; returns the status and body.
    pub async fn get_raw(&self, params: &[(String, String)]) -> (u16, Value) {
        let url = format!("{}?{}", self.sim.api_url(), encode(params));
        let resp = self.http.get(url).send().await.expect("request");
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(
            ctype.starts_with("application/json"),
            "content type {ctype}"
        );
        (status, resp.json().await.expect("json body"))
    }

    /// Sends already-built parameters as a form POST.
    pub async fn post_raw(&self, params: &[(String, String)]) -> (u16, Value) {
        let resp = self
            .http
            .post(self.sim.api_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encode(params))
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("json body"))
    }

    /// A v3-signed GET; returns status and the body inside `<command>response`.
    pub async fn call(&self, command: &str, params: &[(&str, &str)]) -> (u16, Value) {
        let p = signed(KEY, SECRET, command, params, Some(future_expiry()));
        let (status, body) = self.get_raw(&p).await;
        let key = format!("{}response", command.to_lowercase());
        let inner = body
            .get(&key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key} in {body}"));
        (status, inner)
    }

    /// A call that must succeed.
    pub async fn ok(&self, command: &str, params: &[(&str, &str)]) -> Value {
        let (status, inner) = self.call(command, params).await;
        assert_eq!(status, 200, "{command} failed: {inner}");
        inner
    }

    /// Polls `queryAsyncJobResult` until the job leaves status 0 (deadline 10 s).
    pub async fn wait_job(&self, jobid: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let job = self.ok("queryAsyncJobResult", &[("jobid", jobid)]).await;
            if job["jobstatus"] != 0 {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {jobid} still pending: {job}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Creates a volume (custom offering, `gb` GB) and waits for the job; returns its id.
    pub async fn create_volume(&self, name: &str, gb: u64) -> String {
        let custom = self
            .sim
            .disk_offerings()
            .into_iter()
            .find(|o| o.2.is_none())
            .expect("custom offering")
            .0;
        let zone = self.sim.zone_id().to_owned();
        let size = gb.to_string();
        let r = self
            .ok(
                "createVolume",
                &[
                    ("name", name),
                    ("zoneid", &zone),
                    ("diskofferingid", &custom),
                    ("size", &size),
                ],
            )
            .await;
        let id = r["id"].as_str().expect("id").to_owned();
        let job = self.wait_job(r["jobid"].as_str().expect("jobid")).await;
        assert_eq!(job["jobstatus"], 1, "{job}");
        id
    }

    /// Starts an attach and waits for its job; returns the job.
    pub async fn attach(&self, volume: &str, vm: &str, device: Option<u32>) -> Value {
        let dev = device.map(|d| d.to_string());
        let mut p = vec![("id", volume), ("virtualmachineid", vm)];
        if let Some(d) = &dev {
            p.push(("deviceid", d));
        }
        let r = self.ok("attachVolume", &p).await;
        self.wait_job(r["jobid"].as_str().expect("jobid")).await
    }

    pub async fn detach(&self, volume: &str) -> Value {
        let r = self.ok("detachVolume", &[("id", volume)]).await;
        self.wait_job(r["jobid"].as_str().expect("jobid")).await
    }

    /// Runs `stopVirtualMachine`/`startVirtualMachine` and waits for a successful job.
    pub async fn vm_job(&self, command: &str, vm: &str) -> Value {
        let r = self.ok(command, &[("id", vm)]).await;
        let job = self.wait_job(r["jobid"].as_str().expect("jobid")).await;
        assert_eq!(job["jobstatus"], 1, "{command}: {job}");
        assert_eq!(job["jobinstancetype"], "VirtualMachine");
        job
    }

    /// A call whose error body is wrapped in `errorresponse` (unknown or missing command).
    pub async fn call_raw(&self, params: &[(&str, &str)]) -> (u16, Value) {
        let p: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut p = p;
        p.push(("apiKey".into(), KEY.into()));
        p.push(("response".into(), "json".into()));
        let sig = signature(SECRET, &p);
        p.push(("signature".into(), sig));
        self.get_raw(&p).await
    }

    pub async fn volume(&self, id: &str) -> Option<Value> {
        let r = self.ok("listVolumes", &[("id", id)]).await;
        r.get("volume").and_then(|v| v.get(0)).cloned()
    }
}
