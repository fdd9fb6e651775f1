"""Times one training step of the official PyTorch ChatGLM-6B code; runs inside the reference environment.

Started by `bench/train.py` with the `.venv-ref` Python (see `bench/reference_env.sh`). The model is
built from a config.json with the official code (`AutoModel.from_config(..., trust_remote_code=True,
empty_init=False)`, randomly initialised, then float32), and one step is: forward with labels (the
official GLM mask and 2D positions derived from `[gMASK] <sop>` in the ids), backward, global-norm
clipping to 1.0, `torch.optim.AdamW`. Prints one JSON object on the last stdout line.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/reference_forward.py

from absl import app, flags  # noqa: E402

_CONFIG_DIR = flags.DEFINE_string("config_dir", None, "Directory holding the model's config.json.")
_REFERENCE_CODE = flags.DEFINE_string("reference_code", None, "Directory with the official modeling_chatglm.py.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps.")
_THREADS = flags.DEFINE_integer("threads", 2, "torch intra-op threads.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "autocast-bfloat16", "bfloat16"],
                           "float32; bfloat16 autocast over float32 weights (mixed precision); or bfloat16 weights.")
flags.mark_flags_as_required(["config_dir", "reference_code"])


def staged_model_dir(config_dir: str, reference_code: str) -> str:
    """A temporary Hugging Face-style directory: config.json + the official .py files (no weights)."""
    if not os.path.isfile(os.path.join(reference_code, "modeling_chatglm.py")):
        raise FileNotFoundError(f"--reference_code={reference_code} has no modeling_chatglm.py")
    staging = tempfile.mkdtemp(prefix="chatglm-reference-train-")
    model_dir = os.path.join(staging, "model")
    os.mkdir(model_dir)
    shutil.copy(os.path.join(config_dir, "config.json"), model_dir)
    for name in os.listdir(reference_code):
        if name.endswith(".py"):
            shutil.copy(os.path.join(reference_code, name), model_dir)
    os.environ["HF_MODULES_CACHE"] = os.path.join(staging, "modules")
    return model_dir


def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str]) -> None:
    del argv
    model_dir = staged_model_dir(_CONFIG_DIR.value, _REFERENCE_CODE.value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.set_num_threads(_THREADS.value)
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    model = transformers.AutoModel.from_config(config, trust_remote_code=True, empty_init=False)
    model = model.to(torch.bfloat16 if _DTYPE.value == "bfloat16" else torch.float32).train()
    shutil.rmtree(os.path.dirname(model_dir), ignore_errors=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    batch, length = _BATCH.value, _SEQ_LEN.value
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, config.mask_token_id, (batch, length), generator=generator)
    half = length // 2  # text, [gMASK], <sop>, then the span to generate (loss on it only)
    ids[:, half] = config.gmask_token_id
    ids[:, half + 1] = config.bos_token_id
    labels = ids.clone()
    labels[:, :half + 1] = -100

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_DTYPE.value == "autocast-bfloat16"):
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    times, losses = [], []
    for i in range(_WARMUP.value + _REPEATS.value):
        begin = time.perf_counter()
        losses.append(step())
        if i >= _WARMUP.value:
            times.append(time.perf_counter() - begin)
    print(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "dtype": _DTYPE.value, "params": sum(p.numel() for p in model.parameters()), "best_s": min(times),
        "median_s": statistics.median(times), "times_s": times, "losses": losses, "peak_rss_mb": peak_rss_mb(),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
