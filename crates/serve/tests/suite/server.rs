//! The server on the shipped test model: bad requests, concurrency, the queue bound, stop
//! strings and prompt log-probabilities, through HTTP.

use crate::support;

use model_llama::generate::{Decoder, GenerateOptions, SPLIT_ROWS};
use serde_json::{Value, json};
use serve::ServeOptions;
use support::{MODEL, agent, get, greedy, post, start, start_opts, start_with};

/// A 400 with an OpenAI-style error naming `param` and saying `says`.
fn assert_400(answer: (u16, Value), param: Option<&str>, says: &str) {
    let (status, v) = answer;
    assert_eq!(status, 400, "{v}");
    let e = &v["error"];
    assert_eq!(e["type"], "invalid_request_error", "{v}");
    assert_eq!(e["param"].as_str(), param, "{v}");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains(says), "{message:?} does not say {says:?}");
}

/// A bad request: what it is, how to send it (status and body back), the `param` its error
/// must name, and a word its message must contain.
type BadCase<'a> = (
    &'a str,
    Box<dyn Fn() -> (u16, Value) + 'a>,
    Option<&'a str>,
    &'a str,
);

#[test]
fn bad_requests_get_a_clear_400_and_the_server_keeps_serving() {
    let server = start(4);
    let prompt = "Once upon a time";
    let reference = greedy(&server, prompt, 8);
    assert!(!reference.is_empty());
    let completion = |body: Value| post(&server, "/v1/completions", &body.to_string());
    let cases: Vec<BadCase> = vec![
        (
            "bad JSON",
            Box::new(|| post(&server, "/v1/completions", "{\"prompt\": \"x\",")),
            None,
            "not valid JSON",
        ),
        (
            "a missing prompt",
            Box::new(|| completion(json!({"model": MODEL}))),
            None,
            "prompt",
        ),
        (
            "an unknown model",
            Box::new(|| completion(json!({"model": "gpt-9", "prompt": "x"}))),
            Some("model"),
            "gpt-9",
        ),
        (
            "a context overflow",
            Box::new(|| completion(json!({"model": MODEL, "prompt": "x", "max_tokens": 100_000}))),
            Some("max_tokens"),
            "maximum context length is 8192 tokens",
        ),
        (
            "a prompt beyond the context",
            Box::new(|| {
                completion(json!({"model": MODEL, "prompt": vec![1; 9000], "max_tokens": 0}))
            }),
            Some("prompt"),
            "the prompt has 9000 tokens",
        ),
        (
            "a negative max_tokens",
            Box::new(|| completion(json!({"model": MODEL, "prompt": "x", "max_tokens": -3}))),
            Some("max_tokens"),
            "-3 is negative",
        ),
        (
            "an out-of-range top_p",
            Box::new(|| completion(json!({"model": MODEL, "prompt": "x", "top_p": 1.5}))),
            Some("top_p"),
            "1.5",
        ),
        (
            "an empty prompt",
            Box::new(|| completion(json!({"model": MODEL, "prompt": ""}))),
            Some("prompt"),
            "empty",
        ),
        (
            "a token outside the vocabulary",
            Box::new(|| completion(json!({"model": MODEL, "prompt": [5, 9_999_999]}))),
            Some("prompt"),
            "9999999",
        ),
        (
            "n = 0",
            Box::new(|| completion(json!({"model": MODEL, "prompt": "x", "n": 0}))),
            Some("n"),
            "at least 1",
        ),
        (
            "n beyond the queue",
            Box::new(|| completion(json!({"model": MODEL, "prompt": "x", "n": 5}))),
            Some("n"),
            "queue of 4",
        ),
        (
            "n > 1 streamed",
            Box::new(|| completion(json!({"model": MODEL, "prompt": "x", "n": 2, "stream": true}))),
            Some("n"),
            "streaming returns one choice",
        ),
        (
            "chat top_logprobs beyond 20",
            Box::new(|| {
                let body = json!({"model": MODEL, "logprobs": true, "top_logprobs": 21,
                                  "messages": [{"role": "user", "content": "hi"}]});
                post(&server, "/v1/chat/completions", &body.to_string())
            }),
            Some("top_logprobs"),
            "0..=20",
        ),
        (
            "chat top_logprobs without logprobs",
            Box::new(|| {
                let body = json!({"model": MODEL, "top_logprobs": 2,
                                  "messages": [{"role": "user", "content": "hi"}]});
                post(&server, "/v1/chat/completions", &body.to_string())
            }),
            Some("top_logprobs"),
            "needs logprobs",
        ),
        (
            "chat with an unknown model",
            Box::new(|| {
                let body =
                    json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]});
                post(&server, "/v1/chat/completions", &body.to_string())
            }),
            Some("model"),
            "gpt-9",
        ),
        (
            "chat with a negative max_tokens",
            Box::new(|| {
                let body = json!({"model": MODEL, "max_tokens": -1,
                                  "messages": [{"role": "user", "content": "hi"}]});
                post(&server, "/v1/chat/completions", &body.to_string())
            }),
            Some("max_tokens"),
            "negative",
        ),
    ];
    for (what, request, param, says) in cases {
        println!("{what}");
        assert_400(request(), param, says);
        assert_eq!(greedy(&server, prompt, 8), reference, "after {what}");
    }
    let (status, v) = get(&server, "/v1/nothing");
    assert_eq!((status, &v["error"]["code"]), (404, &json!("not_found")));
    let (status, health) = get(&server, "/health");
    assert_eq!((status, &health["status"]), (200, &json!("ok")), "{health}");
    assert_eq!(health["running"], 0, "{health}");
    assert_eq!(health["kv_cache"]["reserved_bytes"], 0, "{health}");
    let (status, models) = get(&server, "/v1/models");
    assert_eq!((status, &models["data"][0]["id"]), (200, &json!(MODEL)));
    server.shutdown().unwrap();
}

