//! The model's own thread: it takes generation jobs from a bounded queue and runs up to
//! `max_batch` of them at once (continuous batching), sending each job's tokens back as they
//! come.
//!
//! Every step samples one token for each running sequence, then runs all their new tokens
//! through the model in one forward ([`Decoder::advance_together`]): the linears become
//! `M = n` products that read each weight once for all sequences, which is what a decode step
//! costs. A waiting job joins the batch at the next step, after its own prefill; a finished one
//! leaves it.
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
    /// How many jobs may wait.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

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

/// Starts the worker thread on `model`; it runs up to `max_batch` jobs at once, and at most
/// `capacity` more wait. The thread ends when every [`Queue`] clone is dropped and its jobs are
/// done.
pub fn spawn<B>(
    model: Llama<B>,
    capacity: usize,
    max_batch: usize,
) -> std::io::Result<(Queue, JoinHandle<()>)>
where
    B: QuantBackend + 'static,
    Llama<B>: Send,
{
    assert!(max_batch > 0, "a batch holds at least one sequence");
    let (jobs, rx) = sync_channel(capacity);
    let handle = std::thread::Builder::new()
        .name("model".into())
        .spawn(move || run(&model, rx, max_batch))?;
    Ok((Queue { jobs, capacity }, handle))
}

/// A job in the running batch.
struct Running<'m, B: QuantBackend> {
    decoder: Decoder<'m, B>,
    job: Job,
}

/// What a job whose model work panicked is told.
fn failed() -> Event {
    Event::Failed("the model failed on this request".into())
}

impl<B: QuantBackend> Running<'_, B> {
    fn send(&self, event: Event) -> bool {
        self.job.events.send(event).is_ok()
    }

    /// Samples and sends the next token; `false` once the job has ended (its last token sent,
    /// or its client gone).
    fn emit(&mut self) -> bool {
        // A closed channel is a client that went away: stop spending the model on it.
        if self.job.events.is_closed() {
            return false;
        }
        if let Some(id) = self.decoder.next_token() {
            let logprob = self
                .job
                .token_logprobs
                .map(|n| model_llama::generate::token_logprob(self.decoder.last_logits(), id, n));
            if !self.send(Event::Token { id, logprob }) {
                return false;
            }
        }
        if self.decoder.is_finished() {
            let last = self.decoder.generated().last().copied();
            let stopped = last.is_some() && last == self.job.opts.stop_token;
            self.send(Event::Done { stopped });
            return false;
        }
        true
    }
}

fn run<B: QuantBackend>(model: &Llama<B>, jobs: Receiver<Job>, max_batch: usize) {
    let mut batch: Vec<Running<'_, B>> = Vec::with_capacity(max_batch);
    loop {
        // Idle: wait for a job. Running: take those waiting, without waiting, up to the batch.
        if batch.is_empty() {
            match jobs.recv() {
                Ok(job) => batch.extend(start(model, job)),
                Err(_) => break,
            }
        }
        while batch.len() < max_batch {
            let Ok(job) = jobs.try_recv() else { break };
            batch.extend(start(model, job));
        }
        batch.retain_mut(Running::emit);
        let mut decoders: Vec<&mut Decoder<'_, B>> =
            batch.iter_mut().map(|r| &mut r.decoder).collect();
        // The products run inside rayon's pool (see `model_llama::generate::generate`).
        if guarded(|| rayon::scope(|_| Decoder::advance_together(&mut decoders))).is_none() {
            for r in batch.drain(..) {
                r.send(failed());
            }
        }
    }
    tracing::debug!("model worker stopped");
}

/// Runs `job`'s prefill (and sends its prompt log-probabilities); `None` if it failed or its
/// client has gone.
fn start<B: QuantBackend>(model: &Llama<B>, job: Job) -> Option<Running<'_, B>> {
    let prefill = || {
        rayon::scope(|_| {
            Decoder::with_prompt_logprobs(model, &job.prompt, &job.opts, job.prompt_logprobs)
        })
    };
    let Some((decoder, prompt_logprobs)) = guarded(prefill) else {
        let _ = job.events.send(failed());
        return None;
    };
    let running = Running { decoder, job };
    let wanted = running.job.prompt_logprobs.is_some();
    (!wanted || running.send(Event::PromptLogprobs(prompt_logprobs))).then_some(running)
}

/// `f()`, or `None` if it panicked: a panic in one request (a bug) must not take the server
/// down with it.
fn guarded<R>(f: impl FnOnce() -> R) -> Option<R> {
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(f));
    if outcome.is_err() {
        tracing::error!("the model panicked on a request");
    }
    outcome.ok()
}
