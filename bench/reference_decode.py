"""Times the official PyTorch ChatGLM `generate` (greedy, KV cache); runs inside the reference environment.

Started by `bench/decode.py` with the `.venv-ref` Python (see `bench/reference_env.sh`). It shares the
flags and the checkpoint staging of `reference_forward.py` (`--checkpoint --reference_code --inputs
--warmup --repeats --threads --dtype`), loads the model like `AutoModel.from_pretrained(dir,
trust_remote_code=True)` in `--dtype`, and for every prompt batch of `--inputs` times
`model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)` for each n of
`--new_tokens` (`min_new_tokens` keeps every run at exactly n tokens). Prints one JSON object on the
last stdout line: per (input, n) the best and median seconds and the generated ids.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

# Passive OpenMP workers (see reference_forward.py); must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from absl import app, flags  # noqa: E402

from reference_forward import (  # noqa: E402 - its flags are this program's flags too
    _DTYPE, _INPUTS, _REPEATS, _WARMUP, official_runtime, peak_rss_mb,
)

_NEW_TOKENS = flags.DEFINE_list("new_tokens", ["1", "65", "128"], "Numbers of new tokens to time.")


def main(argv: list[str]) -> None:
    del argv
    model_dir, torch, transformers = official_runtime()
    import numpy as np  # noqa: PLC0415 - the reference environment's NumPy 1.x
    model = transformers.AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    model = model.to(getattr(torch, _DTYPE.value)).eval()
    shutil.rmtree(os.path.dirname(model_dir), ignore_errors=True)
    inputs = np.load(_INPUTS.value)
    runs = []
    for name in inputs.files:
        ids = torch.from_numpy(inputs[name].astype(np.int64))
        for new_tokens in map(int, _NEW_TOKENS.value):
            times = []
            with torch.no_grad():
                for step in range(_WARMUP.value + _REPEATS.value):
                    begin = time.perf_counter()
                    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         do_sample=False)
                    if step >= _WARMUP.value:
                        times.append(time.perf_counter() - begin)
            runs.append({"name": name, "new_tokens": new_tokens, "best_s": min(times),
                         "median_s": statistics.median(times), "tokens": out[:, ids.shape[1]:].tolist()})
    print(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "dtype": _DTYPE.value, "peak_rss_mb": peak_rss_mb(), "runs": runs,
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
