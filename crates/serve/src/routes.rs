//! The HTTP endpoints: request checks, a job per sequence on the model worker, and the
//! OpenAI-shaped answers (whole, or as Server-Sent Events).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, http::StatusCode};
use model_llama::LlamaTokenizer;
use model_llama::generate::{GenerateOptions, TokenLogprob};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::api::{ChatRequest, CompletionRequest, PromptItem};
use crate::chat::ChatTemplate;
use crate::error::ApiError;
use crate::text::TextStream;
use crate::worker::{Event, Job, KvBudget, Load, Queue};

/// What every handler shares.
pub(crate) struct AppState {
    pub queue: Queue,
    pub tokenizer: LlamaTokenizer,
    /// The chat template, or why there is none.
    pub chat: Result<ChatTemplate, String>,
    pub model_name: String,
    pub config: model_llama::LlamaConfig,
    /// `config`'s context length.
    pub context: usize,
    /// How each sequence's KV cache stores keys and values.
    pub kv_cache: model_llama::KvDtype,
    /// The KV memory the running sequences may reserve, and what they reserve now.
    pub kv: KvBudget,
    pub load: Arc<Load>,
    pub next_id: AtomicU64,
}

type Shared = Arc<AppState>;

pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(state)
}

async fn health(State(state): State<Shared>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "running": state.load.running(),
        "kv_cache": {"reserved_bytes": state.load.kv_reserved(), "limit_bytes": state.kv.limit},
    }))
}

async fn models(State(state): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": now(), "owned_by": "adadim"}],
    }))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The body as `T`; malformed JSON or a wrong field is a 400 naming the problem.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "the body is not valid JSON"
            }
            _ => "the request body does not match the API",
        };
        ApiError::invalid(None, format!("{what}: {e}")).with_code("invalid_json")
    })
}

/// The options every request shares, checked.
struct Sampling {
    max_tokens: Option<usize>,
    temperature: f32,
    top_p: f32,
    seed: u64,
    stop: Vec<String>,
}

