"""Checkpoint conversion: official ChatGLM-6B layout <-> converted checkpoints (golden/chatglm6b).

References: the golden shards themselves (bit-identical round trips), the golden logits of the
official PyTorch model, stock orbax (reads our params without our code), and NumPy dequantization
written from spec §1.7 (`test_quantization.reference_unpack`).
"""

import json
import os
import shutil
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from checkpoints_convert import from_pytorch
from checkpoints_convert.from_pytorch import convert
from checkpoints_convert.to_pytorch import export
from glm_jax import converted, load_pretrained
from glm_jax.sharding import make_mesh
from test_quantization import official_quantize, reference_pack, reference_unpack

ATOL, RTOL = 5e-4, 1e-4
QUANTIZED = ("query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h")


def read_state(directory) -> dict[str, np.ndarray]:
    """Every tensor of an official directory, read with torch / safetensors directly."""
    state = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".bin"):
            for key, t in torch.load(path, weights_only=True).items():
                state[key] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
        elif name.endswith(".safetensors"):
            from safetensors.numpy import load_file

            state.update(load_file(path))
    return state


def assert_same_tensors(expected: dict, actual: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and actual[key].shape == value.shape, key
        assert actual[key].tobytes() == value.tobytes(), key


def stock_orbax_params(directory) -> dict:
    """Our params read by plain orbax, without any code of this project."""
    return ocp.PyTreeCheckpointer().restore(os.path.join(directory, "params"))


def logits(model, params, ids):
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids))


