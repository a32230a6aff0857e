"""Shared MQTT test helpers: a private Mosquitto, the embedded broker in a thread, and a small
paho probe client that records what happened.

    sys.path.insert(0, str(Path(__file__).resolve().parents[N]))   # the tests/ folder
    import mqtt_support
    with mqtt_support.mosquitto(tmp_path, tls=True) as broker: ...

`mosquitto(tmp_path)` skips the test when the binary (or the dynsec plugin) is missing, except
under CI (env CI=true), where a missing broker is a setup bug and fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from sensorseal.mqtt.embedded import BrokerAuth, EmbeddedBroker
from sensorseal.mqtt.mosquitto import (
    MosquittoProcess,
    TlsFiles,
    find_binary,
    find_dynsec_plugin,
    free_port,
    install_hint,
    make_ca_and_cert,
)

__all__ = ["Probe", "TlsFiles", "embedded_broker", "free_port", "make_ca_and_cert",
           "mosquitto", "require_mosquitto"]


def require_mosquitto(*, dynsec: bool = True) -> None:
    """Skip (locally) or fail (CI=true) when Mosquitto or its dynsec plugin is missing."""
    missing = []
    if find_binary() is None:
        missing.append("the mosquitto binary")
    if dynsec and find_dynsec_plugin() is None:
        missing.append("mosquitto_dynamic_security.so")
    if not missing:
        return
    msg = f"{' and '.join(missing)} not found; install with: {install_hint()}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI must provide Mosquitto: " + msg)
    pytest.skip(msg)


@contextlib.contextmanager
def mosquitto(tmp_path: Path, tls: bool = False, **kwargs: Any) -> Iterator[MosquittoProcess]:
    """A running private Mosquitto (dynsec on, persistence off, free ports); stopped after."""
    require_mosquitto(dynsec=kwargs.get("dynsec", True))
    proc = MosquittoProcess(tmp_path / f"mosquitto-{free_port()}", tls=tls, **kwargs)
    with proc:
        yield proc


@contextlib.contextmanager
def embedded_broker(auth: BrokerAuth, **kwargs: Any) -> Iterator[EmbeddedBroker]:
    """The amqtt broker on its own event loop in a daemon thread, so sync tests can use it.
    `.port` is the real port. Use `call(broker.disconnect_user(...))` style via `.loop`."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="embedded-broker", daemon=True)
    thread.start()
    broker = EmbeddedBroker(auth, **kwargs)
    try:
        asyncio.run_coroutine_threadsafe(broker.start(), loop).result(10)
        broker.loop = loop  # type: ignore[attr-defined]
        yield broker
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(broker.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@dataclass(eq=False)
class Probe:
    """A paho 2.x client that records connects, disconnects, SUBACKs, PUBACKs and messages.

    `Probe.connect(...)` returns once CONNACK arrived (or raises TimeoutError); `.refused` tells
    whether the broker said no. Automatic reconnects are off, so a kick stays visible."""

    client: mqtt.Client
    connect_rc: Any = None
    disconnected: threading.Event = field(default_factory=threading.Event)
    disconnect_rc: Any = None
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    subacks: dict[int, list[Any]] = field(default_factory=dict)
    pubacks: dict[int, Any] = field(default_factory=dict)
    on_message_hook: Callable[[mqtt.MQTTMessage], None] | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def connect(cls, host: str, port: int, username: str | None, password: str | None, *,
                protocol: int = mqtt.MQTTv5, ca_cert: Path | None = None,
                client_id: str = "", clean: bool = True, timeout: float = 5.0,
                inflight: int = 100) -> Probe:
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        client = mqtt.Client(CallbackAPIVersion.VERSION2, **kwargs)
        probe = cls(client)
        if username is not None:
            client.username_pw_set(username, password)
        if ca_cert is not None:
            ctx = ssl.create_default_context(cafile=str(ca_cert))
            client.tls_set_context(ctx)
        client.max_inflight_messages_set(inflight)
        # No automatic reconnect (the delay outlives any test): a kick stays visible, and a
        # refused publish is not re-sent on a new connection.
        client.reconnect_delay_set(min_delay=3600, max_delay=3600)
        client.max_queued_messages_set(0)
        client.on_connect = probe._on_connect
        client.on_disconnect = probe._on_disconnect
        client.on_subscribe = probe._on_subscribe
        client.on_publish = probe._on_publish
        client.on_message = probe._on_message
        client.connect(host, port, keepalive=30)
        client.loop_start()
        if not probe.wait(lambda: probe.connect_rc is not None or probe.disconnected.is_set(),
                          timeout):
            probe.close()
            raise TimeoutError("no CONNACK")
        if probe.refused:
            probe.close()
        return probe

    # callbacks (paho network thread)
    def _on_connect(self, c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        with self._cond:
            self.connect_rc = rc
            self._cond.notify_all()
        if rc.is_failure:
            c.disconnect()  # stop paho from retrying with the refused credentials

    def _on_disconnect(self, c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        with self._cond:
            self.disconnect_rc = rc
            self.disconnected.set()
            self._cond.notify_all()

    def _on_subscribe(self, c: mqtt.Client, u: Any, mid: int, rcs: list[Any], p: Any) -> None:
        with self._cond:
            self.subacks[mid] = rcs
            self._cond.notify_all()

    def _on_publish(self, c: mqtt.Client, u: Any, mid: int, rc: Any, p: Any) -> None:
        with self._cond:
            self.pubacks[mid] = rc
            self._cond.notify_all()

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        if self.on_message_hook is not None:
            self.on_message_hook(msg)
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    # helpers
    @property
    def refused(self) -> bool:
        return self.connect_rc is None or bool(self.connect_rc.is_failure)

    def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> bool:
        """True if the broker granted the subscription."""
        _rc, mid = self.client.subscribe(topic, qos)
        assert self.wait(lambda: mid in self.subacks, timeout), "no SUBACK"
        return all(not rc.is_failure for rc in self.subacks[mid])

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        return self.client.publish(topic, payload, qos).mid

    def wait_acked(self, mids: list[int], timeout: float = 10.0) -> bool:
        return self.wait(lambda: all(m in self.pubacks for m in mids), timeout)

    def publish_outcome(self, topic: str, payload: bytes, timeout: float = 5.0) -> str:
        """Publish at QoS 1 and say what the broker did: "acked", "refused" (a PUBACK with a
        failure code, MQTT 5) or "disconnected" (Mosquitto 2.0 may drop a client that
        publishes outside every ACL instead of answering)."""
        mid = self.publish(topic, payload, 1)
        assert self.wait(lambda: mid in self.pubacks or self.disconnected.is_set(), timeout)
        if mid in self.pubacks:
            return "refused" if self.pubacks[mid].is_failure else "acked"
        return "disconnected"

    def topics_seen(self) -> list[str]:
        with self._cond:
            return [t for t, _ in self.messages]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def settle(seconds: float = 0.3) -> None:
    """Give the broker a moment to route (used only to prove that something did NOT arrive)."""
    time.sleep(seconds)
