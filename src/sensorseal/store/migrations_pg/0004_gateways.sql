-- sensorseal schema 4, PostgreSQL dialect (twin of migrations/0004_gateways.sql): networks
-- (E1 link keys), gateways, and which device uses which network. Keys and secrets only wrapped.

CREATE TABLE networks (
    id              BYTEA PRIMARY KEY CHECK (octet_length(id) = 12),
    name            TEXT NOT NULL,
    alg             INTEGER NOT NULL CHECK (alg IN (1, 10, 30)),
    required_layers TEXT NOT NULL DEFAULT 'none',
    wrapped_key     BYTEA NOT NULL,
    created_ms      BIGINT NOT NULL
);

CREATE TABLE gateways (
    id             BYTEA PRIMARY KEY CHECK (octet_length(id) = 12),
    name           TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    epoch          INTEGER NOT NULL CHECK (epoch >= 0),
    wrapped_secret BYTEA NOT NULL,
    created_ms     BIGINT NOT NULL
);

CREATE TABLE gateway_networks (
    gateway_id BYTEA NOT NULL REFERENCES gateways (id),
    network_id BYTEA NOT NULL REFERENCES networks (id),
    PRIMARY KEY (gateway_id, network_id)
);

CREATE TABLE device_networks (
    device_id   BYTEA PRIMARY KEY REFERENCES devices (id),
    network_id  BYTEA NOT NULL REFERENCES networks (id),
    mode        TEXT NOT NULL CHECK (mode IN ('e3', 'e2', 'e2+e3')),
    assigned_ms BIGINT NOT NULL
);
CREATE INDEX device_networks_network ON device_networks (network_id);
