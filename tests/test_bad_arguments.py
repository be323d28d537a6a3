"""Every bad argument is one line and exit code 2, before anything is loaded or trained (issue: a typo in
`lvr.py --stage gpro` silently ran GRPO; `--steps -5` exported an untrained model; `--per-micro -3` crashed deep inside)."""
import pytest

from conftest import run_script

CASES = [
    ("lvr_grpo.py", ["--loss-type", "gpro"], "--loss-type: invalid choice: 'gpro'"),
    ("lvr.py", ["--steps", "-5"], "--steps must be ≥ 1 (got -5)"),
    ("lvr.py", ["--per-micro", "-3"], "--per-micro must be ≥ 1"),
    ("pearl.py", ["--per-micro", "0"], "--per-micro must be ≥ 1 (got 0)"),
    ("latent_pretrain.py", ["--per-micro", "0"], "--per-micro must be ≥ 1 (got 0)"),
    ("pearl.py", ["--lr", "-1"], "--lr must be > 0 (got -1.0)"),
    ("lvr.py", ["--data", "/nope/records.json"], "--data /nope/records.json: no such file"),
    ("pearl.py", ["--model", "/definitely/not/a/model"], "no such directory"),
    ("sft.py", ["--model", "runs/never/trained/export"], "no such directory"),
    ("latent_pretrain.py", ["--head", "transformer"], "argument --head: invalid choice: 'transformer'"),
    ("sft.py", ["--min-pixels", "9999999"], "need 0 < min ≤ max"),
    ("pearl.py", ["--no-such-flag"], "unrecognized arguments"),
]


@pytest.mark.parametrize("script,argv,message", CASES, ids=[f"{s}{' '.join(a)}" for s, a, _ in CASES])
def test_bad_argument_is_one_line_and_exit_2(script, argv, message, tmp_path):
    r = run_script(script, *argv, "--run-dir", tmp_path / "run", timeout=120, check=False)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(errors) == 1, r.stderr


def test_args_built_in_code_are_checked_too():
    import runtime as R
    import lvr_grpo
    with pytest.raises(SystemExit) as e:
        R.check_args(lvr_grpo.Args(loss_type="gpro", model="toy", data="toy"))
    assert e.value.code == 2


def test_empty_model_directory_is_named(tmp_path):
    import common as C
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no config.json"):
        C.check_model_name(str(tmp_path / "empty"))
    assert C.check_model_name("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"   # a hub id passes


@pytest.mark.parametrize("config,message", [("not json", "is not a JSON object"), ("[1, 2]", "is not a JSON object"),
                                            ('{"model_type": "llama"}', "model_type 'llama' is not Qwen2.5-VL")])
def test_garbage_model_directory_is_one_line(tmp_path, config, message):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(config)
    r = run_script("sft.py", "--model", tmp_path / "model", "--run-dir", tmp_path / "run", timeout=120, check=False)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
