"""The glm-train job: SIGKILL + restart is bit-identical, checkpoints restore onto other meshes,
damaged checkpoints are skipped with a clear message, the resolved config and metrics are written."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from glm_jax.sharding import make_mesh
from glm_jax.training.checkpoint import Checkpointer, CheckpointError
from glm_jax.training.metrics import plot_loss, read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "pretrain" / "synthetic_tiny.py")
STEPS = 16


def _command(workdir, *overrides):
    return [sys.executable, "-m", "glm_jax.cli.train", f"--config={CONFIG}", f"--workdir={workdir}",
            f"--config.steps={STEPS}", "--config.checkpoint_every=4", *overrides]


def _env(cache_dir):
    """CPU, one device per process, and a shared persistent compilation cache: the runs compile the same
    programs, so only the first pays for compilation (the executable, hence the numbers, are the same)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _losses(workdir):
    if not (pathlib.Path(workdir) / "metrics.jsonl").is_file():
        return {}
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


def _wait_for(condition, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.05)


def test_sigkill_and_restart_reproduce_the_uninterrupted_losses(tmp_path):
    env = _env(tmp_path / "xla-cache")
    straight = tmp_path / "straight"
    subprocess.run(_command(straight), env=env, check=True, capture_output=True, timeout=300)
    expected = _losses(straight)
    assert sorted(expected) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: process.poll() is not None or (
            (killed / "checkpoints" / "4").is_dir() and max(_losses(killed), default=0) >= 6))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    interrupted_at = max(_losses(killed))
    assert 6 <= interrupted_at < STEPS, "the job was not killed mid-run"

    # Restart, then stop it with SIGTERM (preemption): it saves where it is and exits cleanly.
    process = subprocess.Popen(_command(killed), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _wait_for(lambda: max(_losses(killed)) > interrupted_at or process.poll() is not None)
    process.send_signal(signal.SIGTERM)
    stdout = process.communicate(timeout=120)[0]
    assert "resumed from step" in stdout
    assert process.returncode == 0 and "(preempted)" in stdout, stdout[-2000:]
    stopped = int(stdout.split("stopped at step ")[1].split()[0])
    assert stopped < STEPS and (killed / "checkpoints" / str(stopped)).is_dir()

    subprocess.run(_command(killed), env=env, check=True, capture_output=True, timeout=300)
    resumed = _losses(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in range(1, STEPS + 1)] == [expected[s] for s in range(1, STEPS + 1)]  # bit-identical

    config = json.loads((killed / "config.json").read_text())
    assert config["steps"] == STEPS and config["checkpoint_every"] == 4
    assert any(p.name.startswith("events") for p in (killed / "tensorboard").iterdir())
    png = plot_loss(str(killed), str(tmp_path / "loss.png"))
    assert pathlib.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _state(mesh, seed=0):
    from glm_jax.config import preset
    from glm_jax.modeling.transformer import GLMForCausalLM
    from glm_jax.training.optimizer import OptimizerConfig, make_optimizer
    from glm_jax.training.state import abstract_state, create_state

    model = GLMForCausalLM(preset("chatglm-tiny").replace(vocab_size=1408))
    tx, _ = make_optimizer(OptimizerConfig(warmup_steps=1, decay_steps=10))
    return create_state(model, tx, 32, mesh, seed), abstract_state(model, tx, 32, mesh)


def test_restore_onto_a_different_mesh(tmp_path):
    saved, _ = _state(make_mesh(1, 8, 1))
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(3, saved, {"loader": {"epoch": 1, "position": 2, "chunk": 0}})
    checkpointer.wait()
    target_mesh = make_mesh(2, 1, 4)
    _, abstract = _state(target_mesh, seed=1)
    step, restored, data = checkpointer.restore_latest(abstract)
    checkpointer.close()
    assert step == 3 and data == {"loader": {"epoch": 1, "position": 2, "chunk": 0}}
    for a, b, want in zip(jax.tree.leaves(saved), jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == want.sharding
    kernel = restored.params["layers"]["attention"]["query"]["kernel"]  # [layers, embed, heads, head_dim]
    assert kernel.sharding.mesh.shape == target_mesh.shape and kernel.addressable_shards[0].data.shape[2] == 1


def test_damaged_checkpoints_fall_back_to_the_previous_good_one(tmp_path, caplog):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, abstract = _state(mesh)
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False, keep=5)
    for step in (1, 2):
        checkpointer.save(step, state, {"loader": {"epoch": 0, "position": step, "chunk": 0}})
    checkpointer.wait()
    # step 2 loses its array data (as a partial copy or a full disk would leave it)
    for path in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
        if path.is_file() and "d" == path.parent.name:
            path.write_bytes(b"garbage")
    # a save interrupted before its rename, and a step directory that lost its contents
    (tmp_path / "ckpt" / "3.orbax-checkpoint-tmp-1234").mkdir()
    (tmp_path / "ckpt" / "3.orbax-checkpoint-tmp-1234" / "junk").write_bytes(b"x")
    (tmp_path / "ckpt" / "4").mkdir()
    checkpointer.close()
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False, keep=5)
    step, _, data = checkpointer.restore_latest(abstract)
    assert step == 1 and data["loader"]["position"] == 1
    assert "checkpoint step 2" in caplog.text and "corrupt or incomplete" in caplog.text
    assert 3 not in checkpointer.steps()
    checkpointer.close()

    for path in (tmp_path / "ckpt" / "1" / "state").rglob("*"):
        if path.is_file() and "d" == path.parent.name:
            path.write_bytes(b"garbage")
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        checkpointer.restore_latest(abstract)
    checkpointer.close()


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "pretrain").glob("*.py")))
def test_pretrain_configs_are_valid(name):
    import importlib.util

    from glm_jax.config import preset
    from glm_jax.data.blank_infilling import BlankInfillingConfig
    from glm_jax.training.loop import default_config
    from glm_jax.training.optimizer import OptimizerConfig
    from glm_jax.training.train_step import StepConfig

    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / "pretrain" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert set(config.keys()) == set(default_config().keys())
    preset(config.model.preset).replace(**dict(config.model.overrides))
    BlankInfillingConfig(**dict(config.objective))
    OptimizerConfig(**{**dict(config.optimizer), "decay_steps": config.steps})
    StepConfig(**dict(config.step))
    assert config.data.kind in ("text", "synthetic")
    if config.data.kind == "text" and config.data.path:
        assert pathlib.Path(config.data.path).is_file()
