-- sensorseal schema 7: drop-in endpoints for Cloud IoT Core devices and EVA ICS v3 nodes
-- (sensorseal.compat.gcp_iot / gcp_bridge / eva, served by sensorseal.server.iotcore_service
-- and eva_service). A PostgreSQL port uses BIGINT for every *_ms and change_id column.

-- A Cloud IoT Core device is a sensorseal device (devices row, epoch 0, no native secret)
-- bound to its full name projects/{p}/locations/{r}/registries/{reg}/devices/{d}.
-- `short_name` ({d}) is unique too: the broker topics /devices/{d}/... name only that part, so
-- two registries' "dev-1" would share their config and command topics.
-- `counter_field`: when set, every event must carry that integer JSON field, checked by a
-- replay window like a native sequence number (NULL: server-assigned sequence numbers).
CREATE TABLE iotcore_devices (
    device_id     BLOB PRIMARY KEY REFERENCES devices (id),
    path          TEXT NOT NULL UNIQUE,
    short_name    TEXT NOT NULL UNIQUE,
    counter_field TEXT,
    created_ms    INTEGER NOT NULL
) WITHOUT ROWID;

-- Registered public keys (at most 3 per device, enforced by the registry): the PEM exactly as
-- uploaded (a public key or an X.509 certificate carrying it), its JWT alg and an optional
-- expiry. Public material only: nothing here needs the KEK.
CREATE TABLE iotcore_keys (
    id         INTEGER PRIMARY KEY,
    device_id  BLOB NOT NULL REFERENCES devices (id),
    alg        TEXT NOT NULL CHECK (alg IN ('RS256', 'ES256')),
    pem        TEXT NOT NULL,
    expires_ms INTEGER,
    added_ms   INTEGER NOT NULL,
    UNIQUE (device_id, pem)
);
CREATE INDEX iotcore_keys_device ON iotcore_keys (device_id);

-- The latest config per device. `change_id` grows by one with every write across all devices,
-- so a server learns "what changed since I last looked" with one indexed query.
CREATE TABLE iotcore_configs (
    device_id  BLOB PRIMARY KEY REFERENCES devices (id),
    version    INTEGER NOT NULL CHECK (version >= 1),
    data       BLOB NOT NULL,
    change_id  INTEGER NOT NULL UNIQUE,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- EVA ICS API keys by key id, wrapped under the KEK (never in clear).
CREATE TABLE eva_keys (
    key_id     TEXT PRIMARY KEY,
    wrapped    BLOB NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
