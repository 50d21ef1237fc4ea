-- Byte counters of an export that outlive the daemon's restarts: `*_before` holds what earlier runs
-- counted; `*_run` what the current run has counted so far (saved every few seconds and at stop), folded
-- into `*_before` at the next start.
ALTER TABLE exports ADD COLUMN bytes_read_before BIGINT NOT NULL DEFAULT 0;
ALTER TABLE exports ADD COLUMN bytes_written_before BIGINT NOT NULL DEFAULT 0;
ALTER TABLE exports ADD COLUMN bytes_read_run BIGINT NOT NULL DEFAULT 0;
ALTER TABLE exports ADD COLUMN bytes_written_run BIGINT NOT NULL DEFAULT 0;
