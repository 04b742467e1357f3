//! Group red packets (the WeChat seed): a user **sends** an amount split into shares,
//! others **grab** (a cache-only check: finished, already grabbed, expired) and **open**
//! (the share drawn by the double-average rule, [`split`]), and after
//! `packets.refund_after_secs` the unclaimed remainder goes back to the sender.
//!
//! Where things live and why the money stays exact:
//! - The packet row and its shares are on the **sender's shard**, so the sender's debit
//!   (`packet_send` ledger row `ps_{id}`) and refund (`packet_refund`, `pr_{id}`) move
//!   in one transaction with the packet. The ledger's unique `out_trade_no` makes the
//!   refund happen at most once whatever restarts; the packet's status under its row
//!   lock makes it happen at all.
//! - Every open of one packet is **serialized** by that row lock (and, per instance, at
//!   most `packets.open_concurrency` at once wait for it); a share is a row keyed by
//!   (packet, user), so a user opens a packet once.
//! - A share is **minted as a signed award token** (activity [`PACKETS_ACTIVITY`], scene
//!   = the packet id, award type `packet`) kept in the share row and stored in Redis like
//!   any award, so the grabber sees it at once and the worker books it. Opening again
//!   answers the same share and stores its token again if Redis lost it.
//! - The **cache** (one hash per packet, its own hash tag) only filters: shares left,
//!   expiry and who opened what. MySQL decides.
//!
//! Conservation: for every packet, total = opened + refunded + open remainder, and the
//! opened shares are award tokens (booked + pending).

pub mod split;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use serde::Serialize;
use sqlx::{MySql, Row, Transaction};
use tokio::sync::Semaphore;

use crate::config::PacketSettings;
use crate::domain::{ActivityId, AwardType, Cents, OutTradeNo, RequestId, SceneId, Stage, UserId};
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::ledger::{is_duplicate, Account, ChangeEnd, Ledger, LedgerError, MoveOut, MovedOut};
use crate::pb;
use crate::store::{now_ms, query_scripted, Db, Redis};
use crate::tokens::{AwardEntry, Tokens, Totals};

/// The activity id of every share token; no operator activity may take it.
pub const PACKETS_ACTIVITY: &str = "packets";
/// The award type of share tokens.
pub const PACKET_AWARD_TYPE: &str = "packet";

/// A packet as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Packet {
    pub packet_id: String,
    pub sender_id: i64,
    pub request_id: String,
    pub total_cents: i64,
    pub shares: i64,
    pub greeting: String,
    pub opened_count: i64,
    pub opened_cents: i64,
    pub refunded_cents: i64,
    /// open, finished (every share opened) or refunded (the remainder went back).
    pub status: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// When the unclaimed remainder went back to the sender (ms); null while open.
    pub refunded_at_ms: Option<i64>,
}

/// One opened share.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Share {
    pub user_id: i64,
    /// 1 for the first share opened.
    pub seq: i64,
    pub amount_cents: i64,
    pub opened_at_ms: i64,
    /// The largest share of a finished packet (the first opened among equals).
    pub best_luck: bool,
}

/// A packet with who got what.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct PacketDetail {
    #[serde(flatten)]
    pub packet: Packet,
    pub opened: Vec<Share>,
}

/// What an open gives the grabber: the share and its signed token (base64url, the
/// client's copy, like an award's).
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Opened {
    pub packet_id: String,
    pub share: Share,
    pub token: String,
    pub out_trade_no: String,
}

/// What the grab step says, from the cache alone.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Grab {
    /// A share may be left: go on to open.
    Eligible,
    Finished,
    AlreadyOpened,
    Expired,
}

/// A send as answered: new, or the one the same request made before.
pub enum Sent {
    Created(Packet, i64),
    Existing(Packet),
}

/// An open as answered: a share opened now, or the user's share from before.
pub enum OpenOutcome {
    Created(Opened),
    Existing(Opened),
}

