"""GLM-4 in the `transformers` native layout (`GlmForCausalLM`): a tiny random model built by
`transformers` itself is the reference for logits and greedy tokens."""

import numpy as np
import pytest
import torch
import transformers

from glm_jax import load_pretrained
from parity_helpers import greedy_without_cache

STEPS = 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GlmConfig(
        vocab_size=1536, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5,
        initializer_range=0.3, pad_token_id=1500, eos_token_id=[1500, 1501, 1502],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * 5, "partial_rotary_factor": 0.5},
    )
    model = transformers.GlmForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("glm4")
    model.save_pretrained(directory)
    return model, directory


def test_logits_match_transformers(reference):
    torch_model, directory = reference
    ids = np.random.default_rng(0).integers(10, 1400, size=(2, 12))
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(ids)).logits.numpy()
    model, params = load_pretrained(str(directory))
    assert model.config.family == "glm4_hf" and model.config.extra_stop_token_ids == (1501, 1502)
    logits = np.asarray(model.apply({"params": params}, ids))
    np.testing.assert_allclose(logits, expected, atol=1e-4 * np.abs(expected).max(), rtol=1e-4)


def test_greedy_tokens_match_transformers(reference):
    torch_model, directory = reference
    ids = np.random.default_rng(1).integers(10, 1400, size=(1, 9))
    with torch.no_grad():
        expected = torch_model.generate(torch.from_numpy(ids), max_new_tokens=STEPS, do_sample=False,
                                        eos_token_id=None, pad_token_id=1500).numpy()
    model, params = load_pretrained(str(directory))
    sequences, scores = greedy_without_cache(model, params, ids, STEPS)
    top2 = np.sort(scores, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-3, "reference has near-ties; pick another seed"
    np.testing.assert_array_equal(sequences, expected)
