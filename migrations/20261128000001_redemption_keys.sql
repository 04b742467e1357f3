-- A merchant's redemption request id, claimed on the main database before the coupon's
-- shard is touched: one request id names one redemption (user, coupon, order) whatever
-- shard the coupon lives on. A refused redemption frees its claim; a claim whose
-- redemption a crash cut off stays bound to the same body, which may retry it.
-- (Created on every database; only the main database's table is used. No coupon was
-- redeemed by a release without this table: the coupons came in the same release.)
CREATE TABLE coupon_redemption_keys (
    caller        VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    request_id    VARBINARY(64) NOT NULL,
    user_id       BIGINT        NOT NULL,
    out_trade_no  VARCHAR(160)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    order_cents   BIGINT        NOT NULL,
    at_ms         BIGINT        NOT NULL,
    PRIMARY KEY (caller, request_id)
) ENGINE = InnoDB;

