"""sensorseal.device: the device SDK.

`Device` seals uplink messages (with a crash-safe `SequenceCounter` behind the nonces) and opens
downlink ones; `HttpSender` posts the sealed bytes to the ingest server with bounded retries.
"""

from sensorseal.device.counter import SequenceCounter
from sensorseal.device.device import Device
from sensorseal.device.http import HttpSender, SendError, SendResult

__all__ = ["Device", "HttpSender", "SendError", "SendResult", "SequenceCounter"]
