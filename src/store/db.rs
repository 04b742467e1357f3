//! The MySQL databases and the stable shard map of users' ledgers.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::MySqlPool;

use crate::config::MysqlSettings;
use crate::domain::UserId;

/// Users are spread over this many buckets; buckets, not users, move between shards.
pub const BUCKETS: u16 = 1024;

/// The bucket of a user.
pub fn bucket_of(user: UserId) -> u16 {
    (user.get() % i64::from(BUCKETS)) as u16
}

/// Whether a server's `VERSION()` names MariaDB 10.5 or later, the first with
/// `INSERT … RETURNING`.
fn mariadb_with_returning(version: &str) -> bool {
    if !version.contains("MariaDB") {
        return false;
    }
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (10, 5)
}

/// The map a deployment starts with: bucket `b` on shard `b mod n`.
fn default_map(n: usize) -> Vec<u16> {
    (0..BUCKETS)
        .map(|b| (usize::from(b) % n.max(1)) as u16)
        .collect()
}

/// The MySQL databases: shard 0 (`mysql.url`) holds activities, scenes, reports, keys
/// and the shard map, and the ledger of the users it owns; further shards
/// (`mysql.shard_urls`) hold only ledger, accounts and withdrawals.
///
/// A user belongs to one of [`BUCKETS`] buckets (`user_id mod 1024`); the shard map in
/// the main database sends each bucket to a shard. Every shard records which shard it
/// is (`shard_identity`) and which buckets it owns (`bucket_owner`): a transaction on a
/// user's ledger takes a shared lock on the user's bucket row and refuses a bucket the
/// shard does not own, so a bucket being moved (`ops::reshard`) is paused there, and an
/// instance with a stale map is told so instead of writing to the wrong shard.
pub struct Db {
    shards: Vec<MySqlPool>,
    /// Bucket → shard, as last read from the main database.
    map: RwLock<Arc<Vec<u16>>>,
    /// Whether [`Db::load_map`] has run (it also gives each shard its buckets).
    loaded: AtomicBool,
    /// Per shard, whether its server takes `INSERT … RETURNING` (MariaDB 10.5+; MySQL 8
    /// does not): [`RETURNING_UNKNOWN`] until the first statement there that could use
    /// it asks. Shards may run different servers (a migration from one to the other
    /// moves buckets between them).
    returning: Vec<AtomicU8>,
}

const RETURNING_UNKNOWN: u8 = 0;
const RETURNING_YES: u8 = 1;
const RETURNING_NO: u8 = 2;

impl Db {
    pub fn connect_lazy(settings: &MysqlSettings) -> anyhow::Result<Self> {
        let mut shards = Vec::with_capacity(1 + settings.shard_urls.len());
        for (i, url) in std::iter::once(&settings.url)
            .chain(settings.shard_urls.iter())
            .enumerate()
        {
            let options: MySqlConnectOptions = url
                .expose()
                .parse()
                .with_context(|| format!("mysql shard {i}: bad URL"))?;
            let options = options
                .charset("utf8mb4")
                .timezone(Some(String::from("+00:00")))
                .statement_cache_capacity(512);
            let pool = MySqlPoolOptions::new()
                .after_connect(|conn, _meta| {
                    Box::pin(async move {
                        // The wallet view lists booked tokens with GROUP_CONCAT; MySQL 8's
                        // default limit (1 KiB) would cut a long list short.
                        sqlx::query("SET SESSION group_concat_max_len = 1048576")
                            .execute(conn)
                            .await?;
                        Ok(())
                    })
                })
                .max_connections(settings.max_connections)
                .min_connections(settings.min_connections)
                .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
                .test_before_acquire(false)
                .connect_lazy_with(options);
            shards.push(pool);
        }
        let n = shards.len();
        Ok(Self {
            shards,
            map: RwLock::new(Arc::new(default_map(n))),
            loaded: AtomicBool::new(false),
            returning: (0..n).map(|_| AtomicU8::new(RETURNING_UNKNOWN)).collect(),
        })
    }

