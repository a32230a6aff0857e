"""The MQTT radio's topic layout, ACLs and option checks (no broker; the e2e test has one)."""

from __future__ import annotations

import os
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from gateway_world import World
from paho.mqtt.client import topic_matches_sub

from sensorseal.core.errors import ConfigError
from sensorseal.gateway.buffer import Buffer
from sensorseal.gateway.mqtt_radio import (
    DEFAULT_MAX_PACKET,
    MqttGatewayRadio,
    device_acls,
    downlink_topic,
    gateway_acls,
    uplink_filter,
    uplink_topic,
)
from sensorseal.gateway.run import run_gateway
from sensorseal.gateway.service import Gateway, GatewaySettings
from sensorseal.gateway.upstream import Upstream

NET, OTHER_NET = bytes.fromhex("aa" * 12), bytes.fromhex("bb" * 12)
A, B = bytes.fromhex("01" * 12), bytes.fromhex("02" * 12)


def test_topic_layout() -> None:
    assert uplink_topic(NET, A) == f"sensorseal-radio/{'aa' * 12}/up/{'01' * 12}"
    assert downlink_topic(NET, A, "site/7") == f"site/7/{'aa' * 12}/down/{'01' * 12}"
    assert uplink_filter(NET) == f"sensorseal-radio/{'aa' * 12}/up/+"
    # The gateway's filter takes every sender of its network and nothing else.
    assert topic_matches_sub(uplink_filter(NET), uplink_topic(NET, A))
    assert topic_matches_sub(uplink_filter(NET), uplink_topic(NET, B))
    assert not topic_matches_sub(uplink_filter(NET), downlink_topic(NET, A))
    assert not topic_matches_sub(uplink_filter(NET), uplink_topic(OTHER_NET, A))


@pytest.mark.parametrize("prefix", ["", "a/+", "#", "a/#", "$SYS", "/a", "a/", "a//b", "a b",
                                    "sensorseal-radio\x00"])
def test_prefix_must_be_plain_levels(prefix: str) -> None:
    with pytest.raises(ConfigError):
        uplink_topic(NET, A, prefix)


@pytest.mark.parametrize("bad", [b"", b"\x01" * 11, b"\x01" * 13])
def test_ids_must_be_12_bytes(bad: bytes) -> None:
    with pytest.raises(ConfigError):
        uplink_topic(bad, A)
    with pytest.raises(ConfigError):
        downlink_topic(NET, bad)


def test_device_acl_is_its_own_two_topics() -> None:
    acls = device_acls(NET, A)
    sends = [a.topic for a in acls if a.acltype == "publishClientSend"]
    subs = [a.topic for a in acls if a.acltype.startswith("subscribe")]
    assert sends == [uplink_topic(NET, A)]
    assert subs == [downlink_topic(NET, A)]
    # Literal subscriptions: no wildcard that would also read another device's acks.
    assert all(a.acltype != "subscribePattern" for a in acls)
    assert not any(topic_matches_sub(t, downlink_topic(NET, B)) for t in subs)


def test_gateway_acl_covers_its_networks_only() -> None:
    acls = gateway_acls([NET])
    sends = [a.topic for a in acls if a.acltype == "publishClientSend"]
    subs = [a.topic for a in acls if a.acltype == "subscribePattern"]
    assert all(topic_matches_sub(s, downlink_topic(NET, A)) for s in sends)
    assert not any(topic_matches_sub(s, downlink_topic(OTHER_NET, A)) for s in sends)
    assert not any(topic_matches_sub(s, uplink_topic(NET, A)) for s in sends)
    assert uplink_filter(NET) in subs and f"$share/+/{uplink_filter(NET)}" in subs


def _gateway(world: World, tmp_path: Path, mtu: int = 255) -> Gateway:
    net, _ = world.network()
    return Gateway(world.gateway([net]), Buffer(tmp_path / "buf.db"),
                   Upstream("http://127.0.0.1:9"), GatewaySettings(mtu=mtu))


def test_gateway_radio_options(world: World, tmp_path: Path) -> None:
    gw = _gateway(world, tmp_path)
    try:
        net = next(iter(gw.config.networks))
        radio = MqttGatewayRadio(gw, share_group="gws")
        assert radio.filters == [f"$share/gws/{uplink_filter(net)}"]
        assert radio.url == "mqtt://127.0.0.1:1883"
        with pytest.raises(ConfigError):  # shared subscriptions are MQTT 5
            MqttGatewayRadio(gw, share_group="gws", protocol=mqtt.MQTTv311)
        with pytest.raises(ConfigError):
            MqttGatewayRadio(gw, share_group="a/b")
        with pytest.raises(ConfigError):  # would hide oversized frames from the relay's count
            MqttGatewayRadio(gw, max_packet=gw.settings.mtu)
        with pytest.raises(ConfigError):
            MqttGatewayRadio(gw, topic_prefix="a/+")
    finally:
        gw.buffer.close()
        gw.upstream.close()


def test_max_packet_follows_a_large_mtu(world: World, tmp_path: Path) -> None:
    gw = _gateway(world, tmp_path, mtu=60_000)
    try:
        assert MqttGatewayRadio(gw)._max_packet == 120_000 > DEFAULT_MAX_PACKET
    finally:
        gw.buffer.close()
        gw.upstream.close()


def test_run_gateway_refuses_an_unknown_transport(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="transport"):
        run_gateway(tmp_path / "missing.json", tmp_path / "buf.db", "http://127.0.0.1:9",
                    transport="lora")
    with pytest.raises(ConfigError, match="CA file"):
        run_gateway(tmp_path / "missing.json", tmp_path / "buf.db", "http://127.0.0.1:9",
                    transport="mqtt", mqtt_ca=tmp_path / os.urandom(4).hex())
    with pytest.raises(ConfigError, match="CA"):
        run_gateway(tmp_path / "missing.json", tmp_path / "buf.db", "http://127.0.0.1:9",
                    transport="mqtt", mqtt_client_cert=tmp_path / "c.pem")