/// The red packet capability. Cheap to clone.
#[derive(Clone)]
pub struct Packets {
    db: Arc<Db>,
    redis: Arc<Redis>,
    ledger: Ledger,
    tokens: Tokens,
    keys: Arc<Keys>,
    settings: PacketSettings,
    scripts: Arc<Scripts>,
    /// Per packet, the opens this instance lets wait on its row lock at once.
    gates: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

struct Scripts {
    grab: Script,
    opened: Script,
}

fn new_packet_id() -> String {
    format!("pk{:011x}{:08x}", now_ms(), rand::random::<u32>())
}

/// The shape [`new_packet_id`] gives: anything else is no packet, refused before any
/// lookup.
fn packet_id_ok(id: &str) -> bool {
    id.len() == 21
        && id.starts_with("pk")
        && id[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) const PACKET_COLUMNS: &str = "id, sender_id, request_id, total_cents, shares, greeting, opened_count, opened_cents, refunded_cents, status, created_at_ms, expires_at_ms, refunded_at_ms";

fn packet_of(row: &sqlx::mysql::MySqlRow) -> Result<Packet, sqlx::Error> {
    let request: Vec<u8> = row.try_get(2)?;
    Ok(Packet {
        packet_id: crate::ledger::text(row, 0)?,
        sender_id: row.try_get(1)?,
        request_id: String::from_utf8_lossy(&request).into_owned(),
        total_cents: row.try_get(3)?,
        shares: i64::from(row.try_get::<i32, _>(4)?),
        greeting: row.try_get(5)?,
        opened_count: i64::from(row.try_get::<i32, _>(6)?),
        opened_cents: row.try_get(7)?,
        refunded_cents: row.try_get(8)?,
        status: row.try_get(9)?,
        created_at_ms: row.try_get(10)?,
        expires_at_ms: row.try_get(11)?,
        refunded_at_ms: row.try_get(12)?,
    })
}

/// Packet `id`, its row locked to the end of `tx`: every change of one packet goes
/// through this lock.
async fn lock_packet(
    tx: &mut Transaction<'_, MySql>,
    id: &str,
) -> Result<Option<Packet>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {PACKET_COLUMNS} FROM packets WHERE id = ? FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(packet_of).transpose()
}

/// The packet `sender` sent under `request_id`, if any.
async fn find_sent<'e, E: sqlx::Executor<'e, Database = MySql>>(
    executor: E,
    sender: UserId,
    request_id: &RequestId,
) -> Result<Option<Packet>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {PACKET_COLUMNS} FROM packets WHERE sender_id = ? AND request_id = ?"
    ))
    .bind(sender.get())
    .bind(request_id.as_str().as_bytes())
    .fetch_optional(executor)
    .await?;
    row.as_ref().map(packet_of).transpose()
}

/// A repeated send answered with the packet its `request_id` sent before, or a conflict
/// when it asks for another packet.
fn same_packet(
    packet: Packet,
    request_id: &RequestId,
    total: Cents,
    shares: i64,
    greeting: &str,
) -> Result<Sent> {
    if packet.total_cents == total.get() && packet.shares == shares && packet.greeting == greeting {
        Ok(Sent::Existing(packet))
    } else {
        Err(Error::IdempotencyConflict(format!(
            "request_id `{request_id}` sent another red packet"
        )))
    }
}

/// The token of a share, its bytes for the ledger and Redis.
struct Minted {
    token: pb::RedPacketToken,
    bytes: Vec<u8>,
}

impl Packets {
    pub fn new(
        db: Arc<Db>,
        redis: Arc<Redis>,
        ledger: Ledger,
        tokens: Tokens,
        keys: Arc<Keys>,
        settings: PacketSettings,
    ) -> Self {
        Self {
            db,
            redis,
            ledger,
            tokens,
            keys,
            settings,
            scripts: Arc::new(Scripts {
                grab: crate::store::script(include_str!("grab.lua")),
                opened: crate::store::script(include_str!("opened.lua")),
            }),
            gates: Arc::default(),
        }
    }

    pub fn scripts(&self) -> [&Script; 2] {
        [&self.scripts.grab, &self.scripts.opened]
    }

    /// Checks a send's fields: 1..=max_shares shares, at least a cent each, at most
    /// max_total_cents, a greeting of at most 100 characters.
    fn check_send(&self, total: Cents, shares: i64, greeting: &str) -> Result<()> {
        if shares < 1 || shares > i64::from(self.settings.max_shares) {
            return Err(Error::InvalidRequest(format!(
                "shares must be 1..={}",
                self.settings.max_shares
            )));
        }
        if total.get() < shares {
            return Err(Error::InvalidRequest(
                "total_cents must give every share at least one cent".into(),
            ));
        }
        if total.get() > self.settings.max_total_cents {
            return Err(Error::AmountOverCap(format!(
                "a red packet holds at most {} cents",
                self.settings.max_total_cents
            )));
        }
        if greeting.chars().count() > 100 || greeting.chars().any(char::is_control) {
            return Err(Error::InvalidRequest(
                "greeting must be at most 100 characters, none of them control characters".into(),
            ));
        }
        Ok(())
    }