impl AppState {
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.model_name => Err(ApiError::invalid(
                Some("model"),
                format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    self.model_name
                ),
            )
            .with_code("model_not_found")),
            _ => Ok(()),
        }
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// The generation options for a prompt of `prompt_len` tokens; a prompt and completion
    /// beyond the model's context is a 400 saying by how much.
    fn options(
        &self,
        s: &Sampling,
        prompt_len: usize,
        param: &str,
    ) -> Result<GenerateOptions, ApiError> {
        if prompt_len == 0 {
            return Err(ApiError::invalid(
                Some(param),
                format!("`{param}` is empty"),
            ));
        }
        // Without max_tokens, a sequence may run to the context's end, or to as far as the KV
        // memory holds.
        let fits = self.kv.max_positions().unwrap_or(usize::MAX);
        let max_new_tokens = s
            .max_tokens
            .unwrap_or(self.context.min(fits).saturating_sub(prompt_len));
        if prompt_len.saturating_add(max_new_tokens) > self.context {
            return Err(ApiError::invalid(
                Some(if prompt_len > self.context {
                    param
                } else {
                    "max_tokens"
                }),
                format!(
                    "this model's maximum context length is {} tokens; the prompt has {prompt_len} \
                     tokens and max_tokens asks for {max_new_tokens} more",
                    self.context
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let need = self.kv.need(prompt_len + max_new_tokens);
        if let Some(limit) = self.kv.limit.filter(|&l| need > l) {
            return Err(ApiError::invalid(
                Some(if prompt_len > fits {
                    param
                } else {
                    "max_tokens"
                }),
                format!(
                    "the prompt's {prompt_len} tokens and max_tokens' {max_new_tokens} need {} of \
                     KV cache ({} per position); this server's KV caches hold at most {} ({fits} \
                     positions; `adadim serve --kv-memory` sets it)",
                    crate::worker::bytes(need),
                    crate::worker::bytes(self.kv.per_position),
                    crate::worker::bytes(limit),
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let opts = GenerateOptions {
            max_new_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            seed: s.seed,
            use_cache: true,
            kv_cache: self.kv_cache,
            stop_token: self.tokenizer.eos_id(),
        };
        // What remains to check: the sampling ranges.
        opts.validate(prompt_len, &self.config).map_err(|e| {
            ApiError::invalid(
                Some(e.option),
                format!("invalid {}: {}", e.option, e.reason),
            )
        })?;
        Ok(opts)
    }

    fn tokens(&self, item: PromptItem) -> Result<Vec<u32>, ApiError> {
        match item {
            PromptItem::Text(t) => self
                .tokenizer
                .encode(&t)
                .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string())),
            PromptItem::Tokens(ids) => {
                let vocab = self.tokenizer.vocab_size();
                match ids.iter().find(|&&t| t as usize >= vocab) {
                    Some(t) => Err(ApiError::invalid(
                        Some("prompt"),
                        format!("token id {t} is outside the vocabulary of {vocab} tokens"),
                    )),
                    None => Ok(ids),
                }
            }
        }
    }

    fn submit(
        &self,
        prompt: Vec<u32>,
        opts: GenerateOptions,
        prompt_logprobs: Option<usize>,
        token_logprobs: Option<usize>,
    ) -> Result<UnboundedReceiver<Event>, ApiError> {
        let (events, rx) = unbounded_channel();
        self.queue
            .submit(Job {
                prompt,
                opts,
                prompt_logprobs,
                token_logprobs,
                events,
            })
            .map_err(ApiError::busy)?;
        Ok(rx)
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id]).unwrap_or_default()
    }
}

fn sampling(
    max_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<crate::api::Stop>,
) -> Result<Sampling, ApiError> {
    let max_tokens = match max_tokens {
        Some(m) if m < 0 => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!("max_tokens = {m} is negative; it must be 0 or more"),
            ));
        }
        m => m.map(|m| m as usize),
    };
    Ok(Sampling {
        max_tokens,
        temperature: temperature.unwrap_or(1.0),
        top_p: top_p.unwrap_or(1.0),
        // Without a seed, each request samples differently: std's randomly keyed hasher gives
        // a fresh random number per instance.
        seed: seed.map_or_else(
            || {
                std::hash::BuildHasher::hash_one(
                    &std::collections::hash_map::RandomState::new(),
                    0u8,
                )
            },
            |s| s as u64,
        ),
        stop: stop.map(|s| s.strings()).unwrap_or_default(),
    })
}

/// The number of choices per prompt, `n`: 1 to the queue's length (more could never all be
/// queued at once), and 1 when streaming.
fn choice_count(state: &AppState, n: Option<i64>, stream: bool) -> Result<usize, ApiError> {
    let capacity = state.queue.capacity();
    match n.unwrap_or(1) {
        n if n < 1 => Err(ApiError::invalid(
            Some("n"),
            format!("n = {n}: it must be at least 1"),
        )),
        n if n as u64 > capacity as u64 => Err(ApiError::invalid(
            Some("n"),
            format!("n = {n} is more than this server's queue of {capacity} requests"),
        )),
        n if n > 1 && stream => Err(ApiError::invalid(
            Some("n"),
            "streaming returns one choice; n must be 1",
        )),
        n => Ok(n as usize),
    }
}

/// The options of choice `j` of a prompt: its own seed, so that sampled choices differ.
fn nth_choice(opts: &GenerateOptions, j: usize) -> GenerateOptions {
    GenerateOptions {
        seed: opts.seed.wrapping_add(j as u64),
        ..opts.clone()
    }
}

