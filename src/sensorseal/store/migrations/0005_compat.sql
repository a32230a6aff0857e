-- sensorseal schema 5: legacy devices (sensorseal.compat) and the state their formats need.
-- Secrets are stored only wrapped under the key-encryption key, bound to their device.
-- Sequence numbers: telemetry.seq is an SQLite INTEGER, i.e. signed 64-bit, so Valarm devices
-- that count in milliseconds (~1.7e12 > 2^40) fit; a PostgreSQL port uses BIGINT for every
-- *_ms and seq column below and for telemetry.seq.

-- One row per legacy device. external_id is how the format names the device: the 24-hex id
-- (Valarm), the hub serial (Yoctopuce) or the node serial (Waspmote).
CREATE TABLE legacy_credentials (
    device_id     BLOB PRIMARY KEY REFERENCES devices (id),
    kind          TEXT NOT NULL CHECK (kind IN ('valarm', 'yoctopuce', 'waspmote')),
    external_id   TEXT NOT NULL,
    wrapped       BLOB,                -- NULL only for a Yoctopuce hub without a password
    options       TEXT NOT NULL DEFAULT '{}',  -- not secret, e.g. {"aes_bits": 128}
    state         TEXT NOT NULL DEFAULT 'active'
                  CHECK (state IN ('active', 'migrating', 'migrated')),
    target_policy TEXT,                -- the policy to switch to once native keys are used
    created_ms    INTEGER NOT NULL,
    UNIQUE (kind, external_id)
) WITHOUT ROWID;
CREATE INDEX legacy_credentials_state ON legacy_credentials (state);

-- Bodies/frames seen recently, to refuse a second copy (formats without a counter).
CREATE TABLE compat_digests (
    device_id  BLOB NOT NULL REFERENCES devices (id),
    digest     BLOB NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (device_id, digest)
) WITHOUT ROWID;
CREATE INDEX compat_digests_expiry ON compat_digests (expires_ms);

-- Per Yoctopuce hub: the newest module.upTime accepted and when it was accepted.
CREATE TABLE compat_hub_uptime (
    device_id      BLOB PRIMARY KEY REFERENCES devices (id),
    last_uptime_ms INTEGER NOT NULL,
    last_seen_ms   INTEGER NOT NULL
) WITHOUT ROWID;

-- Commands queued for a hub, delivered in the response to its next accepted callback.
CREATE TABLE compat_commands (
    id           INTEGER PRIMARY KEY,
    device_id    BLOB NOT NULL REFERENCES devices (id),
    command      TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    delivered_ms INTEGER
);
CREATE INDEX compat_commands_pending ON compat_commands (device_id, id) WHERE delivered_ms IS NULL;
