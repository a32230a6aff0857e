-- sensorseal schema, version 1.
-- Secrets are stored only wrapped under the key-encryption key (see sensorseal.keystore).
-- Devices are never deleted: a revoked id stays so that it is never reused and its telemetry
-- stays attributable.

CREATE TABLE devices (
    id           BLOB PRIMARY KEY CHECK (length(id) = 12),
    name         TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    epoch        INTEGER NOT NULL CHECK (epoch >= 0),
    policy       TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    last_seen_ms INTEGER
);

CREATE TABLE device_secrets (
    device_id  BLOB NOT NULL REFERENCES devices (id),
    epoch      INTEGER NOT NULL CHECK (epoch >= 0),
    wrapped    BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER,
    PRIMARY KEY (device_id, epoch)
) WITHOUT ROWID;

-- UNIQUE (device_id, epoch, seq) is the replay truth shared by workers and restarts; its index
-- also serves max_seq(), per-device counts and per-device "newest first" listings.
CREATE TABLE telemetry (
    id           INTEGER PRIMARY KEY,
    device_id    BLOB NOT NULL REFERENCES devices (id),
    epoch        INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    received_ms  INTEGER NOT NULL,
    device_ts_ms INTEGER,
    level        TEXT NOT NULL,
    route        TEXT NOT NULL,
    transport    TEXT NOT NULL,
    payload      BLOB NOT NULL,
    UNIQUE (device_id, epoch, seq)
);

CREATE TABLE audit (
    id        INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
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
) WITHOUT ROWID;
