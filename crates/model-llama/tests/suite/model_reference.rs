//! The Burn model against an independent, naive f64 implementation of LLaMA written here.

use burn::backend::NdArray;
use burn::prelude::*;
use kernels::QuantBackend;
use model_llama::generate::{Decoder, GenerateOptions, MAX_STEP_ROWS, SPLIT_ROWS, generate};
use model_llama::load::load_model;
use model_llama::perplexity::perplexity;
use model_llama::{HostTensor, KvDtype, LlamaConfig, MemorySource, RopeScaling, TensorSource};

type B = NdArray<f32>;

fn tiny_config(rope_scaling: Option<RopeScaling>) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_hidden_layers: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling,
        max_position_embeddings: 64,
        vocab_size: 50,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// [`tiny_config`] with heads of 32 values, as a Q8_0 cache needs.
fn q8_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 64,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        ..tiny_config(None)
    }
}

/// The config the tests of a `kv_cache` run on.
fn config_for(kv_cache: KvDtype) -> LlamaConfig {
    match kv_cache {
        KvDtype::Q8_0 => q8_config(),
        _ => tiny_config(None),
    }
}

fn random_source(config: LlamaConfig, seed: u64) -> MemorySource {
    MemorySource::random(config, seed)
}

/// Naive f64 LLaMA: returns logits `[t][vocab]`.
fn naive_logits(src: &MemorySource, tokens: &[u32]) -> Vec<Vec<f64>> {
    let c = src.config();
    let w = |name: &str| -> (Vec<usize>, Vec<f64>) {
        let t = src.load(name).unwrap();
        (t.shape, t.data.iter().map(|&v| v as f64).collect())
    };
    let matvec = |name: &str, x: &[f64]| -> Vec<f64> {
        let (shape, data) = w(name);
        (0..shape[0])
            .map(|o| (0..shape[1]).map(|i| data[o * shape[1] + i] * x[i]).sum())
            .collect()
    };
    let rmsnorm = |name: &str, x: &[f64]| -> Vec<f64> {
        let (_, g) = w(name);
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + c.rms_norm_eps).sqrt();
        x.iter().zip(&g).map(|(v, g)| v * r * g).collect()
    };
    let d = c.head_dim();
    let freqs = model_llama::model::inv_freq(c);
    let rope = |v: &mut [f64], pos: usize| {
        for i in 0..d / 2 {
            let a = pos as f64 * freqs[i];
            let (x1, x2) = (v[i], v[i + d / 2]);
            v[i] = x1 * a.cos() - x2 * a.sin();
            v[i + d / 2] = x2 * a.cos() + x1 * a.sin();
        }
    };
    let (_, emb) = w("model.embed_tokens.weight");
    let h = c.hidden_size;
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    let rep = c.num_attention_heads / c.num_key_value_heads;
    for l in 0..c.num_hidden_layers {
        let p = |m: &str| format!("model.layers.{l}.{m}");
        let normed: Vec<_> = xs
            .iter()
            .map(|x| rmsnorm(&p("input_layernorm.weight"), x))
            .collect();
        let mut qs: Vec<Vec<f64>> = normed
            .iter()
            .map(|x| matvec(&p("self_attn.q_proj.weight"), x))
            .collect();
        let mut ks: Vec<Vec<f64>> = normed
            .iter()
            .map(|x| matvec(&p("self_attn.k_proj.weight"), x))
            .collect();
        let vs: Vec<Vec<f64>> = normed
            .iter()
            .map(|x| matvec(&p("self_attn.v_proj.weight"), x))
            .collect();
        for (pos, (q, k)) in qs.iter_mut().zip(ks.iter_mut()).enumerate() {
            for hd in 0..c.num_attention_heads {
                rope(&mut q[hd * d..(hd + 1) * d], pos);
            }
            for hd in 0..c.num_key_value_heads {
                rope(&mut k[hd * d..(hd + 1) * d], pos);
            }
        }
        for t in 0..tokens.len() {
            let mut ctx = vec![0.0; h];
            for hd in 0..c.num_attention_heads {
                let kvh = hd / rep;
                let q = &qs[t][hd * d..(hd + 1) * d];
                let scores: Vec<f64> = (0..=t)
                    .map(|s| {
                        let k = &ks[s][kvh * d..(kvh + 1) * d];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (s, es) in e.iter().enumerate() {
                    for j in 0..d {
                        ctx[hd * d + j] += es / z * vs[s][kvh * d + j];
                    }
                }
            }
            let o = matvec(&p("self_attn.o_proj.weight"), &ctx);
            for j in 0..h {
                xs[t][j] += o[j];
            }
            let n2 = rmsnorm(&p("post_attention_layernorm.weight"), &xs[t]);
            let g = matvec(&p("mlp.gate_proj.weight"), &n2);
            let u = matvec(&p("mlp.up_proj.weight"), &n2);
            let hid: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let dn = matvec(&p("mlp.down_proj.weight"), &hid);
            for j in 0..h {
                xs[t][j] += dn[j];
            }
        }
    }
    xs.iter()
        .map(|x| {
            let n = rmsnorm("model.norm.weight", x);
            matvec("model.embed_tokens.weight", &n)
        })
        .collect()
}

fn burn_logits(src: &MemorySource, tokens: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let model = load_model::<B>(src, &device).unwrap();
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), &device);
    model.forward(input).into_data().to_vec::<f32>().unwrap()
}

