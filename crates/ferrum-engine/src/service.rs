//! A model behind a queue: one engine thread per loaded model runs requests one after another
//! and reports each token through the request's own sink. This is the one seam between the
//! server and the engine (`ModelHandle::submit(Request)` -> events), so the server never touches
//! tensors and the engine never sees HTTP or an async runtime.
//!
//! The session (KV cache) lives on the engine thread and is reused across requests: a request
//! whose prompt starts like the previous one skips that prefix (reported as cached tokens).
//! Continuous batching replaces this single-sequence loop later; the seam stays the same.

use std::ops::ControlFlow;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use crate::engine::LoadedModel;
use crate::error::EngineError;
use crate::generate::{Completion, GenerateParams, TokenEvent};

/// What a request reports, in order: per choice, tokens then `ChoiceDone`; or one `Error`.
#[derive(Debug)]
pub enum Event {
    /// The request left the queue and its prompt is being read.
    Started,
    Token {
        choice: u32,
        token: TokenEvent,
    },
    ChoiceDone {
        choice: u32,
        completion: Completion,
    },
    Error(EngineError),
}

/// Receives a request's events on the engine thread. Returning `Break` cancels the request
/// (its client went away); it must not block for long.
pub type Sink = Box<dyn FnMut(Event) -> ControlFlow<()> + Send>;

/// One generation request: `choices` completions of the same prompt.
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Number of choices (OpenAI `n`); choice `i` samples with seed `seed + i`.
    pub choices: u32,
    pub sink: Sink,
}

/// Why a request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the model's engine thread has stopped")]
    Stopped,
}

/// A loaded model and the queue of its engine thread. Cloning shares both; the thread stops
/// once every handle is dropped and the queue is drained.
#[derive(Clone)]
pub struct ModelHandle {
    model: Arc<LoadedModel>,
    queue: SyncSender<Request>,
    capacity: usize,
}

impl ModelHandle {
    /// Starts the engine thread of `model` with room for `queue_capacity` waiting requests.
    pub fn spawn(model: LoadedModel, queue_capacity: usize) -> std::io::Result<ModelHandle> {
        let model = Arc::new(model);
        let (tx, rx) = sync_channel(queue_capacity);
        let engine_model = Arc::clone(&model);
        std::thread::Builder::new()
            .name("ferrum-engine".into())
            .spawn(move || engine_loop(&engine_model, rx))?;
        Ok(ModelHandle {
            model,
            queue: tx,
            capacity: queue_capacity,
        })
    }

    /// The model, for templating and tokenizing off the engine thread.
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// Queues a request without waiting.
    pub fn submit(&self, request: Request) -> Result<(), SubmitError> {
        self.queue.try_send(request).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::QueueFull(self.capacity),
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }
}

fn engine_loop(model: &LoadedModel, requests: Receiver<Request>) {
    let mut session = model.new_session();
    while let Ok(mut request) = requests.recv() {
        // A client that left while its request waited costs nothing.
        if (request.sink)(Event::Started).is_break() {
            continue;
        }
        // A panic in one request must not take the model down with it.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_request(model, &mut session, &mut request)
        }));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = (request.sink)(Event::Error(e));
            }
            Err(_) => {
                tracing::error!("generation panicked; the request fails and the cache is reset");
                session.reset();
                let _ = (request.sink)(Event::Error(EngineError::Internal(
                    "generation panicked".into(),
                )));
            }
        }
    }
    tracing::info!(path = %model.path.display(), "engine thread stopped");
}

fn run_request(
    model: &LoadedModel,
    session: &mut crate::generate::Session,
    request: &mut Request,
) -> crate::Result<()> {
    let generator = model.generator();
    for choice in 0..request.choices.max(1) {
        let mut params = request.params.clone();
        params.sampling.seed = params
            .sampling
            .seed
            .map(|s| s.wrapping_add(u64::from(choice)));
        let sink = &mut request.sink;
        let mut cancelled = false;
        let completion = generator.generate(session, &request.prompt, &params, &mut |token| {
            let flow = sink(Event::Token {
                choice,
                token: token.clone(),
            });
            cancelled |= flow.is_break();
            flow
        })?;
        if cancelled {
            return Ok(());
        }
        if (request.sink)(Event::ChoiceDone { choice, completion }).is_break() {
            return Ok(());
        }
    }
    Ok(())
}
