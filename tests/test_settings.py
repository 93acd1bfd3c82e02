"""Settings: defaults, env vars, flags, and the env that reproduces them."""

from __future__ import annotations

import argparse

import pytest

from meshpush.settings import Settings, add_arguments, env_for, from_sources


def test_defaults_match_the_design() -> None:
    s = Settings(node_id="n")
    assert (s.lease_ttl, s.heartbeat_interval, s.heartbeat_timeout) == (3, 25.0, 60.0)
    assert s.max_msgs_per_user == 1000
    assert s.max_message_age == 7 * 24 * 3600
    assert s.ws_url == "ws://127.0.0.1:8800/ws"


def test_flags_beat_env_beat_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--lease-ttl", "5", "--api-keys", "a, b"])
    s = from_sources(args, {"MESHPUSH_LEASE_TTL": "9", "MESHPUSH_HEARTBEAT_TIMEOUT": "7.5"})
    assert s.lease_ttl == 5
    assert s.heartbeat_timeout == 7.5
    assert s.api_keys == ("a", "b")


def test_env_round_trip() -> None:
    s = Settings(node_id="x", api_keys=("k1", "k2"), ws_port=1234)
    assert from_sources(None, env_for(s)) == s


def test_bad_value_names_the_field() -> None:
    with pytest.raises(ValueError, match="lease_ttl"):
        from_sources(None, {"MESHPUSH_LEASE_TTL": "soon"})


def test_public_urls() -> None:
    s = Settings(node_id="x", ws_host="0.0.0.0", ws_port=1, http_host="::", http_port=2)
    assert s.ws_url == "ws://127.0.0.1:1/ws"
    assert s.http_url == "http://[::1]:2"
    assert Settings(node_id="x", public_ws_url="wss://a/ws").ws_url == "wss://a/ws"


def test_atomic_batches_is_a_switch_and_a_bad_value_names_it() -> None:
    assert from_sources(None, {}).atomic_batches is True
    assert from_sources(None, {"MESHPUSH_ATOMIC_BATCHES": "false"}).atomic_batches is False
    with pytest.raises(ValueError, match="atomic_batches"):
        from_sources(None, {"MESHPUSH_ATOMIC_BATCHES": "sometimes"})
