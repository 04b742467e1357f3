-- When a packet's remainder went back to its sender, so reconciliation checks a refund in
-- the hour it was made, however late after the packet expired. Refunds made before this
-- column: the time of their refund row, or the expiry when the remainder was nothing.
ALTER TABLE packets ADD COLUMN refunded_at_ms BIGINT NULL;
UPDATE packets p SET refunded_at_ms = COALESCE(
    (SELECT l.at_ms FROM ledger_entries l WHERE l.out_trade_no = CONCAT('pr_', p.id)),
    p.expires_at_ms)
WHERE p.status = 'refunded';
ALTER TABLE packets ADD CONSTRAINT packets_refund_time
    CHECK ((status = 'refunded') = (refunded_at_ms IS NOT NULL));
CREATE INDEX packets_refunded_at ON packets (refunded_at_ms);
