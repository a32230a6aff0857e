-- sensorseal schema, version 3: the console's operators, sessions and API tokens; policies as
-- data; device groups. (Version 2 is reserved for key lifecycle; numbers may have gaps.)
-- Nothing secret is stored in clear: passwords as argon2id hashes, session ids and API tokens
-- as SHA-256 of their random value (a copy of the database opens no session).

-- A device belongs to at most one group; operators are scoped to groups.
ALTER TABLE devices ADD COLUMN group_name TEXT;
CREATE INDEX devices_group_name ON devices (group_name);

-- Operator-defined policies (built-in presets live in code). `spec` is JSON (policies.py).
CREATE TABLE policies (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- A policy attached to the network (target ''), to a group or to a device (24 hex).
-- Device attachments live in devices.policy; this table holds the other two kinds.
CREATE TABLE policy_attachments (
    kind   TEXT NOT NULL CHECK (kind IN ('network', 'group')),
    target TEXT NOT NULL,
    policy TEXT NOT NULL,
    PRIMARY KEY (kind, target)
) WITHOUT ROWID;

CREATE TABLE operators (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    groups        TEXT,            -- JSON array of group names; NULL: every group
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_ms    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE sessions (
    id_sha256  TEXT PRIMARY KEY,
    operator   TEXT NOT NULL REFERENCES operators (name),
    csrf       TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX sessions_operator ON sessions (operator);

CREATE TABLE api_tokens (
    token_id   TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    groups     TEXT,
    created_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    revoked_ms INTEGER
) WITHOUT ROWID;
