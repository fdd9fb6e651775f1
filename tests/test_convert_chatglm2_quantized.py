"""ChatGLM2 INT8/INT4 in the official layout (spec §2.2 "Quantization": the §1.7 per-row scheme on
the four linear weights of every `transformer.encoder` layer), both ways, from the golden ChatGLM2
checkpoint: `glm-convert --to=pytorch --quantization=int4|int8` writes it, `load_pretrained` and
`glm-convert --to=jax` read it back.

References: the official `QuantizedLinear` arithmetic and the spec's nibble packing
(`test_quantization.official_quantize` / `reference_pack`), and a float checkpoint whose weights were
dequantized by hand with the spec's unpacking (`test_convert.hand_dequantized_checkpoint`).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from checkpoints_convert.from_pytorch import convert
from glm_jax import load_pretrained
from test_convert import check_hand_dequantized_logits, check_round_trip_keeps_the_bytes, read_state
from test_quantization import official_quantize, reference_pack

QUANTIZED = ("self_attention.query_key_value.weight", "self_attention.dense.weight", "mlp.dense_h_to_4h.weight",
             "mlp.dense_4h_to_h.weight")


@pytest.fixture(scope="module")
def golden_dir(golden2):
    return str(golden2 / "checkpoint")


@pytest.fixture(scope="module")
def ours(golden_dir, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("chatglm2") / "ours")
    convert(golden_dir, dst, progress=False)
    return dst


@pytest.fixture(scope="module", params=[8, 4])
def quantized(request, ours, tmp_path_factory):
    """(bits, official INT8/INT4 directory written by `glm-convert --to=pytorch`, its conversion back)."""
    bits = request.param
    root = tmp_path_factory.mktemp(f"chatglm2_int{bits}")
    official, back = str(root / "official"), str(root / "ours")
    result = subprocess.run(
        [sys.executable, "-m", "checkpoints_convert.cli", "--progress=false", "--to=pytorch", f"--src={ours}",
         f"--dst={official}", f"--quantization=int{bits}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    convert(official, back, progress=False)
    return bits, official, back


def test_exported_weights_follow_the_official_layout(quantized, golden_dir):
    bits, official, _ = quantized
    source, state = read_state(golden_dir), read_state(official)
    assert json.load(open(os.path.join(official, "config.json")))["quantization_bit"] == bits
    expected_keys = {k for k in source if k.startswith("transformer.encoder.layers.") and k.endswith(QUANTIZED)}
    assert len(expected_keys) == 4 * 2
    assert {k for k, v in state.items() if v.dtype == np.int8} == expected_keys
    assert set(state) == set(source) | {k + "_scale" for k in expected_keys}
    for key in expected_keys:
        values, scale = official_quantize(source[key], bits)
        np.testing.assert_array_equal(state[key], reference_pack(values) if bits == 4 else values, err_msg=key)
        assert state[key + "_scale"].dtype == np.float16
        np.testing.assert_array_equal(state[key + "_scale"], scale, err_msg=key)
    for key in set(source) - expected_keys:  # biases, norms, embedding, output layer stay as they were
        assert state[key].tobytes() == source[key].tobytes(), key


def test_quantized_checkpoints_give_the_logits_of_hand_dequantized_weights(quantized, cases2, tmp_path):
    ids = cases2["c_batch_leftpad/input_ids"][:, -7:]  # both rows without their padding
    assert check_hand_dequantized_logits(quantized, ids, tmp_path).config.family == "chatglm2"


def test_quantized_round_trip_keeps_the_bytes(quantized, tmp_path):
    check_round_trip_keeps_the_bytes(quantized, tmp_path)


def test_quantization_on_load_equals_the_official_layout(quantized, golden_dir):
    bits, official, _ = quantized
    _, want = load_pretrained(official)
    _, got = load_pretrained(golden_dir, quantization=f"int{bits}")
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
