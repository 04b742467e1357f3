//! The accounting worker: drains the partition streams into the ledger at a bounded rate.
//!
//! Each instance runs `settle.concurrency` tasks; partitions are dealt out among them,
//! and several instances share the partitions through the Redis consumer group. A
//! batch is: read entries → wait for rate-limit permits → book (one transaction per
//! shard) → mark settled, XACK and XDEL (one script per partition). Nothing is
//! acknowledged before its commit; a crash in between leaves the entries pending, to
//! be read again and booked as no-ops (the ledger's unique key).

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply,
};
use redis::AsyncCommands;
use tokio::sync::watch;

use super::Settler;
use crate::store::{ensure_group, SETTLE_GROUP};
use crate::tokens::status::{entry_fields, parse_entry};
use crate::tokens::AwardEntry;

/// What one call of [`Worker::try_execute_batch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to book in this partition.
    Empty,
    /// Booking is paused by the `booking_paused` switch.
    Paused,
    Booked {
        entries: usize,
        newly_booked: usize,
    },
    /// Test hook: stopped right after the commit, before marking and acknowledging.
    StoppedAfterCommit {
        entries: usize,
    },
}

#[derive(Clone)]
pub struct WorkerOptions {
    /// Consumer name in the group; unique per task.
    pub consumer: String,
    pub batch_size: usize,
    pub claim_idle: Duration,
    /// For tests of crash recovery: return right after the MySQL commit.
    pub stop_after_commit: bool,
}

pub struct Worker {
    settler: Settler,
    options: WorkerOptions,
    /// Partitions where this consumer may hold read-but-unbooked entries (after an
    /// error); they are re-read from the consumer's own pending list first.
    own_pending: HashSet<u32>,
    last_claim: HashMap<u32, Instant>,
    /// Tokens per stream entry lately (store.lua writes one entry per partition and call), so a read
    /// asks for about one booking batch of tokens.
    tokens_per_entry: f64,
}

impl Worker {
    /// A worker drawing from the settler's booking bucket.
    pub fn new(settler: Settler, options: WorkerOptions) -> Self {
        Self {
            settler,
            options,
            own_pending: HashSet::new(),
            last_claim: HashMap::new(),
            tokens_per_entry: 1.0,
        }
    }

    /// Stream entries to read: about one booking batch of tokens.
    fn entries_to_read(&self) -> usize {
        ((self.batch_tokens() as f64 / self.tokens_per_entry).ceil() as usize).max(1)
    }

    /// Tokens booked in one transaction at most.
    fn batch_tokens(&self) -> usize {
        match &self.settler.limiter {
            // Never ask the bucket for more than it can ever hold.
            Some(_) if self.settler.settings.max_tps > 0 => self
                .options
                .batch_size
                .min(self.settler.settings.max_tps as usize),
            _ => self.options.batch_size,
        }
    }

    /// The next entries of `partition`: claimed from a dead consumer, this consumer's own
    /// unbooked ones (after a failed batch), or new ones; and whether they came from this
    /// consumer's own pending list (which may hold more than one read's worth).
    async fn read(&mut self, partition: u32) -> anyhow::Result<(Vec<StreamId>, bool)> {
        let redis = &self.settler.redis;
        let stream = redis.stream_key(partition);
        let mut conn = redis.conn();
        let count = self.entries_to_read();
        let due_claim = self
            .last_claim
            .get(&partition)
            .is_none_or(|t| t.elapsed() >= self.options.claim_idle / 2);
        if due_claim {
            self.last_claim.insert(partition, Instant::now());
            let reply: redis::RedisResult<StreamAutoClaimReply> = conn
                .xautoclaim_options(
                    &stream,
                    SETTLE_GROUP,
                    &self.options.consumer,
                    self.options.claim_idle.as_millis() as u64,
                    "0-0",
                    StreamAutoClaimOptions::default().count(count),
                )
                .await;
            match reply {
                Ok(reply) if !reply.claimed.is_empty() => return Ok((reply.claimed, false)),
                Ok(_) => {}
                Err(err) if err.code() == Some("NOGROUP") => {
                    ensure_group(&mut conn, &stream).await?;
                }
                Err(err) => return Err(err.into()),
            }
        }
        // Entries this consumer read and did not book (a batch failed) come first; once
        // there are none, new entries.
        if self.own_pending.contains(&partition) {
            let ids = self.read_group(&mut conn, &stream, "0", count).await?;
            if !ids.is_empty() {
                return Ok((ids, true));
            }
            self.own_pending.remove(&partition);
        }
        Ok((
            self.read_group(&mut conn, &stream, ">", count).await?,
            false,
        ))
    }

