-- sensorseal schema 6, PostgreSQL dialect (twin of migrations/0006_updates.sql): signed updates
-- (sensorseal.updates): images, manifests, rollouts and where each device of a rollout is.

CREATE TABLE update_images (
    sha256     BYTEA PRIMARY KEY CHECK (octet_length(sha256) = 32),
    size       BIGINT NOT NULL CHECK (size >= 0),
    data       BYTEA NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE update_manifests (
    seq           BIGINT PRIMARY KEY CHECK (seq > 0),
    device_class  TEXT NOT NULL,
    image_version BIGINT NOT NULL CHECK (image_version >= 0),
    image_sha256  BYTEA NOT NULL REFERENCES update_images (sha256),
    payload       BYTEA NOT NULL,
    signed        BYTEA,
    manifest_ref  TEXT,
    created_ms    BIGINT NOT NULL
);

CREATE TABLE update_rollouts (
    rollout_id    TEXT PRIMARY KEY,
    manifest_seq  BIGINT NOT NULL REFERENCES update_manifests (seq),
    manifest_ref  TEXT NOT NULL,
    image_version BIGINT NOT NULL,
    device_class  TEXT NOT NULL,
    target        TEXT NOT NULL DEFAULT '',
    created_ms    BIGINT NOT NULL
);

CREATE TABLE update_rollout_devices (
    rollout_id   TEXT NOT NULL REFERENCES update_rollouts (rollout_id),
    device_id    BYTEA NOT NULL REFERENCES devices (id),
    state        TEXT NOT NULL CHECK (state IN ('pending', 'offered', 'downloading', 'verified',
                                                'installed', 'failed')),
    reason       TEXT,
    offset_bytes BIGINT NOT NULL DEFAULT 0,
    attempts     INTEGER NOT NULL DEFAULT 0,
    updated_ms   BIGINT NOT NULL,
    revision     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX update_rollout_devices_device ON update_rollout_devices (device_id);
