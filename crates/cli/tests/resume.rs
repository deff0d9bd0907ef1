//! `adadim quantize` on the shipped model: a run killed after some layers and resumed writes
//! the same bytes as an uninterrupted one, and so do runs on 1 and 2 threads; resuming with
//! other options is refused; output directories holding a user's files are refused, and
//! `--overwrite` replaces only this tool's files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// GPTQ-ada w3g64 on 8 samples of 256 tokens, each layer calibrated on the quantized layers'
/// output (so a resumed run must carry that output over), `extra` overriding or adding options.
fn quantize(out: &Path, extra: &[&str]) -> Command {
    let mut args = [
        ("--calib-samples", "8"),
        ("--calib-seqlen", "256"),
        ("--bits", "3"),
        ("--group-size", "64"),
        ("--recipe", "paper"),
        ("--method", "gptq"),
        ("--dim", "ada"),
        ("--propagate", "quantized"),
    ];
    let mut flags = Vec::new();
    let mut rest = extra.iter();
    while let Some(&a) = rest.next() {
        match args.iter_mut().find(|(k, _)| *k == a) {
            Some(slot) => slot.1 = rest.next().expect("a value"),
            None => flags.push(a),
        }
    }
    let mut c = Command::new(env!("CARGO_BIN_EXE_adadim"));
    c.arg("quantize")
        .arg("--model")
        .arg(test_assets::smollm2_gguf().unwrap())
        .arg("--calib")
        .arg(test_assets::repo_asset("lee-news.txt"))
        .args(args.iter().flat_map(|(k, v)| [k, v]))
        .arg("--out")
        .arg(out)
        .args(flags)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    c
}

fn run(mut c: Command) -> (bool, String) {
    let o = c.stderr(Stdio::piped()).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Every file of `dir` but the run's report (which holds timings), with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "adadim_report.json")
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn layers_done(partial: &Path) -> usize {
    std::fs::read_to_string(partial.join("adadim_progress.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["layers_done"].as_u64())
        .unwrap_or(0) as usize
}

#[test]
fn a_killed_run_resumes_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let (ok, err) = run(quantize(&whole, &[]));
    assert!(ok, "{err}");

    let out = dir.path().join("resumed");
    let partial = PathBuf::from(format!("{}.adadim-partial", out.display()));
    let mut child = quantize(&out, &[]).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while layers_done(&partial) < 5 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        assert!(start.elapsed() < Duration::from_secs(600), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: no destructor runs, as with a power loss.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists() && partial.is_dir());

    // Without --resume the interrupted run is neither lost nor mixed up with a new one.
    let (ok, err) = run(quantize(&out, &[]));
    assert!(!ok && err.contains("--resume"), "{err}");
    // Other options than the interrupted run's are refused, naming them.
    let (ok, err) = run(quantize(&out, &["--resume", "--calib-samples", "9"]));
    assert!(!ok && err.contains("calib_samples"), "{err}");
    let (ok, err) = run(quantize(&out, &["--resume", "--propagate", "fp"]));
    assert!(!ok && err.contains("propagate (interrupted run"), "{err}");
    assert!(partial.is_dir());

    let (ok, err) = run(quantize(&out, &["--resume"]));
    assert!(ok, "{err}");
    assert!(!partial.exists());
    let (a, b) = (files(&whole), files(&out));
    assert_eq!(
        a.iter().map(|f| &f.0).collect::<Vec<_>>(),
        b.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs after resuming");
    }
}

#[test]
fn output_directories_keep_user_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    std::fs::write(out.join("config.json"), "an older run").unwrap();
    let (ok, err) = run(quantize(&out, &["--method", "rtn"]));
    assert!(!ok && err.contains("--overwrite"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("config.json")).unwrap(),
        "an older run"
    );

    let (ok, err) = run(quantize(&out, &["--method", "rtn", "--overwrite"]));
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(config.contains("quantization_config"), "{config}");
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn one_and_two_threads_write_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    for method in ["rtn", "gptq"] {
        let outs: Vec<PathBuf> = ["1", "2"]
            .iter()
            .map(|threads| {
                let out = dir.path().join(format!("{method}-{threads}"));
                let mut c = quantize(
                    &out,
                    &[
                        "--method",
                        method,
                        "--calib-samples",
                        "4",
                        "--calib-seqlen",
                        "128",
                    ],
                );
                c.env("RAYON_NUM_THREADS", threads);
                let (ok, err) = run(c);
                assert!(ok, "{err}");
                out
            })
            .collect();
        let (a, b) = (files(&outs[0]), files(&outs[1]));
        assert_eq!(a.len(), b.len());
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert!(x == y, "{method}: {name} differs between 1 and 2 threads");
        }
    }
}
