"""Values in the connector's JSON: strings parsed as the field's type says, mistakes refused as ConfigError."""

from __future__ import annotations

from typing import Any

import pytest

from kvcache.errors import ConfigError
from kvcache.settings import CacheSettings


@pytest.mark.parametrize(
    ("section", "name", "given", "expected"),
    [
        pytest.param("l3", "fsync", "false", False, id="bool-string-false"),
        pytest.param("l3", "fsync", "False", False, id="bool-string-False"),
        pytest.param("l3", "fsync", "0", False, id="bool-string-0"),
        pytest.param("l3", "fsync", "no", False, id="bool-string-no"),
        pytest.param("l3", "fsync", "true", True, id="bool-string-true"),
        pytest.param("l3", "fsync", " on ", True, id="bool-string-on"),
        pytest.param("l3", "fsync", True, True, id="bool-json"),
        pytest.param("l3", "fsync", 0, False, id="bool-int-0"),
        pytest.param("l1", "capacity_bytes", "1048576", 1048576, id="int-string"),
        pytest.param("l1", "capacity_bytes", 2048.0, 2048, id="int-whole-float"),
        pytest.param("l2", "replicas", 2, 2, id="int-json"),
        pytest.param("l2", "timeout_s", "0.25", 0.25, id="float-string"),
        pytest.param("l2", "timeout_s", 3, 3.0, id="float-int"),
        pytest.param("l3", "ttl_s", None, None, id="optional-null"),
        pytest.param("l3", "ttl_s", "60", 60.0, id="optional-float-string"),
        pytest.param("l3", "kind", "redis", "redis", id="literal"),
        pytest.param("l2", "peers", "a=127.0.0.1:1, b=127.0.0.1:2", ("a=127.0.0.1:1", "b=127.0.0.1:2"), id="list-string"),
        pytest.param("l2", "peers", ["a=127.0.0.1:1"], ("a=127.0.0.1:1",), id="list"),
        pytest.param("l2", "membership_url", None, None, id="optional-str-null"),
    ],
)
def test_values_are_parsed_by_type(section: str, name: str, given: Any, expected: Any) -> None:
    settings = CacheSettings.from_mapping({section: {name: given}})
    value = getattr(getattr(settings, section), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("section", "name", "given"),
    [
        pytest.param("l3", "fsync", "maybe", id="bool-word"),
        pytest.param("l3", "fsync", 2, id="bool-int-2"),
        pytest.param("l3", "fsync", [], id="bool-list"),
        pytest.param("l1", "capacity_bytes", "lots", id="int-word"),
        pytest.param("l1", "capacity_bytes", "1.5", id="int-fraction-string"),
        pytest.param("l1", "capacity_bytes", 1.5, id="int-fraction"),
        pytest.param("l1", "capacity_bytes", True, id="int-bool"),
        pytest.param("l1", "capacity_bytes", -1, id="int-negative"),
        pytest.param("l1", "capacity_bytes", None, id="int-null"),
        pytest.param("l1", "capacity_bytes", {"a": 1}, id="int-object"),
        pytest.param("l2", "timeout_s", "soon", id="float-word"),
        pytest.param("l2", "timeout_s", "nan", id="float-nan"),
        pytest.param("l2", "timeout_s", "inf", id="float-inf"),
        pytest.param("l2", "timeout_s", "1e999", id="float-overflow"),
        pytest.param("l2", "timeout_s", -0.5, id="float-negative"),
        pytest.param("l2", "timeout_s", False, id="float-bool"),
        pytest.param("l3", "kind", "s3", id="literal-unknown"),
        pytest.param("l3", "unbounded", "ignore", id="literal-unknown-2"),
        pytest.param("l2", "peers", 5, id="list-int"),
        pytest.param("l2", "peers", [1, 2], id="list-of-ints"),
        pytest.param("l1", "policy", 3, id="str-int"),
    ],
)
def test_bad_values_are_config_errors(section: str, name: str, given: Any) -> None:
    with pytest.raises(ConfigError, match=f"{section}.{name}"):
        CacheSettings.from_mapping({section: {name: given}})


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("{", id="not-json"),
        pytest.param("[1, 2]", id="json-array"),
        pytest.param('"l1"', id="json-string"),
        pytest.param(b"\xff", id="not-utf8"),
    ],
)
def test_extra_config_text_that_is_not_an_object_is_a_config_error(text: str | bytes) -> None:
    with pytest.raises(ConfigError):
        CacheSettings.from_mapping(text)


def test_extra_config_json_text_is_parsed() -> None:
    settings = CacheSettings.from_mapping('{"l1": {"capacity_bytes": "4096"}, "l3": {"fsync": "false"}}')
    assert settings.l1.capacity_bytes == 4096
    assert settings.l3.fsync is False