    /// Sends a packet: the sender's pending tokens are booked first (forced settlement,
    /// as for a withdrawal), then the total is debited into the packet, or nothing
    /// changes. The same `request_id` again is the same packet.
    pub async fn send(
        &self,
        sender: UserId,
        request_id: &RequestId,
        total: Cents,
        shares: i64,
        greeting: &str,
    ) -> Result<Sent> {
        self.check_send(total, shares, greeting)?;
        let fence = self.tokens.fence(sender).await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .send_tx(sender, request_id, total, shares, greeting)
                .await
            {
                Ok(Ok((Sent::Created(packet, balance), Some((account, to_mark))))) => {
                    let end = ChangeEnd::Committed(account, to_mark);
                    self.ledger.end_fence(sender, fence, end).await;
                    self.cache(&packet, &[]).await;
                    return Ok(Sent::Created(packet, balance));
                }
                Ok(result) => {
                    self.ledger
                        .end_fence(sender, fence, ChangeEnd::RolledBack)
                        .await;
                    return result.map(|(sent, _)| sent);
                }
                Err(err) if attempt < 6 && err.is_retryable() => {
                    crate::metrics::tx_retry("packet_send");
                    tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                }
                Err(err) => {
                    self.ledger
                        .end_fence(sender, fence, ChangeEnd::InDoubt)
                        .await;
                    return Err(err.into());
                }
            }
        }
    }

    async fn send_tx(
        &self,
        sender: UserId,
        request_id: &RequestId,
        total: Cents,
        shares: i64,
        greeting: &str,
    ) -> Result<Result<(Sent, Option<(Account, Vec<AwardEntry>)>)>, LedgerError> {
        let mut tx = self.db.for_user(sender).begin().await?;
        let id = new_packet_id();
        let now = now_ms();
        let expires = now + (self.settings.refund_after_secs as i64).saturating_mul(1000);
        let out = MoveOut {
            amount: total,
            kind: "packet_send",
            out_trade_no: &format!("ps_{id}"),
            at_ms: now,
        };
        // As a withdrawal: the sender's pending tokens booked, then the debit, or nothing.
        let moved = match self
            .ledger
            .settle_and_move_out(&mut tx, sender, &out)
            .await?
        {
            MovedOut::Done(moved) => moved,
            MovedOut::Insufficient => {
                // A repeat of a packet the balance covered then is answered with it.
                let existing = find_sent(&mut *tx, sender, request_id).await?;
                tx.rollback().await?;
                return Ok(match existing {
                    Some(packet) => same_packet(packet, request_id, total, shares, greeting)
                        .map(|sent| (sent, None)),
                    None => Err(Error::InsufficientBalance),
                });
            }
        };
        let account = moved.account;
        let inserted = sqlx::query(
            "INSERT INTO packets (id, sender_id, request_id, total_cents, shares, greeting, status, created_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?)",
        )
        .bind(&id)
        .bind(sender.get())
        .bind(request_id.as_str().as_bytes())
        .bind(total.get())
        .bind(shares as i32)
        .bind(greeting)
        .bind(now)
        .bind(expires)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(err) if is_duplicate(&err) => {
                // A twin committed first (its unique key, met under the account lock):
                // rolling back undoes this attempt's forced booking too.
                tx.rollback().await?;
                let packet = find_sent(self.db.for_user(sender), sender, request_id)
                    .await?
                    .ok_or(sqlx::Error::RowNotFound)?;
                return Ok(same_packet(packet, request_id, total, shares, greeting)
                    .map(|sent| (sent, None)));
            }
            Err(err) => return Err(err.into()),
        }
        tx.commit().await?;
        let packet = Packet {
            packet_id: id,
            sender_id: sender.get(),
            request_id: request_id.to_string(),
            total_cents: total.get(),
            shares,
            greeting: greeting.to_string(),
            opened_count: 0,
            opened_cents: 0,
            refunded_cents: 0,
            status: "open".into(),
            created_at_ms: now,
            expires_at_ms: expires,
            refunded_at_ms: None,
        };
        let balance = account.balance_cents;
        Ok(Ok((
            Sent::Created(packet, balance),
            Some((account, moved.to_mark)),
        )))
    }

    /// Writes what the cache holds of `packet` (best effort: the cache only filters).
    async fn cache(&self, packet: &Packet, opened: &[(i64, i64)]) {
        let left = if packet.status == "open" {
            packet.shares - packet.opened_count
        } else {
            0
        };
        let key = self.redis.packet_key(&packet.packet_id);
        let mut cmd = crate::store::evalsha(&self.scripts.opened, &[key.as_str()]);
        cmd.arg(left).arg(packet.expires_at_ms).arg(
            // The cache outlives the packet by a day, for late grabs to be answered.
            packet.expires_at_ms + 86_400_000,
        );
        for (user, cents) in opened {
            cmd.arg(user).arg(cents);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let scripts = self.scripts();
        if let Err(err) = query_scripted::<Vec<i64>>(&self.redis, &pipe, &scripts).await {
            tracing::warn!(error = %err, packet = packet.packet_id, "writing the packet cache failed");
        }
    }

    /// The grab step: from the cache alone when it holds the packet; read from MySQL
    /// into the cache when it does not (a first grab after a Redis loss).
    pub async fn grab(&self, user: UserId, id: &str) -> Result<Grab> {
        if !packet_id_ok(id) {
            return Err(Error::NotFound(format!("no red packet `{id}`")));
        }
        let key = self.redis.packet_key(id);
        for _ in 0..2 {
            let mut cmd = crate::store::evalsha(&self.scripts.grab, &[key.as_str()]);
            cmd.arg(user.get()).arg(now_ms());
            let mut pipe = redis::pipe();
            pipe.add_command(cmd);
            let answers: Vec<i64> = query_scripted(&self.redis, &pipe, &self.scripts()).await?;
            let grab = match answers.first() {
                Some(0) => Grab::Eligible,
                Some(1) => Grab::Finished,
                Some(2) => Grab::AlreadyOpened,
                Some(3) => Grab::Expired,
                _ => {
                    let (packet, shares) = self.detail_rows(id).await?;
                    let opened: Vec<(i64, i64)> =
                        shares.iter().map(|s| (s.user_id, s.amount_cents)).collect();
                    self.cache(&packet, &opened).await;
                    continue;
                }
            };
            crate::metrics::packet_grab(grab);
            return Ok(grab);
        }
        Err(Error::Unavailable(
            "the red packet cache cannot be written".into(),
        ))
    }

    /// The gate of `id`: at most `open_concurrency` opens of one packet wait for its
    /// row lock at once on this instance.
    fn gate(&self, id: &str) -> Arc<Semaphore> {
        let mut gates = self.gates.lock().expect("packet gates lock poisoned");
        if gates.len() > 10_000 {
            gates.retain(|_, s| Arc::strong_count(s) > 1);
        }
        gates
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.settings.open_concurrency)))
            .clone()
    }

    /// Opens a share for `user`, or answers the share they opened before.
    pub async fn open(&self, user: UserId, id: &str) -> Result<OpenOutcome> {
        if !packet_id_ok(id) {
            return Err(Error::NotFound(format!("no red packet `{id}`")));
        }
        let gate = self.gate(id);
        let _permit = tokio::time::timeout(Duration::from_secs(5), gate.acquire_owned())
            .await
            .map_err(|_| Error::RateLimited {
                retry_after_secs: 1,
            })?
            .map_err(|_| Error::internal("packet gate closed"))?;
        let shard = self.shard_of(id).await?;
        let mut attempt = 0;
        let (outcome, packet, token_bytes) = loop {
            attempt += 1;
            match self.open_tx(shard, user, id).await {
                Ok(result) => break result?,
                Err(err) if attempt < 6 && err.is_retryable() => {
                    crate::metrics::tx_retry("packet_open");
                    tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                }
                Err(err) => return Err(err.into()),
            }
        };
        // The token goes to Redis (again, when this is an earlier share: a lost copy
        // comes back; one already held or booked is left as it is). In a task of its
        // own, so that a request given up after the commit does not cut it off; a
        // share whose store failed is stored by `restore_shares` (the refund job).
        let (OpenOutcome::Created(opened) | OpenOutcome::Existing(opened)) = &outcome;
        let cents = opened.share.amount_cents;
        let me = self.clone();
        tokio::spawn(async move {
            me.store_share(user, &decode_share(&token_bytes)?, &token_bytes)
                .await?;
            me.cache(&packet, &[(user.get(), cents)]).await;
            Ok::<(), Error>(())
        })
        .await
        .map_err(|e| Error::internal(format!("storing a share: {e}")))??;
        Ok(outcome)
    }

    /// Stores again the share tokens opened between `from_ms` and `to_ms` that neither
    /// the ledger nor Redis holds (their store failed, or Redis lost them); returns how
    /// many. The ledger is asked first, so a share already booked and trimmed never
    /// comes back as pending.
    pub async fn restore_shares(&self, from_ms: i64, to_ms: i64) -> Result<usize> {
        let mut restored = 0;
        for pool in self.db.shards() {
            let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT user_id, token FROM packet_shares WHERE opened_at_ms >= ? AND opened_at_ms < ? LIMIT 10000",
            )
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(pool)
            .await?;
            for (user, bytes) in rows {
                let user = UserId::parse(user)?;
                let token = decode_share(&bytes)?;
                // Held (the common case): no MySQL read.
                let otn = token.out_trade_no.as_str();
                if self.tokens.held(&[(user, otn)]).await?[0].is_some() {
                    continue;
                }
                if self.store_share(user, &token, &bytes).await? {
                    tracing::warn!(
                        user = user.get(),
                        "a red packet share missing from redis stored again"
                    );
                    restored += 1;
                }
            }
        }
        Ok(restored)
    }

    /// Stores a share's token in Redis unless the ledger already holds it (so a share
    /// booked and trimmed never comes back as pending); true when stored now.
    async fn store_share(
        &self,
        user: UserId,
        token: &pb::RedPacketToken,
        bytes: &[u8],
    ) -> Result<bool> {
        let otn = token.out_trade_no.as_str();
        if self.ledger.booked_of(user, &[otn]).await?.contains(otn) {
            return Ok(false);
        }
        let held = self
            .tokens
            .store(std::iter::once((user, token, bytes)))
            .await?;
        Ok(held.first().is_some_and(Option::is_none))
    }

    /// The shard holding packet `id`. While its sender's bucket moves, the packet is on
    /// two shards for a moment: the one the shard map gives the sender is preferred.
    async fn shard_of(&self, id: &str) -> Result<usize> {
        let found = self
            .on_home_shard(|i| {
                let pool = self.db.shard(i);
                async move {
                    let sender: Option<i64> =
                        sqlx::query_scalar("SELECT sender_id FROM packets WHERE id = ?")
                            .bind(id)
                            .fetch_optional(pool)
                            .await?;
                    Ok(sender.map(|s| (s, ())))
                }
            })
            .await?;
        found
            .map(|(shard, ())| shard)
            .ok_or_else(|| Error::NotFound(format!("no red packet `{id}`")))
    }

    /// What `read` finds of a packet on the shard holding it, with that shard: the first
    /// shard that has it, unless the shard map sends its sender (the `i64` `read`
    /// answers beside what it read) to another shard that has it too, as while the
    /// sender's bucket moves.
    async fn on_home_shard<T, F, Fut>(&self, read: F) -> Result<Option<(usize, T)>, sqlx::Error>
    where
        F: Fn(usize) -> Fut,
        Fut: std::future::Future<Output = Result<Option<(i64, T)>, sqlx::Error>>,
    {
        for i in 0..self.db.shards().len() {
            let Some((sender, found)) = read(i).await? else {
                continue;
            };
            let mapped = UserId::parse(sender)
                .map(|u| self.db.shard_index(u))
                .unwrap_or(i);
            if mapped != i {
                if let Some((_, there)) = read(mapped).await? {
                    return Ok(Some((mapped, there)));
                }
            }
            return Ok(Some((i, found)));
        }
        Ok(None)
    }

    fn mint_share(&self, user: UserId, id: &str, cents: i64, now: i64) -> Result<Minted> {
        let otn = OutTradeNo::compose(
            user,
            &ActivityId::parse(PACKETS_ACTIVITY)?,
            &SceneId::parse(id)?,
            0,
            &AwardType::parse(PACKET_AWARD_TYPE)?,
            Stage::Live,
        );
        let token = pb::RedPacketToken {
            app_id: 0,
            user_id: user.get(),
            activity_id: PACKETS_ACTIVITY.into(),
            scene_id: id.into(),
            amount_cents: cents,
            out_trade_no: otn.as_str().to_string(),
            open_time_ms: now,
            rain_id: 0,
            status: pb::TokenStatus::Pending as i32,
            award_type: PACKET_AWARD_TYPE.into(),
            stage: pb::Stage::Live as i32,
            key_id: String::new(),
            issued_at_ms: now,
            budget_gen: 0,
            coupon: None,
        };
        let signed = crate::token::mint(&self.keys.current(), token)
            .map_err(|e| Error::Unavailable(format!("signing a share: {e}")))?;
        Ok(Minted {
            token: signed.token,
            bytes: signed.bytes,
        })
    }

    async fn open_tx(
        &self,
        shard: usize,
        user: UserId,
        id: &str,
    ) -> Result<Result<(OpenOutcome, Packet, Vec<u8>)>, LedgerError> {
        let mut tx = self.db.shard(shard).begin().await?;
        let Some(mut packet) = lock_packet(&mut tx, id).await? else {
            return Ok(Err(Error::NotFound(format!("no red packet `{id}`"))));
        };
        let sender =
            UserId::parse(packet.sender_id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        // The packet moves with its sender's bucket: nothing opens on a shard handing
        // it over.
        self.ledger.own_buckets(&mut tx, &[sender]).await?;
        let mine = sqlx::query(
            "SELECT seq, amount_cents, opened_at_ms, token FROM packet_shares WHERE packet_id = ? AND user_id = ?",
        )
        .bind(id)
        .bind(user.get())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = mine {
            tx.rollback().await?;
            let share = Share {
                user_id: user.get(),
                seq: i64::from(row.try_get::<i32, _>(0)?),
                amount_cents: row.try_get(1)?,
                opened_at_ms: row.try_get(2)?,
                best_luck: false,
            };
            let bytes: Vec<u8> = row.try_get(3)?;
            let opened = opened_answer(id, share, &bytes)?;
            return Ok(Ok((OpenOutcome::Existing(opened), packet, bytes)));
        }
        let now = now_ms();
        if packet.status == "refunded" || now >= packet.expires_at_ms {
            tx.rollback().await?;
            return Ok(Err(Error::PacketExpired));
        }
        if packet.status != "open" || packet.opened_count >= packet.shares {
            tx.rollback().await?;
            return Ok(Err(Error::PacketFinished));
        }
        let left_cents = packet.total_cents - packet.opened_cents;
        let left_shares = packet.shares - packet.opened_count;
        let cents = split::next_share(left_cents, left_shares, &mut rand::rng()).map_err(|e| {
            LedgerError::Overflow(if e == split::SplitError::NoShareLeft {
                "no share left"
            } else {
                "fewer cents than shares"
            })
        })?;
        let minted = match self.mint_share(user, id, cents, now) {
            Ok(minted) => minted,
            Err(err) => return Ok(Err(err)),
        };
        let seq = packet.opened_count + 1;
        sqlx::query(
            "INSERT INTO packet_shares (packet_id, user_id, seq, amount_cents, opened_at_ms, token) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(user.get())
        .bind(seq as i32)
        .bind(cents)
        .bind(now)
        .bind(&minted.bytes)
        .execute(&mut *tx)
        .await?;
        packet.opened_count = seq;
        packet.opened_cents += cents;
        if seq == packet.shares {
            packet.status = "finished".into();
        }
        sqlx::query(
            "UPDATE packets SET opened_count = ?, opened_cents = ?, status = ? WHERE id = ?",
        )
        .bind(packet.opened_count as i32)
        .bind(packet.opened_cents)
        .bind(&packet.status)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        crate::metrics::packet_opened();
        let share = Share {
            user_id: user.get(),
            seq,
            amount_cents: cents,
            opened_at_ms: now,
            best_luck: false,
        };
        debug_assert_eq!(minted.token.amount_cents, cents);
        let opened = Opened {
            packet_id: id.to_string(),
            share,
            token: crate::token::to_base64(&minted.bytes),
            out_trade_no: minted.token.out_trade_no,
        };
        Ok(Ok((OpenOutcome::Created(opened), packet, minted.bytes)))
    }

    async fn detail_rows(&self, id: &str) -> Result<(Packet, Vec<Share>)> {
        if !packet_id_ok(id) {
            return Err(Error::NotFound(format!("no red packet `{id}`")));
        }
        let mut found = self.find_detail(id).await?;
        if found.is_none() && self.db.shards().len() > 1 {
            // Not on any shard: a move may have copied it after the first shard was read
            // and cleared it before the second; read again once no bucket is moving.
            found = self.ledger.stable(|| self.find_detail(id)).await?;
        }
        let (packet, mut shares) =
            found.ok_or_else(|| Error::NotFound(format!("no red packet `{id}`")))?;
        // Best luck is known once nothing more will be opened.
        if packet.status != "open" {
            let best = shares
                .iter()
                .enumerate()
                .max_by_key(|(i, s)| (s.amount_cents, std::cmp::Reverse(*i)))
                .map(|(i, _)| i);
            if let Some(i) = best {
                shares[i].best_luck = true;
            }
        }
        Ok((packet, shares))
    }

    /// A packet and its shares from the shard holding it ([`Packets::on_home_shard`]).
    async fn find_detail(&self, id: &str) -> Result<Option<(Packet, Vec<Share>)>, sqlx::Error> {
        let found = self
            .on_home_shard(|i| {
                let pool = self.db.shard(i);
                async move {
                    let detail = detail_on(pool, id).await?;
                    Ok(detail.map(|d| (d.0.sender_id, d)))
                }
            })
            .await?;
        Ok(found.map(|(_, detail)| detail))
    }

    /// A packet and who got what.
    pub async fn detail(&self, id: &str) -> Result<PacketDetail> {
        let (packet, opened) = self.detail_rows(id).await?;
        Ok(PacketDetail { packet, opened })
    }

    /// Refunds every packet past its time with an unclaimed remainder, on every shard;
    /// returns how many were refunded now. Safe to run anywhere at once: each refund
    /// checks the packet's status under its row lock, and the ledger's unique
    /// `pr_{id}` refuses a second.
    pub async fn refund_due(&self, now: i64) -> Result<usize> {
        let mut refunded = 0;
        for shard in 0..self.db.shards().len() {
            let due: Vec<(Vec<u8>, i64)> = sqlx::query_as(
                "SELECT id, sender_id FROM packets WHERE status = 'open' AND expires_at_ms <= ? ORDER BY expires_at_ms LIMIT 500",
            )
            .bind(now)
            .fetch_all(self.db.shard(shard))
            .await?;
            for (id, sender) in due {
                let id = String::from_utf8_lossy(&id).into_owned();
                let sender = UserId::parse(sender)?;
                // One packet that cannot be refunded now (a deadlock, a bucket being
                // moved) does not hold up the others; the next run tries it again.
                match self.refund_one(shard, &id, sender, now).await {
                    Ok(true) => refunded += 1,
                    Ok(false) => {}
                    Err(err) => {
                        tracing::warn!(packet = id, error = %err, "refunding a red packet failed; the next run tries again");
                    }
                }
            }
        }
        Ok(refunded)
    }

    async fn refund_one(&self, shard: usize, id: &str, sender: UserId, now: i64) -> Result<bool> {
        let fence = self.tokens.fence(sender).await?;
        let (end, refunded) = match self.refund_tx(shard, id, sender, now).await {
            Ok(Some((packet, account, to_mark))) => {
                (ChangeEnd::Committed(account, to_mark), Ok(Some(packet)))
            }
            Ok(None) => (ChangeEnd::RolledBack, Ok(None)),
            Err(err) => (ChangeEnd::InDoubt, Err(err)),
        };
        self.ledger.end_fence(sender, fence, end).await;
        let Some(packet) = refunded? else {
            return Ok(false);
        };
        self.cache(&packet, &[]).await;
        crate::metrics::packet_refunded();
        Ok(true)
    }

    async fn refund_tx(
        &self,
        shard: usize,
        id: &str,
        sender: UserId,
        now: i64,
    ) -> Result<Option<(Packet, Account, Vec<AwardEntry>)>, LedgerError> {
        let mut tx = self.db.shard(shard).begin().await?;
        let Some(mut packet) = lock_packet(&mut tx, id).await? else {
            return Ok(None);
        };
        if packet.status != "open" || packet.expires_at_ms > now {
            tx.rollback().await?;
            return Ok(None);
        }
        let mut accounts = self.ledger.lock_accounts(&mut tx, &[sender]).await?;
        let to_mark = self.ledger.booked_pending(&mut tx, sender).await?;
        let account = accounts.get_mut(&sender).ok_or(sqlx::Error::RowNotFound)?;
        let remainder = packet.total_cents - packet.opened_cents;
        if remainder > 0 {
            let cents = Cents::positive(remainder, "remainder")
                .map_err(|_| LedgerError::Overflow("a remainder is positive"))?;
            Ledger::move_back(
                &mut tx,
                account,
                cents,
                "packet_refund",
                &format!("pr_{id}"),
                now,
            )
            .await?;
        }
        packet.refunded_cents = remainder;
        packet.status = "refunded".into();
        packet.refunded_at_ms = Some(now);
        sqlx::query(
            "UPDATE packets SET status = 'refunded', refunded_cents = ?, refunded_at_ms = ? WHERE id = ?",
        )
        .bind(remainder)
        .bind(now)
        .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some((packet, *account, to_mark)))
    }

    /// Every packet's money on every shard: sent = opened + refunded + open remainder
    /// holds when `sent == opened + refunded + remainder` (the CHECK constraints hold
    /// each packet to it; this sums them for operators and tests).
    pub async fn totals(&self) -> Result<PacketTotals> {
        // A bucket moving between shards has its packets on both for a moment.
        Ok(self.ledger.stable(|| self.totals_once()).await?)
    }

    async fn totals_once(&self) -> Result<PacketTotals, sqlx::Error> {
        let mut t = PacketTotals::default();
        for pool in self.db.shards() {
            let (n, sent, opened, refunded, remainder, shares): (i64, i64, i64, i64, i64, i64) =
                sqlx::query_as(
                    "SELECT COUNT(*), CAST(COALESCE(SUM(total_cents), 0) AS SIGNED), CAST(COALESCE(SUM(opened_cents), 0) AS SIGNED), CAST(COALESCE(SUM(refunded_cents), 0) AS SIGNED), CAST(COALESCE(SUM(CASE WHEN status = 'open' THEN total_cents - opened_cents ELSE 0 END), 0) AS SIGNED), (SELECT CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM packet_shares) FROM packets",
                )
                .fetch_one(pool)
                .await?;
            t.packets += n;
            t.sent_cents += sent;
            t.opened_cents += opened;
            t.refunded_cents += refunded;
            t.open_remainder_cents += remainder;
            t.shares_cents += shares;
        }
        Ok(t)
    }
}

