//! `volumectl` reads whole listings page by page, following the daemon's `Link: <…>; rel="next"` headers: with a
//! page size smaller than the listing, `volumes list`, `ops list` and `exports list` still print everything, in
//! the daemon's order, and `-q` prints their ids one per line. Drives a real `volume-daemon serve --sim` (build it first: `cargo build -p volume-daemon`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A `volume-daemon serve --sim` on ephemeral ports; stopped (SIGTERM, then SIGKILL) on drop.
struct Daemon {
    child: Child,
    api: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Self {
        let ctl = PathBuf::from(env!("CARGO_BIN_EXE_volumectl"));
        let bin = ctl.parent().expect("a directory").join("volume-daemon");
        assert!(
            bin.is_file(),
            "{} does not exist: build the daemon first with `cargo build -p volume-daemon`",
            bin.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(bin)
            .args(["serve", "--sim", "--listen", "127.0.0.1:0"])
            .args(["--nbd-listen", "127.0.0.1:0", "--sim-listen", "127.0.0.1:0"])
            .args(["--sim-job-delay-ms", "0", "--state-dir"])
            .arg(dir.path().join("state"))
            .env_remove("VOLUME_DAEMON_CONFIG")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn volume-daemon");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let api = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                l.strip_prefix("api listening on ")
                    .map(|a| a.trim().to_string())
            })
            .expect("the daemon prints its API address");
        std::thread::spawn(move || for _ in lines {});
        let d = Self {
            child,
            api: format!("http://{api}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.ctl(&["health"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_volumectl"))
            .args(args)
            .env("VOLUMECTL_URL", &self.api)
            .env_remove("VOLUMECTL_TOKEN")
            .env_remove("VOLUMECTL_PAGE_SIZE")
            .stdin(Stdio::null())
            .output()
            .expect("run volumectl")
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.ctl(&[&["--json"], args].concat());
        assert!(
            out.status.success(),
            "volumectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    /// `GET` of the daemon's API, in one request.
    fn get(&self, path: &str) -> Value {
        reqwest::blocking::get(format!("{}/api/v1{path}", self.api))
            .and_then(|r| r.json())
            .expect("GET")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Our own child, by its handle; SIGTERM first so it removes its loop devices, then make sure.
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped; no memory is involved.
        let _ = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ids(v: &Value, key: &str) -> Vec<String> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x[key].as_str().expect("id").to_string())
        .collect()
}

#[test]
fn ext_lists_are_read_page_by_page_to_the_end() {
    let d = Daemon::start();
    let offerings = d.json(&["cloud", "offerings"]);
    let custom = offerings
        .as_array()
        .expect("offerings")
        .iter()
        .find(|o| o["custom"] == true)
        .expect("a custom-size offering")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let zone = d.json(&["cloud", "zones"])[0]["id"]
        .as_str()
        .expect("zone id")
        .to_string();
    for i in 0..7 {
        let name = format!("page-{i}");
        d.json(&[
            "volumes",
            "create",
            "--name",
            &name,
            "--size",
            "1G",
            "--zone-id",
            &zone,
            "--disk-offering-id",
            &custom,
        ]);
    }
    let whole = d.get("/volumes");
    assert_eq!(whole.as_array().expect("volumes").len(), 7);
    for size in ["1", "2", "3", "7", "500"] {
        let listed = d.json(&["--page-size", size, "volumes", "list"]);
        assert_eq!(
            ids(&listed, "volume_id"),
            ids(&whole, "volume_id"),
            "pages of {size}"
        );
        let ops = d.json(&["--page-size", size, "ops", "list"]);
        assert_eq!(
            ids(&ops, "id"),
            ids(&d.get("/operations"), "id"),
            "pages of {size}"
        );
    }
    // The state filter is the daemon's; paging keeps it.
    let detached = d.json(&["--page-size", "2", "volumes", "list", "--state", "detached"]);
    assert_eq!(ids(&detached, "volume_id").len(), 7);
    let attached = d.json(&["--page-size", "2", "volumes", "list", "--state", "attached"]);
    assert_eq!(attached, Value::Array(Vec::new()));
    // `--limit` asks for one page of operations.
    let three = d.json(&["ops", "list", "--limit", "3"]);
    assert_eq!(three.as_array().expect("operations").len(), 3);
    // Exports: the body's shape is kept and `count` is the total.
    let vols = ids(&whole, "volume_id");
    for v in &vols[..2] {
        d.json(&["volumes", "attach", v, "--appliance"]);
    }
    let exports = d.json(&["--page-size", "1", "exports", "list"]);
    let whole_exports = d.get("/exports");
    assert_eq!(exports["count"], 2);
    assert_eq!(exports["exports"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        ids(&exports["exports"], "export_name"),
        ids(&whole_exports["exports"], "export_name")
    );
    let attached = d.json(&["--page-size", "1", "volumes", "list", "--state", "attached"]);
    assert_eq!(ids(&attached, "volume_id"), vols[..2].to_vec());
    // `-q` prints the ids alone, one per line, in the daemon's order: an export's is its volume's id.
    let quiet = |args: &[&str]| -> Vec<String> {
        let out = d.ctl(&[&["-q", "--page-size", "2"], args].concat());
        assert!(out.status.success(), "volumectl -q {args:?}");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .lines()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(quiet(&["volumes", "list"]), vols);
    assert_eq!(quiet(&["ops", "list"]), ids(&d.get("/operations"), "id"));
    assert_eq!(quiet(&["ops", "list"]).len(), 9, "7 creates and 2 attaches");
    assert_eq!(
        quiet(&["exports", "list"]),
        ids(&whole_exports["exports"], "volume_id")
    );
    assert_eq!(quiet(&["exports", "list"]).len(), 2);
    for v in &vols[..2] {
        d.json(&["volumes", "detach", v]);
    }
    // A bad page size is refused before anything is asked.
    let out = d.ctl(&["--page-size", "0", "volumes", "list"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
}
