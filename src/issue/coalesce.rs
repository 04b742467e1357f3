//! Coalescing of single awards: concurrent `POST /v1/awards` requests are issued together
//! through the batch path, so a burst of single awards costs one pipelined Redis round
//! trip per step for many awards instead of three round trips for each.
//!
//! Nothing waits to fill a batch: a request that arrives when the issuer is idle is issued
//! at once, alone. Batches form only from requests that queued while earlier batches were
//! in flight, so coalescing adds no latency of its own. The queue and the number of
//! batches in flight are bounded.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{AwardRequest, Issued};
use crate::error::ApiError;
use crate::startup::App;

type Reply = oneshot::Sender<Result<Issued, ApiError>>;

struct Pending {
    caller: String,
    request: AwardRequest,
    reply: Reply,
}

pub struct Coalescer {
    queue: mpsc::Sender<Pending>,
}

/// Requests waiting for a batch; beyond this, callers wait for room (bounded by the
/// request timeout).
const QUEUE: usize = 4096;

impl Coalescer {
    /// Starts the collector task; it ends when every `Coalescer` clone is dropped. At
    /// most `max_batch` awards go into one batch, and at most `in_flight` batches are
    /// issued at once.
    pub fn start(app: std::sync::Weak<App>, max_batch: usize, in_flight: usize) -> Self {
        let (queue, mut rx) = mpsc::channel::<Pending>(QUEUE);
        let in_flight = Arc::new(Semaphore::new(in_flight));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                let Some(app) = app.upgrade() else { break };
                tokio::spawn(async move {
                    issue_batch(&app, batch).await;
                    drop(permit);
                });
            }
        });
        Self { queue }
    }

    /// Issues one award through the next batch.
    pub async fn issue(&self, caller: String, request: AwardRequest) -> Result<Issued, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                caller,
                request,
                reply,
            })
            .await
            .map_err(|_| ApiError::Unavailable("the issuer is shutting down".into()))?;
        answer.await.map_err(|_| {
            ApiError::Internal(anyhow::anyhow!("the issuing batch dropped an award"))
        })?
    }
}

/// Issues a coalesced batch, one `Issuer::issue` call per caller (admission counts per
/// caller), and answers every request.
async fn issue_batch(app: &App, batch: Vec<Pending>) {
    let mut by_caller: Vec<(String, Vec<Pending>)> = Vec::new();
    for p in batch {
        match by_caller.iter_mut().find(|(c, _)| *c == p.caller) {
            Some((_, group)) => group.push(p),
            None => by_caller.push((p.caller.clone(), vec![p])),
        }
    }
    for (caller, group) in by_caller {
        let (requests, replies): (Vec<AwardRequest>, Vec<Reply>) =
            group.into_iter().map(|p| (p.request, p.reply)).unzip();
        let results = app.issuer.issue(app, &caller, requests).await;
        debug_assert_eq!(results.len(), replies.len(), "one result per award");
        for (result, reply) in results.into_iter().zip(replies) {
            // A caller that gave up (timeout, disconnect) no longer listens; its award
            // stands and a retry replays it.
            let _ = reply.send(result);
        }
    }
}
