-- Events (API.md, "Events"): an outbox written in the same transaction as the change it
-- reports, on the database holding that change (a withdrawal's shard, or the main
-- database), and the deliveries of each event to each subscription, on the same
-- database as the event.

CREATE TABLE webhook_subscriptions (
    id          BIGINT        NOT NULL AUTO_INCREMENT,
    url         VARCHAR(2048) NOT NULL,
    -- Comma-separated event types.
    events      VARCHAR(512)  NOT NULL,
    secret      VARBINARY(256) NOT NULL,
    created_at  DATETIME(3)   NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    deleted_at  DATETIME(3)   NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

CREATE TABLE events (
    seq         BIGINT       NOT NULL AUTO_INCREMENT,
    id          CHAR(32)     NOT NULL,
    type        VARCHAR(64)  NOT NULL,
    -- Events of one key (a withdrawal) reach each subscriber in order.
    order_key   VARCHAR(128) NOT NULL,
    -- Set for events that must be written at most once (budget.low per budget level,
    -- activity.drained).
    dedupe_key  VARCHAR(191) NULL,
    data        TEXT         NOT NULL,
    created_at  DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    fanned_out  TINYINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (seq),
    UNIQUE KEY events_id (id),
    UNIQUE KEY events_dedupe (dedupe_key),
    KEY events_fan_out (fanned_out, seq)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

CREATE TABLE webhook_deliveries (
    id               BIGINT       NOT NULL AUTO_INCREMENT,
    subscription_id  BIGINT       NOT NULL,
    event_seq        BIGINT       NOT NULL,
    order_key        VARCHAR(128) NOT NULL,
    -- pending, delivered, gave_up (retried past webhooks.give_up_after_secs), dropped
    -- (the subscription was deleted).
    state            VARCHAR(16)  NOT NULL DEFAULT 'pending',
    attempts         INT          NOT NULL DEFAULT 0,
    next_attempt_at  DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    -- An instance sending it holds it until then; another may take it after.
    leased_until     DATETIME(3)  NULL,
    last_status      INT          NULL,
    last_error       VARCHAR(512) NULL,
    last_attempt_at  DATETIME(3)  NULL,
    delivered_at     DATETIME(3)  NULL,
    created_at       DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY deliveries_once (subscription_id, event_seq),
    KEY deliveries_due (state, next_attempt_at),
    KEY deliveries_order (subscription_id, order_key, state, event_seq)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;