/// Top-`n` alternatives per position, checked to be OpenAI's `0..=20`.
fn top_count(n: i64, param: &'static str) -> Result<usize, ApiError> {
    if (0..=20).contains(&n) {
        Ok(n as usize)
    } else {
        Err(ApiError::invalid(
            Some(param),
            format!("{param} = {n} is outside 0..=20"),
        ))
    }
}

/// One finished sequence.
struct Outcome {
    text: String,
    /// Generated tokens (the stop token included), with their log-probabilities when asked.
    tokens: Vec<(u32, Option<TokenLogprob>)>,
    prompt_logprobs: Vec<TokenLogprob>,
    finish_reason: &'static str,
}

/// Follows a job's events to the end; `on_text` gets each settled piece of text and returns
/// `false` when its reader has gone (which cancels the job).
async fn follow(
    state: &AppState,
    mut rx: UnboundedReceiver<Event>,
    stop: Vec<String>,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Outcome, ApiError> {
    let mut text = TextStream::new(&state.tokenizer, state.tokenizer.eos_id(), stop);
    let mut out = Outcome {
        text: String::new(),
        tokens: Vec::new(),
        prompt_logprobs: Vec::new(),
        finish_reason: "length",
    };
    let mut emit = |out: &mut Outcome, piece: String| {
        out.text.push_str(&piece);
        piece.is_empty() || on_text(&piece)
    };
    loop {
        let Some(event) = rx.recv().await else {
            return Err(ApiError::internal("the model worker stopped"));
        };
        match event {
            Event::PromptLogprobs(lp) => out.prompt_logprobs = lp,
            Event::Token { id, logprob } => {
                out.tokens.push((id, logprob));
                let (piece, ended) = text.push(id);
                if !emit(&mut out, piece) {
                    return Ok(out);
                }
                if ended {
                    out.finish_reason = "stop";
                    return Ok(out);
                }
            }
            Event::Done { stopped } => {
                let piece = text.rest();
                emit(&mut out, piece);
                out.finish_reason = if stopped { "stop" } else { "length" };
                return Ok(out);
            }
            Event::Failed(message) => return Err(ApiError::internal(message)),
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// OpenAI's legacy `logprobs` object for `tokens`, the first of which has no log-probability
/// when it opens an echoed prompt.
fn logprobs_json(
    state: &AppState,
    first: Option<u32>,
    scored: &[TokenLogprob],
    text_start: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    let mut offset = text_start;
    let mut push = |id: u32, lp: Option<&TokenLogprob>| {
        let t = state.token_text(id);
        text_offset.push(offset);
        offset += t.len();
        tokens.push(t);
        token_logprobs.push(lp.map(|l| l.logprob));
        top_logprobs.push(lp.map(|l| {
            l.top
                .iter()
                .map(|&(id, p)| (state.token_text(id), json!(p)))
                .collect::<serde_json::Map<_, _>>()
        }));
    };
    if let Some(id) = first {
        push(id, None);
    }
    for lp in scored {
        push(lp.token, Some(lp));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset})
}

async fn completions(State(state): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    state.check_model(req.model.as_deref())?;
    let s = sampling(
        req.max_tokens.or(Some(16)),
        req.temperature,
        req.top_p,
        req.seed,
        req.stop,
    )?;
    let logprobs = req.logprobs.map(|n| top_count(n, "logprobs")).transpose()?;
    let streaming = req.stream.unwrap_or(false);
    let n = choice_count(&state, req.n, streaming)?;
    let echo = req.echo.unwrap_or(false);
    let prompts = req
        .prompt
        .items()
        .into_iter()
        .map(|p| state.tokens(p))
        .collect::<Result<Vec<_>, _>>()?;
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            Some("prompt"),
            "`prompt` is an empty list",
        ));
    }
    let opts = prompts
        .iter()
        .map(|p| state.options(&s, p.len(), "prompt"))
        .collect::<Result<Vec<_>, _>>()?;
    let id = state.id("cmpl");
    let created = now();
    if streaming {
        if prompts.len() > 1 || logprobs.is_some() || echo {
            return Err(ApiError::invalid(
                Some("stream"),
                "streaming takes one prompt, without logprobs or echo",
            ));
        }
        let rx = state.submit(prompts[0].clone(), opts[0].clone(), None, None)?;
        let chunk = {
            let (id, model) = (id.clone(), state.model_name.clone());
            move |text: &str, finish: Option<&str>| {
                json!({"id": id, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}]})
            }
        };
        return Ok(stream(
            state.clone(),
            rx,
            s.stop,
            move |event| match event {
                StreamItem::Text(t) => vec![chunk(t, None)],
                StreamItem::End(out) => vec![chunk("", Some(out.finish_reason))],
            },
        ));
    }
    // Every choice is queued before any is followed, so that they run in one batch.
    let prompt_lp = (echo && logprobs.is_some()).then_some(logprobs.unwrap_or(0));
    let mut jobs = Vec::with_capacity(prompts.len() * n);
    for (prompt, opts) in prompts.iter().zip(&opts) {
        for j in 0..n {
            let rx = state.submit(prompt.clone(), nth_choice(opts, j), prompt_lp, logprobs)?;
            jobs.push((prompt, rx));
        }
    }
    let mut choices = Vec::new();
    let (mut prompt_total, mut completion_total) = (0, 0);
    for (index, (prompt, rx)) in jobs.into_iter().enumerate() {
        let out = follow(&state, rx, s.stop.clone(), |_| true).await?;
        if index % n == 0 {
            prompt_total += prompt.len();
        }
        completion_total += out.tokens.len();
        let prompt_text = if echo {
            state.tokenizer.decode(prompt).unwrap_or_default()
        } else {
            String::new()
        };
        let logprobs = logprobs.map(|_| {
            let generated: Vec<TokenLogprob> =
                out.tokens.iter().filter_map(|(_, lp)| lp.clone()).collect();
            let scored: Vec<TokenLogprob> = out
                .prompt_logprobs
                .iter()
                .cloned()
                .chain(generated)
                .collect();
            logprobs_json(&state, echo.then_some(prompt[0]), &scored, 0)
        });
        choices.push(json!({
            "index": index,
            "text": prompt_text + &out.text,
            "logprobs": logprobs,
            "finish_reason": out.finish_reason,
        }));
    }
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": state.model_name,
        "choices": choices, "usage": usage(prompt_total, completion_total),
    }))
    .into_response())
}

