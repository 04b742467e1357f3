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

use super::{AwardRequest, Issued, Issuer};
use crate::error::Error;

type Reply = oneshot::Sender<Result<Issued, Error>>;

struct Pending {
    caller: String,
    request: AwardRequest,
    reply: Reply,
}

pub struct Coalescer {
    queue: mpsc::Sender<Pending>,
}

impl Coalescer {
    /// Starts the collector task; it ends when every `Coalescer` clone is dropped. At
    /// most `max_batch` awards go into one batch, at most `in_flight` batches are
    /// issued at once, and at most `queue` requests wait for a batch (beyond that,
    /// callers wait for room, bounded by the request timeout).
    pub fn start(issuer: Arc<Issuer>, max_batch: usize, in_flight: usize, queue: usize) -> Self {
        let (queue, mut rx) = mpsc::channel::<Pending>(queue.max(1));
        let in_flight = Arc::new(Semaphore::new(in_flight));
        crate::shadow::spawn(async move {
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
                let issuer = issuer.clone();
                crate::shadow::spawn(async move {
                    issue_batch(&issuer, batch).await;
                    drop(permit);
                });
            }
        });
        Self { queue }
    }

    /// Issues one award through the next batch.
    pub async fn issue(&self, caller: String, request: AwardRequest) -> Result<Issued, Error> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                caller,
                request,
                reply,
            })
            .await
            .map_err(|_| Error::Unavailable("the issuer is shutting down".into()))?;
        answer
            .await
            .map_err(|_| Error::Internal(anyhow::anyhow!("the issuing batch dropped an award")))?
    }
}

/// Issues a coalesced batch, one `Issuer::issue` call per caller (admission counts per
/// caller), and answers every request.
async fn issue_batch(issuer: &Issuer, batch: Vec<Pending>) {
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
        let results = issuer.issue(&caller, requests).await;
        debug_assert_eq!(results.len(), replies.len(), "one result per award");
        for (result, reply) in results.into_iter().zip(replies) {
            // A caller that gave up (timeout, disconnect) no longer listens; its award
            // stands and a retry replays it.
            let _ = reply.send(result);
        }
    }
}
