"""Two `glm-train` processes joined by `jax.distributed` on localhost train like one process."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np

from distributed_helpers import coordinator_address, run_processes
from glm_jax.training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "pretrain" / "synthetic_tiny.py")
STEPS = 5


def _command(workdir, *extra):
    return [sys.executable, "-m", "glm_jax.cli.train", f"--config={CONFIG}", f"--workdir={workdir}",
            f"--config.steps={STEPS}", "--config.checkpoint_every=100", "--config.mesh.data=-1",
            "--config.mesh.fsdp=1", *extra]


def _env(cache_dir):
    """CPU, one device per process, and a shared persistent compilation cache: the runs compile the same
    programs, so only the first pays for compilation (the executable, hence the numbers, are the same)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def test_two_processes_match_one(tmp_path):
    env = _env(tmp_path / "xla-cache")
    single = tmp_path / "single"
    subprocess.run(_command(single), env=env, check=True, capture_output=True, timeout=300)

    shared = tmp_path / "distributed"
    address = coordinator_address()
    outputs = run_processes(
        lambda i: _command(shared, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"), 2, env)
    assert "2 process(es)" in outputs[0] and "'data': 2" in outputs[0]

    expected = [r["loss"] for r in read_metrics(str(single))]
    got = [r["loss"] for r in read_metrics(str(shared))]
    assert len(got) == STEPS
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert (shared / "checkpoints" / str(STEPS)).is_dir()