async fn chat_completions(State(state): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(&body)?;
    state.check_model(req.model.as_deref())?;
    let streaming = req.stream.unwrap_or(false);
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, top) => Some(top_count(top.unwrap_or(0), "top_logprobs")?),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                "top_logprobs needs logprobs = true",
            ));
        }
    };
    if streaming && logprobs.is_some() {
        return Err(ApiError::invalid(
            Some("logprobs"),
            "streamed chat completions carry no logprobs; ask without stream",
        ));
    }
    let n = choice_count(&state, req.n, streaming)?;
    let s = sampling(
        req.max_completion_tokens.or(req.max_tokens),
        req.temperature,
        req.top_p,
        req.seed,
        req.stop,
    )?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "`messages` is empty"));
    }
    let template = state
        .chat
        .as_ref()
        .map_err(|why| ApiError::invalid(Some("messages"), why.clone()))?;
    let prompt_text = template
        .render(&req.messages)
        .map_err(|e| ApiError::invalid(Some("messages"), format!("the chat template: {e:#}")))?;
    let prompt = state.tokens(PromptItem::Text(prompt_text))?;
    let opts = state.options(&s, prompt.len(), "messages")?;
    let prompt_len = prompt.len();
    let mut jobs = (0..n)
        .map(|j| state.submit(prompt.clone(), nth_choice(&opts, j), None, logprobs))
        .collect::<Result<Vec<_>, _>>()?;
    let id = state.id("chatcmpl");
    let created = now();
    if streaming {
        let rx = jobs.pop().expect("one choice when streaming");
        let include_usage = req.stream_options.unwrap_or_default().include_usage;
        let (model, mut first) = (state.model_name.clone(), true);
        let chunk = move |delta: Value, finish: Option<&str>, usage: Option<Value>| {
            let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
            if let Some(u) = usage {
                c["choices"] = json!([]);
                c["usage"] = u;
            }
            c
        };
        return Ok(stream(state.clone(), rx, s.stop, move |event| {
            let mut chunks = Vec::new();
            if std::mem::take(&mut first) {
                chunks.push(chunk(
                    json!({"role": "assistant", "content": ""}),
                    None,
                    None,
                ));
            }
            match event {
                StreamItem::Text(t) => chunks.push(chunk(json!({"content": t}), None, None)),
                StreamItem::End(out) => {
                    chunks.push(chunk(json!({}), Some(out.finish_reason), None));
                    if include_usage {
                        chunks.push(chunk(
                            json!({}),
                            None,
                            Some(usage(prompt_len, out.tokens.len())),
                        ));
                    }
                }
            }
            chunks
        }));
    }
    let mut choices = Vec::with_capacity(n);
    let mut completion_total = 0;
    for (index, rx) in jobs.into_iter().enumerate() {
        let out = follow(&state, rx, s.stop.clone(), |_| true).await?;
        completion_total += out.tokens.len();
        let logprobs = logprobs.map(|_| {
            // The stop token ends the message but is not part of it.
            let content: Vec<Value> = (out.tokens.iter())
                .filter_map(|(_, lp)| lp.as_ref())
                .filter(|lp| Some(lp.token) != state.tokenizer.eos_id())
                .map(|lp| chat_logprob(&state, lp))
                .collect();
            json!({"content": content})
        });
        choices.push(json!({
            "index": index,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": logprobs,
            "finish_reason": out.finish_reason,
        }));
    }
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": state.model_name,
        "choices": choices,
        "usage": usage(prompt_len, completion_total),
    }))
    .into_response())
}