fn assert_close(src: &MemorySource, tokens: &[u32]) {
    let naive = naive_logits(src, tokens);
    let got = burn_logits(src, tokens);
    let v = src.config().vocab_size;
    let mut worst = 0.0f64;
    for (t, row) in naive.iter().enumerate() {
        for (j, &e) in row.iter().enumerate() {
            worst = worst.max((got[t * v + j] as f64 - e).abs());
        }
    }
    assert!(worst < 1e-3, "max |burn − naive| = {worst}");
}

#[test]
fn forward_matches_naive_reference() {
    let src = random_source(tiny_config(None), 1);
    let tokens: Vec<u32> = (0..40).map(|i| (i * 7 % 50) as u32).collect();
    assert_close(&src, &tokens);
}

/// More than one query chunk of the chunked causal attention (256 queries), with llama3 rope.
#[test]
fn forward_matches_naive_reference_long_sequence_llama3_rope() {
    let mut config = tiny_config(Some(RopeScaling {
        rope_type: "llama3".into(),
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16,
    }));
    config.max_position_embeddings = 512;
    config.num_hidden_layers = 1;
    let src = random_source(config, 2);
    let tokens: Vec<u32> = (0..300).map(|i| (i * 13 % 50) as u32).collect();
    assert_close(&src, &tokens);
}

#[test]
fn perplexity_matches_naive_cross_entropy() {
    let src = random_source(tiny_config(None), 3);
    let tokens: Vec<u32> = (0..48).map(|i| (i * 11 % 50) as u32).collect();
    let seqlen = 16;
    let mut nll = 0.0;
    for w in tokens.chunks(seqlen) {
        let logits = naive_logits(&src, w);
        let mut s = 0.0;
        for t in 0..seqlen - 1 {
            let m = logits[t].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = logits[t].iter().map(|l| (l - m).exp()).sum::<f64>().ln() + m;
            s += lse - logits[t][w[t + 1] as usize];
        }
        nll += s / (seqlen - 1) as f64;
    }
    let expected = (nll / 3.0).exp();
    let model = load_model::<B>(&src, &Default::default()).unwrap();
    let report = perplexity(&model, &tokens, seqlen, None).unwrap();
    assert_eq!(report.windows, 3);
    assert!(
        (report.perplexity - expected).abs() / expected < 1e-4,
        "{} vs {expected}",
        report.perplexity
    );
}

