"""GLM-130B: the 8-way tensor-parallel SAT checkpoint round trip (spec 3.2) and the forward pass
against a float64 NumPy reference written from spec 3.1, on a tiny model of the same architecture."""

import math
import os

import jax
import numpy as np
import pytest
import torch

from checkpoints_convert.glm130b_sat import convert, official_state_dict, rank_files, split_to_sat
from checkpoints_convert.staging import ConversionError
from glm_jax import CheckpointError, GLMForCausalLM, load_pretrained, preset

RANKS = 8
CFG = preset("glm130b-tiny")
MASK, GMASK, SMASK, SOP = CFG.mask_token_id, CFG.gmask_token_id, CFG.smask_token_id, CFG.bos_token_id


def random_params(cfg, seed=0):
    """Params with strong branches (a random model with small weights only echoes its input), fp16-exact."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: GLMForCausalLM(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32)))["params"]

    def draw(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        shape = leaf.value.shape if hasattr(leaf, "value") else leaf.shape
        if names[-1] == "embedding":
            value = rng.normal(0, 0.5, shape)
        elif names[-1] == "scale":
            value = rng.normal(0 if names[0] == "final_norm" else 1, 0.3 if names[0] != "final_norm" else 1.0, shape)
        elif names[-1] == "bias":
            value = rng.normal(0, 0.1, shape)
        else:
            fan_in = cfg.hidden_size if names[-2] != "down" else cfg.ffn_hidden_size
            value = rng.normal(0, 1.5 / math.sqrt(fan_in), shape)
        return value.astype(np.float16).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract, is_leaf=lambda x: hasattr(x, "value"))


@pytest.fixture(scope="module")
def params():
    import flax

    return flax.linen.unbox(random_params(CFG))


@pytest.fixture(scope="module")
def sat_dir(params, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sat")
    split_to_sat(official_state_dict(CFG, params), str(directory), ranks=RANKS, iteration=49300)
    return directory


@pytest.fixture(scope="module")
def converted(sat_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "glm130b"
    convert(str(sat_dir), str(output), CFG, dtype="float32")
    return load_pretrained(str(output))


def test_rank_files_follow_the_partition_rules(params, sat_dir):
    """Rank partitions built by hand from the spec: heads contiguous per rank with per-head [q, k, v]
    rows, row-parallel dense, GLU halves per rank, vocab-parallel embedding, replicated norms."""
    n, d, h, f, v = CFG.num_heads, CFG.head_dim, CFG.hidden_size, CFG.ffn_hidden_size, CFG.vocab_size
    layer = 1
    attn, mlp = (jax.tree.map(lambda x: np.asarray(x)[layer], params["layers"][k]) for k in ("attention", "mlp"))
    dense = attn["dense"]["kernel"].reshape(n * d, h).T  # PyTorch [out, in]
    p = f"transformer.layers.{layer}"
    for rank, path in enumerate(rank_files(str(sat_dir))):
        module = torch.load(path, weights_only=True)["module"]
        heads = range(rank * n // RANKS, (rank + 1) * n // RANKS)
        qkv_rows = np.concatenate([attn[name]["kernel"][:, head, :].T for head in heads for name in ("query", "key", "value")])
        np.testing.assert_array_equal(module[f"{p}.attention.query_key_value.weight"].numpy(), qkv_rows)
        cols = slice(rank * n * d // RANKS, (rank + 1) * n * d // RANKS)
        np.testing.assert_array_equal(module[f"{p}.attention.dense.weight"].numpy(), dense[:, cols])
        rows = slice(rank * f // RANKS, (rank + 1) * f // RANKS)
        glu = np.concatenate([mlp["up"]["kernel"].T[rows], mlp["gate"]["kernel"].T[rows]])
        np.testing.assert_array_equal(module[f"{p}.mlp.dense_h_to_4h.weight"].numpy(), glu)
        np.testing.assert_array_equal(module[f"{p}.mlp.dense_4h_to_h.weight"].numpy(),
                                      mlp["down"]["kernel"].T[:, rows])
        np.testing.assert_array_equal(module["transformer.word_embeddings.weight"].numpy(),
                                      params["word_embeddings"]["embedding"][rank * v // RANKS:(rank + 1) * v // RANKS])
        np.testing.assert_array_equal(module[f"{p}.post_attention_layernorm.weight"].numpy(),
                                      params["layers"]["post_attention_norm"]["scale"][layer])
        assert module["transformer.word_embeddings.weight"].shape == (v // RANKS, h)


def test_merge_restores_the_unsplit_weights_exactly(params, converted):
    model, restored = converted
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in model.config.to_dict().items()}
    assert stored == CFG.to_dict()
    flat_expected = jax.tree_util.tree_leaves_with_path(params)
    flat_restored = dict(jax.tree_util.tree_leaves_with_path(restored))
    assert len(flat_expected) == len(flat_restored)
    for path, leaf in flat_expected:
        np.testing.assert_array_equal(np.asarray(flat_restored[path]), np.asarray(leaf), err_msg=str(path))


# ------------------------------------------------------------------------ reference (spec 3.1)


def reference_positions(ids):
    """Spec 3.1: the blank is the first [MASK], else the first [sMASK]; positions from <sop> on are reset
    to it; with [gMASK] they continue. Keys before <sop> are visible to every query."""
    length, context = len(ids), ids.index(SOP)
    blank = ids.index(MASK) if MASK in ids else (ids.index(SMASK) if SMASK in ids else None)
    positions = [blank if blank is not None and t >= context else t for t in range(length)]
    allowed = np.array([[j < context or j <= t for j in range(length)] for t in range(length)])
    return np.array(positions, np.float64), allowed


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def reference_logits(state, ids):
    """One unpadded sequence through the merged official state dict, float64."""
    s = {k: v.astype(np.float64) for k, v in state.items()}
    n, d, layers = CFG.num_heads, CFG.head_dim, CFG.num_layers
    alpha = math.sqrt(2 * layers)
    positions, allowed = reference_positions(ids)
    # 1-D rotary over the whole head, rotate-half pairs (j, j + d/2), base 10000. The official model runs
    # `.half()`, so inv_freq, the angles p * inv_freq and their cos/sin are float16 numbers.
    half = lambda a: a.astype(np.float16).astype(np.float64)  # noqa: E731
    inv_freq = half(1.0 / 10000 ** (np.arange(0, d, 2) / d))
    angles = half(np.concatenate([positions[:, None] * inv_freq] * 2, axis=-1)[:, None, :])  # [L, 1, d]
    cos, sin = half(np.cos(angles)), half(np.sin(angles))

    def rotate(t):
        return t * cos + np.concatenate([-t[..., d // 2:], t[..., :d // 2]], axis=-1) * sin

    gelu = np.vectorize(lambda u: 0.5 * u * (1 + math.erf(u / math.sqrt(2))))
    x = s["transformer.word_embeddings.weight"][ids]
    for i in range(layers):
        p = f"transformer.layers.{i}"
        a = layer_norm(x, s[f"{p}.input_layernorm.weight"], s[f"{p}.input_layernorm.bias"])
        qkv = (a @ s[f"{p}.attention.query_key_value.weight"].T + s[f"{p}.attention.query_key_value.bias"])
        qkv = qkv.reshape(len(ids), n, 3, d)
        q, k, v = rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        scores = np.where(allowed[None], scores, -10000.0 * (i + 1))
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = np.einsum("hqk,khd->qhd", probs, v).reshape(len(ids), n * d)
        attn = context @ s[f"{p}.attention.dense.weight"].T + s[f"{p}.attention.dense.bias"]
        x1 = a * alpha + attn
        m = layer_norm(x1, s[f"{p}.post_attention_layernorm.weight"], s[f"{p}.post_attention_layernorm.bias"])
        up = m @ s[f"{p}.mlp.dense_h_to_4h.weight"].T + s[f"{p}.mlp.dense_h_to_4h.bias"]
        first, second = np.split(up, 2, axis=-1)
        y = (first * gelu(second)) @ s[f"{p}.mlp.dense_4h_to_h.weight"].T + s[f"{p}.mlp.dense_4h_to_h.bias"]
        x = m * alpha + y
    h = layer_norm(x, s["transformer.final_layernorm.weight"], s["transformer.final_layernorm.bias"])
    return h @ s["transformer.word_embeddings.weight"].T


def merge_by_spec(sat_dir):
    """The merged state dict, written directly from the partition rules of spec 3.2."""
    modules = [torch.load(p, weights_only=True)["module"] for p in rank_files(str(sat_dir))]
    merged = {}
    for key in modules[0]:
        parts = [m[key].numpy() for m in modules]
        if key.endswith((".attention.dense.weight", ".mlp.dense_4h_to_h.weight")):
            merged[key] = np.concatenate(parts, axis=1)
        elif ".mlp.dense_h_to_4h." in key:
            merged[key] = np.concatenate([p[: len(p) // 2] for p in parts] + [p[len(p) // 2:] for p in parts])
        elif key.endswith(("word_embeddings.weight", "query_key_value.weight", "query_key_value.bias")):
            merged[key] = np.concatenate(parts)
        else:
            merged[key] = parts[0]
    return merged


PROMPTS = [
    [20, 31, MASK, 45, 56, SOP, 77, 88],  # [MASK]: positions reset from <sop> on
    [20, 31, 45, 56, GMASK, SOP, 77, 88],  # [gMASK]: positions continue
    [20, SMASK, 31, 45, SOP, 77],  # [sMASK], left-padded in the batch
    [20, GMASK, 31, MASK, SOP, 70, 71, 72],  # [MASK] is the blank even after a [gMASK]
]


def test_logits_match_spec_reference(sat_dir, converted):
    model, params = converted
    length = max(map(len, PROMPTS))
    ids = np.array([[0] * (length - len(p)) + p for p in PROMPTS], np.int32)
    padding = np.array([[0] * (length - len(p)) + [1] * len(p) for p in PROMPTS], np.int32)
    logits = np.asarray(jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m))(params, ids, padding))
    state = merge_by_spec(sat_dir)
    for row, prompt in enumerate(PROMPTS):
        expected = reference_logits(state, prompt)
        assert np.abs(expected).max() > 5 and expected.std(-1).min() > 0.5, "degenerate reference"
        np.testing.assert_allclose(logits[row, length - len(prompt):], expected, atol=2e-4 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_ranks_are_dequantized_per_partition(params, tmp_path, bits):
    """Each rank's int weights carry scales of its own partition: the merged float weights must be within
    half a quantization step (of that partition's row scale) of the original weights."""
    state = official_state_dict(CFG, params)
    split_to_sat(state, str(tmp_path / "sat"), ranks=RANKS, quantization_bit=bits)
    module = torch.load(rank_files(str(tmp_path / "sat"))[3], weights_only=True)["module"]
    key = "transformer.layers.0.attention.dense.weight"
    assert module[key].dtype == torch.int8 and module[key + "_scale"].dtype == torch.float16
    assert module[key].shape[1] == CFG.num_heads * CFG.head_dim // RANKS * bits // 8
    convert(str(tmp_path / "sat"), str(tmp_path / "out"), CFG, dtype="float32")
    restored = official_state_dict(CFG, load_pretrained(str(tmp_path / "out"))[1])
    for key in [k for k in state if k.endswith(("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight",
                                                   "dense_4h_to_h.weight"))]:
        original, merged = state[key], restored[key]
        row_parallel = key.endswith(("attention.dense.weight", "dense_4h_to_h.weight"))
        axis = 1 if row_parallel else 0
        for part_o, part_m in zip(np.split(original, RANKS, axis=axis), np.split(merged, RANKS, axis=axis)):
            step = np.abs(part_o).max(axis=1, keepdims=True) / (2 ** (bits - 1) - 1)
            assert np.all(np.abs(part_m - part_o) <= 0.65 * step + 1e-7), key
        assert not np.array_equal(original, merged)
    for key in ("transformer.word_embeddings.weight", "transformer.layers.1.attention.query_key_value.bias"):
        np.testing.assert_array_equal(restored[key], state[key])


def test_bad_checkpoints_are_named(params, sat_dir, tmp_path):
    state = official_state_dict(CFG, params)
    paths = split_to_sat(state, str(tmp_path / "sat"), ranks=RANKS)
    module = torch.load(paths[3], weights_only=True)["module"]
    module["transformer.layers.1.input_layernorm.bias"] += 1
    torch.save({"module": module}, paths[3])
    with pytest.raises(CheckpointError, match=r"layers\.1\.input_layernorm\.bias should be replicated, but rank 3"):
        convert(str(tmp_path / "sat"), str(tmp_path / "out"), CFG)
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == ["sat"]
    os.remove(paths[5])
    with pytest.raises(CheckpointError, match=r"missing rank files \['mp_rank_05_model_states\.pt'\]"):
        convert(str(tmp_path / "sat"), str(tmp_path / "out"), CFG)
    with pytest.raises(ConversionError, match="already exists"):
        convert(str(sat_dir), str(tmp_path), CFG)
    paths = split_to_sat(state, str(tmp_path / "sat"), ranks=RANKS)
    module = torch.load(paths[6], weights_only=True)["module"]
    module["transformer.layers.0.attention.dense.weight"] = module["transformer.layers.0.attention.dense.weight"][:, :-1]
    torch.save({"module": module}, paths[6])
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.dense\.weight in mp_rank_06_model_states\.pt: "
                                              r"expected \[64, 8\], got \[64, 7\]"):
        convert(str(tmp_path / "sat"), str(tmp_path / "out"), CFG)


def test_preset_matches_spec():
    cfg = preset("glm-130b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size,
            cfg.max_sequence_length) == (70, 12288, 96, 128, 32768, 150528, 2048)
    assert cfg.residual_alpha == pytest.approx(math.sqrt(140)) and cfg.mlp_type == "geglu" and cfg.rotary == "full"
    assert (cfg.mask_token_id, cfg.gmask_token_id, cfg.smask_token_id, cfg.bos_token_id, cfg.eos_token_id,
            cfg.extra_stop_token_ids) == (150000, 150001, 150002, 150004, 150005, (20002,))
