"""Two `glm-convert` processes joined by `jax.distributed` on localhost (four CPU devices each, one
fsdp=8 mesh across both) write one checkpoint, each process reading and writing only its shards; it
holds exactly the params of the golden checkpoint and loads sharded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from glm_jax import load_pretrained


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_convert_one_checkpoint(golden6b, chatglm6b, tmp_path):
    dst = tmp_path / "ours"
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "checkpoints_convert.cli", f"--src={golden6b / 'checkpoint'}", f"--dst={dst}",
             "--mesh=1,8,1", "--progress=false", f"--coordinator_address={address}", "--num_processes=2",
             f"--process_id={i}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert not [p for p in tmp_path.iterdir() if p.name != "ours"]  # no staging directory left behind

    _, expected = chatglm6b
    _, params = load_pretrained(str(dst))
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
