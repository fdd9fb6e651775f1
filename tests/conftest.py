"""Shared fixtures. Eight simulated CPU devices are requested before JAX starts so that mesh tests
can shard; unsharded computations simply run on the first device."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(os.environ.get("GLM_GOLDEN", REPO.parent / "shared" / "golden"))


def _golden(name: str) -> pathlib.Path:
    path = GOLDEN / name
    if not (path / "cases.npz").is_file():
        raise FileNotFoundError(f"golden data not found at {path}; set GLM_GOLDEN to the golden/ directory")
    return path


@pytest.fixture(scope="session")
def golden6b() -> pathlib.Path:
    return _golden("chatglm6b")


@pytest.fixture(scope="session")
def golden2() -> pathlib.Path:
    return _golden("chatglm2")


@pytest.fixture(scope="session")
def cases6b(golden6b):
    return dict(np.load(golden6b / "cases.npz"))


@pytest.fixture(scope="session")
def cases2(golden2):
    return dict(np.load(golden2 / "cases.npz"))


@pytest.fixture(scope="session")
def chatglm6b(golden6b):
    from glm_jax import load_pretrained

    return load_pretrained(str(golden6b / "checkpoint"))


@pytest.fixture(scope="session")
def chatglm2(golden2):
    from glm_jax import load_pretrained

    return load_pretrained(str(golden2 / "checkpoint"))
