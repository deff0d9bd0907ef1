//! An OpenAI-compatible HTTP server for every checkpoint model-llama opens (GGUF files, Hugging
//! Face directories, packed AdaDim directories); see docs/serve.md.
//!
//! * `POST /v1/completions`: text or token-id prompts; `max_tokens`, `temperature`, `top_p`,
//!   `seed`, `stop`, `n`; `stream` (Server-Sent Events); `logprobs` and `echo` (the prompt's
//!   token log-probabilities, as lm-evaluation-harness's `local-completions` asks for);
//! * `POST /v1/chat/completions`: messages rendered by the checkpoint's chat template, streaming
//!   too; `n`; `logprobs` with `top_logprobs`;
//! * `GET /v1/models`, `GET /health`.
//!
//! [`Server::start`] loads the model onto its own thread ([`worker`]), fed through a bounded
//! queue: a request that finds the queue full gets a 503, a bad request a 400 with an
//! OpenAI-style error body ([`ApiError`]). The running sequences' KV caches stay within a
//! memory budget ([`ServeOptions::kv_memory`]); a request that could never fit in it is a 400.
//! [`Server::run_until_signal`] serves until SIGINT or SIGTERM, then finishes the requests in
//! flight.

pub mod api;
pub mod chat;
pub mod error;
mod routes;
pub mod text;
pub mod worker;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytesize::ByteSize;

use kernels::QuantBackend;
use model_llama::KvDtype;
use model_llama::{Llama, OpenModel};
use tokio::sync::oneshot;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::{ApiError, ServeError};
pub use worker::{KvBudget, Load};

/// Sequences decoded together by default: the CPU kernels read a weight once for up to 8 rows.
pub const DEFAULT_MAX_BATCH: usize = 8;
/// Requests that may wait by default.
pub const DEFAULT_QUEUE: usize = 16;
/// Prompt tokens run per step beside decoding sequences by default: eight of the CPU kernels'
/// 8-row passes over the weights, so a step that carries a chunk takes about nine decode steps'
/// time, and a prompt's own prefill slows by about an eighth.
pub const DEFAULT_PREFILL_CHUNK: NonZeroUsize = NonZeroUsize::new(64).unwrap();

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    /// `0` picks a free port ([`Server::addr`] tells which).
    pub port: u16,
    /// The name clients ask for (`model` in a request); other names are a 400.
    pub model_name: String,
    /// Requests that may wait for the model beside those it runs; more get a 503.
    pub queue_capacity: usize,
    /// Sequences decoded together, one token each per forward (continuous batching).
    pub max_batch: usize,
    /// Prompt tokens run per forward while other sequences decode (chunked prefill): a long
    /// prompt delays their tokens by this many tokens' work at each step, instead of stalling
    /// them for its whole prefill.
    pub prefill_chunk: NonZeroUsize,
    /// How each sequence's KV cache stores keys and values.
    pub kv_cache: KvDtype,
    /// KV cache memory the running sequences may reserve together (each its prompt and
    /// `max_tokens`); `None`: [`AUTO_KV_MEMORY`] of the memory available once the model is
    /// loaded.
    pub kv_memory: Option<ByteSize>,
}

/// The share of the available memory the KV caches may take by default: the rest is left to
/// the process's buffers and the machine's other work.
pub const AUTO_KV_MEMORY: f64 = 0.75;

impl ServeOptions {
    /// Serves `model_name` on 127.0.0.1:8080, 8 sequences at a time with 16 more waiting.
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            model_name: model_name.into(),
            queue_capacity: DEFAULT_QUEUE,
            max_batch: DEFAULT_MAX_BATCH,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            kv_cache: KvDtype::default(),
            kv_memory: None,
        }
    }
}

/// A running server: the HTTP side on a tokio runtime, the model on its worker thread.
pub struct Server {
    addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    stop: oneshot::Sender<()>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    worker: std::thread::JoinHandle<()>,
    load: Arc<Load>,
    kv: KvBudget,
}

