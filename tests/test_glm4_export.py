"""GLM-4 (`transformers.GlmForCausalLM` layout) through glm-convert both ways: the exported
safetensors directory must load back in `transformers` with the original tensors and logits."""

import numpy as np
import pytest
import torch
import transformers

from checkpoints_convert.from_pytorch import convert
from checkpoints_convert.to_pytorch import export
from test_convert import assert_same_tensors, read_state


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
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


@pytest.fixture(scope="module")
def exported(reference, tmp_path_factory):
    _, source = reference
    work = tmp_path_factory.mktemp("glm4_convert")
    convert(str(source), str(work / "ours"), progress=False)
    export(str(work / "ours"), str(work / "hf"), dtype="float32", safetensors=True, num_shards=2, progress=False)
    return work / "hf"


def test_export_keeps_every_tensor_bit_identical(reference, exported):
    _, source = reference
    assert_same_tensors(read_state(source), read_state(exported))


def test_exported_directory_loads_in_transformers_with_identical_logits(reference, exported):
    torch_model, _ = reference
    reloaded = transformers.GlmForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(10, 1400, size=(2, 12)))
    with torch.no_grad():
        expected = torch_model(ids).logits
        actual = reloaded(ids).logits
    assert torch.equal(actual, expected)
