"""Config files and settings are untrusted input: each bad one is one ConfigError line.

The defects: a 521-byte YAML alias bomb hung training at 1.8 GB; ``ways: true`` trained 1-way
and reported 100 %; ``"flase"`` was read as false; a non-UTF-8 file, ``seed: 2**70``, ``--lr nan``
and an ``extra`` key naming a setting gave tracebacks.
"""

from __future__ import annotations

import time

import pytest

from kshot.config import TrainConfig, resolve_config
from kshot.errors import ConfigError


def _refused(path, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as error:
        resolve_config(file=path)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    lines.append("extra: {x: *i}")  # kept, and written out into config.json, it was 387 million strings
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert len(bomb.read_bytes()) < 600  # 9**9 = 387 million strings once expanded
    start = time.perf_counter()
    _refused(bomb, "alias")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("text, match", [
    ("ways: true\n", "ways must be of type int"),               # a bool is not an int
    ("test_within_groups: flase\n", "must be of type bool \\(true or false\\)"),     # nor is a typo a bool
    ("seed: 1180591620717411303424\n", "below 2\\*\\*63"),        # 2**70
    ("lr: .nan\n", "lr must be of type float \\(a finite number\\)"),
    ("steps: 12.5\n", "steps must be of type int"),
    ("dataset: 5\n", "dataset must be of type str"),
    ("extra: {cache_dir: /elsewhere}\n", "extra.cache_dir repeats the setting"),
    ("- ways\n- 5\n", "must hold a mapping"),
])
def test_each_malformed_setting_in_a_file_is_one_line(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    _refused(path, match)


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes("ways = 5\n# caf\xe9\n".encode("latin-1"))
    _refused(path, "not UTF-8")


def test_settings_given_in_python_or_on_the_command_line_are_held_to_the_same_types():
    with pytest.raises(ConfigError, match="lr must be of type float \\(a finite number\\)"):
        resolve_config(overrides={"lr": float("nan")})
    with pytest.raises(ConfigError, match="ways must be of type int"):
        TrainConfig(ways=True).validate()
    assert resolve_config(overrides={"test_within_groups": "yes", "lr": 2}).lr == 2.0  # words and ints still fine