/// Generation through the KV cache gives the tokens of recomputing the whole sequence at every
/// step, greedy and sampled, for an exact (f32) cache and for the default f16 one.
#[test]
fn kv_cache_generation_matches_full_recompute() {
    let src = random_source(tiny_config(None), 4);
    let model = load_model::<B>(&src, &Default::default()).unwrap();
    let prompt = [3u32, 14, 15, 9, 26];
    for kv_cache in [KvDtype::F32, KvDtype::F16] {
        for (temperature, top_p) in [(0.0, 1.0), (0.8, 0.9)] {
            let opts = |use_cache| GenerateOptions {
                max_new_tokens: 20,
                temperature,
                top_p,
                seed: 7,
                use_cache,
                kv_cache,
                stop_token: None,
            };
            let cached = generate(&model, &prompt, &opts(true));
            let full = generate(&model, &prompt, &opts(false));
            assert_eq!(cached.tokens.len(), 20);
            assert_eq!(
                cached.tokens, full.tokens,
                "{kv_cache}, temperature {temperature}"
            );
        }
    }
}

/// Sequences of different lengths advanced together (continuous batching: one joins late, its
/// prompt run in chunks of 3 tokens beside the others' decode steps, and one ends early) see
/// the naive model's logits at every step (within the rounding of the keys and values for an
/// f16 or Q8_0 cache), and produce the tokens each produces alone.
#[test]
fn sequences_advanced_together_match_the_naive_model_and_running_alone() {
    advanced_together(KvDtype::F32, 1e-3);
    advanced_together(KvDtype::F16, 1e-2);
    advanced_together(KvDtype::Q8_0, 0.1);
}

fn advanced_together(kv_cache: KvDtype, tolerance: f64) {
    let src = random_source(config_for(kv_cache), 9);
    let model = load_model::<B>(&src, &Default::default()).unwrap();
    let prompts: [&[u32]; 3] = [
        &[3, 14, 15, 9, 26],
        &[7],
        &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    ];
    let opts = |i: usize| GenerateOptions {
        max_new_tokens: [12, 5, 9][i],
        temperature: [0.0, 0.9, 0.7][i],
        top_p: 0.95,
        seed: 11 + i as u64,
        use_cache: true,
        kv_cache,
        stop_token: None,
    };
    let alone: Vec<Vec<u32>> = (0..3)
        .map(|i| generate(&model, prompts[i], &opts(i)).tokens)
        .collect();

    let mut decoders: Vec<Decoder<'_, B>> = Vec::new();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); 3];
    for step in 0..20 {
        // Two sequences start together; the third joins at the third step.
        let joining = match step {
            0 => 0..2,
            2 => 2..3,
            _ => 0..0,
        };
        for i in joining {
            decoders.push(match i {
                2 => Decoder::start(&model, prompts[i], &opts(i), None),
                _ => Decoder::new(&model, prompts[i], &opts(i)),
            });
        }
        for (i, d) in decoders.iter_mut().enumerate() {
            if d.is_prefilling() {
                continue;
            }
            let Some(token) = d.next_token() else {
                continue;
            };
            let mut seen = prompts[i].to_vec();
            seen.extend(&generated[i]);
            let naive = naive_logits(&src, &seen);
            let naive = naive.last().unwrap();
            for (got, want) in d.last_logits().iter().zip(naive) {
                assert!(
                    (*got as f64 - want).abs() < tolerance,
                    "{kv_cache}: sequence {i}, step {step}: {got} vs {want}"
                );
            }
            generated[i].push(token);
        }
        let mut refs: Vec<&mut Decoder<'_, B>> = decoders.iter_mut().collect();
        Decoder::step_together(&mut refs, 3);
    }
    assert!(decoders.iter().all(Decoder::is_finished));
    assert_eq!(generated, alone);
    assert_eq!(
        generated.iter().map(Vec::len).collect::<Vec<_>>(),
        [12, 5, 9]
    );
}