#[test]
fn concurrent_greedy_requests_return_the_sequential_tokens() {
    let server = start(8);
    // Enough that the decode steps have the rows to run as two forwards side by side on a pool
    // of two threads or more.
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Water boils at",
        "My favourite book is",
        "Once upon a time",
        "The best way to learn",
        "In 1969, the first",
        "A recipe for bread:",
    ];
    assert!(prompts.len() >= SPLIT_ROWS);
    let sequential: Vec<String> = prompts.iter().map(|p| greedy(&server, p, 16)).collect();
    let concurrent: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| greedy(&server, p, 16)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(concurrent, sequential);
    // Distinct prompts give distinct continuations: the answers are not crossed over.
    assert_eq!(
        sequential
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        prompts.len(),
        "{sequential:?}"
    );

    // A stop string cuts the same text just before it.
    let full = &sequential[1];
    let cut = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop: String = full[cut..].chars().take(3).collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let body = json!({"model": MODEL, "prompt": prompts[1], "max_tokens": 16,
                      "temperature": 0, "stop": [stop]});
    let (status, v) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["text"],
        json!(expected),
        "stop {stop:?} in {full:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    server.shutdown().unwrap();
}

/// Under a KV memory limit for two of them, four concurrent requests run two at a time and
/// return what they return alone; a request that could never fit is a 400, and one without
/// `max_tokens` runs as far as the memory holds.
#[test]
fn the_kv_memory_limit_holds_requests_back_until_they_fit() {
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Water boils at",
        "My favourite book is",
    ];
    let new_tokens = 16;
    let free = start(8);
    let per_position = free.kv_budget().per_position;
    let (texts, prompt_tokens): (Vec<String>, Vec<u64>) = prompts
        .iter()
        .map(|p| {
            let body = json!({"model": MODEL, "prompt": p, "max_tokens": new_tokens,
                              "temperature": 0});
            let (status, v) = post(&free, "/v1/completions", &body.to_string());
            assert_eq!(status, 200, "{v}");
            let text = v["choices"][0]["text"].as_str().unwrap().to_string();
            (text, v["usage"]["prompt_tokens"].as_u64().unwrap())
        })
        .unzip();
    assert_eq!(free.load().peak_running(), 1);
    free.shutdown().unwrap();

    // Room for the two longest requests, so for any two and never for three.
    let mut needs: Vec<u64> = prompt_tokens.iter().map(|p| p + new_tokens).collect();
    needs.sort_unstable();
    let positions = needs[2] + needs[3];
    let limit = positions * per_position;
    let server = start_opts(ServeOptions {
        kv_memory: Some(bytesize::ByteSize::b(limit)),
        ..ServeOptions::new(MODEL)
    });
    assert_eq!(server.kv_budget().limit, Some(limit));
    let concurrent: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| greedy(&server, p, new_tokens as usize)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(concurrent, texts);
    assert_eq!(server.load().peak_running(), 2);
    assert_eq!(server.load().kv_reserved(), 0);

    let body = json!({"model": MODEL, "prompt": prompts[0], "max_tokens": positions,
                      "temperature": 0});
    let (status, v) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "max_tokens", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("--kv-memory"), "{message}");

    let body = json!({"model": MODEL, "prompt": prompts[0], "temperature": 0});
    let (status, v) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{v}");
    let used = v["usage"]["prompt_tokens"].as_u64().unwrap()
        + v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(used <= positions, "{v}");
    let (_, health) = get(&server, "/health");
    assert_eq!(health["kv_cache"]["limit_bytes"], limit, "{health}");
    assert_eq!(greedy(&server, prompts[1], new_tokens as usize), texts[1]);
    server.shutdown().unwrap();
}

