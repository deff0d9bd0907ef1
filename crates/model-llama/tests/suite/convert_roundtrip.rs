//! GGUF → Hugging Face directory → back: identical logits and tokens; broken safetensors files
//! give errors naming the file.

use burn::backend::NdArray;
use burn::prelude::*;
use model_llama::{ModelError, open_model};
use test_assets::smollm2_gguf;

type B = NdArray<f32>;

fn logits(path: &std::path::Path, text: &str) -> (Vec<u32>, Vec<f32>) {
    let m = open_model(path).unwrap();
    let ids = m.tokenizer.encode(text).unwrap();
    let model = m.load::<B>(&Default::default()).unwrap();
    let input: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let input =
        Tensor::<B, 2, Int>::from_data(TensorData::new(input, [1, ids.len()]), &Default::default());
    (
        ids,
        model.forward(input).into_data().to_vec::<f32>().unwrap(),
    )
}

#[test]
fn converted_directory_gives_identical_logits() {
    let gguf = smollm2_gguf().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    model_llama::export::write_hf_dir(&open_model(&gguf).unwrap(), &out, false).unwrap();
    let text = "Quantization maps 16-bit weights to 3 bits; per-IC groups isolate outliers.";
    let (ids_a, a) = logits(&gguf, text);
    let (ids_b, b) = logits(&out, text);
    assert_eq!(ids_a, ids_b);
    assert_eq!(a, b, "f32 round trip must be exact");
}

#[test]
fn converted_directory_keeps_special_tokens_and_chat_template() {
    let gguf = open_model(&smollm2_gguf().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    model_llama::export::write_hf_dir(&gguf, &out, false).unwrap();
    let hf = open_model(&out).unwrap();
    let template = gguf
        .tokenizer
        .chat_template()
        .expect("SmolLM2 ships a chat template");
    assert!(template.contains("<|im_start|>"), "{template}");
    assert_eq!(hf.tokenizer.chat_template(), Some(template));
    assert!(gguf.tokenizer.eos_id().is_some());
    assert_eq!(hf.tokenizer.eos_id(), gguf.tokenizer.eos_id());
    assert_eq!(hf.tokenizer.bos_id(), gguf.tokenizer.bos_id());
}

#[test]
fn broken_safetensors_are_clear_errors() {
    let gguf = smollm2_gguf().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    model_llama::export::write_hf_dir(&open_model(&gguf).unwrap(), &out, false).unwrap();
    let st = out.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();

    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let err = open_model(&out).err().unwrap();
    assert!(matches!(err, ModelError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    std::fs::write(&st, b"not a safetensors file").unwrap();
    let err = open_model(&out).err().unwrap().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("malformed"),
        "{err}"
    );

    std::fs::remove_file(&st).unwrap();
    let err = open_model(&out).err().unwrap().to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::write(
        out.join("config.json"),
        b"{\"architectures\": [\"GPT2LMHeadModel\"]}",
    )
    .unwrap();
    let err = open_model(&out).err().unwrap().to_string();
    assert!(
        err.contains("config.json") && err.contains("architecture"),
        "{err}"
    );
}
