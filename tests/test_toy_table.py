"""The miniature results table: its aggregation on fixed inputs, and `--quick` end to end (every row present)."""
import math

import pytest

import toy_table as T


def test_mean_std_and_standard_error_on_fixed_inputs():
    assert T.mean_std([50.0, 60.0, 70.0]) == (60.0, 10.0)          # sample std (n − 1): sqrt((100 + 0 + 100) / 2)
    assert T.mean_std([42.0]) == (42.0, None)                        # one seed: no spread to report
    assert T.binomial_se(50, 400) == pytest.approx(2.5)              # 100·sqrt(0.25 / 400)
    assert T.binomial_se(80, 100) == pytest.approx(4.0)
    assert T.binomial_se(0, 100) == 0 and math.isnan(T.binomial_se(50, 0))
    assert T.cell([50.0, 60.0, 70.0]) == "60.0 ± 10.0" and T.cell([42.0]) == "42.0"


def test_markdown_table_has_chance_in_the_header_and_every_row():
    meta = {"vstar": {"chance": 35.0, "n": 400, "unit": "items"}, "mmvp": {"chance": 25.0, "n": 200, "unit": "pairs"},
            "blink": {"chance": 33.3, "n": 400, "unit": "items"}}
    rows = {"base": {"vstar": [40.0], "mmvp": [25.0], "blink": [30.0]},
            "LVR, N = 8": {"vstar": [50.0, 52.0, 54.0], "mmvp": [30.0, 30.0, 30.0], "blink": []}}
    md = T.markdown(rows, meta).splitlines()
    assert md[0].startswith("| row | vstar (chance 35.0; n 400 items; SE at 50 % 2.5)")
    assert "mmvp (chance 25.0; n 200 pairs; SE at 50 % 3.5)" in md[0]
    assert md[2] == "| base | 40.0 | 25.0 | 30.0 |"
    assert md[3] == "| LVR, N = 8 | 52.0 ± 2.0 | 30.0 ± 0.0 | – |"


def test_quick_table_end_to_end(tmp_path):
    table = T.main(["--quick", "--out", str(tmp_path)])
    assert list(table) == T.ORDER                                    # every row, in order
    for row in table.values():
        assert all(len(v) == 1 and 0 <= v[0] <= 100 for v in row.values())
    md = (tmp_path / "toy_table.md").read_text()
    assert md.count("\n| ") == len(T.ORDER) and "chance" in md and "wall time" in md   # one line per row
    assert (tmp_path / "lvr_latent_steps.png").exists()
    for folder in T.TRAINING_RUNS:                                    # a loss-curve figure per training run
        assert (tmp_path / f"loss_{folder}.png").stat().st_size > 0, folder
    assert "ULR rows: the first 2 items" in md


def test_loss_curves_one_line_per_seed_one_panel_per_loss_term(tmp_path, monkeypatch):
    import json
    import matplotlib.axes
    for seed in (0, 1):
        d = tmp_path / f"seed{seed}" / "lvr"
        d.mkdir(parents=True)
        d.joinpath("metrics.jsonl").write_text("".join(
            json.dumps({"step": k, "loss": 3.0 - k, "loss_ce": 2.0 - k, "loss_lvr": 10.0 + seed, "lr": 1e-3}) + "\n"
            for k in (1, 2)))
    lines = []
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, x, y, **kw: lines.append((kw["label"], x, y)))
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", lambda ax, **kw: None)
    assert T.plot_loss_curves(tmp_path, [0, 1, 2]) == [tmp_path / "loss_lvr.png"]   # runs without logs: no figure
    assert lines == [("seed 0", [1, 2], [2.0, 1.0]), ("seed 1", [1, 2], [2.0, 1.0]),            # loss
                     ("seed 0", [1, 2], [1.0, 0.0]), ("seed 1", [1, 2], [1.0, 0.0]),            # loss_ce
                     ("seed 0", [1, 2], [10.0, 10.0]), ("seed 1", [1, 2], [11.0, 11.0])]        # loss_lvr; not lr
