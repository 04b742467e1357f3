-- Money safety: durable budget grants, the signed token kept in the ledger row, and
-- binary collation on every key the service compares in Rust.

-- Keys compared byte for byte in Rust (flow paging orders by out_trade_no) must sort
-- the same way in MySQL: ascii_bin, not a case-insensitive general collation. (A binary
-- collation makes the driver see bytes: the code reads these columns as bytes.)
ALTER TABLE ledger_entries
    MODIFY out_trade_no VARCHAR(160) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    MODIFY activity_id  VARCHAR(32)  CHARACTER SET ascii COLLATE ascii_bin NULL,
    MODIFY scene_id     VARCHAR(32)  CHARACTER SET ascii COLLATE ascii_bin NULL,
    -- The budget generation the award's money came from (0: not an award, or older rows).
    ADD COLUMN budget_gen BIGINT NOT NULL DEFAULT 0,
    -- The signed token as minted, so a late retry of the award is answered from here
    -- byte for byte after Redis has trimmed it.
    ADD COLUMN token VARBINARY(2048) NULL,
    ADD KEY ledger_activity_gen (activity_id, budget_gen);

ALTER TABLE activities
    -- Budget moved to Redis and not given back: what Redis may spend or has spent.
    -- budget_cents - granted_cents is the ungranted budget, which only MySQL holds.
    ADD COLUMN granted_cents BIGINT NOT NULL DEFAULT 0,
    -- Granted budget whose Redis copy was lost (flush, restart, failover): frozen, never
    -- re-applied, until reconciliation proves how much of it was never spent.
    ADD COLUMN in_doubt_cents BIGINT NOT NULL DEFAULT 0,
    ADD CONSTRAINT activities_granted_within_budget CHECK (granted_cents >= 0 AND granted_cents <= budget_cents),
    ADD CONSTRAINT activities_in_doubt_within_granted CHECK (in_doubt_cents >= 0 AND in_doubt_cents <= granted_cents);

-- One generation of an activity's Redis sub-stocks. Exactly one is `live` per activity;
-- awards take only from the live one. A generation ends either drained (`closing`, then
-- `closed` once its unspent budget is back, then `settled` once its leak is known) or
-- lost with Redis (`in_doubt`, then `resolved` once reconciliation released what was
-- provably never spent).
CREATE TABLE budget_generations (
    activity_id     VARCHAR(32) NOT NULL,
    gen             BIGINT      NOT NULL,
    sub_stocks      INT         NOT NULL,
    state           VARCHAR(16) NOT NULL,
    -- Sum of the grants made to this generation.
    granted_cents   BIGINT      NOT NULL DEFAULT 0,
    -- Unspent budget given back when the generation was drained.
    returned_cents  BIGINT      NOT NULL DEFAULT 0,
    -- Taken but never a token (a crash between take and store), given back by repair.
    leak_cents      BIGINT      NOT NULL DEFAULT 0,
    -- In doubt: what reconciliation released as provably never spent.
    released_cents  BIGINT      NOT NULL DEFAULT 0,
    -- Set once every sub-stock of the generation is initialised in Redis; grants only
    -- go to a ready generation, so a sub-stock missing from a ready one was lost.
    ready           BOOLEAN     NOT NULL DEFAULT FALSE,
    opened_at       DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    closed_at       DATETIME(3) NULL,
    PRIMARY KEY (activity_id, gen)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

-- One chunk of budget moved from MySQL to one Redis sub-stock. Its id makes applying it
-- idempotent (the sub-stock records the ids it applied).
CREATE TABLE budget_grants (
    id           BIGINT      NOT NULL AUTO_INCREMENT,
    activity_id  VARCHAR(32) NOT NULL,
    gen          BIGINT      NOT NULL,
    sub_stock    INT         NOT NULL,
    cents        BIGINT      NOT NULL,
    created_at   DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    KEY grants_gen (activity_id, gen, sub_stock),
    CONSTRAINT budget_grants_positive CHECK (cents > 0)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

-- Activities created before grants existed kept their whole budget in Redis alone, with
-- no durable record of what was spent: it all counts as granted and in doubt, in a
-- generation 0 that reconciliation resolves from the ledger like any other lost one.
-- Each gets a live generation 1, which issues budget added from now on; generation 0 is
-- released once the activity has drained (every token it issued booked).
INSERT INTO budget_generations (activity_id, gen, sub_stocks, state, granted_cents, closed_at)
    SELECT id, 0, 0, 'in_doubt', budget_cents, CURRENT_TIMESTAMP(3) FROM activities;
INSERT INTO budget_generations (activity_id, gen, sub_stocks, state)
    SELECT id, 1, 16, 'live' FROM activities;
UPDATE activities SET granted_cents = budget_cents, in_doubt_cents = budget_cents;
