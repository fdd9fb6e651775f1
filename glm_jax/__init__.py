"""GLM / ChatGLM in JAX + Flax."""

from glm_jax.config import GLMConfig, from_hf_config, preset, to_hf_config
from glm_jax.generation import generate
from glm_jax.hf_io import CheckpointError
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.pretrained import load_pretrained

__all__ = ["GLMConfig", "GLMForCausalLM", "CheckpointError", "from_hf_config", "generate", "load_pretrained", "preset", "to_hf_config"]
