-- sensorseal schema 6: signed updates (sensorseal.updates): images, manifests, rollouts and
-- where each device of a rollout is. Nothing here is secret: images are covered by the signed
-- digest, manifests are public, states are bookkeeping. A PostgreSQL port uses BYTEA for the
-- BLOB columns and BIGINT for every *_ms, size and sequence column.

-- Images, content-addressed: the key is the SHA-256 of the bytes as transferred.
CREATE TABLE update_images (
    sha256     BLOB PRIMARY KEY CHECK (length(sha256) = 32),
    size       INTEGER NOT NULL CHECK (size >= 0),
    data       BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);

-- One row per manifest sequence number (unique per vendor; one vendor per installation).
-- `payload` is the canonical CBOR that the vendor signs; `signed` is set once the signed
-- manifest (COSE_Sign1 or COSE_Sign) has been imported, `manifest_ref` names it in reports.
CREATE TABLE update_manifests (
    seq           INTEGER PRIMARY KEY CHECK (seq > 0),
    device_class  TEXT NOT NULL,
    image_version INTEGER NOT NULL CHECK (image_version >= 0),
    image_sha256  BLOB NOT NULL REFERENCES update_images (sha256),
    payload       BLOB NOT NULL,
    signed        BLOB,
    manifest_ref  TEXT,
    created_ms    INTEGER NOT NULL
);

CREATE TABLE update_rollouts (
    rollout_id    TEXT PRIMARY KEY,
    manifest_seq  INTEGER NOT NULL REFERENCES update_manifests (seq),
    manifest_ref  TEXT NOT NULL,
    image_version INTEGER NOT NULL,
    device_class  TEXT NOT NULL,
    target        TEXT NOT NULL DEFAULT '',  -- for people: "devices", "group lab", "group lab 10%"
    created_ms    INTEGER NOT NULL
) WITHOUT ROWID;

-- Per device of a rollout (sensorseal.updates.rollout.DeviceRecord); `revision` is the
-- compare-and-set key that lets several workers apply reports without losing one.
CREATE TABLE update_rollout_devices (
    rollout_id   TEXT NOT NULL REFERENCES update_rollouts (rollout_id),
    device_id    BLOB NOT NULL REFERENCES devices (id),
    state        TEXT NOT NULL CHECK (state IN ('pending', 'offered', 'downloading', 'verified',
                                                'installed', 'failed')),
    reason       TEXT,
    offset_bytes INTEGER NOT NULL DEFAULT 0,
    attempts     INTEGER NOT NULL DEFAULT 0,
    updated_ms   INTEGER NOT NULL,
    revision     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout_id, device_id)
) WITHOUT ROWID;
CREATE INDEX update_rollout_devices_device ON update_rollout_devices (device_id);