def hand_dequantized_checkpoint(official_dir, out_dir, bits):
    """A float32 official directory with every quantized weight dequantized by the spec reference."""
    state = read_state(official_dir)
    floats = {}
    for key, value in state.items():
        if key.endswith(".weight_scale"):
            continue
        if value.dtype == np.int8:
            values = reference_unpack(value) if bits == 4 else value
            value = values.astype(np.float32) * state[key + "_scale"].astype(np.float32)[:, None]
        floats[key] = torch.from_numpy(np.ascontiguousarray(value, np.float32))
    os.makedirs(out_dir)
    torch.save(floats, os.path.join(out_dir, "pytorch_model.bin"))
    with open(os.path.join(official_dir, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_bit")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return out_dir


@pytest.fixture(scope="module")
def golden_dir(golden6b):
    return str(golden6b / "checkpoint")


@pytest.fixture(scope="module")
def ours(golden_dir, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("convert") / "ours")
    convert(golden_dir, dst, progress=False)
    return dst


@pytest.fixture(scope="module")
def hf_params(chatglm6b):
    return jax.tree.map(np.asarray, chatglm6b[1])


@pytest.fixture(scope="module", params=[8, 4])
def quantized(request, ours, tmp_path_factory):
    """(bits, official INT8/INT4 directory written by the exporter, its conversion back to ours)."""
    root = tmp_path_factory.mktemp(f"int{request.param}")
    official = str(root / "official")
    export(ours, official, quantization=f"int{request.param}", progress=False)
    back = str(root / "ours")
    convert(official, back, progress=False)
    return request.param, official, back


def test_converted_directory_is_an_orbax_checkpoint_with_configs(ours, hf_params):
    assert {"params", "glm_config.json", "config.json"} <= set(os.listdir(ours))
    assert converted.read_glm_config(ours).param_dtype == "float16"
    stored = stock_orbax_params(ours)
    assert jax.tree.structure(stored) == jax.tree.structure(hf_params)
    for got, want in zip(jax.tree.leaves(stored), jax.tree.leaves(hf_params)):
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got.astype(np.float32), want)


def test_round_trip_is_bit_identical(ours, golden_dir, tmp_path):
    export(ours, str(tmp_path / "hf"), num_shards=3, progress=False)
    assert_same_tensors(read_state(golden_dir), read_state(tmp_path / "hf"))
    with open(tmp_path / "hf" / "pytorch_model.bin.index.json") as f:
        index = json.load(f)
    assert sorted(os.path.basename(n) for n in set(index["weight_map"].values())) == [
        f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
    for name in set(index["weight_map"].values()):
        keys = {k for k, v in index["weight_map"].items() if v == name}
        assert set(torch.load(tmp_path / "hf" / name, weights_only=True)) == keys
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in read_state(golden_dir).values())
    with open(os.path.join(golden_dir, "config.json")) as f, open(tmp_path / "hf" / "config.json") as g:
        assert json.load(f) == json.load(g)


@pytest.mark.parametrize("case", ["a_gmask_single", "b_mask_infill"])
def test_converted_model_matches_golden_logits(ours, cases6b, case):
    model, params = load_pretrained(ours)
    ids = cases6b[f"{case}/input_ids"]
    np.testing.assert_allclose(logits(model, params, ids), cases6b[f"{case}/logits"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("layout", ["safetensors_2_shards", "single_safetensors", "single_bin"])
def test_every_official_layout_converts_to_the_same_params(ours, tmp_path, layout):
    official = str(tmp_path / "official")
    if layout == "single_bin":
        export(ours, official, num_shards=1, progress=False)
        assert sorted(os.listdir(official)) == ["config.json", "pytorch_model.bin"]
    elif layout == "single_safetensors":
        export(ours, official, num_shards=1, safetensors=True, progress=False)
        assert sorted(os.listdir(official)) == ["config.json", "model.safetensors"]
    else:
        export(ours, official, num_shards=2, safetensors=True, progress=False)
        assert "model.safetensors.index.json" in os.listdir(official)
    convert(official, str(tmp_path / "again"), progress=False)
    for got, want in zip(jax.tree.leaves(stock_orbax_params(tmp_path / "again")), jax.tree.leaves(stock_orbax_params(ours))):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_small_chunks_and_slab_streaming_give_the_same_params(ours, golden_dir, tmp_path, monkeypatch):
    """Every tensor read slab by slab instead of ahead, into 4 KiB chunks: the same stored values."""
    monkeypatch.setattr(from_pytorch, "_READ_AHEAD_LARGEST", 0)
    convert(golden_dir, str(tmp_path / "small"), chunk_bytes=4096, progress=False)
    with open(tmp_path / "small" / "params" / "word_embeddings.embedding" / ".zarray") as f:
        assert json.load(f)["chunks"] == [375, 4]  # rows halved while even (1500 -> 375), then columns
    for got, want in zip(jax.tree.leaves(stock_orbax_params(tmp_path / "small")), jax.tree.leaves(stock_orbax_params(ours))):
        np.testing.assert_array_equal(got, want)


def test_tokenizer_and_remote_code_files_travel_both_ways(golden_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(golden_dir, src)
    extra = {"ice_text.model": b"\x00sentencepiece\xff", "tokenizer_config.json": b'{"do_lower_case": false}',
             "modeling_chatglm.py": b"# remote code\n"}
    for name, data in extra.items():
        (src / name).write_bytes(data)
    convert(str(src), str(tmp_path / "ours"), progress=False)
    export(str(tmp_path / "ours"), str(tmp_path / "hf"), progress=False)
    for name, data in extra.items():
        assert (tmp_path / "ours" / name).read_bytes() == data
        assert (tmp_path / "hf" / name).read_bytes() == data


def test_export_dtype_float32_widens_exactly(ours, golden_dir, tmp_path):
    export(ours, str(tmp_path / "hf32"), dtype="float32", progress=False)
    state, golden = read_state(tmp_path / "hf32"), read_state(golden_dir)
    assert sorted(state) == sorted(golden)
    for key, value in golden.items():
        assert state[key].dtype == np.float32, key
        np.testing.assert_array_equal(state[key], value.astype(np.float32))
    assert json.load(open(tmp_path / "hf32" / "config.json"))["torch_dtype"] == "float32"


def test_chatglm2_round_trip_and_logits(golden2, cases2, tmp_path):
    source = str(golden2 / "checkpoint")
    convert(source, str(tmp_path / "ours"), progress=False)
    export(str(tmp_path / "ours"), str(tmp_path / "hf"), num_shards=2, progress=False)
    assert_same_tensors(read_state(source), read_state(tmp_path / "hf"))
    model, params = load_pretrained(str(tmp_path / "ours"))
    ids = cases2["a_single/input_ids"]
    np.testing.assert_allclose(logits(model, params, ids), cases2["a_single/logits"], atol=1e-4, rtol=1e-4)


def test_dtype_flag_casts_every_float_leaf(golden_dir, hf_params, tmp_path):
    convert(golden_dir, str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    assert converted.read_glm_config(tmp_path / "bf16").param_dtype == "bfloat16"
    for got, want in zip(jax.tree.leaves(stock_orbax_params(tmp_path / "bf16")), jax.tree.leaves(hf_params)):
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16))


def test_mesh_conversion_chunks_by_shard_and_loads_sharded(golden_dir, hf_params, tmp_path):
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    convert(golden_dir, str(tmp_path / "sharded"), mesh=mesh, progress=False)
    with open(tmp_path / "sharded" / "params" / "layers.mlp.up.kernel" / ".zarray") as f:
        assert json.load(f)["chunks"] == [1, 128 // 4, 512 // 2]  # [layer, embed/fsdp, mlp/tensor]
    model, params = load_pretrained(str(tmp_path / "sharded"), mesh=mesh)
    up = params["layers"]["mlp"]["up"]["kernel"]
    assert up.sharding == NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor"))
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(hf_params)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_two_hosts_write_only_their_own_shards(tmp_path):
    """Simulated 2-host run: each writer gets data that is garbage outside its own shards."""
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    specs = {("layers", "w"): converted.LeafSpec((2, 16, 6), np.dtype(np.float32), True),
             ("emb",): converted.LeafSpec((16, 4), np.dtype(np.float16), False)}
    shardings = {("layers", "w"): NamedSharding(mesh, PartitionSpec(None, "fsdp")),
                 ("emb",): NamedSharding(mesh, PartitionSpec("fsdp"))}
    data = {p: np.random.default_rng(0).standard_normal(s.shape).astype(s.dtype) for p, s in specs.items()}
    host_of = lambda device: int(device.id >= 4)  # noqa: E731 - devices 0-3 on host 0, 4-7 on host 1
    for host in (1, 0):
        writer = converted.ParamWriter(str(tmp_path), specs, shardings, host=host, host_of=host_of, chunk_bytes=64)
        assert not writer.owns_all(("emb",))
        for path, value in data.items():
            garbage = np.full_like(value, np.nan)
            mine = slice(8 * host, 8 * host + 8)  # fsdp shards 0-3 -> rows 0..7 of axis "embed"
            if specs[path].stacked:
                garbage[:, mine] = value[:, mine]
                for layer in range(2):
                    writer.write(path, garbage[layer], layer=layer)
            else:
                garbage[mine] = value[mine]
                writer.write(path, garbage[:5], start=0)
                writer.write(path, garbage[5:], start=5)
        writer.commit() if host == 0 else writer.flush()
    restored = stock_orbax_params(tmp_path)
    np.testing.assert_array_equal(restored["layers"]["w"], data[("layers", "w")])
    np.testing.assert_array_equal(restored["emb"], data[("emb",)])


def test_exported_int4_weights_follow_the_spec_byte_layout(quantized, golden_dir):
    bits, official, _ = quantized
    source, state = read_state(golden_dir), read_state(official)
    assert json.load(open(os.path.join(official, "config.json")))["quantization_bit"] == bits
    for key in ("transformer.layers.0.attention.query_key_value.weight", "transformer.layers.1.mlp.dense_4h_to_h.weight",
                "transformer.layers.1.attention.dense.weight"):
        values, scale = official_quantize(source[key], bits)
        np.testing.assert_array_equal(state[key], reference_pack(values) if bits == 4 else values)
        np.testing.assert_array_equal(state[key + "_scale"], scale)
    quantized_keys = {k for k, v in state.items() if v.dtype == np.int8}
    assert quantized_keys == {k for k in source if k.endswith(".weight") and any(m in k for m in QUANTIZED)}
    assert "lm_head.weight" not in state  # the official INT8/INT4 checkpoints store the tied embedding once


def check_hand_dequantized_logits(quantized, ids: np.ndarray, tmp_path) -> Any:
    """Both the official-layout directory and its conversion back load quantized and give the logits
    of a float checkpoint dequantized by hand; returns the last model loaded."""
    bits, official, back = quantized
    reference_model, reference_params = load_pretrained(hand_dequantized_checkpoint(official, str(tmp_path / "ref"), bits))
    expected = logits(reference_model, reference_params, ids)
    for directory in (official, back):
        model, params = load_pretrained(directory)
        assert model.config.quantization_bit == bits
        assert params["layers"]["mlp"]["down"]["qkernel"].dtype == np.int8
        np.testing.assert_allclose(logits(model, params, ids), expected, atol=ATOL, rtol=RTOL)
    return model


def check_round_trip_keeps_the_bytes(quantized, tmp_path) -> None:
    bits, official, back = quantized
    assert converted.read_glm_config(back).quantization_bit == bits
    export(back, str(tmp_path / "again"), progress=False)
    assert_same_tensors(read_state(official), read_state(tmp_path / "again"))


def test_quantized_checkpoints_give_the_logits_of_hand_dequantized_weights(quantized, cases6b, tmp_path):
    check_hand_dequantized_logits(quantized, cases6b["b_mask_infill/input_ids"], tmp_path)


def test_quantized_round_trip_keeps_the_bytes(quantized, tmp_path):
    check_round_trip_keeps_the_bytes(quantized, tmp_path)


def test_dtype_dequantizes_a_quantized_source(quantized, tmp_path):
    bits, official, _ = quantized
    convert(official, str(tmp_path / "float"), dtype="float32", progress=False)
    reference = hand_dequantized_checkpoint(official, str(tmp_path / "ref"), bits)
    assert converted.read_glm_config(tmp_path / "float").quantization_bit == 0
    _, want = load_pretrained(reference)
    for got, expected in zip(jax.tree.leaves(stock_orbax_params(tmp_path / "float")), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, np.asarray(expected))


def test_quantization_on_load_equals_the_official_quantized_checkpoint(quantized, ours, golden_dir):
    bits, official, _ = quantized
    _, want = load_pretrained(official)
    for source in (ours, golden_dir):
        _, got = load_pretrained(source, quantization=f"int{bits}")
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
