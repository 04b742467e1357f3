-- Coupon awards. A coupon template's stock is budgeted like cash: the template owns a
-- row in `activities` (kind 'coupon', budget_cents = the stock in units, cap 1), so its
-- stock is granted to Redis sub-stocks from MySQL and survives what Redis loses, by the
-- very code that guards cash budgets. Each coupon booked is a ledger row of kind
-- 'coupon' (amount_cents = 1 unit of its template's stock, never cash) and a row in
-- `coupons` with its state, both on the user's shard.
ALTER TABLE activities ADD COLUMN kind VARCHAR(8) NOT NULL DEFAULT 'cash';

CREATE TABLE coupon_templates (
    id               VARCHAR(32)  NOT NULL,
    name             VARCHAR(128) NOT NULL,
    face_value_cents BIGINT       NOT NULL,
    min_spend_cents  BIGINT       NOT NULL,
    -- Either a fixed window (valid_from_ms, valid_until_ms) or valid_days from issue.
    valid_from_ms    BIGINT       NULL,
    valid_until_ms   BIGINT       NULL,
    valid_days       INT          NULL,
    stock            BIGINT       NOT NULL,
    created_at       DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    CONSTRAINT coupon_templates_face CHECK (face_value_cents > 0),
    CONSTRAINT coupon_templates_min_spend CHECK (min_spend_cents >= 0),
    CONSTRAINT coupon_templates_stock CHECK (stock > 0),
    CONSTRAINT coupon_templates_validity CHECK (
        (valid_days IS NULL AND valid_from_ms IS NOT NULL AND valid_until_ms > valid_from_ms)
        OR (valid_days > 0 AND valid_from_ms IS NULL AND valid_until_ms IS NULL))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

-- A coupon scene's template and fallback (JSON of `SceneCoupon`; empty: not a coupon
-- scene).
ALTER TABLE scenes ADD COLUMN coupon VARCHAR(512) NOT NULL DEFAULT '';

CREATE TABLE coupons (
    out_trade_no      VARCHAR(160) NOT NULL,
    user_id           BIGINT       NOT NULL,
    template_id       VARCHAR(32)  NOT NULL,
    face_value_cents  BIGINT       NOT NULL,
    min_spend_cents   BIGINT       NOT NULL,
    valid_from_ms     BIGINT       NOT NULL,
    valid_until_ms    BIGINT       NOT NULL,
    issued_at_ms      BIGINT       NOT NULL,
    -- active, used or expired
    state             VARCHAR(8)   NOT NULL,
    -- The merchant caller and its request id that used it (idempotency of redemption).
    used_by           VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NULL,
    used_request_id   VARBINARY(64) NULL,
    used_order_cents  BIGINT       NULL,
    used_at_ms        BIGINT       NULL,
    expired_at_ms     BIGINT       NULL,
    PRIMARY KEY (out_trade_no),
    UNIQUE KEY coupons_redemption (used_by, used_request_id),
    KEY coupons_user (user_id, issued_at_ms),
    KEY coupons_expiry (state, valid_until_ms),
    KEY coupons_template (template_id, state),
    CONSTRAINT coupons_state CHECK (state IN ('active', 'used', 'expired')),
    CONSTRAINT coupons_used CHECK ((state = 'used') = (used_at_ms IS NOT NULL))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;
