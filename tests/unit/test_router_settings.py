"""Gateway settings: defaults, then a YAML file, then overrides; every bad name or value refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.settings import Settings, SettingsError, load


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvgate.yaml"
    path.write_text(text)
    return path


def test_defaults():
    settings = load()

    assert settings == Settings()
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8000)
    assert settings.routing.policy == "kv-aware"
    assert settings.routing.block_size == 128
    assert settings.routing.tokenizer is None
    assert settings.admission.max_inflight_per_pod == 64
    assert (settings.admission.input_weight, settings.admission.output_weight) == (1.0, 2.0)
    assert settings.discovery.worker_urls == ()


def test_each_load_gets_its_own_settings():
    first, second = load(), load()
    first.routing.policy = "random"

    assert second.routing.policy == "kv-aware"


def test_yaml_file_sets_values_with_their_types(tmp_path):
    path = write(
        tmp_path,
        """
server: {host: 0.0.0.0, port: 9000, api_keys: [k1, k2]}
discovery:
  worker_urls: [http://pod-a:8000, http://pod-b:8000]
  health_interval_s: 1
routing: {policy: "prefix-cache:2,least-request:1", tokenizer: ./model, block_size: 16}
admission: {max_inflight_per_pod: 8, max_queue: 100}
upstream: {retries: 0}
""",
    )

    settings = load(path)

    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 9000
    assert settings.server.api_keys == ("k1", "k2")
    assert settings.discovery.worker_urls == ("http://pod-a:8000", "http://pod-b:8000")
    assert settings.discovery.health_interval_s == 1.0
    assert isinstance(settings.discovery.health_interval_s, float)
    assert settings.routing.policy == "prefix-cache:2,least-request:1"
    assert settings.routing.tokenizer == Path("./model")
    assert settings.routing.block_size == 16
    assert (settings.admission.max_inflight_per_pod, settings.admission.max_queue) == (8, 100)
    assert settings.upstream.retries == 0
    assert settings.scrape == Settings().scrape  # groups the file leaves out keep their defaults


@pytest.mark.parametrize(
    "text", [pytest.param("", id="empty-file"), pytest.param("# nothing here\n", id="comments-only")]
)
def test_an_empty_file_gives_defaults(tmp_path, text):
    assert load(write(tmp_path, text)) == Settings()


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "server: {port: 9000, host: 0.0.0.0}\nrouting: {policy: random}\n")

    settings = load(path, {"server": {"port": 9100}, "routing": {"policy": "least-request"}})

    assert settings.server.port == 9100
    assert settings.server.host == "0.0.0.0"  # not overridden: the file's value stays
    assert settings.routing.policy == "least-request"


def test_overrides_apply_without_a_file():
    settings = load(None, {"admission": {"max_queue": 3}})

    assert settings.admission.max_queue == 3


@pytest.mark.parametrize(
    ("text", "group", "field", "value"),
    [
        pytest.param("discovery: {worker_urls: http://pod-a:8000}", "discovery", "worker_urls", ("http://pod-a:8000",), id="worker-urls"),
        pytest.param("server: {api_keys: secret}", "server", "api_keys", ("secret",), id="api-keys"),
    ],
)
def test_a_single_string_becomes_a_one_item_list(tmp_path, text, group, field, value):
    settings = load(write(tmp_path, text))

    assert getattr(getattr(settings, group), field) == value


def test_numbers_of_a_compatible_form_are_converted():
    settings = load(
        None,
        {"server": {"port": "9000"}, "scrape": {"interval_s": "0.25"}, "admission": {"max_queue": 16.0}},
    )

    assert (settings.server.port, settings.scrape.interval_s, settings.admission.max_queue) == (9000, 0.25, 16)
    assert isinstance(settings.admission.max_queue, int)


def test_the_decision_log_is_a_path_from_the_file_or_the_flag(tmp_path):
    from router.server import build_parser, settings_from_args

    config = tmp_path / "kvgate.yaml"
    config.write_text("routing: {decision_log: /var/log/kvgate/decisions.jsonl}\n")
    flagged = settings_from_args(build_parser().parse_args(["--config", str(config), "--decision-log", "d.jsonl"]))

    assert load(config).routing.decision_log == Path("/var/log/kvgate/decisions.jsonl")
    assert flagged.routing.decision_log == Path("d.jsonl")
    assert load(None).routing.decision_log is None


def test_tokenizer_can_be_unset():
    settings = load(None, {"routing": {"tokenizer": "./model"}})
    load_again = load(None, {"routing": {"tokenizer": None}})

    assert settings.routing.tokenizer == Path("./model")
    assert load_again.routing.tokenizer is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("gateway: {port: 1}", "unknown settings group 'gateway'", id="unknown-group"),
        pytest.param("server: {prot: 1}", "unknown setting server.prot", id="unknown-field"),
        pytest.param("routing: {imbalance: 3}", "unknown setting routing.imbalance", id="field-of-another-name"),
        pytest.param("server: {port: eighty}", "port: expected int", id="int-from-word"),
        pytest.param("server: {port: [1, 2]}", "port: expected int", id="int-from-list"),
        pytest.param("scrape: {interval_s: soon}", "interval_s: expected float", id="float-from-word"),
        pytest.param("admission: {max_inflight_per_pod: 0.5}", "max_inflight_per_pod: expected int", id="int-from-fraction"),
        pytest.param("server: {port: yes}", "port: expected int", id="int-from-yaml-bool"),
        pytest.param("server: {host: no}", "host: expected str", id="str-from-yaml-bool"),
        pytest.param("discovery: {worker_urls: 5}", "worker_urls: expected a list", id="list-from-number"),
        pytest.param("server: 8000", "server: expected a mapping", id="group-not-a-mapping"),
        pytest.param("- server\n- routing\n", "must hold a mapping", id="file-not-a-mapping"),
        pytest.param("server: {port: 1\n", "cannot read settings file", id="broken-yaml"),
    ],
)
def test_bad_files_are_refused(tmp_path, text, message):
    with pytest.raises(SettingsError, match=message):
        load(write(tmp_path, text))


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="cannot read settings file"):
        load(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"admission": {"max_queue": "lots"}}, id="bad-value"),
        pytest.param({"admission": {"max_queues": 1}}, id="unknown-field"),
        pytest.param({"limits": {}}, id="unknown-group"),
    ],
)
def test_bad_overrides_are_refused(overrides):
    with pytest.raises(SettingsError):
        load(None, overrides)


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)
