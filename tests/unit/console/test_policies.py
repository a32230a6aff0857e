"""Policies as data: presets, strictest-wins resolution, and enforcement at ingest."""

from __future__ import annotations

import pytest
from console_helpers import T0, Env, login, page_csrf, sealed

from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import Level
from sensorseal.operators import Role
from sensorseal.policies import BUILTIN, PolicySpec, meet


def test_presets_from_lax_to_critical() -> None:
    assert {"lax", "standard", "stringent", "weather-station", "industrial-controller",
            "critical-site"} <= set(BUILTIN)
    critical = BUILTIN["critical-site"]
    assert critical.layers == {"E1", "E2", "E3", "E4"} and critical.require_hardware_keys
    assert Level.SIGNED in BUILTIN["weather-station"].levels


def test_meet_is_the_strictest_of_each_rule() -> None:
    a = PolicySpec("a", levels=frozenset({Level.SIGNED, Level.SEALED}), max_skew_s=60)
    b = PolicySpec("b", levels=frozenset({Level.SEALED}), require_tls=True, replay_window=16)
    m = meet([a, b])
    assert m.levels == {Level.SEALED} and m.max_skew_s == 60 and m.require_tls
    assert m.replay_window == 16 and m.name == "a+b"
    # one that dominates every rule wins under its own name
    assert meet([BUILTIN["lax"], BUILTIN["critical-site"]]).name == "critical-site"
    with pytest.raises(Rejected) as exc:
        meet([PolicySpec("s", levels=frozenset({Level.SIGNED})), b])
    assert exc.value.reason is RejectReason.POLICY_VIOLATION


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "Bad Name"}, "policy name"),
    ({"name": "p", "levels": []}, "at least one level"),
    ({"name": "p", "levels": ["plain"]}, "levels are"),
    ({"name": "p", "max_skew_s": 0}, "clock skew"),
    ({"name": "p", "replay_window": 99999}, "replay window"),
    ({"name": "p", "layers": ["E9"]}, "layers"),
    ({"name": "p", "require_tls": "yes"}, "true or false"),
    ({"name": "p", "colour": "red"}, "unknown policy field"),
])
def test_spec_validation_messages(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PolicySpec.from_mapping(data)


def test_json_round_trip() -> None:
    spec = BUILTIN["critical-site"]
    again = PolicySpec.from_json(spec.to_json())
    assert again.rules() == spec.rules()


def test_network_policy_is_enforced_at_ingest(env: Env) -> None:
    cred = env.device("d", "A")
    # the device's own policy (standard) accepts a sealed message without a timestamp
    assert env.pipeline.ingest([(sealed(cred, 1, timestamp_ms=None), "/v1/messages")],
                               transport="test", source="t")[0].ok
    env.console.policies.attach("network", "", "stringent", actor="test")
    env.clock.now_ms += 2_000  # past the pipeline's status TTL and the policy cache
    [r] = env.pipeline.ingest([(sealed(cred, 2, timestamp_ms=None), "/v1/messages")],
                              transport="test", source="t")
    assert not r.ok and r.reason is RejectReason.POLICY_VIOLATION
    detail = env.store.events(reason="policy_violation", limit=1)[0].detail
    assert "requires a timestamp" in detail
    # a lax device policy cannot loosen it
    env.console.policies.set_device_policy(cred.device_id, "lax", actor="test")
    env.clock.now_ms += 2_000
    [r] = env.pipeline.ingest([(sealed(cred, 3, timestamp_ms=None), "/v1/messages")],
                              transport="test", source="t")
    assert r.reason is RejectReason.POLICY_VIOLATION
    [r] = env.pipeline.ingest([(sealed(cred, 4, timestamp_ms=env.clock.now_ms),
                                "/v1/messages")], transport="test", source="t")
    assert r.ok


def test_group_policy_applies_to_its_group_only(env: Env) -> None:
    a, b = env.device("a", "A"), env.device("b", "B")
    env.console.policies.save(PolicySpec("sealed-only-fresh", max_skew_s=30,
                                         require_timestamp=True), actor="test")
    env.console.policies.attach("group", "A", "sealed-only-fresh", actor="test")
    old = T0 - 120_000
    [ra, rb] = env.pipeline.ingest([(sealed(a, 1, timestamp_ms=old), "/v1/messages"),
                                    (sealed(b, 1, timestamp_ms=old), "/v1/messages")],
                                   transport="test", source="t")
    assert ra.reason is RejectReason.STALE and rb.ok
    signed = sealed(b, 2, level=Level.SIGNED)
    assert env.pipeline.ingest([(signed, "/v1/messages")], transport="t", source="t")[0].reason \
        is RejectReason.POLICY_VIOLATION  # standard: sealed only


def test_unknown_policy_refuses_rather_than_guess(env: Env) -> None:
    cred = env.device("d")
    env.store.set_device_policy(cred.device_id, "gone")
    env.console.policies.refresh()
    [r] = env.pipeline.ingest([(sealed(cred, 1), "/v1/messages")], transport="t", source="t")
    assert r.reason is RejectReason.POLICY_VIOLATION


def test_builtins_are_read_only_and_attached_ones_kept(env: Env) -> None:
    with pytest.raises(ConfigError, match="built-in"):
        env.console.policies.save(PolicySpec("standard"), actor="t")
    env.console.policies.save(PolicySpec("mine"), actor="t")
    env.console.policies.attach("group", "A", "mine", actor="t")
    with pytest.raises(ConfigError, match="detach it first"):
        env.console.policies.delete("mine", actor="t")


def test_policy_editor_form(env: Env) -> None:
    env.add_operator("root", Role.ADMIN)
    c = login(env.new_client(), "root")
    csrf = page_csrf(c, "/console/policies")
    r = c.post("/console/policies/save", data={
        "csrf": csrf, "name": "greenhouse", "description": "<b>glass</b>",
        "levels": ["sealed", "signed"], "max_skew_s": "90", "replay_window": "128",
        "require_tls": "on", "layers": ["E3", "E4"]})
    assert r.status_code == 303
    spec = env.console.policies.get("greenhouse")
    assert spec is not None and spec.max_skew_s == 90 and spec.require_tls
    assert spec.levels == {Level.SEALED, Level.SIGNED} and spec.layers == {"E3", "E4"}
    page = c.get("/console/policies").text
    assert "&lt;b&gt;glass&lt;/b&gt;" in page and "<b>glass</b>" not in page
    r = c.post("/console/policies/save", data={"csrf": csrf, "name": "x",
                                               "max_skew_s": "soon"})
    assert r.status_code == 400 and "clock skew must be a whole number" in r.text
    r = c.post("/console/policies/attach", data={"csrf": csrf, "kind": "group",
                                                 "target": "A", "policy": "greenhouse"})
    assert r.status_code == 303
    assert env.console.policies.attachments()[("group", "A")] == "greenhouse"
