-- sensorseal schema, version 2: key lifecycle (epochs, E5 renewal, device public keys).
-- device_secrets (version 1) already holds one wrapped root secret per (device, epoch) and an
-- `expires_ms` column: an epoch older than the current one is accepted until then (its grace
-- period); NULL on an older epoch means "no longer accepted". A row for epoch current + 1 is a
-- pending E5 renewal (its secret travels to the device in an HPKE offer).

-- One open (or last) renewal per device: RenewalState.to_cbor() (offer ciphertext only, never a
-- secret) and the grace the old epoch gets once the device confirms the new one.
CREATE TABLE device_renewals (
    device_id  BLOB PRIMARY KEY REFERENCES devices (id),
    state      BLOB NOT NULL,
    grace_ms   INTEGER NOT NULL CHECK (grace_ms >= 0),
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- Device public keys: purpose 'renewal' (alg = RenewalSuite value, raw KEM public key) and
-- 'signing' (alg = COSE alg -8 EdDSA / -7 ES256, raw Ed25519 key or SEC1 P-256 point). Kept
-- forever: archived signed readings stay verifiable with every key a device ever had.
CREATE TABLE device_public_keys (
    device_id BLOB NOT NULL REFERENCES devices (id),
    purpose   TEXT NOT NULL CHECK (purpose IN ('renewal', 'signing')),
    alg       INTEGER NOT NULL,
    public    BLOB NOT NULL,
    added_ms  INTEGER NOT NULL,
    PRIMARY KEY (device_id, purpose, public)
) WITHOUT ROWID;
