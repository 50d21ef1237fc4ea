-- One lease per appliance identity: the daemon that holds it is the only one that writes that appliance's
-- records. `token` (the fencing token) grows by one at every acquisition and never shrinks; every write
-- transaction checks it. A lease whose `expires_at` has passed may be taken over by another daemon.
CREATE TABLE appliance_leases (
    appliance_id TEXT   NOT NULL PRIMARY KEY,
    holder_id    TEXT   NOT NULL,
    host         TEXT   NOT NULL,
    pid          BIGINT NOT NULL,
    token        BIGINT NOT NULL,
    acquired_at  TEXT   NOT NULL,
    heartbeat_at TEXT   NOT NULL,
    expires_at   TEXT   NOT NULL
);
