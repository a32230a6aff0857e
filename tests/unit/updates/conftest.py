"""Fixtures for the update tests: a vendor key of each algorithm (every test that signs runs
with Ed25519 and with ES256), an operator key, trust anchors and a random image."""

from __future__ import annotations

import os

import pytest
from updates_support import Key, make_key

from sensorseal.core.attest import ALG_EDDSA, ALG_ES256
from sensorseal.updates.manifest import TrustAnchors


@pytest.fixture(params=[ALG_EDDSA, ALG_ES256], ids=["ed25519", "es256"])
def vendor(request: pytest.FixtureRequest) -> Key:
    return make_key(request.param, b"vendor-2025")


@pytest.fixture
def operator() -> Key:
    return make_key(ALG_ES256, b"operator-acme")


@pytest.fixture
def trust(vendor: Key, operator: Key) -> TrustAnchors:
    return TrustAnchors(vendor={vendor.kid: vendor.public},
                        operator={operator.kid: operator.public})


@pytest.fixture
def image() -> bytes:
    return os.urandom(10_000)
