-- sensorseal schema 8: E1 network keys and gateway secrets per key epoch, each with the end of
-- its grace period (not_after_ms; NULL: no end), so that both rotate like device keys
-- (docs/keys.md). Every blob stays wrapped under the KEK bound to (id, epoch): the existing
-- network key becomes epoch 0 (what it was wrapped with), the gateway secret keeps its epoch.

CREATE TABLE network_keys (
    network_id   BLOB NOT NULL REFERENCES networks (id),
    epoch        INTEGER NOT NULL CHECK (epoch >= 0 AND epoch <= 4294967295),
    wrapped_key  BLOB NOT NULL,
    created_ms   INTEGER NOT NULL,
    not_after_ms INTEGER,
    PRIMARY KEY (network_id, epoch)
) WITHOUT ROWID;

INSERT INTO network_keys (network_id, epoch, wrapped_key, created_ms, not_after_ms)
    SELECT id, 0, wrapped_key, created_ms, NULL FROM networks;

ALTER TABLE networks DROP COLUMN wrapped_key;

CREATE TABLE gateway_secrets (
    gateway_id     BLOB NOT NULL REFERENCES gateways (id),
    epoch          INTEGER NOT NULL CHECK (epoch >= 0),
    wrapped_secret BLOB NOT NULL,
    created_ms     INTEGER NOT NULL,
    not_after_ms   INTEGER,
    PRIMARY KEY (gateway_id, epoch)
) WITHOUT ROWID;

INSERT INTO gateway_secrets (gateway_id, epoch, wrapped_secret, created_ms, not_after_ms)
    SELECT id, epoch, wrapped_secret, created_ms, NULL FROM gateways;

ALTER TABLE gateways DROP COLUMN wrapped_secret;
