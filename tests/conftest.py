"""Shared test fixtures: the toy backbones, the toy world, and one launcher for scripts run as subprocesses.

pytest.ini puts the repository root on sys.path (`pythonpath = .`), so tests import the project's files directly.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on now, for torchrun's rendezvous (no hard-coded ports: parallel runs never clash)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(path, *argv, nproc: int = 1, cwd=ROOT, timeout: int = 600, check: bool = True, env: dict | None = None):
    """Run a project script (`sft.py`, `lvr.py`, `toy_world.py`, ...) as a subprocess: with `python`, or under
    torchrun with `nproc` processes on a free port; one thread per process, offline. Returns the CompletedProcess; with
    check, a failure shows the end of its output."""
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  str(nproc), "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    r = subprocess.run(launch + [str(ROOT / path), *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(run_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def toy_world() -> Path:
    """The offline toy world (data/toy), built once and reused across the session."""
    from toy_world import ensure_toy_world
    return Path(ensure_toy_world(str(ROOT / "data/toy"), seed=0))


@pytest.fixture(scope="module")
def toy_bb():
    """The random-init toy Qwen2.5-VL backbone (a fresh copy per test module: tests may add tokens or train it)."""
    import common as C
    return C.load_backbone("toy")


@pytest.fixture(scope="module", params=["toy", "toy-qwen3vl"])
def toy_bb_both(request):
    """The toy backbone of each family (Qwen2.5-VL, Qwen3-VL)."""
    import common as C
    return C.load_backbone(request.param)
