-- Operation types may be longer than 16 characters (`test_failover_cleanup`).
ALTER TABLE operations MODIFY op_type VARCHAR(32) NOT NULL;
