"""Training metrics: throughput / MFU arithmetic and writers (stdout, JSONL, TensorBoard), loss plot.

`metrics.jsonl` in the workdir is the machine-readable record (one JSON object per logged step);
TensorBoard event files go to `workdir/tensorboard`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.config import GLMConfig

METRICS_FILE = "metrics.jsonl"


def train_flops_per_token(config: GLMConfig, seq_len: int) -> float:
    """Matmul FLOPs of one trained token: 6 × (matmul params, LM head included) + attention scores/values.

    Attention adds 2·2·L·heads·head_dim per token and layer forward (QKᵀ and PV), ×3 with backward;
    norms, softmax and elementwise work are not counted (the usual MFU convention).
    """
    h, d = config.hidden_size, config.head_dim
    attention = h * d * (config.num_heads + 2 * config.num_kv_heads) + config.num_heads * d * h
    mlp = h * config.ffn_hidden_size * (3 if config.gated_mlp else 2)
    matmul_params = config.num_layers * (attention + mlp) + config.vocab_size * h
    attention_flops = 12 * config.num_layers * seq_len * config.num_heads * d
    return 6.0 * matmul_params + attention_flops


def measure_peak_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Best observed FLOP/s of a jitted square matmul on the first device (f32 accumulation)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def process_peak_flops(per_device: float) -> float:
    """Peak of the devices this job drives: CPU 'devices' share the host's cores, so count one per process."""
    if jax.devices()[0].platform == "cpu":
        return per_device * jax.process_count()
    return per_device * jax.device_count()


class MetricWriter:
    """Writes scalars to stdout, `metrics.jsonl` and TensorBoard (only on the primary process)."""

    def __init__(self, workdir: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()
        print(f"step {step}: " + "  ".join(f"{k}={_fmt(v)}" for k, v in values.items()), flush=True)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tensorboard:
            self._tensorboard.close()


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl`; a restarted run's repeated steps keep their latest record."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {workdir!r}: has a training run logged there?")
    by_step: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(workdir: str, output: str, baseline: float | None = None) -> str:
    """Renders the loss curve of `workdir` to a PNG (with an optional horizontal baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(workdir) if "loss" in r]
    steps = np.array([r["step"] for r in records])
    losses = np.array([r["loss"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, label="train loss (Part B tokens)")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(os.path.basename(os.path.abspath(workdir)))
    ax.legend()
    fig.tight_layout()
    tmp = output + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, output)
    return output