    /// Whether the ledger's statements on `shard` may read rows back with `INSERT …
    /// RETURNING` (MariaDB 10.5 and later) or must follow an insert with a `SELECT …
    /// FOR UPDATE` (MySQL 8). Asked once per shard of its server, on `conn`, which the
    /// caller must have opened on that shard (the ledger names it by the shard's own
    /// `shard_identity`, never by its map): `SELECT VERSION()`.
    pub async fn returning(
        &self,
        shard: usize,
        conn: &mut sqlx::MySqlConnection,
    ) -> Result<bool, sqlx::Error> {
        debug_assert!(shard < self.shards.len(), "no shard {shard}");
        if let Some(known) = self.known_returning(shard) {
            return Ok(known);
        }
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(conn)
            .await?;
        let yes = mariadb_with_returning(&version);
        self.set_returning_on(shard, yes);
        Ok(yes)
    }

    /// The statement form known for `shard`, without asking its server: `None` until
    /// [`Db::returning`] asked it (or it was set).
    pub fn known_returning(&self, shard: usize) -> Option<bool> {
        match self.returning.get(shard)?.load(Ordering::Relaxed) {
            RETURNING_YES => Some(true),
            RETURNING_NO => Some(false),
            _ => None,
        }
    }

    /// Sets the statement form [`Db::returning`] answers on every shard: what a test of
    /// the MySQL 8 form on MariaDB uses.
    pub fn set_returning(&self, yes: bool) {
        for shard in 0..self.shards.len() {
            self.set_returning_on(shard, yes);
        }
    }

    /// Sets the statement form [`Db::returning`] answers on `shard`.
    pub fn set_returning_on(&self, shard: usize, yes: bool) {
        let state = if yes { RETURNING_YES } else { RETURNING_NO };
        if let Some(r) = self.returning.get(shard) {
            r.store(state, Ordering::Relaxed);
        }
    }

    pub fn main(&self) -> &MySqlPool {
        &self.shards[0]
    }

    pub fn for_user(&self, user: UserId) -> &MySqlPool {
        &self.shards[self.shard_index(user)]
    }

    /// The shard of `user`'s bucket, by the map as last read.
    pub fn shard_index(&self, user: UserId) -> usize {
        let map = self.map.read().expect("shard map lock poisoned");
        usize::from(map[usize::from(bucket_of(user))]).min(self.shards.len() - 1)
    }

    pub fn shard(&self, index: usize) -> &MySqlPool {
        &self.shards[index]
    }

    pub fn shards(&self) -> &[MySqlPool] {
        &self.shards
    }

