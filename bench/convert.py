"""Conversion benchmark at full ChatGLM-6B size: official layout -> ours -> official layout.

    python bench/convert.py [--work_dir=bench/_work/convert] [--keep]

1. Writes a random ChatGLM-6B-shaped checkpoint in the official layout (28 layers, hidden 4096,
   vocab 130528, float16, 8 `.bin` shards + index, ~13.4 GB) with `bench/make_checkpoint.py`.
2. Measures the disk's sequential read speed on those shards (page cache dropped first when allowed).
3. Runs `glm-convert` (official -> ours) and `glm-convert --to=pytorch` (ours -> official, 8 shards),
   each in its own process under `/usr/bin/time -v`, with a cold page cache: wall time, MB/s of
   checkpoint bytes, the ratio to the disk read speed, and peak RSS.
4. Checks the exported checkpoint against the source (every key, byte for byte).

Appends a section to bench/RESULTS.md and deletes the 40 GB of checkpoints unless --keep.
Targets: conversion peak RSS <= 2.5 GB (the largest tensor is 1.07 GB) and throughput >= 50% of
the disk's sequential read speed.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

_WORK_DIR = flags.DEFINE_string("work_dir", os.path.join(common.BENCH_DIR, "_work", "convert"),
                                "Scratch directory on the disk to measure (needs ~41 GB free).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoints after the run.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 8, "Shards of the source and of the exported checkpoint.")
_REUSE_SOURCE = flags.DEFINE_bool("reuse_source", False, "Reuse an official checkpoint already in --work_dir "
                                  "(written by an earlier run with --keep) instead of writing it again.")

PEAK_RSS_TARGET_MB = 2500
THROUGHPUT_TARGET = 0.5
CHUNK = 64 << 20


def drop_page_cache() -> bool:
    """Writes back and drops the page cache so the next reads come from disk; False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def weight_paths(directory: str) -> list[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith((".bin", ".safetensors")))


def sequential_read_speed(paths: list[str], direct: bool) -> tuple[float, int]:
    """(bytes/s, bytes) reading `paths` front to back in 64 MiB blocks, through the page cache or not."""
    buffer = mmap.mmap(-1, CHUNK)  # page aligned, as O_DIRECT needs
    total = 0
    start = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            while n := os.readv(fd, [buffer]):
                total += n
        finally:
            os.close(fd)
    return total / (time.perf_counter() - start), total


def timed(command: list[str]) -> dict:
    """Runs `command` under `/usr/bin/time -v`: wall and CPU seconds, peak RSS (MB), the inner timing it prints."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
    inner = re.search(r" in ([\d.]+) s$", result.stdout.strip().splitlines()[-1])
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", result.stderr).group(1)) for kind in ("User", "System"))
    return {"wall_s": seconds, "cpu_s": cpu, "peak_rss_mb": rss_kb / 1024,
            "inner_s": float(inner.group(1)) if inner else None}


def same_tensors(src: str, dst: str) -> int:
    """Compares every tensor of two official directories byte for byte; returns the count."""
    import numpy as np

    from glm_jax.hf_io import open_weight_file

    def index(directory):
        files = [open_weight_file(p) for p in weight_paths(directory)]
        return {key: f for f in files for key in f.tensors}

    a, b = index(src), index(dst)
    if sorted(a) != sorted(b):
        raise AssertionError(f"key sets differ: {sorted(set(a) ^ set(b))[:5]}")
    for key, file_a in a.items():
        x, y = file_a.read(key), b[key].read(key)
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
            raise AssertionError(f"{key} differs after the round trip")
    return len(a)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    work = os.path.abspath(_WORK_DIR.value)
    source, ours, back = (os.path.join(work, name) for name in ("official", "ours", "exported"))
    os.makedirs(work, exist_ok=True)
    reuse = _REUSE_SOURCE.value and os.path.isfile(os.path.join(source, "config.json"))
    for path in (ours, back) if reuse else (source, ours, back):
        shutil.rmtree(path, ignore_errors=True)
    python = sys.executable
    notes = []
    try:
        if reuse:
            notes.append("Source: an official-layout checkpoint written earlier by bench/make_checkpoint.py (--reuse_source).")
        else:
            start = time.perf_counter()
            subprocess.run([python, os.path.join(common.BENCH_DIR, "make_checkpoint.py"), "--preset=chatglm-6b",
                            f"--out={source}", f"--num_shards={_NUM_SHARDS.value}"], check=True)
            notes.append(f"Source written by bench/make_checkpoint.py in {time.perf_counter() - start:.0f} s.")

        speeds = {}
        for direct in (False, True):
            cold = drop_page_cache()
            speeds[direct], source_bytes = sequential_read_speed(weight_paths(source), direct)
        if not cold:
            notes.append("The page cache could not be dropped (not root): buffered reads may partly come from memory.")
        read_speed = max(speeds.values())
        notes.append(f"Disk sequential read of the {source_bytes / 1e9:.2f} GB source: {speeds[False] / 1e6:.0f} MB/s "
                     f"through the page cache, {speeds[True] / 1e6:.0f} MB/s direct; the larger is the reference.")
        print(notes[-1])

        rows = []
        runs = [
            ("official -> ours (glm-convert)", [python, "-m", "checkpoints_convert.cli", f"--src={source}",
                                                f"--dst={ours}", "--progress=false"]),
            ("ours -> official (glm-convert --to=pytorch)", [python, "-m", "checkpoints_convert.cli", "--to=pytorch",
                                                             f"--src={ours}", f"--dst={back}", "--progress=false",
                                                             f"--num_shards={_NUM_SHARDS.value}"]),
        ]
        for name, command in runs:
            drop_page_cache()
            load = os.getloadavg()[0]
            figures = timed(command)
            throughput = source_bytes / figures["wall_s"]
            rows.append({
                "direction": name,
                "GB": source_bytes / 1e9,
                "wall s": figures["wall_s"],
                "work s (no startup)": figures["inner_s"],
                "MB/s": throughput / 1e6,
                "disk read MB/s": read_speed / 1e6,
                "ratio to disk read": throughput / read_speed,
                "peak RSS MB": figures["peak_rss_mb"],
                "CPU s (user+sys)": figures["cpu_s"],
                "load avg at start": load,
            })
            print(common.markdown_table(rows[-1:]))
        count = same_tensors(source, back)
        notes.append(f"Round trip checked: all {count} tensors of the exported checkpoint equal the source byte for byte.")
        convert_row = rows[0]
        notes.append(
            f"Targets (official -> ours): peak RSS <= {PEAK_RSS_TARGET_MB} MB: "
            f"{'met' if convert_row['peak RSS MB'] <= PEAK_RSS_TARGET_MB else 'NOT met'} "
            f"({convert_row['peak RSS MB']:.0f} MB); throughput >= {THROUGHPUT_TARGET:.0%} of the disk read speed: "
            f"{'met' if convert_row['ratio to disk read'] >= THROUGHPUT_TARGET else 'NOT met'} "
            f"({convert_row['ratio to disk read']:.0%}).")
        notes.append("Each direction runs in a fresh process (wall time includes interpreter and JAX start-up; "
                     "'work s' is the converter's own timing) after the page cache was dropped. The machine is "
                     "shared: with a load average above the 2 cores the converter gets a fraction of a core, so "
                     "'CPU s' is the figure that does not depend on the neighbours.")
        text = common.append_results("Checkpoint conversion, ChatGLM-6B size (13.4 GB, fp16, 8 shards)",
                                     "python bench/convert.py", rows, notes)
        print(text)
    finally:
        if not _KEEP.value:
            for path in (source, ours, back):
                shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
