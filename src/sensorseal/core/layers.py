"""Composing the protection layers E1-E4: names, requirements, the gateway key, the batch format.

Pure code. What each layer is (docs/protocol.md, section 14):

    E1 link      network-wide AES-128 key (core/link.py); checked at the first hop
    E2 gateway   native envelope under the device's *gateway secret*; the gateway opens it
    E3 cloud     native envelope under the device's root secret; only the cloud opens it
    E4 transport TLS between gateway (or device) and cloud

The gateway secret is HKDF(root secret, purpose "gateway"): the cloud can compute it and hand it
to a gateway, and the gateway, holding only that, cannot compute the root secret and so cannot
open or forge E3. The E2 envelope is the ordinary native envelope with the gateway secret in the
place of the root secret, so every rule of the native format holds for it unchanged.

A gateway forwards upstream one native envelope sealed under its *own* credential (its kid is
the gateway id, so the cloud knows who vouched); its payload is a batch::

    batch   = { "items": [* item], "drops": [* [label: tstr, count: uint, at_ms: uint]] }
    item    = [0, facts: tstr, envelope: bstr]                          ; E3 inside: untouched
            / [1, facts: tstr, kid: bstr, epoch, seq, ts / null, level: tstr, payload: bstr]
                                                                        ; E2 only: vouched
    facts   = the layers the gateway checked, e.g. "e1+e2"

The cloud adds E3 itself (it opened a sealed inner envelope) and E4 (the request came over TLS),
and refuses with policy_violation anything weaker than the device's network requires.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any, NamedTuple

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DEVICE_ID_LEN, DeviceId, Direction, Level
from sensorseal.core.keys import ROOT_SECRET_LEN, KeyContext, hkdf_info
from sensorseal.core.replay import MAX_SEQ

__all__ = [
    "E2_ROUTE_PREFIX",
    "E3_ROUTE",
    "GATEWAY_BATCH_ROUTE",
    "Batch",
    "Layer",
    "Mode",
    "Vouched",
    "check_layers",
    "decode_batch",
    "decode_vouched",
    "e2_route",
    "encode_batch",
    "envelope_item",
    "format_layers",
    "gateway_keys",
    "gateway_secret",
    "parse_layers",
    "vouched_item",
]

E3_ROUTE = "/v1/gateway"  # route (external AAD) of an E3 envelope meant to travel via a gateway
E2_ROUTE_PREFIX = "/e2/"  # + network id hex: route of the E2 envelope (binds it to the network)
GATEWAY_BATCH_ROUTE = "/v1/gateway/batch"  # route of the gateway's own upstream envelope
GATEWAY_PURPOSE = "gateway"
ITEM_ENVELOPE, ITEM_VOUCHED = 0, 1
MAX_ITEMS = 10_000


class Layer(StrEnum):
    E1 = "e1"
    E2 = "e2"
    E3 = "e3"
    E4 = "e4"


class Mode(StrEnum):
    """How a device behind a gateway protects its frames (E1 is always on via a gateway)."""

    E3 = "e3"  # the gateway passes the inner envelope through untouched
    E2 = "e2"  # the gateway opens it and vouches for the content
    E2_E3 = "e2+e3"  # the gateway checks the outer layer; the cloud opens the inner one


def parse_layers(text: str) -> frozenset[Layer]:
    """"e1+e3+e4" -> {E1, E3, E4}; "" or "none" -> {}. ConfigError on an unknown name."""
    text = text.strip().lower()
    if text in ("", "none"):
        return frozenset()
    try:
        return frozenset(Layer(part.strip()) for part in text.split("+"))
    except ValueError:
        raise ConfigError(f"layers are e1..e4 joined by '+', not {text!r:.40}") from None


def format_layers(layers: Iterable[Layer]) -> str:
    """The canonical text: sorted, joined by '+', "none" when empty."""
    return "+".join(sorted(lay.value for lay in layers)) or "none"


def check_layers(required: frozenset[Layer], present: frozenset[Layer]) -> None:
    """Rejected(POLICY_VIOLATION) naming what is missing, if `present` lacks a required layer."""
    missing = required - present
    if missing:
        raise Rejected(RejectReason.POLICY_VIOLATION,
                       f"layers {format_layers(present)} lack {format_layers(missing)} "
                       f"(required {format_layers(required)})")


def e2_route(network_id: bytes) -> str:
    return E2_ROUTE_PREFIX + bytes(network_id).hex()


def gateway_secret(root_secret: bytes, device_id: DeviceId, epoch: int) -> bytes:
    """The device's E2 secret for its gateways: HKDF(root, purpose "gateway", 32 bytes).

    One-way: holding it reveals nothing about the root secret, hence nothing of E3.
    """
    if len(root_secret) != ROOT_SECRET_LEN:
        raise ConfigError(f"a root secret is {ROOT_SECRET_LEN} bytes")
    info = hkdf_info(device_id, epoch, Direction.UP, GATEWAY_PURPOSE, ROOT_SECRET_LEN, None)
    return HKDF(algorithm=hashes.SHA256(), length=ROOT_SECRET_LEN, salt=None,
                info=info).derive(bytes(root_secret))


def gateway_keys(secret: bytes, device_id: DeviceId, epoch: int) -> KeyContext:
    """The E2 key context: the native derivation with the gateway secret as its root."""
    return KeyContext(device_id, epoch, Direction.UP, bytes(secret))


# -- the upstream batch ------------------------------------------------------------------------

class Vouched(NamedTuple):
    """An E2-only item: the gateway opened the device's envelope and vouches for it."""

    device_id: DeviceId
    epoch: int
    seq: int
    timestamp_ms: int | None
    level: Level
    payload: bytes


