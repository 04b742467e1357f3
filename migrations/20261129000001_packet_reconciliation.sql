-- The hourly reconciliation of red packets reads the shares opened, and the packets
-- sent, in an hour (and the share restore reads shares by the hour too).
ALTER TABLE packet_shares ADD KEY packet_shares_opened (opened_at_ms);
ALTER TABLE packets ADD KEY packets_created (created_at_ms);
