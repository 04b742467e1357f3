-- Group red packets: a user's money split into shares that others open. The packet lives
-- on its sender's shard, with the sender's debit and refund, so each moves in one
-- transaction with the money.
CREATE TABLE packets (
    id             VARCHAR(32)   CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    sender_id      BIGINT        NOT NULL,
    -- Client-chosen and case-sensitive: the same id again is the same packet.
    request_id     VARBINARY(64) NOT NULL,
    total_cents    BIGINT        NOT NULL,
    shares         INT           NOT NULL,
    greeting       VARCHAR(200)  NOT NULL,
    opened_count   INT           NOT NULL DEFAULT 0,
    opened_cents   BIGINT        NOT NULL DEFAULT 0,
    refunded_cents BIGINT        NOT NULL DEFAULT 0,
    -- open, finished (every share opened) or refunded (the remainder went back).
    status         VARCHAR(16)   NOT NULL,
    created_at_ms  BIGINT        NOT NULL,
    expires_at_ms  BIGINT        NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY packets_sender_request (sender_id, request_id),
    KEY packets_due (status, expires_at_ms),
    CONSTRAINT packets_shares_positive CHECK (shares >= 1 AND total_cents >= shares),
    CONSTRAINT packets_within_total CHECK (opened_count <= shares
        AND opened_cents + refunded_cents <= total_cents AND opened_cents >= 0
        AND refunded_cents >= 0)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

-- One opened share: at most one per user and packet, numbered in opening order. The
-- signed token minted for it is kept here too, so it can be stored again in Redis.
CREATE TABLE packet_shares (
    packet_id     VARCHAR(32)    CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    user_id       BIGINT         NOT NULL,
    seq           INT            NOT NULL,
    amount_cents  BIGINT         NOT NULL,
    opened_at_ms  BIGINT         NOT NULL,
    token         VARBINARY(2048) NOT NULL,
    PRIMARY KEY (packet_id, user_id),
    UNIQUE KEY packet_shares_seq (packet_id, seq),
    CONSTRAINT packet_shares_positive CHECK (amount_cents >= 1)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;
