"""`with_huge_page_heap`: the process re-executes itself once, same command line, with the glibc
tunable added; an explicit setting is respected."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from glm_jax.host_memory import huge_page_heap_available

SCRIPT = """
import os, sys
from glm_jax.host_memory import with_huge_page_heap
print("start", flush=True)
with_huge_page_heap()
print("args", sys.argv[1:], "tunables", os.environ.get("GLIBC_TUNABLES"), flush=True)
"""


def _run(env_tunables: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if env_tunables is not None:
        env["GLIBC_TUNABLES"] = env_tunables
    done = subprocess.run([sys.executable, "-c", SCRIPT, "--flag=a b", "x"], env=env, capture_output=True, text=True,
                          check=True, timeout=60)
    return done.stdout.splitlines()


@pytest.mark.skipif(not huge_page_heap_available(), reason="needs glibc and transparent huge pages")
def test_reexecutes_once_with_the_tunable_and_the_same_arguments():
    lines = _run("glibc.malloc.arena_max=4")
    assert lines == ["start", "start",  # once before the re-execution, once after it
                     "args ['--flag=a b', 'x'] tunables glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"]


def test_an_explicit_setting_is_kept():
    assert _run("glibc.malloc.hugetlb=0") == ["start", "args ['--flag=a b', 'x'] tunables glibc.malloc.hugetlb=0"]
