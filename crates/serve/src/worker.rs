//! The model's own thread: it takes generation jobs from a bounded queue and runs up to
//! `max_batch` of them at once (continuous batching), sending each job's tokens back as they
//! come.
//!
//! Every step samples one token for each running sequence, then runs all their new tokens
//! through the model in one forward ([`Decoder::step_together`]): the linears become
//! `M = n` products that read each weight once for all sequences, which is what a decode step
//! costs. (On the CPU, from [`model_llama::generate::SPLIT_ROWS`] rows on, two forwards over
//! half the sequences each run side by side, so that each one's serial stretches overlap the
//! other's products.) A waiting job joins the batch at the next step; a finished one leaves it.
//!
//! A joining job's prompt runs in the same forwards, at most `prefill_chunk` prompt tokens per
//! step (chunked prefill), so a long prompt delays the running sequences' next tokens by a
//! chunk's time at each step instead of stalling them for its whole prefill. With no sequence
//! decoding there is nothing to stall, and prompts run whole (in forwards of at most
//! [`model_llama::generate::MAX_STEP_ROWS`] rows).
//!
//! Each running sequence reserves the KV cache of its longest possible length (prompt and
//! `max_new_tokens`) against a [`KvBudget`]; a job that does not fit waits, first in line, until
//! enough sequences end. So a server holds at most its budget in caches, whatever its clients
//! ask, instead of running out of memory mid-generation.
//!
//! The model runs here, not on tokio's executor: a forward pass is long CPU work (rayon-parallel
//! products) that would stall every connection the executor serves meanwhile.

use std::num::NonZeroUsize;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use kernels::QuantBackend;
use model_llama::Llama;
use model_llama::generate::{Decoder, GenerateOptions, TokenLogprob};
use model_llama::pool::run_awake;
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

impl Job {
    /// The most positions its sequence can reach.
    pub fn positions(&self) -> usize {
        self.prompt.len() + self.opts.max_new_tokens
    }
}

/// How much KV cache the running sequences may hold together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvBudget {
    /// Bytes one sequence's cache holds per position (all layers, keys and values).
    pub per_position: u64,
    /// Bytes all running sequences may reserve together; `None`: no limit.
    pub limit: Option<u64>,
}

impl KvBudget {
    /// What a sequence of up to `positions` positions reserves.
    pub fn need(&self, positions: usize) -> u64 {
        (positions as u64).saturating_mul(self.per_position)
    }

    /// The most positions one sequence can hold within the limit (`None`: no limit).
    pub fn max_positions(&self) -> Option<usize> {
        let positions = self.limit? / self.per_position.max(1);
        Some(usize::try_from(positions).unwrap_or(usize::MAX))
    }

    /// Whether `need` more bytes fit beside `reserved`.
    fn fits(&self, reserved: u64, need: u64) -> bool {
        self.limit
            .is_none_or(|limit| reserved.saturating_add(need) <= limit)
    }
}

/// What the worker runs, as it runs it (shared with the server, which reports it).
#[derive(Debug, Default)]
pub struct Load {
    running: AtomicUsize,
    peak_running: AtomicUsize,
    kv_reserved: AtomicU64,
}

impl Load {
    /// Sequences running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// The most sequences that ever ran at once.
    pub fn peak_running(&self) -> usize {
        self.peak_running.load(Ordering::Relaxed)
    }

    /// KV cache bytes the running sequences reserve.
    pub fn kv_reserved(&self) -> u64 {
        self.kv_reserved.load(Ordering::Relaxed)
    }

    fn set(&self, running: usize, kv_reserved: u64) {
        self.running.store(running, Ordering::Relaxed);
        self.peak_running.fetch_max(running, Ordering::Relaxed);
        self.kv_reserved.store(kv_reserved, Ordering::Relaxed);
    }
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

/// How the worker schedules its jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Jobs that may wait beside those running.
    pub capacity: usize,
    /// Sequences run at once.
    pub max_batch: usize,
    /// Prompt tokens run per step while other sequences decode.
    pub prefill_chunk: NonZeroUsize,
}

/// Starts the worker thread on `model`; it runs jobs as `schedule` says, within `budget`.
/// `load` follows what it runs. The thread ends when every [`Queue`] clone is dropped and its
/// jobs are done.
pub fn spawn<B>(
    model: Llama<B>,
    schedule: Schedule,
    budget: KvBudget,
    load: Arc<Load>,
) -> std::io::Result<(Queue, JoinHandle<()>)>
where
    B: QuantBackend + 'static,
    Llama<B>: Send,
{
    assert!(
        schedule.max_batch > 0,
        "a batch holds at least one sequence"
    );
    let (jobs, rx) = sync_channel(schedule.capacity);
    let handle = std::thread::Builder::new()
        .name("model".into())
        .spawn(move || run(&model, rx, schedule, budget, &load))?;
    let capacity = schedule.capacity;
    Ok((Queue { jobs, capacity }, handle))
}

