"""The README's reading-size table: each file's lines (`wc -l`) and code lines (docstrings, comments and blank lines
left out) at git revisions, side by side. Not a speed benchmark; it lives here with the other measuring scripts.

    python bench/line_counts.py                                   # the working tree
    python bench/line_counts.py --revs a476bfd,a5c68bc,HEAD       # the README's columns
"""
import argparse
import ast
import io
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["pearl.py", "lvr.py", "lvr_grpo.py", "latent_pretrain.py", "unsilence.py", "sft.py", "common.py",
         "dataloader.py", "runtime.py", "eval.py"]


def counts(src: str) -> tuple[int, int]:
    """(lines, code lines): a code line holds a token that is not a comment and not part of a docstring (the first
    string statement of a module, class or function)."""
    docstrings = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                    str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    code = {line for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type not in skip
            for line in range(tok.start[0], tok.end[0] + 1) if line not in docstrings}
    return len(src.splitlines()), len(code)


def source(path: str, rev: str) -> str | None:
    if rev == "work":
        p = ROOT / path
        return p.read_text() if p.exists() else None
    r = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--revs", default="work", help="comma-separated git revisions; 'work' = the working tree")
    p.add_argument("--files", default=",".join(FILES))
    a = p.parse_args()
    revs = a.revs.split(",")
    print("| file | " + " | ".join(f"lines {r}" for r in revs) + f" | code lines {revs[-1]} |")
    print("|---|" + "---|" * (len(revs) + 1))
    for f in a.files.split(","):
        cells = [counts(s) if (s := source(f, r)) is not None else None for r in revs]
        print(f"| `{f}` | " + " | ".join(str(c[0]) if c else "—" for c in cells) +
              f" | {cells[-1][1] if cells[-1] else '—'} |")


if __name__ == "__main__":
    main()
