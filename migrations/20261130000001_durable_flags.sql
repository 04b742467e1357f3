-- Flagged users (seckill guards), kept durably. Redis holds the copy the award path reads;
-- after Redis loses it, it is restored from here (see `issue::guards`).
CREATE TABLE flagged_users (
    user_id        BIGINT      NOT NULL,
    -- early or burst: the latest flag's reason
    reason         VARCHAR(16) NOT NULL,
    flagged_at_ms  BIGINT      NOT NULL,
    PRIMARY KEY (user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;
