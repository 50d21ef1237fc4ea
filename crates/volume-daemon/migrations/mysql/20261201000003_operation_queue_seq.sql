-- The order an operation was queued in its volume's turn, assigned under the same lock that queues it
-- (`created_at` need not be that order). Recovery re-queues unfinished operations by it. NULL for operations
-- journaled before it existed; they are older than every numbered one.
ALTER TABLE operations ADD COLUMN queue_seq BIGINT;
