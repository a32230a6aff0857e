"""The MQTT topic layout. Every topic names exactly one device, so a broker ACL can confine a
device to its own subtree and the envelope's route (the topic) binds a message to it.

    sensorseal/<id>/telemetry               device -> cloud   sealed (or signed per policy)
    sensorseal/<id>/state                   device -> cloud   signed (readable) or sealed
    sensorseal/<id>/commands                cloud -> device   sealed, downlink keys
    sensorseal/<id>/acks                    device -> cloud   sealed
    sensorseal/<id>/rpc/request             caller -> device  sealed JSON-RPC 2.0 request
    sensorseal/<id>/rpc/response/<req-id>   device -> caller  sealed JSON-RPC 2.0 response

`<id>` is the 24-hex device id. Ingest workers share `$share/<group>/sensorseal/+/telemetry`.
"""

from __future__ import annotations

import re

from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import DeviceId

__all__ = [
    "PREFIX",
    "acks",
    "commands",
    "device_of",
    "rpc_request",
    "rpc_response",
    "shared",
    "state",
    "telemetry",
]

PREFIX = "sensorseal"
_TOPIC = re.compile(r"sensorseal/([0-9a-f]{24})/(telemetry|state|commands|acks|rpc/request"
                    r"|rpc/response/[0-9a-f]{1,64})")
_REQ_ID = re.compile(r"[0-9a-f]{1,64}")


def telemetry(device_id: DeviceId) -> str:
    return f"{PREFIX}/{device_id.hex()}/telemetry"


def state(device_id: DeviceId) -> str:
    return f"{PREFIX}/{device_id.hex()}/state"


def commands(device_id: DeviceId) -> str:
    return f"{PREFIX}/{device_id.hex()}/commands"


def acks(device_id: DeviceId) -> str:
    return f"{PREFIX}/{device_id.hex()}/acks"


def rpc_request(device_id: DeviceId) -> str:
    return f"{PREFIX}/{device_id.hex()}/rpc/request"


def rpc_response(device_id: DeviceId, request_id: str) -> str:
    if not _REQ_ID.fullmatch(request_id):
        raise ValueError("request id must be 1-64 lowercase hex characters")
    return f"{PREFIX}/{device_id.hex()}/rpc/response/{request_id}"


def shared(group: str, kind: str = "telemetry") -> str:
    """An MQTT 5 shared subscription over every device's `kind` topic."""
    return f"$share/{group}/{PREFIX}/+/{kind}"


def device_of(topic: str) -> tuple[DeviceId, str]:
    """Split a received topic into (device id, kind). Anything off-layout (wildcards, odd
    characters, upper-case hex, extra levels) is refused as malformed."""
    m = _TOPIC.fullmatch(topic)
    if m is None:
        raise Rejected(RejectReason.MALFORMED, "topic outside the sensorseal layout")
    return DeviceId(bytes.fromhex(m.group(1))), m.group(2)