class Batch(NamedTuple):
    items: list[tuple[int, frozenset[Layer], bytes]]  # (kind, facts, item as CBOR)
    drops: list[tuple[str, int, int]]


def envelope_item(facts: frozenset[Layer], envelope: bytes) -> bytes:
    return cbor2.dumps([ITEM_ENVELOPE, format_layers(facts), bytes(envelope)])


def vouched_item(facts: frozenset[Layer], v: Vouched) -> bytes:
    return cbor2.dumps([ITEM_VOUCHED, format_layers(facts), bytes(v.device_id), v.epoch, v.seq,
                        v.timestamp_ms, v.level.value, bytes(v.payload)])


def _array_head(n: int) -> bytes:
    """The shortest CBOR head of an array of n items (RFC 8949 section 3)."""
    if n < 24:
        return bytes((0x80 | n,))
    if n < 0x100:
        return bytes((0x98, n))
    if n < 0x10000:
        return b"\x99" + n.to_bytes(2, "big")
    return b"\x9a" + n.to_bytes(4, "big")


def encode_batch(items: list[bytes], drops: Iterable[tuple[str, int, int]] = ()) -> bytes:
    """The batch from already-encoded items (as the gateway buffered them): the items are
    spliced in as they are, so forwarding costs no decode and re-encode per item."""
    return (b"\xa2" + cbor2.dumps("items") + _array_head(len(items)) + b"".join(items)
            + cbor2.dumps("drops") + cbor2.dumps([list(d) for d in drops]))


def _facts(text: Any) -> frozenset[Layer]:
    if type(text) is not str:
        raise Rejected(RejectReason.MALFORMED, "item facts are not text")
    try:
        facts = parse_layers(text)
    except ConfigError:
        raise Rejected(RejectReason.MALFORMED, "unknown layer in item facts") from None
    if Layer.E3 in facts or Layer.E4 in facts:
        # Only the cloud can establish E3 (it opens the envelope) and E4 (its own TLS).
        raise Rejected(RejectReason.MALFORMED, "a gateway may only vouch for e1 and e2")
    return facts


def decode_batch(payload: bytes) -> Batch:
    """Split an authenticated batch into items; Rejected(MALFORMED) for any other shape."""
    try:
        doc = cbor2.loads(payload)
    except Exception as exc:
        raise Rejected(RejectReason.MALFORMED, "gateway batch is not CBOR") from exc
    if type(doc) is not dict or set(doc) != {"items", "drops"}:
        raise Rejected(RejectReason.MALFORMED, "gateway batch must be {items, drops}")
    items, drops = doc["items"], doc["drops"]
    if type(items) is not list or type(drops) is not list or len(items) > MAX_ITEMS:
        raise Rejected(RejectReason.MALFORMED, "gateway batch items/drops not lists in bounds")
    out: list[tuple[int, frozenset[Layer], bytes]] = []
    for item in items:
        if type(item) is not list or len(item) < 3 or type(item[0]) is not int:
            raise Rejected(RejectReason.MALFORMED, "gateway batch item shape")
        kind = item[0]
        if kind == ITEM_ENVELOPE and len(item) == 3 and type(item[2]) is bytes:
            out.append((kind, _facts(item[1]), item[2]))
        elif kind == ITEM_VOUCHED and len(item) == 8:
            out.append((kind, _facts(item[1]), cbor2.dumps(item)))
        else:
            raise Rejected(RejectReason.MALFORMED, "gateway batch item kind")
    checked: list[tuple[str, int, int]] = []
    for d in drops[:64]:
        if (type(d) is not list or len(d) != 3 or type(d[0]) is not str or len(d[0]) > 32
                or type(d[1]) is not int or type(d[2]) is not int or d[1] < 0):
            raise Rejected(RejectReason.MALFORMED, "gateway drop report shape")
        checked.append((d[0], d[1], d[2]))
    return Batch(out, checked)


def decode_vouched(data: bytes) -> Vouched:
    """A vouched item (as `vouched_item` encodes it) back; Rejected(MALFORMED) otherwise."""
    try:
        item = cbor2.loads(data)
    except Exception as exc:
        raise Rejected(RejectReason.MALFORMED, "vouched item is not CBOR") from exc
    if type(item) is not list or len(item) != 8 or item[0] != ITEM_VOUCHED:
        raise Rejected(RejectReason.MALFORMED, "vouched item shape")
    _, _, kid, epoch, seq, ts, level, payload = item
    if type(kid) is not bytes or len(kid) != DEVICE_ID_LEN:
        raise Rejected(RejectReason.MALFORMED, "vouched item kid")
    if type(epoch) is not int or not 0 <= epoch < 2**32:
        raise Rejected(RejectReason.MALFORMED, "vouched item epoch")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise Rejected(RejectReason.MALFORMED, "vouched item seq")
    if ts is not None and (type(ts) is not int or not 0 <= ts < 2**53):
        raise Rejected(RejectReason.MALFORMED, "vouched item timestamp")
    if level not in ("sealed", "signed") or type(payload) is not bytes:
        raise Rejected(RejectReason.MALFORMED, "vouched item level/payload")
    return Vouched(DeviceId.trusted(kid), epoch, seq, ts, Level(level), payload)
