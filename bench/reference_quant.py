"""Tries the official weight-only quantization (`model.quantize(bits)`) and times its greedy `generate`;
runs inside the reference environment.

Started by `bench/quant.py` with the `.venv-ref` Python. Same flags and checkpoint staging as
`reference_forward.py`; `--bits` lists the widths to try (each on a freshly loaded float32 model).
Prints one JSON object on the last stdout line: per width either the best seconds of
`generate(max_new_tokens=n, min_new_tokens=n)` for each n of `--new_tokens`, or the exception the
official code raised (its `quantization.py` moves weights to CUDA and runs CUDA kernels).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see reference_forward.py

from absl import app, flags  # noqa: E402

from reference_forward import (  # noqa: E402 - its flags are this program's flags too
    _INPUTS, _REPEATS, official_runtime, peak_rss_mb,
)

_BITS = flags.DEFINE_list("bits", ["8", "4"], "Quantization widths to try.")
_NEW_TOKENS = flags.DEFINE_list("new_tokens", ["9", "16"], "Numbers of new tokens to time.")


def main(argv: list[str]) -> None:
    del argv
    model_dir, torch, transformers = official_runtime()
    import numpy as np  # noqa: PLC0415 - the reference environment's NumPy 1.x
    ids = torch.from_numpy(np.load(_INPUTS.value)["b1"].astype(np.int64))
    results = {}
    for bits in map(int, _BITS.value):
        model = transformers.AutoModel.from_pretrained(model_dir, trust_remote_code=True).float().eval()
        try:
            model = model.quantize(bits)
            runs = {}
            with torch.no_grad():
                for n in map(int, _NEW_TOKENS.value):
                    times = []
                    for _ in range(_REPEATS.value):
                        begin = time.perf_counter()
                        model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                        times.append(time.perf_counter() - begin)
                    runs[n] = min(times)
            results[bits] = {"ok": True, "best_s": runs}
        except Exception as e:  # noqa: BLE001 - the point is to report whatever the official code raises
            results[bits] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        del model
    shutil.rmtree(os.path.dirname(model_dir), ignore_errors=True)
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "cuda_available": torch.cuda.is_available(), "peak_rss_mb": peak_rss_mb(), "results": results}))
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
