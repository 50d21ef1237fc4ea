-- Operation types may be longer than 16 characters (`test_failover_cleanup`); op_type is TEXT in this dialect,
-- so nothing changes: this version exists so every dialect has the same migrations.
SELECT 1;
