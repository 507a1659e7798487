"""`kshot train --help` says what each setting may be and what it is by default (and in a preset)."""

from __future__ import annotations

import re

import pytest

from kshot.cli import main


def _help(capsys, *args: str) -> str:
    import os

    os.environ["COLUMNS"] = "2000"  # one line per option: no word broken at a hyphen
    try:
        with pytest.raises(SystemExit) as done:
            main(["train", *args, "--help"])
    finally:
        del os.environ["COLUMNS"]
    assert done.value.code == 0
    return re.sub(r"\s+", " ", capsys.readouterr().out)


def test_train_help_lists_choices_defaults_and_the_presets_values(capsys):
    from kshot.runs.build import algorithms

    text = _help(capsys)
    names = ", ".join(sorted(algorithms()))
    assert f"--algo STR meta-learning algorithm; one of {names} (default protonet)" in text
    assert "--backbone STR backbone network; one of conv4," in text and "(default conv4)" in text
    assert re.search(r"--dataset STR dataset name; one of .*banking77, clinc150, folder, .*miniimagenet, .*omniglot, "
                     r"sinusoid, table, or several joined by \+", text)
    assert "--steps INT outer steps (meta-batches) to train for (default 10000)" in text
    assert "--threads 1" in text
    text = _help(capsys, "--preset", "quick")
    assert "(default 10000; preset quick: 300)" in text and "values of --preset quick shown" in text


def test_help_shows_no_preset_of_an_earlier_command(capsys):
    """The preset of one call of main() does not leak into the help of the next (seen in the suite:
    a run with --preset melu-movielens-100k made every later `kshot train --help` show its values)."""
    assert "preset quick: 300" in _help(capsys, "--preset", "quick")
    text = _help(capsys)
    assert "preset quick" not in text and "values of --preset" not in text