impl Server {
    /// Loads `model` onto `device` and starts listening.
    pub fn start<B>(
        model: &OpenModel,
        device: &B::Device,
        opts: &ServeOptions,
    ) -> Result<Self, ServeError>
    where
        B: QuantBackend + 'static,
        Llama<B>: Send,
    {
        if opts.queue_capacity == 0 {
            return Err(ServeError::Option {
                option: "queue_capacity",
                reason: "0 would turn every request away; need at least 1".into(),
            });
        }
        if opts.max_batch == 0 {
            return Err(ServeError::Option {
                option: "max_batch",
                reason: "0 would run no request; need at least 1".into(),
            });
        }
        if opts.kv_memory.is_some_and(|m| m.as_u64() == 0) {
            return Err(ServeError::Option {
                option: "kv_memory",
                reason: "0 bytes hold no sequence; need more".into(),
            });
        }
        let config = model.source.config().clone();
        opts.kv_cache
            .check_heads(config.head_dim())
            .map_err(|reason| ServeError::Option {
                option: "kv_cache",
                reason,
            })?;
        let tokenizer = model.tokenizer.clone();
        let chat = chat_template(&tokenizer);
        if let Err(why) = &chat {
            tracing::warn!("chat completions are off: {why}");
        }
        let llama = model.load::<B>(device)?;
        let kv = KvBudget {
            per_position: llama.kv_bytes_per_position(opts.kv_cache) as u64,
            limit: opts
                .kv_memory
                .map(|m| m.as_u64())
                .or_else(|| available_memory().map(|a| (a as f64 * AUTO_KV_MEMORY) as u64)),
        };
        match kv.limit.zip(kv.max_positions()) {
            Some((limit, positions)) => tracing::info!(
                "KV caches: at most {} ({positions} positions of {} each){}",
                worker::bytes(limit),
                worker::bytes(kv.per_position),
                if opts.kv_memory.is_none() {
                    "; --kv-memory sets it"
                } else {
                    ""
                }
            ),
            None => {
                tracing::warn!("no memory figure on this system: the KV caches are not limited")
            }
        }
        let load = Arc::new(Load::default());
        let schedule = worker::Schedule {
            capacity: opts.queue_capacity,
            max_batch: opts.max_batch,
            prefill_chunk: opts.prefill_chunk,
        };
        let (queue, worker) = worker::spawn(llama, schedule, kv, load.clone())?;
        let state = Arc::new(routes::AppState {
            queue,
            load: load.clone(),
            kv,
            tokenizer,
            chat,
            model_name: opts.model_name.clone(),
            context: config.context_length(),
            kv_cache: opts.kv_cache,
            config,
            next_id: AtomicU64::new(0),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("http")
            .enable_all()
            .build()?;
        let host_port = format!("{}:{}", opts.host, opts.port);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(&host_port))
            .map_err(|source| ServeError::Bind {
                addr: host_port,
                source,
            })?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let app = routes::router(state);
        let http = runtime.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!("serving `{}` on http://{addr}", opts.model_name);
        Ok(Self {
            addr,
            runtime,
            stop,
            http,
            worker,
            load,
            kv,
        })
    }

    /// What the model worker runs now.
    pub fn load(&self) -> &Load {
        &self.load
    }

    /// The KV cache budget the server runs under.
    pub fn kv_budget(&self) -> KvBudget {
        self.kv
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until SIGINT (Ctrl-C) or SIGTERM, then shuts down as [`Self::shutdown`] does.
    pub fn run_until_signal(self) -> Result<(), ServeError> {
        self.runtime.block_on(async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    r = ctrl_c => r?,
                    _ = term.recv() => {},
                }
            }
            #[cfg(not(unix))]
            ctrl_c.await?;
            Ok::<_, std::io::Error>(())
        })?;
        tracing::info!("shutting down: finishing the requests in flight");
        self.shutdown()
    }

    /// Stops accepting connections, lets the requests in flight finish, then stops the model
    /// worker.
    pub fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.stop.send(());
        let served = self
            .runtime
            .block_on(self.http)
            .map_err(|_| ServeError::WorkerPanicked)?;
        // The router held the last queue sender: the worker ends once the server has.
        drop(self.runtime);
        self.worker.join().map_err(|_| ServeError::WorkerPanicked)?;
        Ok(served?)
    }
}

/// Linux's estimate of the memory available without swapping (`MemAvailable`), in bytes.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The checkpoint's chat template, compiled, or why chat completions cannot be served.
fn chat_template(tokenizer: &model_llama::LlamaTokenizer) -> Result<ChatTemplate, String> {
    let source = tokenizer.chat_template().ok_or(
        "the checkpoint has no chat template (GGUF `tokenizer.chat_template`, or \
                `chat_template` in tokenizer_config.json)",
    )?;
    let token = |id: Option<u32>| {
        id.and_then(|id| tokenizer.id_to_token(id))
            .unwrap_or_default()
    };
    ChatTemplate::new(
        source,
        &token(tokenizer.bos_id()),
        &token(tokenizer.eos_id()),
    )
    .map_err(|e| format!("the checkpoint's chat template does not compile: {e:#}"))
}
