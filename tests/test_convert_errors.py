"""Bad input to the converters: one clear error naming the problem, and nothing left behind.

Each case breaks a copy of the golden ChatGLM-6B checkpoint in its own way; afterwards neither the
destination nor any temporary directory may exist.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoints_convert import from_pytorch
from checkpoints_convert.from_pytorch import convert
from checkpoints_convert.staging import ConversionError
from checkpoints_convert.to_pytorch import export
from glm_jax import converted
from glm_jax.hf_io import CheckpointError

SHARD = "pytorch_model-0000{}-of-00003.bin"
INDEX = "pytorch_model.bin.index.json"


@pytest.fixture
def src(golden6b, tmp_path):
    path = tmp_path / "src"
    shutil.copytree(golden6b / "checkpoint", path)
    return path


def edit_shard(src, number, change, index_change=None):
    """Rewrites one shard of `src` through `change(state)` and the index through `index_change(weight_map)`."""
    path = src / SHARD.format(number)
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    if index_change is not None:
        index = json.loads((src / INDEX).read_text())
        index_change(index["weight_map"])
        (src / INDEX).write_text(json.dumps(index))


def assert_refused(src, match, *, error=CheckpointError, **kwargs):
    dst = src.parent / "out"
    with pytest.raises(error, match=match):
        convert(str(src), str(dst), progress=False, **kwargs)
    assert sorted(os.listdir(src.parent)) == ["src"], "a failed conversion left files behind"


def test_directory_without_config(src):
    (src / "config.json").unlink()
    assert_refused(src, r"not a Hugging Face checkpoint directory \(no config.json\)")


def test_config_without_model_type(src):
    config = json.loads((src / "config.json").read_text())
    del config["model_type"]
    (src / "config.json").write_text(json.dumps(config))
    assert_refused(src, "has no model_type: not a ChatGLM checkpoint directory")


def test_unknown_model_type(src):
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    assert_refused(src, r"config.json: unsupported model_type 'llama'")


def test_missing_key(src):
    key = "transformer.final_layernorm.bias"
    edit_shard(src, 2, lambda s: s.pop(key), lambda m: m.pop(key))
    assert_refused(src, rf"missing keys \['{key}'\]")


def test_index_listing_a_key_its_shard_lacks(src):
    edit_shard(src, 2, lambda s: s.pop("transformer.final_layernorm.bias"))
    assert_refused(src, r"the index disagrees with pytorch_model-00002-of-00003.bin: listed but absent "
                        r"\['transformer.final_layernorm.bias'\]")


def test_extra_key(src):
    key = "transformer.extra.weight"

    def add(state):
        state[key] = torch.zeros(3, dtype=torch.float16)

    edit_shard(src, 2, add, lambda m: m.__setitem__(key, SHARD.format(2)))
    assert_refused(src, rf"unexpected keys \['{key}'\]")


def test_mis_shaped_key(src):
    key = "transformer.layers.1.mlp.dense_4h_to_h.weight"

    def shrink(state):
        state[key] = state[key][:, :-2].clone()

    edit_shard(src, 2, shrink)
    assert_refused(src, rf"shape mismatch \['{key}: expected \[128, 512\], got \[128, 510\]'\]")


def test_wrong_dtype(src):
    key = "transformer.final_layernorm.weight"

    def to_int(state):
        state[key] = state[key].to(torch.int8)

    edit_shard(src, 2, to_int)
    assert_refused(src, rf"dtype mismatch \['{key}: expected a float dtype, got int8'\]")


def test_truncated_shard(src):
    path = src / SHARD.format(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_refused(src, rf"cannot read weight file .*{SHARD.format(1)}")


def test_corrupt_shard(src):
    path = src / SHARD.format(2)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())
    assert_refused(src, rf"cannot read weight file .*{SHARD.format(2)}")


def test_truncated_safetensors(golden6b, tmp_path):
    ours = tmp_path / "ours"
    convert(str(golden6b / "checkpoint"), str(ours), progress=False)
    export(str(ours), str(tmp_path / "src"), num_shards=2, safetensors=True, progress=False)
    shutil.rmtree(ours)
    path = tmp_path / "src" / "model-00001-of-00002.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_refused(tmp_path / "src", r"model-00001-of-00002.safetensors: truncated safetensors file")


def test_index_naming_a_missing_file(src):
    (src / SHARD.format(3)).unlink()
    assert_refused(src, rf"names shard file\(s\) that do not exist: \['{SHARD.format(3)}'\]")


@pytest.mark.parametrize("read_ahead", [True, False])
def test_tied_head_that_differs_is_found_after_writing_began(src, monkeypatch, read_ahead):
    if not read_ahead:  # both tensors read slab by slab
        monkeypatch.setattr(from_pytorch, "_READ_AHEAD_LARGEST", 0)
    edit_shard(src, 3, lambda s: s["lm_head.weight"][-1, -1].add_(1.0))
    assert_refused(src, "lm_head.weight differs from transformer.word_embeddings.weight")


def test_interrupted_conversion_leaves_nothing(src, monkeypatch):
    real_write = from_pytorch._Streamer.write
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(from_pytorch._Streamer, "write", interrupted)
    assert_refused(src, None, error=KeyboardInterrupt)


def test_existing_destination_needs_overwrite(src):
    dst = src.parent / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(ConversionError, match=r"destination already exists: .*out \(pass --overwrite to replace it\)"):
        convert(str(src), str(dst), progress=False)
    assert os.listdir(dst) == ["old.txt"]
    convert(str(src), str(dst), overwrite=True, progress=False)
    assert converted.is_converted_checkpoint(str(dst)) and not (dst / "old.txt").exists()
    assert sorted(os.listdir(src.parent)) == ["out", "src"]


def test_export_refuses_a_directory_that_is_not_converted(src, tmp_path):
    with pytest.raises(CheckpointError, match="not a converted checkpoint"):
        export(str(src), str(tmp_path / "hf"), progress=False)
    assert not (tmp_path / "hf").exists()


def test_requantizing_a_quantized_checkpoint_is_refused(src, tmp_path):
    convert(str(src), str(tmp_path / "int8"), quantization="int8", progress=False)
    with pytest.raises(ConversionError, match="is INT8; re-quantizing it to INT4"):
        export(str(tmp_path / "int8"), str(tmp_path / "hf"), quantization="int4", progress=False)
    assert not (tmp_path / "hf").exists()


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "checkpoints_convert.cli", "--progress=false", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_reports_one_error_line_and_exits_non_zero(src, tmp_path):
    (src / "config.json").unlink()
    result = run_cli(f"--src={src}", f"--dst={tmp_path / 'out'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"glm-convert: error: not a Hugging Face checkpoint directory (no config.json): {src}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("direction", ["jax", "pytorch"])
def test_full_disk(golden6b, tmp_path, direction):
    """Converts onto a 256 KiB tmpfs (a private mount namespace, so no root needed)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"]).returncode != 0:
        pytest.skip("needs unprivileged mount namespaces (unshare -Urm) to mount a small tmpfs")
    src = str(golden6b / "checkpoint")
    if direction == "pytorch":
        src = str(tmp_path / "ours")
        convert(str(golden6b / "checkpoint"), src, progress=False)
    mount = tmp_path / "small"
    mount.mkdir()
    script = ('mount -t tmpfs -o size=256k tmpfs "$0" && { "$1" -m checkpoints_convert.cli --progress=false '
              '--to="$2" --src="$3" --dst="$0/out"; echo "rc=$?"; ls -A "$0"; }')
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", script, str(mount), sys.executable, direction, src],
                            capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert result.stdout.splitlines() == ["rc=1"], result.stdout + result.stderr  # nothing left on the mount
    assert result.stderr.strip().splitlines()[-1].startswith(f"glm-convert: error: disk full while writing {mount}/out")