/// A generated token in the chat form of log-probabilities: the token's text and bytes, its
/// log-probability and the alternatives.
fn chat_logprob(state: &AppState, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = state.token_text(id);
        json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
    };
    let mut v = entry(lp.token, lp.logprob);
    v["top_logprobs"] = lp.top.iter().map(|&(id, p)| entry(id, p)).collect();
    v
}

enum StreamItem<'a> {
    Text(&'a str),
    End(&'a Outcome),
}

/// A Server-Sent Events answer: `to_chunks` turns each piece of text, then the end, into JSON
/// chunks; `data: [DONE]` closes the stream.
fn stream(
    state: Shared,
    rx: UnboundedReceiver<Event>,
    stop: Vec<String>,
    mut to_chunks: impl FnMut(StreamItem) -> Vec<Value> + Send + 'static,
) -> Response {
    let (tx, events) = unbounded_channel::<Result<SseEvent, Infallible>>();
    tokio::spawn(async move {
        let send = |tx: &UnboundedSender<Result<SseEvent, Infallible>>, v: &Value| {
            tx.send(Ok(SseEvent::default().data(v.to_string()))).is_ok()
        };
        let outcome = follow(&state, rx, stop, |t| {
            to_chunks(StreamItem::Text(t)).iter().all(|c| send(&tx, c))
        })
        .await;
        match outcome {
            Ok(out) => {
                for c in to_chunks(StreamItem::End(&out)) {
                    send(&tx, &c);
                }
            }
            // The status line is gone: the error goes as the last event.
            Err(e) => {
                send(&tx, &e.body());
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
    });
    (
        StatusCode::OK,
        Sse::new(UnboundedReceiverStream::new(events)).keep_alive(KeepAlive::default()),
    )
        .into_response()
}
