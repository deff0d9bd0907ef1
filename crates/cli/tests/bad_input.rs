//! Bad input to `adadim`: a clear error naming the file, option or problem (each cause stated
//! once), a non-zero exit, and no output left behind.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

/// Runs `adadim args...` in `cwd`; returns success and stderr.
fn adadim(cwd: &Path, args: &[OsString]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_adadim"))
        .current_dir(cwd)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn os(items: &[&str]) -> Vec<OsString> {
    items.iter().map(OsString::from).collect()
}

/// `adadim quantize` with small defaults for whatever `extra` does not set.
fn quantize(dir: &Path, model: &Path, calib: &Path, extra: &[&str], out: &Path) -> (bool, String) {
    let mut args = os(&["quantize", "--model"]);
    args.extend([model.into(), "--calib".into(), calib.into()]);
    for (flag, value) in [
        ("--calib-samples", "4"),
        ("--calib-seqlen", "512"),
        ("--group-size", "64"),
    ] {
        if !extra.contains(&flag) {
            args.extend(os(&[flag, value]));
        }
    }
    args.extend(os(extra));
    if !extra.contains(&"--out") {
        args.extend(["--out".into(), out.into()]);
    }
    adadim(dir, &args)
}

fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Fails, names everything in `expect` exactly once, and leaves `dir` as it was.
fn check_failure(dir: &Path, what: &str, run: impl FnOnce() -> (bool, String), expect: &[&str]) {
    let before = listing(dir);
    let (ok, stderr) = run();
    assert!(!ok, "{what} succeeded");
    for e in expect {
        assert_eq!(
            stderr.matches(e).count(),
            1,
            "{what}: expected `{e}` exactly once in: {stderr}"
        );
    }
    assert_eq!(listing(dir), before, "{what} left files behind");
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let model = test_assets::smollm2_gguf().unwrap();
    let calib = test_assets::repo_asset("lee-news.txt");
    let empty = d.join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let truncated = d.join("truncated.gguf");
    std::fs::write(&truncated, &std::fs::read(&model).unwrap()[..4096]).unwrap();
    let plain = d.join("plain-file");
    std::fs::write(&plain, "not a directory").unwrap();
    let under_file = plain.join("out");
    let under_file = under_file.to_str().unwrap();

    let cases: Vec<(&Path, &Path, Vec<&str>, Vec<&str>)> = vec![
        (
            Path::new("/nonexistent/model.gguf"),
            &calib,
            vec![],
            vec!["/nonexistent/model.gguf"],
        ),
        (
            &truncated,
            &calib,
            vec![],
            vec!["truncated.gguf", "malformed"],
        ),
        (
            &model,
            &empty,
            vec![],
            vec!["empty calibration", "empty.txt"],
        ),
        (
            &model,
            &calib,
            vec!["--bits", "5"],
            vec!["unsupported bit width 5", "expected 2, 3, 4 or 8"],
        ),
        (
            &model,
            &calib,
            vec!["--group-size", "100"],
            vec!["does not divide"],
        ),
        (
            &model,
            &calib,
            vec!["--dim", "ic:foo"],
            vec!["unknown linear `foo`"],
        ),
        (
            &model,
            &calib,
            vec!["--calib-samples", "0"],
            vec!["invalid --calib-samples"],
        ),
        (
            &model,
            &calib,
            vec!["--calib-seqlen", "0"],
            vec!["invalid --calib-seqlen"],
        ),
        (
            &model,
            &calib,
            vec!["--calib-seqlen", "9000"],
            vec!["invalid --calib-seqlen", "8192"],
        ),
        (
            &model,
            &calib,
            vec!["--group-size", "0"],
            vec![
                "invalid value '0' for '--group-size",
                "-1 (whole dimension)",
            ],
        ),
        (
            &model,
            &calib,
            vec!["--method", "gptq", "--gptq-damp", "-0.5"],
            vec!["invalid --gptq-damp", "-0.5"],
        ),
        (
            &model,
            &calib,
            vec!["--method", "gptq", "--gptq-block-size", "0"],
            vec!["invalid --gptq-block-size"],
        ),
        (
            &model,
            &calib,
            vec!["--method", "gptq", "--gptq-static-groups", "false"],
            vec!["invalid --gptq-static-groups", "`ada`"],
        ),
        (
            &model,
            &calib,
            vec!["--method", "rtn", "--score", "gptq"],
            vec!["invalid --score", "needs method gptq"],
        ),
        (
            &model,
            &calib,
            vec!["--method", "rtn", "--refit", "true"],
            vec!["invalid --refit", "needs method gptq"],
        ),
        (
            &model,
            &calib,
            vec!["--recipe", "fast"],
            vec!["invalid value 'fast' for '--recipe", "paper or best"],
        ),
        (
            &model,
            &calib,
            vec!["--propagate", "int8"],
            vec!["invalid value 'int8' for '--propagate", "fp or quantized"],
        ),
        (
            &model,
            &calib,
            vec!["--out", under_file],
            vec!["invalid --out", "plain-file is not a directory"],
        ),
        (
            &model,
            &calib,
            vec!["--fake-quant", under_file],
            vec!["invalid --fake-quant", "plain-file is not a directory"],
        ),
    ];
    for (m, c, extra, expect) in cases {
        let what = format!("quantize {extra:?}");
        check_failure(d, &what, || quantize(d, m, c, &extra, &out), &expect);
    }
}

#[test]
fn bad_generate_and_eval_options_fail_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = test_assets::smollm2_gguf().unwrap();
    let text = test_assets::repo_asset("wiki-eval.txt");
    let short = d.join("short.txt");
    std::fs::write(&short, "Only a few words.").unwrap();
    let run = |args: &[&str], model: &Path, text: &Path| {
        let mut all = os(&args[..1]);
        all.extend(["--model".into(), model.into()]);
        if args[0] == "eval" {
            all.extend(["--text".into(), text.into()]);
        } else {
            all.extend(os(&["--prompt", "The capital of France is"]));
        }
        all.extend(os(&args[1..]));
        adadim(d, &all)
    };
    let cases: Vec<(Vec<&str>, &Path, Vec<&str>)> = vec![
        (
            vec!["generate", "--top-p", "2"],
            &text,
            vec!["invalid --top-p", "(0, 1]"],
        ),
        (
            vec!["generate", "--top-p", "0"],
            &text,
            vec!["invalid --top-p"],
        ),
        (
            vec!["generate", "--temperature=-1"],
            &text,
            vec!["invalid --temperature"],
        ),
        (
            vec!["generate", "--temperature", "nan"],
            &text,
            vec!["invalid --temperature"],
        ),
        (
            vec!["generate", "--max-tokens", "9000"],
            &text,
            vec!["invalid --max-tokens", "9000 new tokens", "8192"],
        ),
        (
            vec!["generate", "--kv-cache", "q4_0"],
            &text,
            vec![
                "--kv-cache",
                "unknown KV cache type `q4_0`",
                "f16, f32 or q8_0",
            ],
        ),
        (
            vec!["eval", "--windows", "0"],
            &text,
            vec!["invalid --windows"],
        ),
        (
            vec!["eval", "--seqlen", "1"],
            &text,
            vec!["invalid --seqlen"],
        ),
        (
            vec!["eval", "--seqlen", "9000"],
            &text,
            vec!["invalid --seqlen", "8192"],
        ),
        (
            vec!["eval", "--seqlen", "64"],
            &short,
            vec!["short.txt", "fewer than one window of --seqlen 64"],
        ),
    ];
    for (args, text, expect) in cases {
        check_failure(
            d,
            &format!("{args:?}"),
            || run(&args, &model, text),
            &expect,
        );
    }
}

#[test]
fn bad_serve_options_fail_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = test_assets::smollm2_gguf().unwrap();
    let serve = |extra: &[&str]| {
        let mut all = os(&["serve", "--port", "0", "--model"]);
        all.push(model.clone().into());
        all.extend(os(extra));
        adadim(d, &all)
    };
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["--kv-memory", "0"],
            &["invalid --kv-memory 0", "holds no"],
        ),
        (&["--kv-memory", "12XB"], &["--kv-memory", "12XB"]),
        (
            &["--prefill-chunk", "0"],
            &["--prefill-chunk", "would be zero"],
        ),
    ];
    for (extra, expect) in cases {
        check_failure(d, &format!("{extra:?}"), || serve(extra), expect);
    }
}
