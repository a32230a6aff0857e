-- sensorseal schema, version 3, PostgreSQL dialect (twin of migrations/0003_console.sql):
-- the console's operators, sessions and API tokens; policies as data; device groups.
-- Nothing secret is stored in clear: passwords as argon2id hashes, session ids and API tokens
-- as SHA-256 of their random value.

ALTER TABLE devices ADD COLUMN group_name TEXT;
CREATE INDEX devices_group_name ON devices (group_name);

CREATE TABLE policies (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE policy_attachments (
    kind   TEXT NOT NULL CHECK (kind IN ('network', 'group')),
    target TEXT NOT NULL,
    policy TEXT NOT NULL,
    PRIMARY KEY (kind, target)
);

CREATE TABLE operators (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    groups        TEXT,
    disabled      BOOLEAN NOT NULL DEFAULT false,
    created_ms    BIGINT NOT NULL
);

CREATE TABLE sessions (
    id_sha256  TEXT PRIMARY KEY,
    operator   TEXT NOT NULL REFERENCES operators (name),
    csrf       TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX sessions_operator ON sessions (operator);

CREATE TABLE api_tokens (
    token_id   TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    groups     TEXT,
    created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    revoked_ms BIGINT
);