/// A long prompt that arrives while another request streams runs in chunks between that
/// stream's tokens (chunked prefill): the stream keeps receiving tokens during the prefill,
/// and the long request gets the answer it gets alone.
#[test]
fn a_long_prompt_does_not_stall_a_running_stream() {
    use std::io::BufRead;
    use std::time::Instant;

    let (chunks, chunk) = (30, 16);
    let server = start_opts(ServeOptions {
        prefill_chunk: std::num::NonZeroUsize::new(chunk as usize).unwrap(),
        ..ServeOptions::new(MODEL)
    });
    let long: Vec<u32> = (0..chunks * chunk).map(|i| 100 + (i * 37) % 5000).collect();
    let long_body = json!({"model": MODEL, "prompt": long, "max_tokens": 4, "temperature": 0});
    let (status, alone) = post(&server, "/v1/completions", &long_body.to_string());
    assert_eq!(status, 200, "{alone}");

    let (arrivals, arrived) = std::sync::mpsc::channel::<Instant>();
    let (long_answer, started, ended, streamed) = std::thread::scope(|s| {
        let stream = s.spawn(|| {
            let body = json!({"model": MODEL, "prompt": "Count from 1 to 500: 1, 2, 3,",
                              "max_tokens": 300, "temperature": 0, "stream": true});
            let mut r = agent()
                .post(format!("http://{}/v1/completions", server.addr()))
                .header("content-type", "application/json")
                .send(body.to_string())
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let mut tokens = 0;
            for line in std::io::BufReader::new(r.body_mut().as_reader()).lines() {
                if line.unwrap().starts_with("data: {") {
                    tokens += 1;
                    arrivals.send(Instant::now()).unwrap();
                }
            }
            tokens
        });
        // The stream is under way before the long prompt arrives.
        for _ in 0..3 {
            arrived.recv().unwrap();
        }
        let started = Instant::now();
        let (status, answer) = post(&server, "/v1/completions", &long_body.to_string());
        let ended = Instant::now();
        assert_eq!(status, 200, "{answer}");
        (answer, started, ended, stream.join().unwrap())
    });
    // A chunk per token, and the last one with the finish reason.
    assert_eq!(streamed, 301);
    let during = arrived
        .try_iter()
        .filter(|&t| t > started && t < ended)
        .count();
    // One stream token per step, and the prompt takes `chunks` steps; run whole, it would
    // take one.
    assert!(
        during >= chunks as usize * 2 / 3,
        "{during} tokens streamed during the long prefill"
    );
    assert_eq!(
        long_answer["choices"][0]["text"],
        alone["choices"][0]["text"]
    );
    assert_eq!(server.load().peak_running(), 2);
    server.shutdown().unwrap();
}