    /// Loads the shard map from the main database, creating it the first time (bucket
    /// `b` on shard `b mod n`), and checks it against the configured shards: a map that
    /// sends a bucket to a shard not configured, or a shard list in another order than
    /// the one the shards were created in, refuses start-up with the reason.
    pub async fn load_map(&self) -> anyhow::Result<()> {
        let n = self.shards.len();
        let main = self.main();
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM shard_map")
            .fetch_one(main)
            .await?;
        if count == 0 {
            if BUCKETS as usize % n != 0 && n > 1 {
                // Before the map, users were on shard `user_id mod n`; a map of
                // `bucket mod n` agrees with that only when n divides the bucket count.
                for (i, pool) in self.shards.iter().enumerate() {
                    let used: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
                        .fetch_one(pool)
                        .await?;
                    anyhow::ensure!(
                        used == 0,
                        "mysql shard {i} holds accounts placed by user_id mod {n}; a shard map for {n} shards (not a divisor of {BUCKETS}) would re-home them: move them first"
                    );
                }
            }
            let mut insert = sqlx::QueryBuilder::<sqlx::MySql>::new(
                "INSERT IGNORE INTO shard_map (bucket, shard) ",
            );
            insert.push_values(0..BUCKETS, |mut b, bucket| {
                b.push_bind(bucket)
                    .push_bind((usize::from(bucket) % n) as u16);
            });
            insert.build().execute(main).await?;
        }
        let map = self.read_map().await?;
        if let Some((bucket, shard)) = map.iter().enumerate().find(|(_, s)| usize::from(**s) >= n) {
            anyhow::bail!(
                "the shard map in the main database sends bucket {bucket} to shard {shard}, but only {n} shard(s) are configured (mysql.url and mysql.shard_urls): configure that shard, or move its buckets with `redpacket-wallet reshard`"
            );
        }
        for (i, pool) in self.shards.iter().enumerate() {
            sqlx::query("INSERT IGNORE INTO shard_identity (id, shard) VALUES (1, ?)")
                .bind(i as u16)
                .execute(pool)
                .await?;
            let known: u16 = sqlx::query_scalar("SELECT shard FROM shard_identity WHERE id = 1")
                .fetch_one(pool)
                .await?;
            anyhow::ensure!(
                usize::from(known) == i,
                "the database configured as mysql shard {i} is shard {known} of this deployment: the order of mysql.url and mysql.shard_urls changed"
            );
            // A shard owns the buckets the map gives it (a bucket in the middle of a
            // move is owned by nobody until the move ends).
            let mut own = sqlx::QueryBuilder::<sqlx::MySql>::new(
                "INSERT IGNORE INTO bucket_owner (bucket, owned) ",
            );
            let mine: Vec<u16> = (0..BUCKETS)
                .filter(|b| usize::from(map[usize::from(*b)]) == i)
                .collect();
            if mine.is_empty() {
                continue;
            }
            own.push_values(mine, |mut b, bucket| {
                b.push_bind(bucket).push_bind(1);
            });
            own.build().execute(pool).await?;
        }
        *self.map.write().expect("shard map lock poisoned") = Arc::new(map);
        self.loaded.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the shard map was loaded (and checked) since start.
    pub fn map_loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    /// Where the moves stand: buckets being moved, and the last move's time. A scan over
    /// every shard is consistent when this is the same before and after it, with no
    /// bucket moving (a bucket's rows are on two shards, or momentarily on none, while
    /// it moves).
    pub async fn moves(&self) -> Result<(i64, Option<chrono::NaiveDateTime>), sqlx::Error> {
        sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(moving), 0) AS SIGNED), MAX(moved_at) FROM shard_map",
        )
        .fetch_one(self.main())
        .await
    }

    /// Reads the shard map again (after a move, or when a shard refused a bucket). A map
    /// that sends a bucket to a shard this instance does not have is refused (the last
    /// map stays) with the reason.
    pub async fn refresh_map(&self) -> anyhow::Result<()> {
        let map = self.read_map().await?;
        let n = self.shards.len();
        if let Some((bucket, shard)) = map.iter().enumerate().find(|(_, s)| usize::from(**s) >= n) {
            anyhow::bail!(
                "the shard map now sends bucket {bucket} to shard {shard}, but only {n} shard(s) are configured here"
            );
        }
        *self.map.write().expect("shard map lock poisoned") = Arc::new(map);
        Ok(())
    }

    async fn read_map(&self) -> anyhow::Result<Vec<u16>> {
        let rows: Vec<(u16, u16)> = sqlx::query_as("SELECT bucket, shard FROM shard_map")
            .fetch_all(self.main())
            .await?;
        anyhow::ensure!(
            rows.len() == usize::from(BUCKETS),
            "the shard map holds {} buckets, not {BUCKETS}",
            rows.len()
        );
        let mut map = vec![0u16; usize::from(BUCKETS)];
        for (bucket, shard) in rows {
            map[usize::from(bucket)] = shard;
        }
        Ok(map)
    }

    /// The map as last read: bucket → shard.
    pub fn map(&self) -> Arc<Vec<u16>> {
        self.map.read().expect("shard map lock poisoned").clone()
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        for (i, pool) in self.shards.iter().enumerate() {
            MIGRATOR
                .run(pool)
                .await
                .with_context(|| format!("migrating mysql shard {i}"))?;
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        for pool in &self.shards {
            sqlx::query("SELECT 1").execute(pool).await?;
        }
        Ok(())
    }
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[cfg(test)]
mod tests {
    use super::mariadb_with_returning;

    #[test]
    fn returning_is_read_from_the_server_version() {
        assert!(mariadb_with_returning("10.11.6-MariaDB-0+deb12u1"));
        assert!(mariadb_with_returning("10.5.0-MariaDB"));
        assert!(mariadb_with_returning("11.4.2-MariaDB-log"));
        assert!(!mariadb_with_returning("10.4.32-MariaDB"));
        assert!(!mariadb_with_returning("8.0.36"));
        assert!(!mariadb_with_returning("8.4.0-commercial"));
    }
}
