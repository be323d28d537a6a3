"""The installed torch and transformers are the versions the suite was run with (constraints.txt). This is the test
that fails loudly, and first, when a fresh machine resolves a newer release: read its message, then the others."""
import pytest

import common as C


def test_installed_versions_are_in_the_tested_range():
    bad = C.untested_versions()
    assert not bad, ("UNTESTED PACKAGE VERSIONS: " + "; ".join(bad) +
                     ". Install the tested ones: pip install -r requirements.txt -c constraints.txt")


@pytest.mark.parametrize("installed,outside", [("5.24.0", False), ("5.24.3", False), ("5.25.0", True),
                                               ("5.23.9", True), ("6.0.0", True), ("4.57.1", True)])
def test_range_check_itself(monkeypatch, installed, outside):
    import importlib.metadata as md
    real = md.version
    monkeypatch.setattr(md, "version", lambda n: installed if n == "transformers" else real(n))
    assert any(b.startswith("transformers") for b in C.untested_versions()) == outside
