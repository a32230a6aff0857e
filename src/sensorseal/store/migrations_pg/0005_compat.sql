-- sensorseal schema 5, PostgreSQL dialect (twin of migrations/0005_compat.sql): legacy devices
-- (sensorseal.compat) and the state their formats need. BIGINT for every *_ms column (Valarm
-- counts in milliseconds; telemetry.seq is BIGINT since version 1).

CREATE TABLE legacy_credentials (
    device_id     BYTEA PRIMARY KEY REFERENCES devices (id),
    kind          TEXT NOT NULL CHECK (kind IN ('valarm', 'yoctopuce', 'waspmote')),
    external_id   TEXT NOT NULL,
    wrapped       BYTEA,
    options       TEXT NOT NULL DEFAULT '{}',
    state         TEXT NOT NULL DEFAULT 'active'
                  CHECK (state IN ('active', 'migrating', 'migrated')),
    target_policy TEXT,
    created_ms    BIGINT NOT NULL,
    UNIQUE (kind, external_id)
);
CREATE INDEX legacy_credentials_state ON legacy_credentials (state);

CREATE TABLE compat_digests (
    device_id  BYTEA NOT NULL REFERENCES devices (id),
    digest     BYTEA NOT NULL,
    expires_ms BIGINT NOT NULL,
    PRIMARY KEY (device_id, digest)
);
CREATE INDEX compat_digests_expiry ON compat_digests (expires_ms);

CREATE TABLE compat_hub_uptime (
    device_id      BYTEA PRIMARY KEY REFERENCES devices (id),
    last_uptime_ms BIGINT NOT NULL,
    last_seen_ms   BIGINT NOT NULL
);

CREATE TABLE compat_commands (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id    BYTEA NOT NULL REFERENCES devices (id),
    command      TEXT NOT NULL,
    created_ms   BIGINT NOT NULL,
    delivered_ms BIGINT
);
CREATE INDEX compat_commands_pending ON compat_commands (device_id, id) WHERE delivered_ms IS NULL;
