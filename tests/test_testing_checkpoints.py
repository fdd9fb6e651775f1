"""Random checkpoints in the official layout (glm_jax.testing_checkpoints): files, index, formats,
values, determinism, failure behaviour, and that the random model is numerically usable."""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.torch
import torch

from glm_jax import load_pretrained, preset
from glm_jax.hf_io import iter_tensors
from glm_jax.hf_layout import ignored_keys, tensor_maps
from glm_jax.testing_checkpoints import OfficialTensor, write_hf_checkpoint, write_random_hf_checkpoint

PRESETS = ["chatglm-tiny", "chatglm2-tiny"]


def read_all(directory):
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith((".bin", ".safetensors")):
            for key, array in iter_tensors(os.path.join(directory, name)):
                tensors[key] = (name, np.array(array))
    return tensors


@pytest.mark.parametrize("name", PRESETS)
def test_sharded_bin_has_every_official_key_and_a_consistent_index(tmp_path, name):
    config = preset(name)
    out = tmp_path / "ckpt"
    names = write_random_hf_checkpoint(config, str(out), seed=3, num_shards=3)
    assert names == [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
    assert json.loads((out / "config.json").read_text())["num_layers"] == config.num_layers
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    tensors = read_all(out)
    expected = {m.key for m in tensor_maps(config)} | set(ignored_keys(config))
    assert set(tensors) == expected == set(index["weight_map"])
    assert all(index["weight_map"][key] == shard for key, (shard, _) in tensors.items())
    assert index["metadata"]["total_size"] == sum(a.nbytes for _, a in tensors.values())
    assert all(a.dtype == np.float16 for _, a in tensors.values())
    # Each shard reads back with plain torch (the official loader's path) as a state dict.
    for shard in names:
        state = torch.load(out / shard, weights_only=True)
        assert set(state) == {k for k, (s, _) in tensors.items() if s == shard}


def test_tied_head_and_rotary_buffers_match_the_official_checkpoint_conventions(tmp_path):
    config = preset("chatglm-tiny")
    write_random_hf_checkpoint(config, str(tmp_path / "c"), seed=0)
    tensors = {k: a for k, (_, a) in read_all(tmp_path / "c").items()}
    np.testing.assert_array_equal(tensors["lm_head.weight"], tensors["transformer.word_embeddings.weight"])
    # ChatGLM-6B buffer: 1 / 10000^(2j/d) over d = head_dim / 2, rounded to float16 (spec).
    d = config.head_dim // 2
    expected = (1.0 / 10000 ** (np.arange(0, d, 2, dtype=np.float32) / d)).astype(np.float16)
    for layer in range(config.num_layers):
        np.testing.assert_array_equal(tensors[f"transformer.layers.{layer}.attention.rotary_emb.inv_freq"], expected)


@pytest.mark.parametrize("name", PRESETS)
def test_loader_reads_back_exactly_what_was_written(tmp_path, name):
    config = preset(name)
    write_random_hf_checkpoint(config, str(tmp_path / "c"), seed=5, num_shards=2)
    _, params = load_pretrained(str(tmp_path / "c"))
    tensors = {k: a for k, (_, a) in read_all(tmp_path / "c").items()}
    for tensor_map in tensor_maps(config):
        leaves = []
        for path in tensor_map.paths:
            leaf = params
            for part in path:
                leaf = leaf[part]
            leaf = np.asarray(leaf)
            leaves.append(leaf if tensor_map.layer is None else leaf[tensor_map.layer])
        np.testing.assert_array_equal(tensor_map.merge(*leaves), tensors[tensor_map.key].astype(np.float32),
                                      err_msg=tensor_map.key)


def test_safetensors_hold_the_same_values_and_load_with_the_reference_library(tmp_path):
    config = preset("chatglm-tiny")
    write_random_hf_checkpoint(config, str(tmp_path / "bin"), seed=1, num_shards=2)
    names = write_random_hf_checkpoint(config, str(tmp_path / "st"), seed=1, num_shards=2, safetensors=True)
    assert (tmp_path / "st" / "model.safetensors.index.json").is_file()
    from_bin = {k: a for k, (_, a) in read_all(tmp_path / "bin").items()}
    loaded = {}
    for name in names:
        loaded.update(safetensors.torch.load_file(str(tmp_path / "st" / name)))
    assert set(loaded) == set(from_bin)
    for key, array in from_bin.items():
        np.testing.assert_array_equal(loaded[key].numpy(), array, err_msg=key)


def test_bfloat16_safetensors_round_to_the_float32_values(tmp_path):
    config = preset("chatglm-tiny")
    write_random_hf_checkpoint(config, str(tmp_path / "f32"), seed=2, dtype="float32", safetensors=True)
    write_random_hf_checkpoint(config, str(tmp_path / "bf16"), seed=2, dtype="bfloat16", safetensors=True)
    f32 = safetensors.torch.load_file(str(tmp_path / "f32" / "model.safetensors"))
    bf16 = safetensors.torch.load_file(str(tmp_path / "bf16" / "model.safetensors"))
    key = "transformer.layers.0.mlp.dense_h_to_4h.weight"
    assert bf16[key].dtype == torch.bfloat16
    torch.testing.assert_close(bf16[key], f32[key].to(torch.bfloat16), rtol=0, atol=0)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    config = preset("chatglm-tiny")
    for directory, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_random_hf_checkpoint(config, str(tmp_path / directory), seed=seed, safetensors=True)
    data = {d: (tmp_path / d / "model.safetensors").read_bytes() for d in "abc"}
    assert data["a"] == data["b"] != data["c"]


def test_existing_directory_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        write_random_hf_checkpoint(preset("chatglm-tiny"), str(tmp_path / "c"))


def test_failure_leaves_nothing_behind(tmp_path):
    def broken():
        raise RuntimeError("disk full")

    tensors = [OfficialTensor("a", (2,), lambda: np.zeros(2, np.float16)), OfficialTensor("b", (2,), broken)]
    for safe in (False, True):
        with pytest.raises(RuntimeError, match="disk full"):
            write_hf_checkpoint(preset("chatglm-tiny"), str(tmp_path / "c"), tensors, num_shards=2, safetensors=safe)
        assert os.listdir(tmp_path) == []


def test_prefix_or_quantized_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pre_seq_len=4"):
        write_random_hf_checkpoint(preset("chatglm-tiny", pre_seq_len=4), str(tmp_path / "c"))


@pytest.mark.parametrize("name", PRESETS)
def test_random_model_is_well_conditioned_in_half_precision(tmp_path, name):
    """Logits of a useful scale, not just the input token echoed, and float16 close to float32."""
    config = preset(name)
    write_random_hf_checkpoint(config, str(tmp_path / "c"), seed=0)
    ids = np.random.default_rng(0).integers(10, 1000, (2, 24))
    if config.gmask_token_id is not None:
        ids[:, -2:] = [config.gmask_token_id, config.bos_token_id]
    logits = {}
    for dtype in ("float32", "float16"):
        model, params = load_pretrained(str(tmp_path / "c"), dtype=dtype)
        logits[dtype] = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids), np.float32)
    assert np.isfinite(logits["float16"]).all()
    assert 1.0 < logits["float32"].std() < 5.0
    assert (logits["float32"].argmax(-1) == ids).mean() < 0.2
    np.testing.assert_allclose(logits["float16"], logits["float32"], atol=0.1)
