-- sensorseal schema 4: networks (E1 link keys), gateways, and which device uses which network.
-- Keys and secrets are stored only wrapped under the key-encryption key, bound to their row's id.

CREATE TABLE networks (
    id              BLOB PRIMARY KEY CHECK (length(id) = 12),
    name            TEXT NOT NULL,
    alg             INTEGER NOT NULL CHECK (alg IN (1, 10, 30)),
    required_layers TEXT NOT NULL DEFAULT 'none',
    wrapped_key     BLOB NOT NULL,
    created_ms      INTEGER NOT NULL
);

CREATE TABLE gateways (
    id             BLOB PRIMARY KEY CHECK (length(id) = 12),
    name           TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    epoch          INTEGER NOT NULL CHECK (epoch >= 0),
    wrapped_secret BLOB NOT NULL,
    created_ms     INTEGER NOT NULL
);

CREATE TABLE gateway_networks (
    gateway_id BLOB NOT NULL REFERENCES gateways (id),
    network_id BLOB NOT NULL REFERENCES networks (id),
    PRIMARY KEY (gateway_id, network_id)
) WITHOUT ROWID;

-- A device belongs to at most one network; `mode` says how it protects frames behind a gateway.
CREATE TABLE device_networks (
    device_id   BLOB PRIMARY KEY REFERENCES devices (id),
    network_id  BLOB NOT NULL REFERENCES networks (id),
    mode        TEXT NOT NULL CHECK (mode IN ('e3', 'e2', 'e2+e3')),
    assigned_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX device_networks_network ON device_networks (network_id);
