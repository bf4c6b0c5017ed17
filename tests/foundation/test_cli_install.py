"""What the CLI says when an install lacks what a command needs (the Docker image has no `dev`)."""

from __future__ import annotations

import importlib.util

import pytest

from banditgate import cli


def test_demo_without_its_training_libraries_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", "--quick"])
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["banditgate: error: the demo trains its models with sklearn, which this install lacks: "
                   "`pip install -c constraints.txt -e '.[dev,local]'` (see README.md)"]
