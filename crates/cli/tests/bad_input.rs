//! Bad input to `adadim quantize`: a clear error naming the file or problem, a non-zero exit,
//! and no output left behind.

use std::path::Path;
use std::process::Command;

fn quantize(model: &Path, calib: &Path, extra: &[&str], out: &Path) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_adadim"))
        .arg("quantize")
        .arg("--model")
        .arg(model)
        .arg("--calib")
        .arg(calib)
        .args(["--calib-samples", "4", "--calib-seqlen", "512"])
        .args(if extra.contains(&"--group-size") {
            &[][..]
        } else {
            &["--group-size", "64"][..]
        })
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("out"))
        .collect()
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let model = model_llama::assets::smollm2_gguf().unwrap();
    let calib = model_llama::assets::repo_asset("lee-news.txt");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &std::fs::read(&model).unwrap()[..4096]).unwrap();

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
            vec!["unsupported bit width 5"],
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
    ];
    for (m, c, extra, expect) in cases {
        let (ok, stderr) = quantize(m, c, &extra, &out);
        assert!(!ok, "{extra:?} succeeded");
        for e in expect {
            assert!(stderr.contains(e), "{extra:?}: expected `{e}` in: {stderr}");
        }
        assert!(
            leftovers(dir.path()).is_empty(),
            "{extra:?} left {:?}",
            leftovers(dir.path())
        );
    }
}