/// Steps of at least [`SPLIT_ROWS`] rows run as two forwards side by side on a pool of two
/// threads; every sequence still produces the tokens it produces alone, greedy or sampled,
/// through prompts run in chunks beside decode steps and sequences ending at different steps.
#[test]
fn split_steps_match_running_alone() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        assert_eq!(<B as QuantBackend>::concurrent_forwards(), 2);
        let src = random_source(tiny_config(None), 21);
        let model = load_model::<B>(&src, &Default::default()).unwrap();
        let n = SPLIT_ROWS + 2;
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                (0..1 + i % 4)
                    .map(|t| (7 * i + 3 * t) as u32 % 50)
                    .collect()
            })
            .collect();
        let opts = |i: usize| GenerateOptions {
            max_new_tokens: 6 + i % 5,
            temperature: if i.is_multiple_of(3) { 0.0 } else { 0.8 },
            top_p: 0.9,
            seed: 100 + i as u64,
            use_cache: true,
            kv_cache: KvDtype::F16,
            stop_token: None,
        };
        let alone: Vec<Vec<u32>> = (0..n)
            .map(|i| generate(&model, &prompts[i], &opts(i)).tokens)
            .collect();
        let mut decoders: Vec<Decoder<'_, B>> = (0..n)
            .map(|i| Decoder::start(&model, &prompts[i], &opts(i), None))
            .collect();
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut widest = 0;
        while !decoders.iter().all(Decoder::is_finished) {
            for (d, g) in decoders.iter_mut().zip(&mut generated) {
                if !d.is_prefilling() && !d.is_finished() {
                    g.extend(d.next_token());
                }
            }
            // Each decoding sequence is one row of the step (prompts add theirs).
            let decoding = (decoders.iter())
                .filter(|d| !d.is_prefilling() && !d.is_finished())
                .count();
            widest = widest.max(decoding);
            let mut refs: Vec<&mut Decoder<'_, B>> = decoders.iter_mut().collect();
            Decoder::step_together(&mut refs, 4);
        }
        assert!(
            widest >= SPLIT_ROWS,
            "the steps never had {SPLIT_ROWS} rows"
        );
        assert_eq!(generated, alone);
    });
}

/// A prompt longer than a forward's rows runs in forwards of at most [`MAX_STEP_ROWS`], the
/// rows of decoding sequences counted, and ends with the naive model's next-token logits.
#[test]
fn long_prompts_run_in_forwards_of_at_most_max_step_rows() {
    let config = LlamaConfig {
        max_position_embeddings: 512,
        ..tiny_config(None)
    };
    let src = random_source(config, 4);
    let model = load_model::<B>(&src, &Default::default()).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 4,
        kv_cache: KvDtype::F32,
        ..GenerateOptions::default()
    };
    let prompt: Vec<u32> = (0..2 * MAX_STEP_ROWS as u32 + 44)
        .map(|i| i * 7 % 50)
        .collect();
    let mut alone = Decoder::start(&model, &prompt, &opts, None);
    let mut steps = 0;
    while alone.is_prefilling() {
        Decoder::step_together(&mut [&mut alone], usize::MAX);
        steps += 1;
    }
    assert_eq!(steps, 3);
    alone.next_token();
    let naive = naive_logits(&src, &prompt);
    for (got, want) in alone.last_logits().iter().zip(naive.last().unwrap()) {
        assert!((*got as f64 - want).abs() < 1e-3, "{got} vs {want}");
    }
    // Beside a decoding sequence, a prompt of twice a forward's rows less one each takes two.
    let mut decoding = Decoder::new(&model, &[3, 1, 4], &opts);
    let prompt = &prompt[..2 * (MAX_STEP_ROWS - 1)];
    let mut joining = Decoder::start(&model, prompt, &opts, None);
    let mut steps = 0;
    while joining.is_prefilling() {
        decoding.next_token();
        Decoder::step_together(&mut [&mut decoding, &mut joining], usize::MAX);
        steps += 1;
    }
    assert_eq!(steps, 2);
}

