-- Where a budget generation's sub-stocks live in Redis: each in a hash slot of its own
-- (0, every generation before this column), or sub-stock i in the slot of partition
-- `i mod n` of the n partitions there were when the generation opened (n,
-- `issue.sub_stocks_in_partitions`), where a store call of that partition can take from
-- it on a Redis Cluster. Fixed for the generation's life, so its keys never move.
ALTER TABLE budget_generations ADD COLUMN stock_partitions INT NOT NULL DEFAULT 0;