/// An hour of packets as reconciliation reads it (see `ops::reconcile`), over every
/// shard, each shard's figures in one statement (one consistent read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHour {
    /// Shares opened in the hour: each was minted as one share token.
    pub shares: Totals,
    /// Packets sent in the hour (count, total cents)...
    pub sent: Totals,
    /// ... and what their `packet_send` ledger rows (`ps_{id}`) debited.
    pub sent_debited_cents: i64,
    /// Packets refunded in the hour (count, refunded cents)...
    pub refunded: Totals,
    /// ... and what their `packet_refund` ledger rows (`pr_{id}`) gave back.
    pub refunded_booked_cents: i64,
    /// Refund rows written in the hour that gave back other than the packet's total
    /// less its share rows.
    pub inexact_refunds: i64,
    /// Send and refund rows written in the hour whose packet is missing, or records
    /// another amount (or no refund).
    pub stray_rows: i64,
    /// Packets, of any hour, still open longer than `overdue_ms` after they expired:
    /// refunds the refund job has not made.
    pub overdue: i64,
}

impl PacketHour {
    /// Nothing of the hour (overdue refunds of other hours aside).
    pub fn is_empty(&self) -> bool {
        Self {
            overdue: 0,
            ..*self
        } == Self::default()
    }
}

/// The figures of packets in `[start, end)` ms, read again while buckets move; packets
/// still open `overdue_ms` after expiring, as of `now`, are counted as overdue.
pub async fn hour_figures(
    ledger: &Ledger,
    db: &Db,
    (start, end): (i64, i64),
    overdue_before: i64,
) -> Result<PacketHour, sqlx::Error> {
    ledger
        .stable(|| hour_figures_once(db, start, end, overdue_before))
        .await
}

