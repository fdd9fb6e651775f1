"""Running a `jax.distributed` job as real processes on localhost."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Mapping


def coordinator_address() -> str:
    """`127.0.0.1:PORT` with a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def run_processes(command: Callable[[int], list[str]], count: int, env: Mapping[str, str],
                  timeout_s: float = 300) -> list[str]:
    """Starts `command(process_id)` for every id and returns their combined stdout/stderr, after
    checking that all exited with 0. A process that fails or a job that hangs (a process waiting for
    a peer that died) ends every process, and the failure shows all their outputs."""
    processes = [subprocess.Popen(command(i), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for i in range(count)]
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate()[0] for p in processes]
    codes = [p.returncode for p in processes]
    assert codes == [0] * count, f"exit codes {codes}:\n" + "\n".join(
        f"--- process {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))
    return outputs
