-- An Idempotency-Key names one request of one appliance, whatever its kind (it was unique per operation type).
-- Where earlier versions journaled one key for operations of several types, the first keeps it: it is the one
-- a replay of that key answers with.
UPDATE operations SET idempotency_key = NULL
    WHERE idempotency_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM operations o2
        WHERE o2.appliance_id = operations.appliance_id AND o2.idempotency_key = operations.idempotency_key
          AND (o2.created_at < operations.created_at
               OR (o2.created_at = operations.created_at AND o2.id < operations.id)));
DROP INDEX operations_idempotency;
CREATE UNIQUE INDEX operations_idempotency ON operations (appliance_id, idempotency_key);