async fn hour_figures_once(
    db: &Db,
    start: i64,
    end: i64,
    overdue_before: i64,
) -> Result<PacketHour, sqlx::Error> {
    // Debits and refunds are ledger rows without an activity, on the sender's shard
    // with their packet. Every subquery but the last reads the `[start, end)` window.
    const FIGURES: &str = "SELECT \
        (SELECT COUNT(*) FROM packet_shares WHERE opened_at_ms >= ? AND opened_at_ms < ?), \
        (SELECT CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM packet_shares \
           WHERE opened_at_ms >= ? AND opened_at_ms < ?), \
        (SELECT COUNT(*) FROM packets WHERE created_at_ms >= ? AND created_at_ms < ?), \
        (SELECT CAST(COALESCE(SUM(total_cents), 0) AS SIGNED) FROM packets \
           WHERE created_at_ms >= ? AND created_at_ms < ?), \
        (SELECT CAST(COALESCE(-SUM(l.amount_cents), 0) AS SIGNED) FROM packets p \
           JOIN ledger_entries l ON l.out_trade_no = CONCAT('ps_', p.id) AND l.kind = 'packet_send' \
           WHERE p.created_at_ms >= ? AND p.created_at_ms < ?), \
        (SELECT COUNT(*) FROM packets \
           WHERE status = 'refunded' AND refunded_at_ms >= ? AND refunded_at_ms < ?), \
        (SELECT CAST(COALESCE(SUM(refunded_cents), 0) AS SIGNED) FROM packets \
           WHERE status = 'refunded' AND refunded_at_ms >= ? AND refunded_at_ms < ?), \
        (SELECT CAST(COALESCE(SUM(l.amount_cents), 0) AS SIGNED) FROM packets p \
           JOIN ledger_entries l ON l.out_trade_no = CONCAT('pr_', p.id) AND l.kind = 'packet_refund' \
           WHERE p.status = 'refunded' AND p.refunded_at_ms >= ? AND p.refunded_at_ms < ?), \
        (SELECT COUNT(*) FROM ledger_entries l JOIN packets p ON p.id = SUBSTRING(l.out_trade_no, 4) \
           WHERE l.activity_id IS NULL AND l.kind = 'packet_refund' \
           AND l.at_ms >= ? AND l.at_ms < ? \
           AND l.amount_cents <> p.total_cents - (SELECT COALESCE(SUM(s.amount_cents), 0) \
             FROM packet_shares s WHERE s.packet_id = p.id)), \
        (SELECT COUNT(*) FROM ledger_entries l LEFT JOIN packets p ON p.id = SUBSTRING(l.out_trade_no, 4) \
           WHERE l.activity_id IS NULL AND l.kind IN ('packet_send', 'packet_refund') \
           AND l.at_ms >= ? AND l.at_ms < ? \
           AND (p.id IS NULL \
             OR (l.kind = 'packet_send' AND -l.amount_cents <> p.total_cents) \
             OR (l.kind = 'packet_refund' AND (p.status <> 'refunded' OR p.refunded_cents <> l.amount_cents)))), \
        (SELECT COUNT(*) FROM packets WHERE status = 'open' AND expires_at_ms < ?)";
    const WINDOWS: usize = 10;
    debug_assert_eq!(FIGURES.matches('?').count(), 2 * WINDOWS + 1);
    let mut hour = PacketHour::default();
    for pool in db.shards() {
        let mut q = sqlx::query(FIGURES);
        for _ in 0..WINDOWS {
            q = q.bind(start).bind(end);
        }
        let row = q.bind(overdue_before).fetch_one(pool).await?;
        let get = |i: usize| row.try_get::<i64, _>(i);
        hour.shares.count += get(0)?;
        hour.shares.cents += get(1)?;
        hour.sent.count += get(2)?;
        hour.sent.cents += get(3)?;
        hour.sent_debited_cents += get(4)?;
        hour.refunded.count += get(5)?;
        hour.refunded.cents += get(6)?;
        hour.refunded_booked_cents += get(7)?;
        hour.inexact_refunds += get(8)?;
        hour.stray_rows += get(9)?;
        hour.overdue += get(10)?;
    }
    Ok(hour)
}

