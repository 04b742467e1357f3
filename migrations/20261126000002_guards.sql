-- Seckill guards per scene (JSON of `SceneGuards`; empty: none), and the operators'
-- blacklist of users and callers.
ALTER TABLE scenes ADD COLUMN guards VARCHAR(512) NOT NULL DEFAULT '';

CREATE TABLE blacklist (
    -- user or caller
    kind       VARCHAR(8)   CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    value      VARCHAR(64)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    reason     VARCHAR(200) NOT NULL DEFAULT '',
    created_at DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (kind, value)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;
