-- A stable shard map: users → 1,024 buckets (user_id mod 1024) → shards. The map lives
-- in the main database; every database (main included) records which shard it is and
-- which buckets it owns, so a bucket being moved is paused where it was and an instance
-- with a stale map cannot write to the wrong shard.
CREATE TABLE shard_map (
    bucket    SMALLINT UNSIGNED NOT NULL,
    shard     SMALLINT UNSIGNED NOT NULL,
    -- Set while `redpacket-wallet reshard` moves the bucket.
    moving    TINYINT(1)  NOT NULL DEFAULT 0,
    moved_at  DATETIME(3) NULL,
    PRIMARY KEY (bucket)
) ENGINE = InnoDB;

CREATE TABLE shard_identity (
    id     TINYINT UNSIGNED NOT NULL,
    shard  SMALLINT UNSIGNED NOT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB;

-- owned = 1: this shard holds the bucket's ledger and takes its transactions; 2: it holds
-- it while a move copies it away (views read it, nothing writes it); 0: it does not hold it.
CREATE TABLE bucket_owner (
    bucket  SMALLINT UNSIGNED NOT NULL,
    owned   TINYINT NOT NULL,
    PRIMARY KEY (bucket)
) ENGINE = InnoDB;
