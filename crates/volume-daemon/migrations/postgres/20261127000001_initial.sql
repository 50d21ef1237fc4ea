-- Initial schema (PostgreSQL). Identifiers are UUID text, timestamps are UTC RFC 3339 text with microseconds
-- (fixed width, so they sort as text), JSON is text.

CREATE TABLE volumes (
    id                  TEXT    NOT NULL PRIMARY KEY,
    name                TEXT    NOT NULL,
    size_bytes          BIGINT  NOT NULL,
    disk_offering_id    TEXT    NOT NULL,
    zone_id             TEXT    NOT NULL,
    metadata            TEXT    NOT NULL,
    cloud_state         TEXT,
    snapshot_id         TEXT,
    snapshot_name       TEXT,
    snapshot_status     TEXT,
    vm_context_id       TEXT,
    snapshot_created_at TEXT,
    created_at          TEXT    NOT NULL,
    updated_at          TEXT    NOT NULL,
    deleted_at          TEXT
);

CREATE TABLE attachments (
    volume_id         TEXT   NOT NULL PRIMARY KEY REFERENCES volumes (id),
    vm_id             TEXT   NOT NULL,
    target            TEXT   NOT NULL CHECK (target IN ('appliance', 'remote')),
    role              TEXT   NOT NULL CHECK (role IN ('data', 'root')),
    device_id         BIGINT,
    by_id_path        TEXT,
    kernel_device     TEXT,
    stable_name       TEXT,
    export_generation BIGINT,
    created_at        TEXT   NOT NULL,
    updated_at        TEXT   NOT NULL
);
CREATE INDEX attachments_vm ON attachments (vm_id);

CREATE TABLE exports (
    volume_id   TEXT   NOT NULL PRIMARY KEY REFERENCES volumes (id),
    export_name TEXT   NOT NULL UNIQUE,
    device_path TEXT   NOT NULL,
    generation  BIGINT NOT NULL,
    read_only   BIGINT NOT NULL,
    created_at  TEXT   NOT NULL,
    updated_at  TEXT   NOT NULL
);

CREATE TABLE operations (
    id              TEXT NOT NULL PRIMARY KEY,
    op_type         TEXT NOT NULL,
    status          TEXT NOT NULL,
    step            TEXT NOT NULL,
    volume_id       TEXT,
    vm_id           TEXT,
    request         TEXT NOT NULL,
    response        TEXT,
    error_code      TEXT,
    error_message   TEXT,
    cloud_job_id    TEXT,
    idempotency_key TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    completed_at    TEXT
);
CREATE UNIQUE INDEX operations_idempotency ON operations (op_type, idempotency_key);
CREATE INDEX operations_status ON operations (status, created_at);
CREATE INDEX operations_volume ON operations (volume_id, created_at);
CREATE INDEX operations_vm ON operations (vm_id, created_at);

CREATE TABLE appliance (
    singleton  BIGINT NOT NULL PRIMARY KEY CHECK (singleton = 1),
    vm_id      TEXT   NOT NULL,
    source     TEXT   NOT NULL,
    updated_at TEXT   NOT NULL
);
