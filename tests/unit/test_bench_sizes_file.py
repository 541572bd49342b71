"""`kvgate bench --sizes FILE`: a TOML file changes the named fields of the workloads' sizes, and only those."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgate.bench import config as presets
from kvgate.bench.cli import main
from kvgate.bench.sizes_file import SizesError, apply_sizes, load_sizes
from kvgate.bench.workloads import build_workload
from tests.support.word_encoder import WordEncoder

BASE = presets.full().sizes


def test_named_fields_change_and_every_other_keeps_the_preset_s_value(tmp_path: Path):
    path = tmp_path / "sizes.toml"
    path.write_text("max_model_len = 2048\n\n[mixed]\ngroups = 24\none_offs = 0\n\n[shared-prefix]\nclients = 3\n")

    sizes = load_sizes(path, BASE)

    assert sizes.max_model_len == 2048
    assert (sizes.mixed.groups, sizes.mixed.one_offs) == (24, 0)
    assert sizes.mixed.prefix_tokens == BASE.mixed.prefix_tokens
    assert sizes.shared_prefix.clients == 3
    assert sizes.shared_prefix.groups == BASE.shared_prefix.groups
    assert sizes.multi_turn == BASE.multi_turn


def test_a_changed_size_reaches_the_trace():
    sizes = apply_sizes({"mixed": {"groups": 3, "requests": 9, "one_offs": 2, "prefix_tokens": 40}}, BASE)

    trace = build_workload("mixed", sizes, 1, WordEncoder())

    users = {session.user for session in trace.sessions}
    assert {user for user in users if user.startswith("desk-")} == {"desk-00", "desk-01", "desk-02"}
    assert len(trace.sessions) == 9 + 2


def test_tables_are_named_as_on_the_command_line_or_as_the_fields():
    assert apply_sizes({"skewed_users": {"duration_s": 5}}, BASE).skewed_users.duration_s == 5.0
    assert apply_sizes({"skewed-users": {"duration_s": 2.5}}, BASE).skewed_users.duration_s == 2.5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mixd": {"groups": 2}}, "no workload 'mixd'"),
        ({"mixed": {"group": 2}}, "[mixed] has no field 'group'"),
        ({"mixed": 3}, "[mixed] must be a table"),
        ({"mixed": {"groups": 2.5}}, "mixed.groups must be a whole number"),
        ({"mixed": {"groups": True}}, "mixed.groups must be a number"),
        ({"mixed": {"groups": "ten"}}, "mixed.groups must be a whole number"),
        ({"mixed": {"groups": 0}}, "mixed.groups must be at least 1"),
        ({"mixed": {"one_offs": -1}}, "mixed.one_offs must be at least 0"),
        ({"skewed-users": {"duration_s": 0}}, "skewed-users.duration_s must be above 0"),
        ({"max_model_len": 0}, "max_model_len must be at least 1"),
    ],
)
def test_what_the_specs_do_not_have_is_refused_by_name(data, message):
    with pytest.raises(SizesError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        apply_sizes(data, BASE)


def test_a_missing_or_broken_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(SizesError, match="cannot read"):
        load_sizes(tmp_path / "absent.toml", BASE)
    broken = tmp_path / "broken.toml"
    broken.write_text("[mixed\ngroups = 2\n")
    with pytest.raises(SizesError, match="is not TOML"):
        load_sizes(broken, BASE)


def test_the_command_line_refuses_a_bad_sizes_file_before_starting_anything(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sizes.toml"
    path.write_text("[mixed]\ngroups = 0\n")

    with pytest.raises(SystemExit) as exit_:
        main(["--sizes", str(path), "--workloads", "mixed", "--routers", "none", "--overhead-routers", "none"])

    assert exit_.value.code == 2
    assert "mixed.groups must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
