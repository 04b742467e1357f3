-- Where a move is taking a bucket, so a move cut short can only be finished, never
-- turned elsewhere (which could leave a second shard owning the bucket).
ALTER TABLE shard_map ADD COLUMN moving_to SMALLINT UNSIGNED NULL;
