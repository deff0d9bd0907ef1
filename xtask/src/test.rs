//! `cargo xtask test`: the project's whole test suite on a fresh machine.
//!
//! Installs what the tests need and the project cannot ship (Mesa's lavapipe Vulkan driver, so
//! the CubeCL kernels run on the CPU through wgpu), fetches the test model, runs every test in
//! release mode with the wgpu kernels enabled (the kernels' own tests and the end-to-end checks
//! of the root package on wgpu), and checks that the CUDA build compiles (`cargo check`).

use std::process::Command;

use anyhow::{Context, Result, bail};

const APT_PACKAGES: [&str; 2] = ["mesa-vulkan-drivers", "libvulkan1"];

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn ensure_lavapipe() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !root {
        bail!(
            "the kernel tests need {missing:?}: run `sudo apt-get install {}`",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing))
}

pub fn test() -> Result<()> {
    ensure_lavapipe()?;
    let path = test_assets::smollm2_gguf()?;
    eprintln!("test model: {}", path.display());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo).args([
        "test",
        "--release",
        "--workspace",
        "--features",
        "kernels/wgpu,adadim-e2e/wgpu",
    ]))?;
    // The `adadim` binary on CUDA, with every crate it uses. `check`, not `build`: nothing
    // here can run CUDA code, and type-checking it takes about a minute, where building the
    // kernels crate alone took ~6 (code generation for the burn and CubeCL stack under the
    // feature), a sixth of a cold CI run on 2 cores.
    run(Command::new(&cargo).args([
        "check",
        "--release",
        "-p",
        "adadim-cli",
        "--features",
        "cuda",
    ]))
}
