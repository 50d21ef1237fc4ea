-- One lease per appliance identity: the daemon that holds it is the only one that writes that appliance's
-- records. `token` (the fencing token) grows by one at every acquisition and never shrinks; every write
-- transaction checks it. A lease whose `expires_at` has passed may be taken over by another daemon.
CREATE TABLE appliance_leases (
    appliance_id VARCHAR(255) NOT NULL PRIMARY KEY,
    holder_id    VARCHAR(255) NOT NULL,
    host         VARCHAR(255) NOT NULL,
    pid          BIGINT       NOT NULL,
    token        BIGINT       NOT NULL,
    acquired_at  VARCHAR(32)  NOT NULL,
    heartbeat_at VARCHAR(32)  NOT NULL,
    expires_at   VARCHAR(32)  NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
