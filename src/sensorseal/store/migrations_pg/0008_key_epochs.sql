-- sensorseal schema 8, PostgreSQL dialect (twin of migrations/0008_key_epochs.sql): E1 network
-- keys and gateway secrets per key epoch with the end of their grace period (NULL: no end).
-- The existing network key becomes epoch 0, the gateway secret keeps its epoch.

CREATE TABLE network_keys (
    network_id   BYTEA NOT NULL REFERENCES networks (id),
    epoch        BIGINT NOT NULL CHECK (epoch >= 0 AND epoch <= 4294967295),
    wrapped_key  BYTEA NOT NULL,
    created_ms   BIGINT NOT NULL,
    not_after_ms BIGINT,
    PRIMARY KEY (network_id, epoch)
);

INSERT INTO network_keys (network_id, epoch, wrapped_key, created_ms, not_after_ms)
    SELECT id, 0, wrapped_key, created_ms, NULL FROM networks;

ALTER TABLE networks DROP COLUMN wrapped_key;

CREATE TABLE gateway_secrets (
    gateway_id     BYTEA NOT NULL REFERENCES gateways (id),
    epoch          INTEGER NOT NULL CHECK (epoch >= 0),
    wrapped_secret BYTEA NOT NULL,
    created_ms     BIGINT NOT NULL,
    not_after_ms   BIGINT,
    PRIMARY KEY (gateway_id, epoch)
);

INSERT INTO gateway_secrets (gateway_id, epoch, wrapped_secret, created_ms, not_after_ms)
    SELECT id, epoch, wrapped_secret, created_ms, NULL FROM gateways;

ALTER TABLE gateways DROP COLUMN wrapped_secret;
