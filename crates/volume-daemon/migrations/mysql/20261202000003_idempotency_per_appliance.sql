-- An Idempotency-Key names one request of one appliance, whatever its kind (it was unique per operation type).
-- Where earlier versions journaled one key for operations of several types, the first keeps it: it is the one
-- a replay of that key answers with.
UPDATE operations o
    JOIN (SELECT appliance_id, idempotency_key, MIN(CONCAT(created_at, id)) AS first_key
          FROM operations WHERE idempotency_key IS NOT NULL
          GROUP BY appliance_id, idempotency_key HAVING COUNT(*) > 1) d
      ON d.appliance_id = o.appliance_id AND d.idempotency_key = o.idempotency_key
    SET o.idempotency_key = NULL
    WHERE CONCAT(o.created_at, o.id) <> d.first_key;
DROP INDEX operations_idempotency ON operations;
CREATE UNIQUE INDEX operations_idempotency ON operations (appliance_id, idempotency_key);
