-- redpacket-wallet schema. MariaDB 10.11 and MySQL 8 both accept every statement here.
-- Money is BIGINT cents; times are DATETIME(3) in UTC, or *_ms BIGINT where they order rows.

CREATE TABLE activities (
    id               VARCHAR(32)  NOT NULL,
    name             VARCHAR(128) NOT NULL,
    stage            VARCHAR(8)   NOT NULL,
    starts_at        DATETIME(3)  NOT NULL,
    ends_at          DATETIME(3)  NOT NULL,
    budget_cents     BIGINT       NOT NULL,
    max_award_cents  BIGINT       NOT NULL,
    drained_at       DATETIME(3)  NULL,
    created_at       DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at       DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    CONSTRAINT activities_budget_positive CHECK (budget_cents > 0),
    CONSTRAINT activities_cap_positive CHECK (max_award_cents > 0),
    CONSTRAINT activities_window CHECK (ends_at > starts_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

CREATE TABLE scenes (
    activity_id        VARCHAR(32)  NOT NULL,
    id                 VARCHAR(32)  NOT NULL,
    name               VARCHAR(128) NOT NULL,
    award_type         VARCHAR(32)  NOT NULL,
    rate_limit_per_s   INT          NULL,
    admission_fraction DOUBLE       NULL,
    created_at         DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (activity_id, id),
    CONSTRAINT scenes_activity FOREIGN KEY (activity_id) REFERENCES activities (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

CREATE TABLE accounts (
    user_id             BIGINT      NOT NULL,
    balance_cents       BIGINT      NOT NULL DEFAULT 0,
    total_income_cents  BIGINT      NOT NULL DEFAULT 0,
    withdrawn_cents     BIGINT      NOT NULL DEFAULT 0,
    -- Bumped by every change; orders the snapshots written to Redis for degraded views.
    version             BIGINT      NOT NULL DEFAULT 0,
    created_at          DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at          DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (user_id),
    CONSTRAINT accounts_balance_not_negative CHECK (balance_cents >= 0)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

-- One row per money movement. `out_trade_no` is unique: it is what makes booking idempotent.
-- kind: award (+), withdraw (-), reversal (+, a failed payout given back).
CREATE TABLE ledger_entries (
    id            BIGINT       NOT NULL AUTO_INCREMENT,
    user_id       BIGINT       NOT NULL,
    out_trade_no  VARCHAR(160) NOT NULL,
    kind          VARCHAR(16)  NOT NULL,
    amount_cents  BIGINT       NOT NULL,
    activity_id   VARCHAR(32)  NULL,
    scene_id      VARCHAR(32)  NULL,
    -- Awards: the token's issue time; withdrawals and reversals: when they happened.
    -- Flows are ordered by it, so booking a pending award never moves it in the list.
    at_ms         BIGINT       NOT NULL,
    booked_at     DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY ledger_out_trade_no (out_trade_no),
    KEY ledger_user_at (user_id, at_ms, out_trade_no),
    KEY ledger_activity_at (activity_id, at_ms)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

CREATE TABLE withdrawals (
    id                    VARCHAR(32) NOT NULL,
    user_id               BIGINT      NOT NULL,
    -- Client-chosen and case-sensitive: bytes, not text under a case-insensitive collation.
    request_id            VARBINARY(64) NOT NULL,
    amount_cents          BIGINT      NOT NULL,
    status                VARCHAR(16) NOT NULL,
    forced_settled_count  INT         NOT NULL,
    balance_after_cents   BIGINT      NOT NULL,
    created_at            DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at            DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY withdrawals_user_request (user_id, request_id),
    CONSTRAINT withdrawals_amount_positive CHECK (amount_cents > 0)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

CREATE TABLE reconciliation_reports (
    id                 BIGINT      NOT NULL AUTO_INCREMENT,
    activity_id        VARCHAR(32) NOT NULL,
    hour_start         DATETIME    NOT NULL,
    kind               VARCHAR(16) NOT NULL,
    issued_count       BIGINT      NOT NULL,
    issued_cents       BIGINT      NOT NULL,
    booked_count       BIGINT      NOT NULL,
    booked_cents       BIGINT      NOT NULL,
    settled_count      BIGINT      NOT NULL,
    settled_cents      BIGINT      NOT NULL,
    pending_count      BIGINT      NOT NULL,
    pending_cents      BIGINT      NOT NULL,
    budget_taken_cents BIGINT      NOT NULL,
    leak_cents         BIGINT      NOT NULL,
    ok                 BOOLEAN     NOT NULL,
    problems           TEXT        NOT NULL,
    created_at         DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    KEY reports_activity (activity_id, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

CREATE TABLE signing_keys (
    key_id      VARCHAR(64)   NOT NULL,
    alg         VARCHAR(16)   NOT NULL,
    public_key  VARBINARY(64) NOT NULL,
    created_at  DATETIME(3)   NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    retired_at  DATETIME(3)   NULL,
    PRIMARY KEY (key_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;
