-- sensorseal schema, version 1, PostgreSQL dialect (twin of migrations/0001_initial.sql).
-- Secrets are stored only wrapped under the key-encryption key (see sensorseal.keystore).
-- Devices are never deleted: a revoked id stays so that it is never reused and its telemetry
-- stays attributable.

CREATE TABLE devices (
    id           BYTEA PRIMARY KEY CHECK (octet_length(id) = 12),
    name         TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    epoch        INTEGER NOT NULL CHECK (epoch >= 0),
    policy       TEXT NOT NULL,
    created_ms   BIGINT NOT NULL,
    last_seen_ms BIGINT
);
CREATE INDEX devices_created ON devices (created_ms, id);

CREATE TABLE device_secrets (
    device_id  BYTEA NOT NULL REFERENCES devices (id),
    epoch      INTEGER NOT NULL CHECK (epoch >= 0),
    wrapped    BYTEA NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT,
    PRIMARY KEY (device_id, epoch)
);

-- UNIQUE (device_id, epoch, seq) is the replay truth shared by workers and restarts; its index
-- also serves max_seq(), per-device counts and per-device "newest first" listings.
CREATE TABLE telemetry (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id    BYTEA NOT NULL REFERENCES devices (id),
    epoch        INTEGER NOT NULL,
    seq          BIGINT NOT NULL,
    received_ms  BIGINT NOT NULL,
    device_ts_ms BIGINT,
    level        TEXT NOT NULL,
    route        TEXT NOT NULL,
    transport    TEXT NOT NULL,
    payload      BYTEA NOT NULL,
    UNIQUE (device_id, epoch, seq)
);

CREATE TABLE audit (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    reason    TEXT NOT NULL,
    transport TEXT NOT NULL,
    source    TEXT NOT NULL,
    device_id TEXT,
    detail    TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_at_ms ON audit (at_ms);
CREATE INDEX audit_reason ON audit (reason, at_ms);
CREATE INDEX audit_device_id ON audit (device_id, at_ms);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
