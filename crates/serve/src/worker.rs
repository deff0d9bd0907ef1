//! The model's own thread: it takes generation jobs from a bounded queue, one at a time, and
//! sends each job's tokens back as they come.
//!
//! The model runs here, not on tokio's executor: a forward pass is long CPU work (rayon-parallel
//! products) that would stall every connection the executor serves meanwhile.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use kernels::QuantBackend;
use model_llama::Llama;
use model_llama::generate::{Decoder, GenerateOptions, TokenLogprob};
use tokio::sync::mpsc::UnboundedSender;

/// One sequence to generate.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    /// Also score the prompt's tokens, with this many alternatives per position.
    pub prompt_logprobs: Option<usize>,
    /// Score each new token, with this many alternatives.
    pub token_logprobs: Option<usize>,
    /// Where the job's events go; dropping the receiving side cancels the job.
    pub events: UnboundedSender<Event>,
}

/// What a job reports, in this order: `PromptLogprobs` (when asked), `Token`s, then `Done`
/// (or `Failed`).
#[derive(Debug)]
pub enum Event {
    PromptLogprobs(Vec<TokenLogprob>),
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    /// `stopped`: the stop token ended the sequence (not `max_new_tokens`).
    Done {
        stopped: bool,
    },
    Failed(String),
}

/// The sending side of the queue.
#[derive(Clone, Debug)]
pub struct Queue {
    jobs: SyncSender<Job>,
    capacity: usize,
}

impl Queue {
    /// Queues `job`; `Err` (with the job's description) when `capacity` jobs already wait or
    /// the worker has stopped.
    pub fn submit(&self, job: Job) -> Result<(), String> {
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => format!(
                "the server is busy: {} requests are already waiting; retry later",
                self.capacity
            ),
            TrySendError::Disconnected(_) => "the model worker has stopped".to_string(),
        })
    }
}

/// Starts the worker thread on `model`; at most `capacity` jobs wait beside the one running.
/// The thread ends when every [`Queue`] clone is dropped.
pub fn spawn<B>(model: Llama<B>, capacity: usize) -> std::io::Result<(Queue, JoinHandle<()>)>
where
    B: QuantBackend + 'static,
    Llama<B>: Send,
{
    let (jobs, rx) = sync_channel(capacity);
    let handle = std::thread::Builder::new()
        .name("model".into())
        .spawn(move || run(&model, rx))?;
    Ok((Queue { jobs, capacity }, handle))
}

fn run<B: QuantBackend>(model: &Llama<B>, jobs: Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        let events = job.events.clone();
        // A panic in one request (a bug) must not take the server down with it.
        // The products run inside rayon's pool (see `model_llama::generate::generate`).
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            rayon::scope(|_| run_job(model, job));
        }));
        if outcome.is_err() {
            tracing::error!("the model panicked on a request");
            let _ = events.send(Event::Failed("the model failed on this request".into()));
        }
    }
    tracing::debug!("model worker stopped");
}

fn run_job<B: QuantBackend>(model: &Llama<B>, job: Job) {
    let send = |e: Event| job.events.send(e).is_ok();
    let (mut decoder, prompt_logprobs) =
        Decoder::with_prompt_logprobs(model, &job.prompt, &job.opts, job.prompt_logprobs);
    if job.prompt_logprobs.is_some() && !send(Event::PromptLogprobs(prompt_logprobs)) {
        return;
    }
    let mut last = None;
    // A closed channel is a client that went away: stop spending the model on it.
    while !job.events.is_closed() {
        let Some(id) = decoder.next_token() else {
            break;
        };
        last = Some(id);
        let logprob = job
            .token_logprobs
            .map(|n| model_llama::generate::token_logprob(decoder.last_logits(), id, n));
        if !send(Event::Token { id, logprob }) {
            return;
        }
    }
    let stopped = last.is_some() && last == job.opts.stop_token;
    send(Event::Done { stopped });
}
