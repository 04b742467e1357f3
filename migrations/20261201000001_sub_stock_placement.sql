-- Where a budget generation's sub-stocks live in Redis: each in a hash slot of its own
-- (FALSE, every generation before this column), or sub-stock i in the slot of partition
-- `i mod partitions` (TRUE, `issue.sub_stocks_in_partitions`), where a store call of that
-- partition can take from it on a Redis Cluster. Fixed for the generation's life.
ALTER TABLE budget_generations ADD COLUMN in_partitions BOOLEAN NOT NULL DEFAULT FALSE;
