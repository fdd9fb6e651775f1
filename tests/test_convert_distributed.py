"""Two `glm-convert` processes joined by `jax.distributed` on localhost (four CPU devices each, one
fsdp=8 mesh across both) write one checkpoint, each process reading and writing only its shards; it
holds exactly the params of the golden checkpoint and loads sharded."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from glm_jax import load_pretrained
from distributed_helpers import coordinator_address, run_processes


def test_two_processes_convert_one_checkpoint(golden6b, chatglm6b, tmp_path):
    dst = tmp_path / "ours"
    address = coordinator_address()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    run_processes(lambda i: [
        sys.executable, "-m", "checkpoints_convert.cli", f"--src={golden6b / 'checkpoint'}", f"--dst={dst}",
        "--mesh=1,8,1", "--progress=false", f"--coordinator_address={address}", "--num_processes=2",
        f"--process_id={i}"], 2, env)
    assert not [p for p in tmp_path.iterdir() if p.name != "ours"]  # no staging directory left behind

    _, expected = chatglm6b
    _, params = load_pretrained(str(dst))
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
