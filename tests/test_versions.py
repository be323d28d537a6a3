"""The installed torch and transformers are the versions the suite was run with (constraints.txt). This is the test
that fails loudly, and first, when a fresh machine resolves a newer release: read its message, then the others."""
import pytest

import runtime as R


def test_installed_versions_are_in_the_tested_range():
    bad = R.untested_versions()
    assert not bad, ("UNTESTED PACKAGE VERSIONS: " + "; ".join(bad) +
                     ". Install the tested ones: pip install -r requirements.txt -c constraints.txt")


@pytest.mark.parametrize("installed,outside", [("5.24.0", False), ("5.24.3", False), ("5.25.0", True),
                                               ("5.23.9", True), ("6.0.0", True), ("4.57.1", True)])
def test_range_check_itself(monkeypatch, installed, outside):
    import importlib.metadata as md
    real = md.version
    monkeypatch.setattr(md, "version", lambda n: installed if n == "transformers" else real(n))
    assert any(b.startswith("transformers") for b in R.untested_versions()) == outside


def test_scripts_warn_once_at_start_up(monkeypatch, capsys):
    """parse_args (every script's start) prints one warning line naming the package outside the range, once."""
    import importlib.metadata as md
    from dataclasses import dataclass

    @dataclass
    class Args:
        steps: int = 1

    real = md.version
    monkeypatch.setattr(md, "version", lambda n: "5.30.0" if n == "transformers" else real(n))
    R.warn_untested_versions.cache_clear()
    R.parse_args(Args, [])
    R.parse_args(Args, ["--steps", "2"])
    lines = [x for x in capsys.readouterr().out.splitlines() if "untested package versions" in x]
    R.warn_untested_versions.cache_clear()
    assert len(lines) == 1 and "transformers 5.30.0 (tested >=5.24,<5.25)" in lines[0], lines
