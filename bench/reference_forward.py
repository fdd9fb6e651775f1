"""Times the official PyTorch ChatGLM forward pass; runs inside the reference environment.

Started by `bench/forward.py` with the `.venv-ref` Python (see `bench/reference_env.sh`): the official
remote code needs an old `transformers` and NumPy 1.x, so it cannot run in the project's venv.
It loads the checkpoint exactly as `AutoModel.from_pretrained(dir, trust_remote_code=True).float()`
does, times `model(input_ids, use_cache=False)` under `torch.no_grad()` for every input of
`--inputs`, optionally saves the logits, and prints one JSON object on the last stdout line.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

# Passive OpenMP workers: with spinning workers about one fp32 run in three on a shared 2-core
# machine slows down 5-15x for the whole process. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from absl import app, flags  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint directory (config.json + weights).")
_REFERENCE_CODE = flags.DEFINE_string("reference_code", None, "Directory with the official modeling_chatglm.py and configuration_chatglm.py.")
_INPUTS = flags.DEFINE_string("inputs", None, "NumPy .npz file: one int array [batch, seq_len] of token ids per entry.")
_LOGITS_DIR = flags.DEFINE_string("logits_dir", None, "If set, the float32 logits of each input are saved there as <entry>.npy.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed forward passes before timing each input.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed forward passes per input (best and median are reported).")
_THREADS = flags.DEFINE_integer("threads", 2, "torch intra-op threads.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Model dtype after loading.")
flags.mark_flags_as_required(["checkpoint", "reference_code", "inputs"])

REQUIRED_CODE = ("modeling_chatglm.py", "configuration_chatglm.py")


def staged_model_dir(checkpoint: str, reference_code: str) -> str:
    """A temporary directory holding the official .py files and links to the checkpoint's files.

    This is what a Hugging Face ChatGLM directory looks like, so `trust_remote_code` loading works
    unchanged, while the checkpoint and the code stay where they are.
    """
    missing = [name for name in REQUIRED_CODE if not os.path.isfile(os.path.join(reference_code, name))]
    if missing:
        raise FileNotFoundError(f"--reference_code={reference_code} lacks {missing}")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise FileNotFoundError(f"--checkpoint={checkpoint} has no config.json")
    staging = tempfile.mkdtemp(prefix="chatglm-reference-")
    model_dir = os.path.join(staging, "model")
    os.mkdir(model_dir)
    for name in os.listdir(checkpoint):
        if not name.endswith(".py"):
            os.symlink(os.path.abspath(os.path.join(checkpoint, name)), os.path.join(model_dir, name))
    for name in os.listdir(reference_code):
        if name.endswith(".py"):
            shutil.copy(os.path.join(reference_code, name), model_dir)
    # transformers copies remote code into a modules cache; keep it inside the staging directory.
    os.environ["HF_MODULES_CACHE"] = os.path.join(staging, "modules")
    return model_dir


def peak_rss_mb() -> float:
    """VmHWM of this process: unlike `ru_maxrss` it does not include the parent's memory at fork."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def official_runtime() -> tuple[str, Any, Any]:
    """(staged model directory, torch, transformers): the hub switched off before transformers is
    imported, torch limited to --threads. Shared by every reference runner."""
    model_dir = staged_model_dir(_CHECKPOINT.value, _REFERENCE_CODE.value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch  # noqa: PLC0415 - after the environment above is set
    import transformers  # noqa: PLC0415

    torch.set_num_threads(_THREADS.value)
    return model_dir, torch, transformers


def main(argv: list[str]) -> None:
    del argv
    model_dir, torch, transformers = official_runtime()
    import numpy as np  # noqa: PLC0415 - the reference environment's NumPy 1.x
    start = time.perf_counter()
    model = transformers.AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    model = model.to(getattr(torch, _DTYPE.value)).eval()
    load_s = time.perf_counter() - start
    shutil.rmtree(os.path.dirname(model_dir), ignore_errors=True)

    inputs = np.load(_INPUTS.value)
    runs = []
    for name in inputs.files:
        ids = torch.from_numpy(inputs[name].astype(np.int64))
        times, cpu_times = [], []
        with torch.no_grad():
            for step in range(_WARMUP.value + _REPEATS.value):
                begin, cpu_begin = time.perf_counter(), time.process_time()
                logits = model(input_ids=ids, use_cache=False).logits
                if step >= _WARMUP.value:
                    times.append(time.perf_counter() - begin)
                    cpu_times.append(time.process_time() - cpu_begin)
        if _LOGITS_DIR.value:
            np.save(os.path.join(_LOGITS_DIR.value, f"{name}.npy"), logits.float().numpy())
        runs.append({"name": name, "shape": list(ids.shape), "best_s": min(times),
                     "median_s": statistics.median(times), "times_s": times,
                     "cpu_best_s": min(cpu_times)})
        del logits
    print(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        "threads": torch.get_num_threads(), "dtype": _DTYPE.value, "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(), "runs": runs,
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