/// A job in the running batch.
struct Running<'m, B: QuantBackend> {
    decoder: Decoder<'m, B>,
    job: Job,
    /// KV cache bytes it reserves.
    kv_need: u64,
    /// Its prompt log-probabilities were sent (or not asked for).
    prompt_sent: bool,
}

/// What a job whose model work panicked is told.
fn failed() -> Event {
    Event::Failed("the model failed on this request".into())
}

impl<B: QuantBackend> Running<'_, B> {
    fn send(&self, event: Event) -> bool {
        self.job.events.send(event).is_ok()
    }

    /// Samples and sends the next token; once the job has ended (its last token sent, or its
    /// client gone), `Some` of the event that closes it, for the caller to send after it has
    /// released what the job held.
    fn emit(&mut self) -> Option<Option<Event>> {
        // A closed channel is a client that went away: stop spending the model on it.
        if self.job.events.is_closed() {
            return Some(None);
        }
        if self.decoder.is_prefilling() {
            return None;
        }
        if !self.prompt_sent {
            self.prompt_sent = true;
            let logprobs = self.decoder.take_prompt_logprobs();
            if !self.send(Event::PromptLogprobs(logprobs)) {
                return Some(None);
            }
        }
        if let Some(id) = self.decoder.next_token() {
            let logprob = self
                .job
                .token_logprobs
                .map(|n| model_llama::generate::token_logprob(self.decoder.last_logits(), id, n));
            if !self.send(Event::Token { id, logprob }) {
                return Some(None);
            }
        }
        if self.decoder.is_finished() {
            let last = self.decoder.generated().last().copied();
            let stopped = last.is_some() && last == self.job.opts.stop_token;
            return Some(Some(Event::Done { stopped }));
        }
        None
    }
}

fn run<B: QuantBackend>(
    model: &Llama<B>,
    jobs: Receiver<Job>,
    schedule: Schedule,
    budget: KvBudget,
    load: &Load,
) {
    let max_batch = schedule.max_batch;
    let mut batch: Vec<Running<'_, B>> = Vec::with_capacity(max_batch);
    // A job taken from the queue that waits for KV memory; it starts before any later one.
    let mut waiting: Option<Job> = None;
    let mut reserved = 0u64;
    loop {
        // Idle: wait for a job. Running: take those waiting, without waiting, up to the batch
        // and the budget.
        if batch.is_empty() && waiting.is_none() {
            match jobs.recv() {
                Ok(job) => waiting = Some(job),
                Err(_) => break,
            }
        }
        while batch.len() < max_batch {
            let Some(job) = waiting.take().or_else(|| jobs.try_recv().ok()) else {
                break;
            };
            let need = budget.need(job.positions());
            if budget.fits(reserved, need) {
                if let Some(running) = start(model, job, need) {
                    reserved += need;
                    batch.push(running);
                }
            } else if batch.is_empty() {
                // The server turns such requests away; a job queued by other means fails here.
                let _ = job.events.send(Event::Failed(format!(
                    "the request needs {} of KV cache, more than the server's limit of {}",
                    bytes(need),
                    bytes(budget.limit.unwrap_or(0))
                )));
            } else {
                waiting = Some(job);
                break;
            }
        }
        load.set(batch.len(), reserved);
        let mut ended = Vec::new();
        batch.retain_mut(|r| {
            let Some(last) = r.emit() else { return true };
            reserved -= r.kv_need;
            ended.extend(last.map(|e| (r.job.events.clone(), e)));
            false
        });
        // What a finished job held is free before its client hears that it has finished.
        load.set(batch.len(), reserved);
        for (events, last) in ended {
            let _ = events.send(last);
        }
        // Prompts run whole when no sequence is decoding: there is nothing to stall.
        let decoding = batch.iter().any(|r| !r.decoder.is_prefilling());
        let chunk = if decoding {
            schedule.prefill_chunk.get()
        } else {
            usize::MAX
        };
        let mut decoders: Vec<&mut Decoder<'_, B>> =
            batch.iter_mut().map(|r| &mut r.decoder).collect();
        // The products run inside rayon's pool, its threads awake through the step.
        let step = || run_awake(|| Decoder::step_together(&mut decoders, chunk));
        if guarded(step).is_none() {
            for r in batch.drain(..) {
                r.send(failed());
            }
            reserved = 0;
        }
    }
    load.set(0, 0);
    tracing::debug!("model worker stopped");
}

/// `n` bytes for people (`1.5 GiB`).
pub(crate) fn bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// Sets `job` up to run (its prefill runs in the steps that follow); `None` if that failed.
fn start<B: QuantBackend>(model: &Llama<B>, job: Job, kv_need: u64) -> Option<Running<'_, B>> {
    let start = || Decoder::start(model, &job.prompt, &job.opts, job.prompt_logprobs);
    let Some(decoder) = guarded(start) else {
        let _ = job.events.send(failed());
        return None;
    };
    let prompt_sent = job.prompt_logprobs.is_none();
    Some(Running {
        decoder,
        job,
        kv_need,
        prompt_sent,
    })
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
