-- sensorseal schema, version 2, PostgreSQL dialect (twin of migrations/0002_keys.sql):
-- key lifecycle (epochs, E5 renewal, device public keys).

CREATE TABLE device_renewals (
    device_id  BYTEA PRIMARY KEY REFERENCES devices (id),
    state      BYTEA NOT NULL,
    grace_ms   BIGINT NOT NULL CHECK (grace_ms >= 0),
    updated_ms BIGINT NOT NULL
);

CREATE TABLE device_public_keys (
    device_id BYTEA NOT NULL REFERENCES devices (id),
    purpose   TEXT NOT NULL CHECK (purpose IN ('renewal', 'signing')),
    alg       INTEGER NOT NULL,
    public    BYTEA NOT NULL,
    added_ms  BIGINT NOT NULL,
    PRIMARY KEY (device_id, purpose, public)
);
