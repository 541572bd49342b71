"""Token configuration: the authenticator's rules, the node's flags, the launcher's token file."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvcache.auth import CLUSTER, Authenticator, read_tenant_tokens, read_token_file, tenant_scope
from kvcache.errors import ConfigError
from kvcache.launch import cache_node_argv, connector_extra_config, write_token_file
from kvcache.metrics import StoreMetrics
from kvcache.node import _tokens, build_parser, parse_bytes
from kvcache.settings import CacheSettings
from kvcache.wiring import build_store

TOKEN = "t" * 32


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_each_token_stands_for_its_tenant() -> None:
    auth = Authenticator(TOKEN, {"alice": "a" * 20, "bob": "b" * 20})
    assert auth.caller(_bearer(TOKEN)) is CLUSTER
    alice = auth.caller(_bearer("a" * 20))
    assert alice is not None and alice.tenant == "alice" and alice.scope == tenant_scope("alice")
    assert auth.caller(_bearer("b" * 20)).tenant == "bob"  # type: ignore[union-attr]
    assert tenant_scope("alice") != tenant_scope("bob")
    for metadata in ([], _bearer(""), _bearer("a" * 19), _bearer("a" * 21), [("other", TOKEN)]):
        assert auth.caller(metadata) is None


def test_an_authenticator_without_tokens_is_open() -> None:
    auth = Authenticator()
    assert auth.open and auth.caller([]) is CLUSTER


@pytest.mark.parametrize(
    ("cluster", "tenants"),
    [
        pytest.param("short", {}, id="short-cluster-token"),
        pytest.param(TOKEN, {"a": "short"}, id="short-tenant-token"),
        pytest.param("", {"a": "a" * 20}, id="tenants-without-cluster-token"),
        pytest.param(TOKEN, {"a": TOKEN}, id="tenant-reuses-cluster-token"),
        pytest.param(TOKEN, {"a": "a" * 20, "b": "a" * 20}, id="two-tenants-one-token"),
    ],
)
def test_unsafe_token_sets_are_config_errors(cluster: str, tenants: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Authenticator(cluster, tenants)


def test_token_files(tmp_path: Path) -> None:
    (tmp_path / "t").write_text(f"  {TOKEN}\n")
    assert read_token_file(tmp_path / "t") == TOKEN
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "tenants").write_text("# tenants\nalice aaaaaaaaaaaaaaaaaaaa\n\nbob bbbbbbbbbbbbbbbbbbbb  # bob\n")
    assert read_tenant_tokens(tmp_path / "tenants") == {"alice": "a" * 20, "bob": "b" * 20}
    (tmp_path / "bad").write_text("alice\n")
    for call, path in ((read_token_file, "empty"), (read_token_file, "missing"), (read_tenant_tokens, "bad")):
        with pytest.raises(ConfigError):
            call(tmp_path / path)


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_a_node_on_a_public_interface_needs_a_token_or_an_explicit_waiver(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without a token"):
        _tokens(_args("--host", "0.0.0.0"), {})
    assert _tokens(_args("--host", "0.0.0.0", "--allow-unauthenticated"), {}) == ("", ())
    assert _tokens(_args("--host", "0.0.0.0"), {"KVGATE_CACHE_TOKEN": TOKEN}) == (TOKEN, ())
    assert _tokens(_args(), {}) == ("", ())  # loopback may stay open
    (tmp_path / "t").write_text(TOKEN)
    (tmp_path / "tenants").write_text("alice " + "a" * 20)
    token, tenants = _tokens(_args("--token-file", str(tmp_path / "t"), "--tenant-tokens-file", str(tmp_path / "tenants")), {})
    assert (token, tenants) == (TOKEN, (("alice", "a" * 20),))


@pytest.mark.parametrize("text", ["inf", "1e999", "nan", "-5", "", "lots"])
def test_bad_byte_counts_are_argument_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_the_launcher_writes_a_private_token_and_hands_its_path_to_nodes_and_engines(tmp_path: Path) -> None:
    token_file = write_token_file(tmp_path / "cache.token")
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    token = token_file.read_text()
    assert len(token) >= 32 and write_token_file(tmp_path / "again").read_text() != token
    argv = cache_node_argv(node_id="n0", ready_file=tmp_path / "r.json", token_file=token_file)
    assert token not in " ".join(argv)
    assert _args(*argv[4:]).token_file == token_file
    extra = connector_extra_config(peers=["n0=127.0.0.1:1"], token_file=token_file)
    assert token not in str(extra)
    settings = CacheSettings.from_mapping(extra)
    assert settings.l2.token_file == str(token_file)
    store = build_store(settings, metrics=StoreMetrics(CollectorRegistry()))
    assert store.tiers[1]._token == token  # type: ignore[attr-defined]
