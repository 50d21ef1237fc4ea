-- Initial schema (MariaDB / MySQL). Identifiers are UUID text, timestamps are UTC RFC 3339 text with
-- microseconds (fixed width, so they sort as text), JSON is text. Binary collation: comparisons are exact,
-- as on the other backends.

CREATE TABLE volumes (
    id                  VARCHAR(36)   NOT NULL PRIMARY KEY,
    name                VARCHAR(255)  NOT NULL,
    size_bytes          BIGINT        NOT NULL,
    disk_offering_id    VARCHAR(255)  NOT NULL,
    zone_id             VARCHAR(255)  NOT NULL,
    metadata            MEDIUMTEXT    NOT NULL,
    cloud_state         VARCHAR(64),
    snapshot_id         VARCHAR(255),
    snapshot_name       VARCHAR(255),
    snapshot_status     VARCHAR(64),
    vm_context_id       VARCHAR(255),
    snapshot_created_at VARCHAR(32),
    created_at          VARCHAR(32)   NOT NULL,
    updated_at          VARCHAR(32)   NOT NULL,
    deleted_at          VARCHAR(32)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE attachments (
    volume_id         VARCHAR(36)   NOT NULL PRIMARY KEY,
    vm_id             VARCHAR(255)  NOT NULL,
    target            VARCHAR(16)   NOT NULL CHECK (target IN ('appliance', 'remote')),
    role              VARCHAR(16)   NOT NULL CHECK (role IN ('data', 'root')),
    device_id         BIGINT,
    by_id_path        VARCHAR(1024),
    kernel_device     VARCHAR(1024),
    stable_name       VARCHAR(1024),
    export_generation BIGINT,
    created_at        VARCHAR(32)   NOT NULL,
    updated_at        VARCHAR(32)   NOT NULL,
    CONSTRAINT attachments_volume FOREIGN KEY (volume_id) REFERENCES volumes (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE INDEX attachments_vm ON attachments (vm_id);

CREATE TABLE exports (
    volume_id   VARCHAR(36)   NOT NULL PRIMARY KEY,
    export_name VARCHAR(255)  NOT NULL UNIQUE,
    device_path VARCHAR(1024) NOT NULL,
    generation  BIGINT        NOT NULL,
    read_only   BIGINT        NOT NULL,
    created_at  VARCHAR(32)   NOT NULL,
    updated_at  VARCHAR(32)   NOT NULL,
    CONSTRAINT exports_volume FOREIGN KEY (volume_id) REFERENCES volumes (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE operations (
    id              VARCHAR(36)  NOT NULL PRIMARY KEY,
    op_type         VARCHAR(16)  NOT NULL,
    status          VARCHAR(16)  NOT NULL,
    step            VARCHAR(64)  NOT NULL,
    volume_id       VARCHAR(36),
    vm_id           VARCHAR(255),
    request         MEDIUMTEXT   NOT NULL,
    response        MEDIUMTEXT,
    error_code      VARCHAR(64),
    error_message   MEDIUMTEXT,
    cloud_job_id    VARCHAR(255),
    idempotency_key VARCHAR(255),
    created_at      VARCHAR(32)  NOT NULL,
    updated_at      VARCHAR(32)  NOT NULL,
    completed_at    VARCHAR(32)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE UNIQUE INDEX operations_idempotency ON operations (op_type, idempotency_key);
CREATE INDEX operations_status ON operations (status, created_at);
CREATE INDEX operations_volume ON operations (volume_id, created_at);
CREATE INDEX operations_vm ON operations (vm_id, created_at);

CREATE TABLE appliance (
    singleton  BIGINT       NOT NULL PRIMARY KEY CHECK (singleton = 1),
    vm_id      VARCHAR(255) NOT NULL,
    source     VARCHAR(32)  NOT NULL,
    updated_at VARCHAR(32)  NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
