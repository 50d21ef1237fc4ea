-- The hub projection's outbox: one row per committed change of a volume's attachment or export, written in
-- the same transaction as the change. The delivery task applies the rows to the hub's tables in `seq` order
-- and sets `delivered_at`; `attempts` and `last_error` say why a row is still pending. `payload` is JSON: the
-- volume's attachment and export as committed (or none) and what the hub's `ossea_volumes` row becomes.
-- `appliance_id`: the appliance whose daemon wrote and delivers the row (several may share one database).
CREATE TABLE hub_outbox (
    seq          BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    volume_id    VARCHAR(36)  NOT NULL,
    appliance_id VARCHAR(64)  NOT NULL DEFAULT '',
    payload      MEDIUMTEXT   NOT NULL,
    created_at   VARCHAR(32)  NOT NULL,
    delivered_at VARCHAR(32),
    attempts     BIGINT       NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX hub_outbox_pending ON hub_outbox (appliance_id, delivered_at, seq);
