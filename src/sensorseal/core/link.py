"""E1, the link layer: every frame on a sensor network is wrapped under the network's key.

Pure code (no clock, no socket, no RNG). The wire format is specified in docs/protocol.md,
section 14; in short::

    frame = #6.16([ protected: bstr .cbor { 1: alg, 4: sender id (12 bytes),
                                            6: Partial IV (link seq),
                                            10: kid context = network id (12 bytes)
                                                || key epoch (absent for epoch 0, else
                                                   1-4 bytes big-endian, no leading zero) },
                    unprotected: {}, ciphertext: bstr ])
    external_aad = CBOR ["sensorseal/1", "link"]

Key epochs. A network's key is rotated (epoch N -> N+1) while devices still hold the old one,
so a receiver must know which key a frame uses. The epoch rides in the kid context, the COSE
field that names the security context (OSCORE changes its ID Context on a rekey the same way,
RFC 8613 appendix B.2): it costs nothing at epoch 0 (a network that never rotated sends the
frames it always sent) and one byte up to epoch 255, where a private header label (-65537, as
in the envelope) would cost six. Every epoch has exactly one encoding: an explicit zero
(a suffix 0x00) or a leading zero byte is malformed.

Algorithms (RFC 9053 section 4): A128GCM (1), AES-CCM-16-64-128 (10, what 802.15.4-style radios
implement: 8-byte tag, 13-byte nonce) and AES-CCM-16-128-128 (30, 16-byte tag).

Why per-sender keys. The network key is shared by every node, so a nonce built from one node's
counter alone would collide with another node's. The 802.15.4 answer (nonce = sender address ||
frame counter) does not fit: our sender ids are 12 bytes and a CCM nonce has 13. Random nonces
cost 12-13 bytes of a 255-byte radio frame and bound the number of frames (NIST SP 800-38D 8.3).
So the network key is never used for AES directly: HKDF derives from it one key and one IV per
(network, epoch, sender, alg), and the nonce is that IV XOR the sender's persistent link counter
(RFC 9052 section 3.1). A (key, nonce) pair then repeats only if one sender repeats its own
counter, which the device SDK's persistent counter rules out, and a node that learns the
network key still learns only what E1 protects: membership of the network, not payloads.

Freshness and anti-injection: the AEAD makes injection without the key impossible; the receiver
keeps a replay window per (network, sender) on the link sequence number (the gateway resumes
it from disk after a restart), so a recorded frame is refused at the first hop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import IntEnum
from typing import NamedTuple

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sensorseal.core.envelope import _bstr, _bstr_at, partial_iv
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.keys import PROTOCOL_LABEL
from sensorseal.core.replay import MAX_SEQ

__all__ = [
    "DEFAULT_MTU",
    "MAX_LINK_EPOCH",
    "NETWORK_ID_LEN",
    "NETWORK_KEY_LEN",
    "LinkAlg",
    "LinkFrame",
    "NetworkKey",
    "NetworkKeyring",
    "kid_context",
    "open_frame",
    "parse_frame",
    "wrap",
]

NETWORK_KEY_LEN = 16  # AES-128
NETWORK_ID_LEN = 12
SENDER_ID_LEN = 12
DEFAULT_MTU = 255  # bytes a typical sub-GHz / 802.15.4g radio frame carries
MAX_LINK_EPOCH = 2**32 - 1  # the envelope's epoch range (section 5.3); 4 bytes in the kid context
HDR_ALG, HDR_KID, HDR_PIV, HDR_KID_CONTEXT = 1, 4, 6, 10
_LABELS = frozenset({HDR_ALG, HDR_KID, HDR_PIV, HDR_KID_CONTEXT})
_MAX_CACHE = 65_536


class LinkAlg(IntEnum):
    """COSE algorithm ids (RFC 9053 section 4) accepted on the link layer."""

    A128GCM = 1
    AES_CCM_16_64_128 = 10
    AES_CCM_16_128_128 = 30


# alg -> (nonce length, tag length)
_PARAMS = {LinkAlg.A128GCM: (12, 16), LinkAlg.AES_CCM_16_64_128: (13, 8),
           LinkAlg.AES_CCM_16_128_128: (13, 16)}
_ALG_INTS = frozenset(int(a) for a in LinkAlg)
_AAD = _bstr(cbor2.dumps([PROTOCOL_LABEL, "link"]))
_ENC0 = b"\x83" + cbor2.dumps("Encrypt0")


def kid_context(network_id: bytes, epoch: int) -> bytes:
    """The kid context of (network, epoch): the network id, then the epoch in the fewest
    big-endian bytes, nothing for epoch 0 (one encoding per epoch)."""
    if not 0 <= epoch <= MAX_LINK_EPOCH:
        raise ConfigError(f"a network key epoch is between 0 and {MAX_LINK_EPOCH}")
    return bytes(network_id) + (epoch.to_bytes((epoch.bit_length() + 7) // 8, "big")
                                if epoch else b"")


class _SenderKeys(NamedTuple):
    aead: AESGCM | AESCCM
    iv: int
    nonce_len: int


class NetworkKey:
    """A network's id, key epoch, algorithm and shared key, with the per-sender keys derived
    from it.

    `repr()` never shows the key. Per-sender keys are cached (bounded) because deriving one
    costs an HKDF; only senders whose frames verified are cached, so a stranger cycling sender
    ids cannot fill the cache.
    """

    __slots__ = ("_cache", "_key", "alg", "epoch", "kid_context", "network_id")

    def __init__(self, network_id: bytes, key: bytes, alg: int = LinkAlg.AES_CCM_16_64_128,
                 *, epoch: int = 0) -> None:
        if len(network_id) != NETWORK_ID_LEN:
            raise ConfigError(f"a network id is {NETWORK_ID_LEN} bytes")
        if len(key) != NETWORK_KEY_LEN:
            raise ConfigError(f"a network key is {NETWORK_KEY_LEN} bytes (AES-128)")
        if alg not in _ALG_INTS:
            raise ConfigError(f"link algorithm must be one of {sorted(_ALG_INTS)}")
        self.network_id = bytes(network_id)
        self.epoch = epoch
        self.kid_context = kid_context(self.network_id, epoch)  # checks the epoch's range
        self.alg = LinkAlg(alg)
        self._key = bytes(key)
        self._cache: dict[bytes, _SenderKeys] = {}

    def __repr__(self) -> str:
        return f"NetworkKey({self.network_id.hex()}, epoch={self.epoch}, alg={int(self.alg)})"

    def _derive(self, sender: bytes) -> _SenderKeys:
        nonce_len, tag_len = _PARAMS[self.alg]
        # The kid context (network id || epoch) makes the epoch an HKDF input: per-sender keys
        # of two epochs differ even if an operator loaded the same key twice. At epoch 0 it is
        # the network id alone, so networks that never rotated derive what they always did.
        info = cbor2.dumps([PROTOCOL_LABEL, "link", self.kid_context, bytes(sender),
                            int(self.alg), NETWORK_KEY_LEN + nonce_len])
        okm = HKDF(algorithm=hashes.SHA256(), length=NETWORK_KEY_LEN + nonce_len, salt=None,
                   info=info).derive(self._key)
        key, iv = okm[:NETWORK_KEY_LEN], okm[NETWORK_KEY_LEN:]
        aead: AESGCM | AESCCM = AESGCM(key) if self.alg is LinkAlg.A128GCM \
            else AESCCM(key, tag_length=tag_len)
        return _SenderKeys(aead, int.from_bytes(iv, "big"), nonce_len)

    def sender_keys(self, sender: bytes) -> tuple[_SenderKeys, bool]:
        """(keys, cached): the per-sender keys, and whether they came from the cache."""
        keys = self._cache.get(sender)
        if keys is None:
            return self._derive(sender), False
        return keys, True

    def remember(self, sender: bytes, keys: _SenderKeys) -> None:
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()  # crude but bounded; re-deriving costs one HKDF per sender
        self._cache[bytes(sender)] = keys


class NetworkKeyring:
    """The keys of one network by epoch, each usable until its `not_after_ms` (None: no end).

    What a gateway holds while a network key rotates: the new epoch and, for the grace period,
    the old one. Pure: the caller passes the time.
    """

    __slots__ = ("_keys", "network_id")

    def __init__(self, keys: Iterable[tuple[NetworkKey, int | None]]) -> None:
        self._keys: dict[int, tuple[NetworkKey, int | None]] = {}
        self.network_id = b""
        for key, not_after_ms in keys:
            self.add(key, not_after_ms)
        if not self._keys:
            raise ConfigError("a network keyring holds at least one key")

    @classmethod
    def of(cls, key: NetworkKey) -> NetworkKeyring:
        return cls([(key, None)])

    def add(self, key: NetworkKey, not_after_ms: int | None = None) -> None:
        if self._keys and key.network_id != self.network_id:
            raise ConfigError("every key of a keyring belongs to one network")
        if key.epoch in self._keys:
            raise ConfigError(f"network key epoch {key.epoch} given twice")
        self.network_id = key.network_id
        self._keys[key.epoch] = (key, not_after_ms)

    def __repr__(self) -> str:
        return f"NetworkKeyring({self.network_id.hex()}, epochs={sorted(self._keys)})"

    def __iter__(self) -> Iterator[tuple[NetworkKey, int | None]]:
        return iter(sorted(self._keys.values(), key=lambda kv: kv[0].epoch))

    def get(self, epoch: int) -> NetworkKey | None:
        """The key of `epoch`, expired or not (to answer a frame already accepted)."""
        found = self._keys.get(epoch)
        return None if found is None else found[0]

    def usable(self, epoch: int, now_ms: int) -> NetworkKey | None:
        """The key of `epoch` if it is held and its grace period has not ended."""
        found = self._keys.get(epoch)
        if found is None or (found[1] is not None and now_ms >= found[1]):
            return None
        return found[0]

    @property
    def current(self) -> NetworkKey:
        """The newest epoch's key (what the gateway's own frames would use by default)."""
        return self._keys[max(self._keys)][0]


class LinkFrame(NamedTuple):
    """A parsed, not yet verified link frame."""

    alg: int
    network_id: bytes
    sender: bytes
    seq: int
    protected: bytes  # the protected header bstr (head + bytes), as received
    partial_iv: bytes
    ciphertext: bytes
    epoch: int = 0  # the network key epoch, from the kid context


def _nonce(keys: _SenderKeys, piv: bytes) -> bytes:
    return (keys.iv ^ int.from_bytes(piv, "big")).to_bytes(keys.nonce_len, "big")


def wrap(payload: bytes, *, network: NetworkKey, sender: bytes, seq: int) -> bytes:
    """Wrap `payload` for the network. `seq` comes from the sender's persistent link counter
    and must never repeat for (network, sender)."""
    if len(sender) != SENDER_ID_LEN:
        raise ConfigError(f"a sender id is {SENDER_ID_LEN} bytes")
    if not 0 <= seq <= MAX_SEQ:
        raise ConfigError(f"link seq must be between 0 and {MAX_SEQ}")
    piv = partial_iv(seq)
    protected = _bstr(cbor2.dumps({HDR_ALG: int(network.alg), HDR_KID: bytes(sender),
                                   HDR_PIV: piv, HDR_KID_CONTEXT: network.kid_context}))
    keys, cached = network.sender_keys(bytes(sender))
    if not cached:
        network.remember(sender, keys)
    ct = keys.aead.encrypt(_nonce(keys, piv), payload, _ENC0 + protected + _AAD)
    return b"\xd0\x83" + protected + b"\xa0" + _bstr(ct)


def _malformed(detail: str) -> Rejected:
    return Rejected(RejectReason.MALFORMED, f"link frame: {detail}")


def parse_frame(frame: bytes, *, mtu: int = DEFAULT_MTU) -> LinkFrame:
    """Read the frame's structure and header; nothing is verified yet.

    Raises Rejected: OVERSIZE over the MTU (checked first, before any decoding), MALFORMED for
    anything but exactly this structure in canonical form, UNSUPPORTED for another algorithm.
    """
    if len(frame) > mtu:
        raise Rejected(RejectReason.OVERSIZE, f"frame of {len(frame)} bytes > MTU {mtu}")
    if frame[:2] != b"\xd0\x83":
        raise _malformed("not a COSE_Encrypt0")
    p_start, p_end = _bstr_at(frame, 2)
    if frame[p_end:p_end + 1] != b"\xa0":
        raise _malformed("unprotected header must be empty")
    c_start, c_end = _bstr_at(frame, p_end + 1)
    if c_end != len(frame):
        raise _malformed("trailing bytes")
    raw = frame[p_start:p_end]
    try:
        hdr = cbor2.loads(raw)
    except Exception as exc:  # cbor2 raises several types; all mean the same here
        raise _malformed("header is not CBOR") from exc
    if type(hdr) is not dict or set(hdr) != _LABELS:
        raise _malformed("header must hold exactly labels 1, 4, 6, 10")
    alg, sender, piv, ctx = hdr[HDR_ALG], hdr[HDR_KID], hdr[HDR_PIV], hdr[HDR_KID_CONTEXT]
    # One encoding only: preferred serialization in the order wrap() writes (RFC 8949 4.2.1
    # deterministic order for these labels). Re-encoding in that order must give the bytes.
    if cbor2.dumps({HDR_ALG: alg, HDR_KID: sender, HDR_PIV: piv, HDR_KID_CONTEXT: ctx}) != raw:
        raise _malformed("header must be in preferred serialization, labels 1, 4, 6, 10")
    if type(alg) is not int:
        raise _malformed("alg is not an integer")
    if alg not in _ALG_INTS:
        raise Rejected(RejectReason.UNSUPPORTED, f"link alg {alg}")
    if type(sender) is not bytes or len(sender) != SENDER_ID_LEN:
        raise _malformed("sender id must be 12 bytes")
    if type(ctx) is not bytes or not NETWORK_ID_LEN <= len(ctx) <= NETWORK_ID_LEN + 4:
        raise _malformed("kid context must be a 12-byte network id and a 0-4 byte epoch")
    if len(ctx) > NETWORK_ID_LEN and ctx[NETWORK_ID_LEN] == 0:
        raise _malformed("key epoch must be in shortest form, epoch 0 absent")
    net, epoch = ctx[:NETWORK_ID_LEN], int.from_bytes(ctx[NETWORK_ID_LEN:], "big")
    if type(piv) is not bytes or not 1 <= len(piv) <= 5 or (len(piv) > 1 and piv[0] == 0):
        raise _malformed("Partial IV must be 1-5 bytes, shortest form")
    if c_end - c_start < _PARAMS[LinkAlg(alg)][1]:
        raise _malformed("ciphertext shorter than its tag")
    return LinkFrame(alg, net, sender, int.from_bytes(piv, "big"), frame[2:p_end], piv,
                     frame[c_start:c_end], epoch)


def open_frame(frame: LinkFrame, network: NetworkKey) -> bytes:
    """Verify and decrypt a parsed frame; Rejected(DECRYPT_FAILED) if it does not authenticate
    (no network key, a changed byte, another network, epoch or algorithm)."""
    if (frame.network_id != network.network_id or frame.epoch != network.epoch
            or frame.alg != network.alg):
        raise Rejected(RejectReason.DECRYPT_FAILED, "link frame not under this network key")
    keys, cached = network.sender_keys(frame.sender)
    try:
        payload = keys.aead.decrypt(_nonce(keys, frame.partial_iv), frame.ciphertext,
                                    _ENC0 + frame.protected + _AAD)
    except InvalidTag:
        raise Rejected(RejectReason.DECRYPT_FAILED, "link frame did not authenticate") from None
    if not cached:
        network.remember(frame.sender, keys)  # authentic: now worth caching
    return payload
