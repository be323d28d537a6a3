"""bench/run_all.py: the one benchmark table. Formats only: no timing is asserted (speed is measured in bench/)."""
import json
import math
import re

from bench import run_all as RA
from conftest import run_script

HEADER = "| measurement | ratio (median) | spread (min–max) | repeats | what the ratio means |"


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_quick_run_prints_every_row_and_writes_provenance(tmp_path):
    out = tmp_path / "run_all.json"
    r = run_script("bench/run_all.py", "--quick", "--out", out, timeout=600)
    lines = [x for x in r.stdout.splitlines() if x.strip()]
    assert all(x.startswith("|") for x in lines), "stdout must be the table only"
    assert lines[0] == HEADER and lines[1] == "|---|---|---|---|---|"
    body = [cells(x) for x in lines[2:]]
    assert [c[0] for c in body] == [label for _, _, label, _ in RA.ROWS]     # every row, in order, none silent
    data = json.loads(out.read_text())
    by_label = {row["label"]: row for row in data["rows"]}
    for label, ratio, spread, repeats, meaning in body:
        assert meaning
        if ratio.startswith("skipped ("):
            assert ratio.endswith(")") and repeats == "0" and by_label[label]["status"] == "skipped"
            continue
        assert not ratio.startswith("error"), (label, ratio)
        value = float(ratio)
        assert math.isfinite(value), (label, ratio)        # a per-step difference of short times may be noise
        row = by_label[label]
        assert int(repeats) == row["repeats"] == len(row["values"]) >= 1       # --quick: one repeat each
        assert math.isclose(value, row["median"], rel_tol=6e-3)               # the table shows the JSON's median
        assert spread == "(one run)" or re.fullmatch(r"[0-9.e+-]+–[0-9.e+-]+", spread)
    skipped = {row["key"] for row in data["rows"] if row["status"] == "skipped"}
    assert skipped == {"pearl_naive", "decode_step_2048", "decode_call_2048"} | {
        k for k, m, _, _ in RA.ROWS if m == "memory"}                        # what --quick leaves out, and only that
    prov = data["provenance"]
    assert {"date", "machine", "torch", "transformers", "git_commit", "args"} <= set(prov)
    assert prov["args"]["quick"] is True and prov["machine"]["platform"]
    assert {"packing", "pearl", "lvr", "latent_pretrain", "decode", "ulr", "eval"} <= set(data["raw"])


def test_failed_row_is_one_line_and_the_others_still_run():
    cfg = RA.parse_args(["--quick"])

    def broken(cfg):
        raise ImportError("first line\nNo module named 'optional_thing'")

    def three(cfg):
        return {"pearl": [3.0, 1.0, 2.0], "pearl_naive": RA.Skip("not today")}, {}

    def skipped(cfg):
        raise RA.Skip("left out")

    rows, _ = RA.run_rows(cfg, {"packing": broken, "pearl": three, "eval": skipped})
    got = {r["key"]: cells(line) for r, line in zip(rows, RA.table(rows).splitlines()[2:])}
    assert set(got) == {"packing", "padding", "pearl", "pearl_naive", "eval"}
    assert got["packing"][1] == got["padding"][1] == "error: ImportError: No module named 'optional_thing'"
    assert got["pearl"][1:4] == ["2", "1–3", "3"]                            # median, min–max, repeats of 3, 1, 2
    assert got["pearl_naive"][1] == "skipped (not today)" and got["eval"][1] == "skipped (left out)"
    assert RA.exit_status(rows) == 0
    assert RA.exit_status([r for r in rows if r["status"] != "ok"]) == 1     # no number at all: a failed run
