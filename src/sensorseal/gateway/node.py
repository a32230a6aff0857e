"""The device side of the layers: build E1(E2(E3(payload))) frames and send them over the radio.

`LayeredDevice` composes, for a device in a network:

    mode e3     E1( E3 envelope, route /v1/gateway )
    mode e2     E1( E2 envelope(payload), route /e2/<network> )
    mode e2+e3  E1( E2 envelope( E3 envelope ) )

E3 uses the device's ordinary uplink keys; E2 the keys derived from its *gateway secret*; both
take their sequence numbers from the device's persistent uplink counter (different keys, so a
shared counter never repeats a (key, nonce) pair). E1 takes its numbers from a separate
persistent link counter per network, since the link key outlives device key epochs; it also
runs on across network key epochs (`rekey`), so the gateway's one window per (network, sender)
serves frames of the old and the new epoch alike. E1 frames carry the epoch of the
`NetworkKey` the device was given.

`UdpRadio` sends a frame to a gateway on loopback UDP and waits for the gateway's ack, itself
an E1 frame, so a stranger cannot fake an ack and make a device forget an unsent frame.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import cbor2

from sensorseal.core.envelope import seal
from sensorseal.core.errors import ConfigError, Rejected
from sensorseal.core.ids import Level
from sensorseal.core.keys import Alg
from sensorseal.core.layers import E3_ROUTE, Mode, e2_route, gateway_keys, gateway_secret
from sensorseal.core.link import NetworkKey, open_frame, parse_frame, wrap
from sensorseal.device.counter import SequenceCounter
from sensorseal.device.device import Device, wall_clock_ms

__all__ = ["LayeredDevice", "UdpRadio"]


class LayeredDevice:
    """A `Device` behind a gateway: wraps each payload in the layers of its mode."""

    def __init__(self, device: Device, network: NetworkKey, mode: Mode | str, *,
                 clock_ms: Callable[[], int] | None = wall_clock_ms) -> None:
        self.device = device
        self.network = network
        self.mode = Mode(mode)
        self._clock_ms = clock_ms
        cred = device.credential
        self._e2 = gateway_keys(gateway_secret(cred.secret, cred.device_id, cred.epoch),
                                cred.device_id, cred.epoch)
        path = Path(device.state_path).parent / \
            f"{cred.device_id}-link-{network.network_id.hex()}.seq"
        self.link_counter = SequenceCounter(path, create=not path.exists())

    @property
    def sender(self) -> bytes:
        return bytes(self.device.device_id)

    def rekey(self, network: NetworkKey) -> None:
        """Take the network's key of a newer epoch (after `network rotate`); frames built from
        now on use it. The link counter carries on, so no link sequence number repeats."""
        if network.network_id != self.network.network_id:
            raise ConfigError("rekey takes a key of the same network")
        if network.epoch <= self.network.epoch:
            raise ConfigError(f"network key epoch {network.epoch} is not newer than "
                              f"{self.network.epoch}")
        self.network = network

    def frame(self, payload: bytes) -> tuple[bytes, int]:
        """(frame, link seq): a new frame for `payload`. Resend the same bytes to retry."""
        if self.mode is Mode.E2:
            body = self._seal_e2(payload)
        else:
            body = self.device.seal(payload, route=E3_ROUTE)
            if self.mode is Mode.E2_E3:
                body = self._seal_e2(body)
        seq = self.link_counter.next()
        return wrap(body, network=self.network, sender=self.sender, seq=seq), seq

    def _seal_e2(self, payload: bytes) -> bytes:
        ts = None if self._clock_ms is None else self._clock_ms()
        return seal(payload, keys=self._e2, seq=self.device.counter.next(),
                    route=e2_route(self.network.network_id), timestamp_ms=ts,
                    level=Level.SEALED, alg=Alg.A256GCM)

    def close(self) -> None:
        self.link_counter.close()


class UdpRadio:
    """Loopback UDP standing in for the radio: send a frame, wait for its E1 ack."""

    def __init__(self, gateway: tuple[str, int], network: NetworkKey, *,
                 timeout_s: float = 0.3) -> None:
        self.gateway = gateway
        self.network = network
        self._keys = {network.epoch: network}  # acks come under the epoch of their frame
        self.timeout_s = timeout_s
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))

    def send(self, frame: bytes, sender: bytes, link_seq: int, *, attempts: int = 10) -> bool:
        """True once the gateway acked (the frame is durable there); False after `attempts`."""
        if attempts < 1:
            raise ConfigError("attempts must be at least 1")
        for _ in range(attempts):
            self._sock.sendto(frame, self.gateway)
            deadline = time.monotonic() + self.timeout_s
            while (left := deadline - time.monotonic()) > 0:
                self._sock.settimeout(left)
                try:
                    data, _ = self._sock.recvfrom(2048)
                except TimeoutError:
                    break
                if self._is_ack(data, sender, link_seq):
                    return True
        return False

    def rekey(self, network: NetworkKey) -> None:
        """Also accept acks under `network` (a newer epoch); frames sent under the old epoch
        are still acked under it."""
        self.network = network
        self._keys[network.epoch] = network

    def _is_ack(self, data: bytes, sender: bytes, link_seq: int) -> bool:
        try:
            frame = parse_frame(data, mtu=2048)
            key = self._keys.get(frame.epoch)
            if key is None:
                return False
            body = open_frame(frame, key)
            msg = cbor2.loads(body)
        except (Rejected, ValueError, cbor2.CBORDecodeError):
            return False
        return isinstance(msg, list) and msg == [0, bytes(sender), link_seq]

    def close(self) -> None:
        self._sock.close()
