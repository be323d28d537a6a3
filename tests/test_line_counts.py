"""bench/line_counts.py (the README's reading-size table) on a hand-counted file."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("line_counts", Path(__file__).resolve().parents[1] / "bench/line_counts.py")
line_counts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(line_counts)

SRC = '''"""Module docstring,
two lines."""
import os  # a trailing comment does not make a line less code

# a comment line


def f(x):
    """One-line docstring."""
    s = """a string that is not a docstring
spans two lines"""
    return (x +
            1)
'''


def test_counts_leave_out_docstrings_comments_and_blank_lines():
    lines, code = line_counts.counts(SRC)
    assert lines == 13
    assert code == 6     # import os; def f; s = ... (2 lines); return (2 lines)
