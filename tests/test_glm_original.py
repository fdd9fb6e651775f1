"""The original GLM (spec 4.3) loaded from a Hugging Face `glm-*` style checkpoint, against a float64
NumPy reference written from the spec, with the positions and attention of the blank-infilling
collator (spec 4.1) and of generation."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from glm_jax import load_pretrained, preset
from glm_jax.config import from_hf_config, to_hf_config

CFG = preset("glm-tiny")
H, N, D, LAYERS, V, ROWS = CFG.hidden_size, CFG.num_heads, CFG.head_dim, CFG.num_layers, CFG.vocab_size, 65
IDS = dict(bos_token_id=1004, eos_token_id=1005, pad_token_id=0, mask_token_id=1000, gmask_token_id=1001,
           smask_token_id=1002)
MASK, GMASK, SOP = 1000, 1001, 1004


def official_state(seed=0):
    """A random checkpoint under the official key names (fp16-exact values)."""
    rng = np.random.default_rng(seed)

    def normal(scale, *shape, mean=0.0):
        return rng.normal(mean, scale, shape).astype(np.float16).astype(np.float32)

    state = {
        "word_embeddings.weight": normal(0.5, V, H),
        "transformer.position_embeddings.weight": normal(0.5, ROWS, H),
        "transformer.block_position_embeddings.weight": normal(0.5, ROWS, H),
    }
    for i in range(LAYERS):
        p = f"transformer.layers.{i}"
        state.update({
            f"{p}.input_layernorm.weight": normal(0.3, H, mean=1.0), f"{p}.input_layernorm.bias": normal(0.2, H),
            f"{p}.attention.query_key_value.weight": normal(2.0 / math.sqrt(H), 3 * H, H),
            f"{p}.attention.query_key_value.bias": normal(0.1, 3 * H),
            f"{p}.attention.dense.weight": normal(1.0 / math.sqrt(H), H, H), f"{p}.attention.dense.bias": normal(0.1, H),
            f"{p}.post_attention_layernorm.weight": normal(0.3, H, mean=1.0),
            f"{p}.post_attention_layernorm.bias": normal(0.2, H),
            f"{p}.mlp.dense_h_to_4h.weight": normal(1.0 / math.sqrt(H), 4 * H, H),
            f"{p}.mlp.dense_h_to_4h.bias": normal(0.1, 4 * H),
            f"{p}.mlp.dense_4h_to_h.weight": normal(1.0 / math.sqrt(4 * H), H, 4 * H),
            f"{p}.mlp.dense_4h_to_h.bias": normal(0.1, H),
        })
    state["transformer.final_layernorm.weight"] = normal(1.0, H)
    state["transformer.final_layernorm.bias"] = normal(0.2, H)
    return state


HF_CONFIG = {
    "architectures": ["GLMModel"], "model_type": "glm", "num_layers": LAYERS, "vocab_size": V, "hidden_size": H,
    "num_attention_heads": N, "max_sequence_length": ROWS - 1, "block_position_encoding": True,
    "relative_encoding": False, "attention_scale": 1.0, "embedding_dropout_prob": 0.1, "attention_dropout_prob": 0.1,
    "output_dropout_prob": 0.1, "checkpoint_activations": False, "checkpoint_num_layers": 1, "parallel_output": True,
    "output_predict": True, "spell_length": None, "spell_func": "lstm", "initializer_range": 0.02,
    "pool_token": "cls", "torch_dtype": "float32",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("glm")
    state = official_state()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    model, params = load_pretrained(str(directory), **IDS)
    return state, model, params, directory


# ------------------------------------------------------------------------ reference (spec 4.3)


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


def reference_logits(state, ids, positions, blocks, allowed):
    """Pre-LN transformer, learned position + block position embeddings, [Q|K|V] blocks, scores masked as
    `score * mask - 65504 * (1 - mask)`, tanh GELU, tied head; float64."""
    s = {k: v.astype(np.float64) for k, v in state.items()}
    mask = allowed.astype(np.float64)[None]
    length = len(ids)
    x = (s["word_embeddings.weight"][ids] + s["transformer.position_embeddings.weight"][positions]
         + s["transformer.block_position_embeddings.weight"][blocks])
    for i in range(LAYERS):
        p = f"transformer.layers.{i}"
        a = layer_norm(x, s[f"{p}.input_layernorm.weight"], s[f"{p}.input_layernorm.bias"])
        qkv = a @ s[f"{p}.attention.query_key_value.weight"].T + s[f"{p}.attention.query_key_value.bias"]
        q, k, v = (t.reshape(length, N, D) for t in np.split(qkv, 3, axis=-1))
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        scores = scores * mask - 65504.0 * (1.0 - mask)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = np.einsum("hqk,khd->qhd", probs, v).reshape(length, H)
        x = x + context @ s[f"{p}.attention.dense.weight"].T + s[f"{p}.attention.dense.bias"]
        m = layer_norm(x, s[f"{p}.post_attention_layernorm.weight"], s[f"{p}.post_attention_layernorm.bias"])
        u = m @ s[f"{p}.mlp.dense_h_to_4h.weight"].T + s[f"{p}.mlp.dense_h_to_4h.bias"]
        gelu = 0.5 * u * (1.0 + np.tanh(0.7978845608028654 * u * (1.0 + 0.044715 * u * u)))
        x = x + gelu @ s[f"{p}.mlp.dense_4h_to_h.weight"].T + s[f"{p}.mlp.dense_4h_to_h.bias"]
    h = layer_norm(x, s["transformer.final_layernorm.weight"], s["transformer.final_layernorm.bias"])
    return h @ s["word_embeddings.weight"].T


def sep_mask(length, sep):
    """Spec 4.1 step 5: query t may attend key j iff j < sep or j <= t."""
    return np.array([[j < sep or j <= t for j in range(length)] for t in range(length)])


def assert_close(actual, expected):
    assert np.abs(expected).max() > 5 and expected.std(-1).min() > 0.5, "degenerate reference"
    np.testing.assert_allclose(actual, expected, atol=2e-4 * np.abs(expected).max(), rtol=0)


# Spec 4.1 worked example: x = x1..x6, spans {x3}, {x5, x6}, Part B shuffled to {x5, x6} first.
X = {i: 10 + 7 * i for i in range(1, 7)}
COLLATED_IDS = [X[1], X[2], MASK, X[4], MASK, SOP, X[5], X[6], SOP, X[3]]
COLLATED_POSITIONS = [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]
COLLATED_BLOCKS = [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
COLLATED_SEP = 5


def test_blank_infilling_example_matches_reference(checkpoint):
    state, model, params, _ = checkpoint
    length = len(COLLATED_IDS)
    allowed = sep_mask(length, COLLATED_SEP)
    logits = model.apply({"params": params}, jnp.array([COLLATED_IDS]),
                         jnp.array([[COLLATED_POSITIONS, COLLATED_BLOCKS]]), jnp.array(allowed)[None, None])
    expected = reference_logits(state, COLLATED_IDS, COLLATED_POSITIONS, COLLATED_BLOCKS, allowed)
    assert_close(np.asarray(logits)[0], expected)


@pytest.mark.parametrize("ids, positions, blocks", [
    # [MASK] blank: from <sop> on the position is the mask's, the block position counts 1, 2, ...
    ([X[1], X[2], MASK, X[4], SOP, X[5]], [0, 1, 2, 3, 2, 2], [0, 0, 0, 0, 1, 2]),
    ([X[1], X[2], X[3], GMASK, SOP, X[5], X[6]], [0, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 1, 2, 3]),
])
def test_generation_positions_are_derived_from_ids(checkpoint, ids, positions, blocks):
    state, model, params, _ = checkpoint
    logits = model.apply({"params": params}, jnp.array([ids]))
    expected = reference_logits(state, ids, positions, blocks, sep_mask(len(ids), ids.index(SOP)))
    assert_close(np.asarray(logits)[0], expected)


def test_decode_with_cache_equals_full_forward(checkpoint):
    _, model, params, _ = checkpoint
    ids = jnp.array([COLLATED_IDS])
    positions = jnp.array([[COLLATED_POSITIONS, COLLATED_BLOCKS]])
    allowed = jnp.array(sep_mask(len(COLLATED_IDS), COLLATED_SEP))[None, None]
    full = model.apply({"params": params}, ids, positions, allowed)

    @jax.jit
    def step(cache, tokens, token_positions, token_mask):
        return model.apply({"params": params, "cache": cache}, tokens, token_positions, token_mask, decode=True,
                           mutable=["cache"])

    state = model.init(jax.random.PRNGKey(0), ids, positions, allowed, decode=True)
    prefix = 7
    _, state = step(state["cache"], ids[:, :prefix], positions[..., :prefix], allowed[:, :, :prefix])
    steps = []
    for t in range(prefix, len(COLLATED_IDS)):
        logits, state = step(state["cache"], ids[:, t:t + 1], positions[..., t:t + 1], allowed[:, :, t:t + 1])
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full)[:, prefix:], atol=1e-4, rtol=1e-4)


def test_config_round_trip_and_presets():
    written = to_hf_config(from_hf_config(HF_CONFIG, **IDS))
    assert {k: written.get(k) for k in HF_CONFIG} == HF_CONFIG
    with pytest.raises(ValueError, match="no known special ids .* vocab_size 1024"):
        from_hf_config(HF_CONFIG)
    assert from_hf_config({**HF_CONFIG, **IDS}) == from_hf_config(HF_CONFIG, **IDS)
    large = from_hf_config({**HF_CONFIG, "vocab_size": 30592, "hidden_size": 1024, "num_layers": 24,
                            "num_attention_heads": 16, "max_sequence_length": 512})
    assert large == preset("glm-large")
    ten_b = preset("glm-10b")
    assert (ten_b.num_layers, ten_b.hidden_size, ten_b.num_heads, ten_b.ffn_hidden_size, ten_b.vocab_size,
            ten_b.max_sequence_length) == (48, 4096, 64, 16384, 50304, 1024)
    # The transformers-native GLM-4 config shares model_type "glm" and still reads as GLM-4.
    assert from_hf_config({"model_type": "glm", "vocab_size": 1536, "hidden_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "intermediate_size": 344}).family == "glm4_hf"


def test_glm_convert_writes_the_same_params(checkpoint, tmp_path):
    """The generic converter (official directory -> converted checkpoint) reads the original GLM layout."""
    from checkpoints_convert.from_pytorch import convert

    _, _, params, directory = checkpoint
    source = tmp_path / "source"
    source.mkdir()
    (source / "pytorch_model.bin").symlink_to(directory / "pytorch_model.bin")
    (source / "config.json").write_text(json.dumps({**HF_CONFIG, **IDS}))  # ids our config writer adds
    config = convert(str(source), str(tmp_path / "converted"), progress=False)
    assert config.family == "glm" and config.position_embedding == "learned_2d"
    _, restored = load_pretrained(str(tmp_path / "converted"))
    for (path, expected), (_, leaf) in zip(jax.tree_util.tree_leaves_with_path(params),
                                           jax.tree_util.tree_leaves_with_path(restored)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected), err_msg=str(path))
