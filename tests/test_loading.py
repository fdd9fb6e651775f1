"""load_pretrained on official-layout directories: formats, and one clear error per kind of bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

from glm_jax import CheckpointError, load_pretrained
from glm_jax.hf_io import iter_tensors, weight_files

INDEX = "pytorch_model.bin.index.json"


@pytest.fixture
def checkpoint_copy(golden6b, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(golden6b / "checkpoint", target)
    return target


def _edit_shard(directory, shard, edit):
    path = directory / shard
    state = torch.load(path, map_location="cpu", weights_only=True)
    edit(state)
    torch.save(state, path)


def _drop_from_index(directory, key):
    index = json.loads((directory / INDEX).read_text())
    del index["weight_map"][key]
    (directory / INDEX).write_text(json.dumps(index))


def test_safetensors_single_file_loads_identically(chatglm6b, golden6b, cases6b, tmp_path):
    from safetensors.numpy import save_file

    tensors = {}
    for path in weight_files(str(golden6b / "checkpoint")):
        tensors.update({k: np.ascontiguousarray(v) for k, v in iter_tensors(path)})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(golden6b / "checkpoint" / "config.json", tmp_path / "config.json")
    model, params = load_pretrained(str(tmp_path))
    logits = model.apply({"params": params}, cases6b["a_gmask_single/input_ids"])
    np.testing.assert_allclose(np.asarray(logits), cases6b["a_gmask_single/logits"], atol=5e-4, rtol=1e-4)


def test_missing_key_is_named(checkpoint_copy):
    key = "transformer.layers.1.mlp.dense_4h_to_h.bias"
    _edit_shard(checkpoint_copy, "pytorch_model-00002-of-00003.bin", lambda s: s.pop(key))
    _drop_from_index(checkpoint_copy, key)
    with pytest.raises(CheckpointError, match=r"missing keys \['transformer.layers.1.mlp.dense_4h_to_h.bias'\]"):
        load_pretrained(str(checkpoint_copy))


def test_missing_key_without_index_is_named(checkpoint_copy):
    key = "transformer.final_layernorm.bias"
    state = {}
    for shard in sorted(checkpoint_copy.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
        shard.unlink()
    del state[key]
    (checkpoint_copy / INDEX).unlink()
    torch.save(state, checkpoint_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=key):
        load_pretrained(str(checkpoint_copy))


def test_unexpected_key_is_named(checkpoint_copy):
    _edit_shard(checkpoint_copy, "pytorch_model-00002-of-00003.bin", lambda s: s.update(extra_weight=torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra_weight'\]"):
        load_pretrained(str(checkpoint_copy))


def test_wrong_shape_is_named(checkpoint_copy):
    key = "transformer.layers.0.attention.dense.weight"
    _edit_shard(checkpoint_copy, "pytorch_model-00001-of-00003.bin", lambda s: s.update({key: torch.zeros(128, 64)}))
    with pytest.raises(CheckpointError, match=rf"{key}: expected \[128, 128\], got \[128, 64\]"):
        load_pretrained(str(checkpoint_copy))


def test_truncated_shard_is_named(checkpoint_copy):
    shard = checkpoint_copy / "pytorch_model-00002-of-00003.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00003.bin"):
        load_pretrained(str(checkpoint_copy))


def test_index_naming_a_missing_file(checkpoint_copy):
    (checkpoint_copy / "pytorch_model-00003-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match=r"do not exist: \['pytorch_model-00003-of-00003.bin'\]"):
        load_pretrained(str(checkpoint_copy))


def test_untied_head_copy_is_rejected(checkpoint_copy):
    _edit_shard(checkpoint_copy, "pytorch_model-00003-of-00003.bin", lambda s: s["lm_head.weight"].mul_(2))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from transformer.word_embeddings.weight"):
        load_pretrained(str(checkpoint_copy))


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(str(tmp_path / "absent"))


def test_unknown_model_type(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["model_type"] = "llama"
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        load_pretrained(str(checkpoint_copy))