#[test]
fn requests_beyond_the_queue_get_a_503() {
    // One request runs, one waits; the others are turned away.
    let server = start_with(1, 1);
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5)
            .map(|_| {
                s.spawn(|| {
                    let body = json!({"model": MODEL, "prompt": "Count: 1, 2, 3,",
                                      "max_tokens": 48, "temperature": 0});
                    post(&server, "/v1/completions", &body.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let busy: Vec<&Value> = answers
        .iter()
        .filter(|a| a.0 == 503)
        .map(|a| &a.1)
        .collect();
    assert_eq!(ok + busy.len(), 5, "{answers:?}");
    assert!((1..=2).contains(&ok), "{answers:?}");
    for b in busy {
        assert_eq!(b["error"]["code"], "server_busy", "{b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains("busy"),
            "{b}"
        );
    }
    assert!(!greedy(&server, "Count: 1, 2, 3,", 4).is_empty());
    server.shutdown().unwrap();
}

#[test]
fn echo_logprobs_are_the_models_prompt_logprobs() {
    let server = start(2);
    let path = test_assets::smollm2_gguf().unwrap();
    let m = model_llama::open_model(&path).unwrap();
    let prompt = "The quick brown fox jumps over the lazy dog";
    let ids = m.tokenizer.encode(prompt).unwrap();
    // The same prompt as token ids, as lm-evaluation-harness sends it.
    let body = json!({"model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0,
                      "echo": true, "logprobs": 2});
    let (status, v) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert!(choice["text"].as_str().unwrap().starts_with(prompt), "{v}");
    let lp = &choice["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_logprobs.len(), ids.len() + 1, "{lp}");
    assert!(token_logprobs[0].is_null() && lp["top_logprobs"][0].is_null());

    let llama = m.load::<support::Cpu>(&Default::default()).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 1,
        ..GenerateOptions::default()
    };
    let (mut decoder, reference) = Decoder::with_prompt_logprobs(&llama, &ids, &opts, Some(2));
    for (i, r) in reference.iter().enumerate() {
        let served = token_logprobs[i + 1].as_f64().unwrap();
        assert!(
            (served - r.logprob as f64).abs() < 1e-4,
            "token {}: {served} vs {r:?}",
            i + 1
        );
        let top = lp["top_logprobs"][i + 1].as_object().unwrap();
        let best = top
            .values()
            .map(|p| p.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            (best - r.top[0].1 as f64).abs() < 1e-4 && best >= served,
            "{top:?}"
        );
    }
    let next = decoder.next_token().unwrap();
    assert_eq!(
        lp["tokens"][ids.len()],
        json!(m.tokenizer.decode(&[next]).unwrap())
    );
    assert_eq!(v["usage"]["prompt_tokens"], json!(ids.len()));
    server.shutdown().unwrap();
}

/// `n` choices per prompt run together in the batch, choice `j` sampling with `seed + j`: its
/// first token (drawn from its prompt's own prefill) is exactly the one that seed draws alone.
/// Later tokens come from batched steps, which differ from a lone sequence's in float rounding
/// (docs/serve.md), so they are not compared. Chat completions report each generated token's
/// log-probability with its alternatives, most likely first.
#[test]
fn n_choices_are_their_seeds_completions_and_chat_reports_logprobs() {
    let server = start(8);
    let prompt = "Once upon a time";
    let sampled = |seed: u64, n: usize, max_tokens: usize| {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                          "temperature": 1.0, "seed": seed, "n": n});
        let (status, v) = post(&server, "/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{v}");
        let choices = v["choices"].as_array().unwrap().clone();
        assert_eq!(choices.len(), n, "{v}");
        choices
            .iter()
            .enumerate()
            .map(|(j, c)| {
                assert_eq!(c["index"], json!(j));
                c["text"].as_str().unwrap().to_string()
            })
            .collect::<Vec<_>>()
    };
    let firsts = sampled(7, 3, 1);
    let alone: Vec<String> = (7..10).map(|seed| sampled(seed, 1, 1).remove(0)).collect();
    assert_eq!(firsts, alone);
    let together = sampled(7, 3, 12);
    assert!(
        together[0] != together[1] || together[1] != together[2],
        "{together:?}"
    );
    for (text, first) in together.iter().zip(&firsts) {
        assert!(text.starts_with(first.as_str()), "{text:?} after {first:?}");
    }

    let body = json!({"model": MODEL, "max_tokens": 8, "temperature": 0, "n": 2,
                      "logprobs": true, "top_logprobs": 3,
                      "messages": [{"role": "user", "content": "What is the capital of France?"}]});
    let (status, v) = post(&server, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{v}");
    assert_eq!(
        choices[0]["message"], choices[1]["message"],
        "greedy choices agree"
    );
    let content = choices[0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty(), "{v}");
    let mut text = String::new();
    for entry in content {
        let (token, logprob) = (
            entry["token"].as_str().unwrap(),
            entry["logprob"].as_f64().unwrap(),
        );
        assert_eq!(entry["bytes"], json!(token.as_bytes()));
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{entry}");
        // Greedy: the token is the most likely one, and the alternatives come in order.
        assert_eq!(
            (
                top[0]["token"].as_str().unwrap(),
                top[0]["logprob"].as_f64().unwrap()
            ),
            (token, logprob)
        );
        assert!(
            top.windows(2)
                .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64())
        );
        assert!(logprob <= 0.0);
        text.push_str(token);
    }
    assert_eq!(
        text.trim(),
        choices[0]["message"]["content"].as_str().unwrap().trim()
    );
    server.shutdown().unwrap();
}

/// A client that closes its connection mid-generation, streaming or not, frees the model at
/// once: its sequence leaves the batch instead of running to `max_tokens`. (The prompt counts
/// on for thousands of tokens; greedy, the model does not stop by itself for far longer than
/// the deadline.)
#[test]
fn a_client_that_goes_away_cancels_its_request() {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    let server = start(2);
    for stream in [true, false] {
        let body = json!({"model": MODEL, "prompt": "Count from 1 to 5000: 1, 2, 3,",
                          "max_tokens": 4000, "temperature": 0, "stream": stream})
        .to_string();
        let mut socket = TcpStream::connect(server.addr()).unwrap();
        write!(
            socket,
            "POST /v1/completions HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            server.addr(),
            body.len()
        )
        .unwrap();
        if stream {
            // Three tokens have come: the sequence is decoding.
            let mut lines = BufReader::new(socket.try_clone().unwrap()).lines();
            let mut tokens = 0;
            while tokens < 3 {
                tokens += usize::from(lines.next().unwrap().unwrap().starts_with("data: {"));
            }
        } else {
            let started = Instant::now();
            while server.load().running() == 0 {
                assert!(started.elapsed() < Duration::from_secs(30), "never started");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(server.load().running(), 1, "stream {stream}");
        drop(socket);
        let gone = Instant::now();
        while server.load().running() > 0 {
            assert!(
                gone.elapsed() < Duration::from_secs(10),
                "stream {stream}: the request still runs 10 s after its client left"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(server.load().kv_reserved(), 0);
    }
    // It still serves.
    assert!(!greedy(&server, "Once upon a time", 4).is_empty());
    server.shutdown().unwrap();
}
