//! `adadim serve`: its greedy completion is `adadim generate`'s output, and SIGTERM stops it
//! cleanly.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

fn adadim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_adadim"))
}

/// `adadim generate`'s continuation of `prompt` (its output starts with the prompt).
fn generate(model: &Path, prompt: &str, max_tokens: usize) -> String {
    let out = adadim()
        .args(["generate", "--model"])
        .arg(model)
        .args(["--prompt", prompt, "--max-tokens", &max_tokens.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // `println!` adds the newline.
    let text = text.strip_suffix('\n').unwrap();
    text.strip_prefix(prompt).unwrap().to_string()
}

#[test]
fn served_greedy_text_is_generates_and_sigterm_stops_the_server() {
    let model = test_assets::smollm2_gguf().unwrap();
    let mut child = adadim()
        .args(["serve", "--port", "0", "--model"])
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("serving on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let name = model.file_stem().unwrap().to_str().unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();

    let eos = "<|im_end|>";
    for (prompt, max_tokens) in [
        ("The capital of France is", 24),
        (
            "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
            40,
        ),
    ] {
        let body = serde_json::json!({"model": name, "prompt": prompt,
                                      "max_tokens": max_tokens, "temperature": 0});
        let v: serde_json::Value = agent
            .post(format!("{base}/v1/completions"))
            .send_json(&body)
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        let choice = &v["choices"][0];
        let served = choice["text"].as_str().unwrap();
        // `generate` prints the stop token's text; the API leaves it out.
        let expected = generate(&model, prompt, max_tokens);
        match choice["finish_reason"].as_str().unwrap() {
            "stop" => assert_eq!(expected.strip_suffix(eos), Some(served), "{v}"),
            _ => assert_eq!(expected, served, "{v}"),
        }
    }

    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "after SIGTERM: {status}");
}
