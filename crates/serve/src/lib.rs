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
//! OpenAI-style error body ([`ApiError`]). [`Server::run_until_signal`] serves until SIGINT or
//! SIGTERM, then finishes the requests in flight.

pub mod api;
pub mod chat;
pub mod error;
mod routes;
pub mod text;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use kernels::QuantBackend;
use model_llama::KvDtype;
use model_llama::{Llama, OpenModel};
use tokio::sync::oneshot;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::{ApiError, ServeError};

/// Sequences decoded together by default: the CPU kernels read a weight once for up to 8 rows.
pub const DEFAULT_MAX_BATCH: usize = 8;
/// Requests that may wait by default.
pub const DEFAULT_QUEUE: usize = 16;

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
    /// How each sequence's KV cache stores keys and values.
    pub kv_cache: KvDtype,
}

impl ServeOptions {
    /// Serves `model_name` on 127.0.0.1:8080, 8 sequences at a time with 16 more waiting.
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            model_name: model_name.into(),
            queue_capacity: DEFAULT_QUEUE,
            max_batch: DEFAULT_MAX_BATCH,
            kv_cache: KvDtype::default(),
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
        let config = model.source.config().clone();
        let tokenizer = model.tokenizer.clone();
        let chat = chat_template(&tokenizer);
        if let Err(why) = &chat {
            tracing::warn!("chat completions are off: {why}");
        }
        let llama = model.load::<B>(device)?;
        let (queue, worker) = worker::spawn(llama, opts.queue_capacity, opts.max_batch)?;
        let state = Arc::new(routes::AppState {
            queue,
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
        })
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
