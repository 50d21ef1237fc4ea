//! A third-party client (the Python `cs` package) against the simulator.

mod common;

use std::process::Command;

use common::{Harness, KEY, SECRET};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_python_cs_client_drives_a_volume_lifecycle() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let probe = Command::new(&python).args(["-c", "import cs"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the Python `cs` package is missing (pip install cs): {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run {python} (set PYTHON or install python3): {e}"),
    }
    let h = Harness::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/cs_client.py");
    let (url, appliance) = (h.sim.api_url(), h.sim.appliance_vm_id().to_owned());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args([url.as_str(), KEY, SECRET, appliance.as_str()])
            .output()
    })
    .await
    .expect("join")
    .expect("run the python script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cs script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "zones 1",
        "created ",
        "attached 1",
        "detached",
        "deleted",
        "refused 401",
    ] {
        assert!(stdout.contains(step), "missing step {step:?} in:\n{stdout}");
    }
    h.sim.shutdown().await;
}
