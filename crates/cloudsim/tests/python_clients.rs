//! Third-party CloudStack clients from PyPI against the simulator: the `cs` package and
//! apache-libcloud's CloudStack driver.

mod common;

use std::process::Command;

use common::{Harness, KEY, SECRET};

/// Runs `tests/py/<script>` (which needs the Python module `module`) against a fresh simulator and
/// checks that it printed every step.
async fn run_client(module: &str, pip_name: &str, script: &str, steps: &[&str]) {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let probe = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the Python package {pip_name} is missing (pip install {pip_name}): {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run {python} (set PYTHON or install python3): {e}"),
    }
    let h = Harness::start().await;
    let script = format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"));
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
        "{pip_name} script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in steps {
        assert!(stdout.contains(step), "missing step {step:?} in:\n{stdout}");
    }
    h.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_python_cs_client_lists_drives_a_volume_and_a_root_attach() {
    run_client(
        "cs",
        "cs",
        "cs_client.py",
        &[
            "zones 1",
            "vms 4",
            "offerings 1 templates 1",
            "created ",
            "attached 1",
            "detached",
            "root refused while running",
            "root attached 0",
            "deleted",
            "refused 401",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_python_libcloud_driver_lists_and_drives_a_volume() {
    run_client(
        "libcloud",
        "apache-libcloud",
        "libcloud_client.py",
        &[
            "nodes 4",
            "sizes 1",
            "images 1",
            "locations 1",
            "created ",
            "attached 1",
            "detached",
            "destroyed",
        ],
    )
    .await;
}