/// The packets' money, summed (see [`Packets::totals`]).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PacketTotals {
    pub packets: i64,
    pub sent_cents: i64,
    pub opened_cents: i64,
    pub refunded_cents: i64,
    pub open_remainder_cents: i64,
    /// The sum of the share rows (equal to `opened_cents`).
    pub shares_cents: i64,
}

/// A packet and its shares on one shard, in one statement: one consistent read, so a
/// move clearing the shard in between never leaves the shares out.
async fn detail_on(
    pool: &sqlx::MySqlPool,
    id: &str,
) -> Result<Option<(Packet, Vec<Share>)>, sqlx::Error> {
    static QUERY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let packet: Vec<String> = PACKET_COLUMNS
            .split(", ")
            .map(|c| format!("p.{c}"))
            .collect();
        format!(
            "SELECT {}, s.user_id, s.seq, s.amount_cents, s.opened_at_ms \
             FROM packets p LEFT JOIN packet_shares s ON s.packet_id = p.id WHERE p.id = ? ORDER BY s.seq",
            packet.join(", ")
        )
    });
    let rows = sqlx::query(QUERY.as_str()).bind(id).fetch_all(pool).await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let packet = packet_of(first)?;
    let mut shares = Vec::with_capacity(rows.len());
    // The share's columns follow the packet's.
    let at = PACKET_COLUMNS.split(", ").count();
    for r in &rows {
        let Some(user_id) = r.try_get::<Option<i64>, _>(at)? else {
            continue;
        };
        shares.push(Share {
            user_id,
            seq: i64::from(r.try_get::<i32, _>(at + 1)?),
            amount_cents: r.try_get(at + 2)?,
            opened_at_ms: r.try_get(at + 3)?,
            best_luck: false,
        });
    }
    Ok(Some((packet, shares)))
}

fn decode_share(bytes: &[u8]) -> Result<pb::RedPacketToken> {
    crate::token::decode_trusted(bytes)
        .map_err(|e| Error::internal(format!("a stored share token: {e}")))
}

fn opened_answer(id: &str, share: Share, bytes: &[u8]) -> Result<Opened, sqlx::Error> {
    let token =
        crate::token::decode_trusted(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(Opened {
        packet_id: id.to_string(),
        share,
        token: crate::token::to_base64(bytes),
        out_trade_no: token.out_trade_no,
    })
}
