//! The official `openai` Python client against the server (tests/openai_client.py): the test
//! installs it in a virtual environment under target/ on first use; a failed install fails the
//! test with pip's error.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `cmd`, panicking with its output when it fails.
fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A virtual environment with `openai`, made once (the marker file says it is complete).
fn openai_venv() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let python = venv.join("bin").join("python");
    let ready = venv.join("openai-installed");
    if !ready.exists() {
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        );
        run(
            Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai",
            ]),
            "pip install openai",
        );
        std::fs::write(&ready, b"").unwrap();
    }
    python
}

#[test]
fn the_openai_python_client_talks_to_the_server() {
    let python = openai_venv();
    let server = support::start(4);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    run(
        Command::new(python)
            .arg(script)
            .arg(format!("http://{}/v1", server.addr()))
            .arg(support::MODEL),
        "the openai client script",
    );
    server.shutdown().unwrap();
}