/// Within the rounding of the keys and values for an f16 or Q8_0 cache; a prefill in chunks
/// scores the prompt as a whole one does.
#[test]
fn prompt_logprobs_are_the_naive_log_softmax() {
    prompt_logprobs(KvDtype::F32, 1e-3);
    prompt_logprobs(KvDtype::F16, 1e-2);
    prompt_logprobs(KvDtype::Q8_0, 0.1);
}

fn prompt_logprobs(kv_cache: KvDtype, tolerance: f64) {
    let src = random_source(config_for(kv_cache), 6);
    let model = load_model::<B>(&src, &Default::default()).unwrap();
    let prompt = [3u32, 14, 15, 9, 26, 41, 0];
    let naive = naive_logits(&src, &prompt);
    let opts = GenerateOptions {
        max_new_tokens: 1,
        kv_cache,
        ..GenerateOptions::default()
    };
    let (mut decoder, logprobs) = Decoder::with_prompt_logprobs(&model, &prompt, &opts, Some(3));
    assert_eq!(logprobs.len(), prompt.len() - 1);
    // A prefill in chunks scores the same tokens, and leaves the same next-token logits.
    let mut chunked = Decoder::start(&model, &prompt, &opts, Some(3));
    let mut steps = 0;
    while chunked.is_prefilling() {
        Decoder::step_together(&mut [&mut chunked], 2);
        steps += 1;
    }
    assert_eq!(steps, prompt.len().div_ceil(2));
    let chunked_logprobs = chunked.take_prompt_logprobs();
    assert_eq!(chunked_logprobs.len(), logprobs.len());
    for (c, w) in chunked_logprobs.iter().zip(&logprobs) {
        assert_eq!(c.token, w.token);
        assert!(
            (c.logprob - w.logprob).abs() < 1e-4,
            "{kv_cache}: {c:?} vs {w:?}"
        );
    }
    let log_softmax = |row: &[f64], t: usize| {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        row[t] - max - row.iter().map(|l| (l - max).exp()).sum::<f64>().ln()
    };
    for (i, lp) in logprobs.iter().enumerate() {
        let row = &naive[i];
        assert_eq!(lp.token, prompt[i + 1]);
        let expected = log_softmax(row, prompt[i + 1] as usize);
        assert!(
            (lp.logprob as f64 - expected).abs() < tolerance,
            "{kv_cache}, {i}: {lp:?} vs {expected}"
        );
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        assert_eq!(lp.top[0].0 as usize, order[0], "position {i}");
        assert!(lp.top[0].1 >= lp.top[1].1 && lp.top[1].1 >= lp.top[2].1);
    }
    // The first new token is the greedy choice of the last position, then the sequence ends.
    let last = &naive[prompt.len() - 1];
    let argmax = (0..last.len())
        .max_by(|&a, &b| last[a].total_cmp(&last[b]))
        .unwrap();
    assert_eq!(decoder.next_token(), Some(argmax as u32));
    assert_eq!(decoder.next_token(), None);
    assert!(decoder.is_finished());
    assert_eq!(chunked.next_token(), Some(argmax as u32));
    assert!(chunked.is_finished());
}

#[test]
fn wrong_shape_is_a_clear_error() {
    let mut src = random_source(tiny_config(None), 5);
    src.tensors.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        HostTensor::new(vec![47, 32], vec![0.0; 47 * 32]),
    );
    let err = load_model::<B>(&src, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("[47, 32]"),
        "{err}"
    );
    src.tensors.remove("model.norm.weight");
    src.tensors.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        HostTensor::new(vec![48, 32], vec![f32::NAN; 48 * 32]),
    );
    let err = load_model::<B>(&src, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite"), "{err}");
}