    async fn read_group(
        &self,
        conn: &mut crate::store::RedisConn,
        stream: &str,
        start: &str,
        count: usize,
    ) -> anyhow::Result<Vec<StreamId>> {
        let options = StreamReadOptions::default()
            .group(SETTLE_GROUP, &self.options.consumer)
            .count(count);
        let reply: redis::RedisResult<StreamReadReply> =
            conn.xread_options(&[stream], &[start], &options).await;
        match reply {
            Ok(reply) => Ok(reply.keys.into_iter().flat_map(|k| k.ids).collect()),
            Err(err) if err.code() == Some("NOGROUP") => {
                ensure_group(conn, stream).await?;
                Ok(Vec::new())
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Reads, books and acknowledges one batch of `partition`: the entries read carry
    /// about one booking batch of tokens; more are booked in several transactions, and
    /// the entries are acknowledged with the last one's marks, once all are booked.
    pub async fn try_execute_batch(&mut self, partition: u32) -> anyhow::Result<Outcome> {
        if self.settler.switches.booking_paused() {
            return Ok(Outcome::Paused);
        }
        let (ids, from_own_pending) = self.read(partition).await?;
        if ids.is_empty() {
            return Ok(Outcome::Empty);
        }
        let mut entries = Vec::with_capacity(ids.len());
        let mut acks = Vec::with_capacity(ids.len());
        let mut malformed = Vec::new();
        for id in &ids {
            match parse_entry(id) {
                Some(tokens) => {
                    entries.extend(tokens);
                    acks.push((partition, id.id.clone()));
                }
                None => malformed.push(id.id.clone()),
            }
        }
        if !acks.is_empty() {
            let per_entry = entries.len() as f64 / acks.len() as f64;
            self.tokens_per_entry = 0.5 * self.tokens_per_entry + 0.5 * per_entry;
        }
        if !malformed.is_empty() {
            // Only store.lua and sync write these streams; an unreadable entry cannot
            // be booked by anyone, so it is logged loudly and acknowledged.
            tracing::error!(partition, entries = ?malformed, "malformed settlement entries acknowledged without booking");
            let mut conn = self.settler.redis.conn();
            let stream = self.settler.redis.stream_key(partition);
            let _: () = conn.xack(&stream, SETTLE_GROUP, &malformed).await?;
        }
        if entries.is_empty() {
            return Ok(Outcome::Booked {
                entries: 0,
                newly_booked: 0,
            });
        }
        self.own_pending.insert(partition);
        let chunks: Vec<&[AwardEntry]> = entries.chunks(self.batch_tokens()).collect();
        let mut newly_booked = 0;
        let mut acked = false;
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            if let (Some(limiter), Some(n)) =
                (&self.settler.limiter, NonZeroU32::new(chunk.len() as u32))
            {
                limiter
                    .until_n_ready(n)
                    .await
                    .map_err(|e| anyhow::anyhow!("rate limiter: {e}"))?;
            }
            let started = Instant::now();
            let booked = match self.settler.ledger.book(chunk).await {
                Ok(booked) => booked,
                Err(err) if err.is_data_error() => {
                    // One entry may be unbookable; find it, park it, book the rest.
                    newly_booked += self.book_one_by_one(partition, chunk).await?;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            crate::metrics::booking_batch_latency(started.elapsed().as_secs_f64());
            self.settler.count_booked(booked.newly_booked.len());
            newly_booked += booked.newly_booked.len();
            if self.options.stop_after_commit {
                return Ok(Outcome::StoppedAfterCommit {
                    entries: entries.len(),
                });
            }
            let crash = self.settler.settings.crash_after_commit_permille;
            if crash > 0 && rand::random::<u32>() % 1000 < crash {
                // The chaos harness's "kill -9 between commit and ack", from the inside.
                tracing::error!(
                    partition,
                    "fault injection: aborting between commit and ack"
                );
                std::process::abort();
            }
            let acks: &[(u32, String)] = if last { &acks } else { &[] };
            self.settler
                .tokens
                .mark(&booked.to_mark, &booked.snapshots(), acks)
                .await?;
            acked = last;
        }
        if !acked {
            self.settler.tokens.mark(&[], &[], &acks).await?;
        }
        // Booked and acknowledged. Entries read new leave nothing of ours pending; after
        // a failure, our pending list is read until it is empty (it may hold more entries
        // than one read takes).
        if !from_own_pending {
            self.own_pending.remove(&partition);
        }
        Ok(Outcome::Booked {
            entries: entries.len(),
            newly_booked,
        })
    }

    /// A batch failed on its data: each token is booked alone, and one whose own
    /// booking fails on its data is parked in the partition's parked stream (with the
    /// error), where an operator sees it (`GET /v1/admin/parked`); its stream entry is
    /// acknowledged with the batch's. Nothing is lost: the token stays pending in Redis.
    /// Returns the tokens newly booked.
    async fn book_one_by_one(
        &mut self,
        partition: u32,
        entries: &[AwardEntry],
    ) -> anyhow::Result<usize> {
        let mut newly = 0;
        for entry in entries {
            match self.settler.ledger.book(std::slice::from_ref(entry)).await {
                Ok(booked) => {
                    newly += booked.newly_booked.len();
                    self.settler.count_booked(booked.newly_booked.len());
                    self.settler
                        .tokens
                        .mark(&booked.to_mark, &booked.snapshots(), &[])
                        .await?;
                }
                Err(err) if err.is_data_error() => {
                    self.park(partition, entry, &err.to_string()).await?;
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(newly)
    }

    /// Records an unbookable token in the partition's parked stream (bounded). A token
    /// parked twice (its batch failed after parking it and was read again) is listed
    /// twice; its money is still only ever booked once.
    async fn park(&self, partition: u32, entry: &AwardEntry, error: &str) -> anyhow::Result<()> {
        let redis = &self.settler.redis;
        let id = entry.stream_id.clone().unwrap_or_default();
        let mut conn = redis.conn();
        let mut fields = vec![("id", id.clone())];
        fields.extend(entry_fields(entry));
        fields.push(("error", error.chars().take(500).collect()));
        redis::cmd("XADD")
            .arg(redis.parked_key(partition))
            .arg("MAXLEN")
            .arg("~")
            .arg(100_000)
            .arg("*")
            .arg(&fields)
            .query_async::<()>(&mut conn)
            .await?;
        crate::metrics::parked(partition, 1);
        tracing::error!(
            partition,
            entry = id,
            out_trade_no = entry.out_trade_no,
            error,
            "settlement entry parked: it cannot be booked"
        );
        Ok(())
    }

    /// Works `partitions` until `shutdown` flips. A failing partition is retried with
    /// its own capped exponential backoff while the others go on; an idle round sleeps
    /// `settle.idle_sleep_ms`.
    pub async fn run(mut self, partitions: Vec<u32>, mut shutdown: watch::Receiver<bool>) {
        let settings = self.settler.settings.clone();
        let base = Duration::from_millis(settings.retry_base_ms);
        let max_backoff = Duration::from_millis(settings.retry_max_ms);
        let idle = Duration::from_millis(settings.idle_sleep_ms);
        // Per partition: the current backoff and the instant before which it is skipped.
        let mut failing: HashMap<u32, (Duration, Instant)> = HashMap::new();
        while !*shutdown.borrow() {
            let mut busy = false;
            for &p in &partitions {
                if *shutdown.borrow() {
                    break;
                }
                if failing
                    .get(&p)
                    .is_some_and(|(_, until)| *until > Instant::now())
                {
                    continue;
                }
                match self.try_execute_batch(p).await {
                    Ok(Outcome::Booked { .. }) | Ok(Outcome::StoppedAfterCommit { .. }) => {
                        failing.remove(&p);
                        busy = true
                    }
                    Ok(Outcome::Empty) | Ok(Outcome::Paused) => {
                        failing.remove(&p);
                    }
                    Err(err) => {
                        let backoff = failing
                            .get(&p)
                            .map(|(b, _)| (*b * 2).min(max_backoff))
                            .unwrap_or(base);
                        failing.insert(p, (backoff, Instant::now() + backoff));
                        crate::metrics::booking_failure(p);
                        tracing::warn!(
                            partition = p,
                            error = format!("{err:#}"),
                            retry_in_ms = backoff.as_millis() as u64,
                            "booking batch failed"
                        );
                    }
                }
            }
            if busy {
                continue;
            }
            // Sleep until the next failing partition is due, at most an idle period.
            let pause = failing
                .values()
                .map(|(_, until)| until.saturating_duration_since(Instant::now()))
                .min()
                .map_or(idle, |d| d.min(idle).max(Duration::from_millis(1)));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

/// Starts the worker tasks of one instance; they stop when `shutdown` flips.
pub fn spawn(
    settler: &Settler,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let settings = &settler.settings;
    let partitions = settler.redis.partitions();
    let tasks = settings.concurrency.min(partitions as usize).max(1);
    (0..tasks)
        .map(|t| {
            let mine: Vec<u32> = (0..partitions)
                .filter(|p| *p as usize % tasks == t)
                .collect();
            let worker = Worker::new(
                settler.clone(),
                WorkerOptions {
                    consumer: format!("{}-{t}", settler.instance_id),
                    batch_size: settings.batch_size,
                    claim_idle: Duration::from_millis(settings.claim_idle_ms),
                    stop_after_commit: false,
                },
            );
            crate::shadow::spawn(worker.run(mine, shutdown.clone()))
        })
        .collect()
}
