"""Model configuration for every GLM family member.

One frozen dataclass describes all variants through *architectural switches* (norm type, residual
style, MLP type, rotary kind, QKV layout, head tying, KV groups) so that the model code never asks
"which model is this?". Family names appear only here, in the Hugging Face config readers/writers
and in the checkpoint key tables.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

NormType = Literal["layernorm", "rmsnorm"]
# "deepnorm": x1 = norm(x) * alpha + f(norm(x))   (ChatGLM-6B, GLM-130B: residual on the norm OUTPUT)
# "pre_norm": x1 = x + f(norm(x))                 (ChatGLM2/3, GLM-4, original GLM)
ResidualStyle = Literal["deepnorm", "pre_norm"]
# "gelu": act(x W1) W2 (not gated). "swiglu"/"geglu": act(x Wg) * (x Wu) W2.
MLPType = Literal["gelu", "swiglu", "geglu"]
# "2d": two rotary sections of head_dim/2, section 0 rotated by position ids, section 1 by block
#       position ids, rotate-half pairing (j, j + d/2) (ChatGLM-6B).
# "half_adjacent": one rotary section over the first head_dim/2 dims, adjacent pairs (2j, 2j+1), the
#       rest passes through (ChatGLM2/3, GLM-4).
# "full": one rotate-half section over the whole head (GLM-130B).
RotaryKind = Literal["2d", "half_adjacent", "full"]
# How fused checkpoint QKV rows are ordered: per head [q_h, k_h, v_h] (ChatGLM-6B, GLM-130B) or in
# blocks [Q | K | V] (ChatGLM2, GLM-4). Only the converters read this; the model keeps q/k/v separate.
QKVLayout = Literal["per_head", "blocks"]
# "glm_2d": prefix-LM positions/mask of ChatGLM-6B (context bidirectional, [sop] onward causal).
# "causal": 1D positions and a causal mask (ChatGLM2/3, GLM-4).
PositionScheme = Literal["glm_2d", "causal"]
# "layer_scaled": scores scaled by 1/(layer+1) before masking, masked with -10000, rescaled in fp32
#       (ChatGLM-6B: masked logits end at -10000*(layer+1), fully masked rows become uniform).
# "standard": masked with the most negative finite float (ChatGLM2 SDPA path).
MaskFill = Literal["layer_scaled", "standard"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class GLMConfig:
    """Shape, architecture switches, special ids and numerics of one GLM model."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    ffn_hidden_size: int
    max_sequence_length: int = 2048
    norm_type: NormType = "layernorm"
    norm_eps: float = 1e-5
    residual_style: ResidualStyle = "deepnorm"
    residual_alpha: float = math.sqrt(56.0)
    mlp_type: MLPType = "gelu"
    qkv_layout: QKVLayout = "per_head"
    qkv_bias: bool = True
    dense_bias: bool = True
    mlp_bias: bool = True
    rotary: RotaryKind = "2d"
    rope_base: float = 10000.0
    rope_ratio: float = 1.0
    rope_fp16_inv_freq: bool = True
    rope_dtype: str = "float32"
    position_scheme: PositionScheme = "glm_2d"
    mask_fill: MaskFill = "layer_scaled"
    tie_word_embeddings: bool = True
    # Special token ids (None where a family has no such token).
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Further ids that end generation besides eos (GLM-4 stops at <|user|> and <|observation|> too).
    extra_stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    mask_token_id: int | None = None
    gmask_token_id: int | None = None
    # P-Tuning v2.
    pre_seq_len: int = 0
    prefix_projection: bool = False
    # The projected prefix embeds in the hidden size (ChatGLM-6B) or in the kv size (ChatGLM2).
    prefix_embed_in_kv_size: bool = False
    prefix_dropout: float = 0.1
    # Numerics and memory.
    dtype: str = "float32"
    param_dtype: str = "float32"
    logits_dtype: str = "float32"
    remat_policy: RematPolicy = "none"
    quantization_bit: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rotary == "2d" and self.head_dim % 4:
            problems.append(f"2d rotary needs head_dim divisible by 4, got {self.head_dim}")
        if self.rotary == "half_adjacent" and self.head_dim % 4:
            problems.append(f"half_adjacent rotary needs head_dim divisible by 4, got {self.head_dim}")
        for name in ("dtype", "param_dtype", "logits_dtype", "rope_dtype"):
            if getattr(self, name) not in DTYPES:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {DTYPES}")
        if self.quantization_bit not in (0, 4, 8):
            problems.append(f"quantization_bit must be 0, 4 or 8, got {self.quantization_bit}")
        if self.position_scheme == "glm_2d" and None in (self.bos_token_id, self.mask_token_id, self.gmask_token_id):
            problems.append("position_scheme 'glm_2d' needs bos_token_id, mask_token_id and gmask_token_id")
        if problems:
            raise ValueError("invalid GLMConfig: " + "; ".join(problems))

    @property
    def num_position_rows(self) -> int:
        """Rows of `position_ids`: 2 for GLM 2D positions (position, block position), else 1."""
        return 2 if self.rotary == "2d" else 1

    @property
    def gated_mlp(self) -> bool:
        return self.mlp_type in ("swiglu", "geglu")

    @property
    def prefix_kv_size(self) -> int:
        """Width of one prefix token's keys+values for all layers (the P-Tuning v2 encoder output)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> "GLMConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GLMConfig fields: {unknown}")
        return cls(**values)


def _chatglm6b(**overrides: Any) -> GLMConfig:
    values: dict[str, Any] = dict(
        family="chatglm", vocab_size=130528, hidden_size=4096, num_layers=28, num_heads=32, head_dim=128,
        num_kv_heads=32, ffn_hidden_size=16384, bos_token_id=130004, eos_token_id=130005, pad_token_id=3,
        mask_token_id=130000, gmask_token_id=130001,
    )
    values.update(overrides)
    return GLMConfig(**values)


def _chatglm2(**overrides: Any) -> GLMConfig:
    values: dict[str, Any] = dict(
        family="chatglm2", vocab_size=65024, hidden_size=4096, num_layers=28, num_heads=32, head_dim=128,
        num_kv_heads=2, ffn_hidden_size=13696, max_sequence_length=32768, norm_type="rmsnorm",
        residual_style="pre_norm", residual_alpha=1.0, mlp_type="swiglu", qkv_layout="blocks", dense_bias=False,
        mlp_bias=False, rotary="half_adjacent", rope_fp16_inv_freq=False, position_scheme="causal",
        mask_fill="standard", tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
        prefix_embed_in_kv_size=True,
    )
    values.update(overrides)
    return GLMConfig(**values)


def _glm4(**overrides: Any) -> GLMConfig:
    values: dict[str, Any] = dict(
        family="glm4_hf", vocab_size=151552, num_layers=40, max_sequence_length=131072, norm_eps=1.5625e-7,
        rope_base=10000.0 * 500, eos_token_id=151329, extra_stop_token_ids=(151336, 151338), pad_token_id=151329,
    )
    values.update(overrides)
    return _chatglm2(**values)


PRESETS: dict[str, Any] = {
    "chatglm-6b": _chatglm6b,
    # Same architecture at test / benchmark sizes; special ids stay at the end of the vocabulary.
    "chatglm-tiny": lambda **o: _chatglm6b(
        vocab_size=1500, hidden_size=128, num_layers=2, num_heads=4, head_dim=32, num_kv_heads=4,
        ffn_hidden_size=512, bos_token_id=1404, eos_token_id=1405, mask_token_id=1400, gmask_token_id=1401, **o),
    "chatglm-100m": lambda **o: _chatglm6b(
        vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, head_dim=64, num_kv_heads=12,
        ffn_hidden_size=3072, bos_token_id=31004, eos_token_id=31005, mask_token_id=31000, gmask_token_id=31001, **o),
    "chatglm-1b": lambda **o: _chatglm6b(
        vocab_size=65024, hidden_size=2048, num_layers=16, num_heads=16, head_dim=128, num_kv_heads=16,
        ffn_hidden_size=8192, bos_token_id=64004, eos_token_id=64005, mask_token_id=64000, gmask_token_id=64001, **o),
    "chatglm2-6b": _chatglm2,
    "chatglm2-tiny": lambda **o: _chatglm2(
        vocab_size=1536, hidden_size=128, num_layers=2, num_heads=4, head_dim=32, num_kv_heads=2,
        ffn_hidden_size=344, **o),
    "glm-4-9b": _glm4,
    "glm4-tiny": lambda **o: _glm4(
        vocab_size=1536, hidden_size=128, num_layers=2, num_heads=4, head_dim=32, num_kv_heads=2,
        ffn_hidden_size=344, max_sequence_length=2048, norm_eps=1e-5, eos_token_id=1500,
        extra_stop_token_ids=(1501, 1502), pad_token_id=1500, **o),
}


def preset(name: str, **overrides: Any) -> GLMConfig:
    """A named configuration, optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


def from_hf_config(hf: dict[str, Any], **overrides: Any) -> GLMConfig:
    """Reads an official Hugging Face `config.json` (as a dict) into a GLMConfig.

    ChatGLM-6B and ChatGLM2/3 share `model_type == "chatglm"`; they are told apart by the fields only
    one of them has (`position_encoding_2d`/`inner_hidden_size` vs `multi_query_attention`/`rmsnorm`).
    """
    model_type = hf.get("model_type")
    if model_type == "glm":
        return _from_hf_glm4(hf, **overrides)
    if model_type != "chatglm":
        raise ValueError(f"unsupported model_type {model_type!r} in config.json (expected 'chatglm' or 'glm')")
    if "inner_hidden_size" in hf or "position_encoding_2d" in hf:
        return _from_hf_chatglm6b(hf, **overrides)
    if "multi_query_attention" in hf or "rmsnorm" in hf:
        return _from_hf_chatglm2(hf, **overrides)
    raise ValueError("config.json has model_type 'chatglm' but neither ChatGLM-6B nor ChatGLM2 fields")


def _require(hf: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ValueError(f"config.json is missing required fields: {missing}")


def _from_hf_chatglm6b(hf: dict[str, Any], **overrides: Any) -> GLMConfig:
    _require(hf, "vocab_size", "hidden_size", "num_layers", "num_attention_heads")
    if hf.get("position_encoding_2d", True) is not True:
        raise ValueError("ChatGLM-6B configs with position_encoding_2d=false are not supported")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    values: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_layers"], num_heads=heads,
        head_dim=hidden // heads, num_kv_heads=heads, ffn_hidden_size=hf.get("inner_hidden_size") or 4 * hidden,
        max_sequence_length=hf.get("max_sequence_length", 2048), norm_eps=hf.get("layernorm_epsilon", 1e-5),
        bos_token_id=hf.get("bos_token_id", 130004), eos_token_id=hf.get("eos_token_id", 130005),
        pad_token_id=hf.get("pad_token_id", 3), mask_token_id=hf.get("mask_token_id", 130000),
        gmask_token_id=hf.get("gmask_token_id", 130001), pre_seq_len=hf.get("pre_seq_len") or 0,
        prefix_projection=bool(hf.get("prefix_projection", False)),
        quantization_bit=hf.get("quantization_bit") or 0,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )
    values.update(overrides)
    return _chatglm6b(**values)


def _from_hf_chatglm2(hf: dict[str, Any], **overrides: Any) -> GLMConfig:
    _require(hf, "padded_vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if not hf.get("rmsnorm", True) or hf.get("apply_residual_connection_post_layernorm", False):
        raise ValueError("ChatGLM2 configs without rmsnorm or with post-layernorm residuals are not supported")
    values: dict[str, Any] = dict(
        vocab_size=hf["padded_vocab_size"], hidden_size=hidden, num_layers=hf["num_layers"], num_heads=heads,
        head_dim=hf.get("kv_channels") or hidden // heads,
        num_kv_heads=hf.get("multi_query_group_num", 1) if hf.get("multi_query_attention", False) else heads,
        ffn_hidden_size=hf["ffn_hidden_size"], max_sequence_length=hf.get("seq_length", 32768),
        norm_eps=hf.get("layernorm_epsilon", 1e-5), qkv_bias=bool(hf.get("add_qkv_bias", True)),
        dense_bias=bool(hf.get("add_bias_linear", False)), mlp_bias=bool(hf.get("add_bias_linear", False)),
        rope_ratio=float(hf.get("rope_ratio", 1.0)), eos_token_id=hf.get("eos_token_id", 2),
        pad_token_id=hf.get("pad_token_id", 0), pre_seq_len=hf.get("pre_seq_len") or 0,
        prefix_projection=bool(hf.get("prefix_projection", False)),
        quantization_bit=hf.get("quantization_bit") or 0,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    values.update(overrides)
    return _chatglm2(**values)


def _from_hf_glm4(hf: dict[str, Any], **overrides: Any) -> GLMConfig:
    """The `transformers` native GLM-4 layout (`GlmForCausalLM`, model_type "glm")."""
    _require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    rope = hf.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    if partial != 0.5 or hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"GLM-4 configs need partial_rotary_factor 0.5 and silu, got {partial} / {hf.get('hidden_act')}")
    eos = hf.get("eos_token_id", [151329, 151336, 151338])
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    heads = hf["num_attention_heads"]
    values: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden_size=hf["intermediate_size"],
        max_sequence_length=hf.get("max_position_embeddings", 131072), norm_eps=hf.get("rms_norm_eps", 1.5625e-7),
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), qkv_bias=bool(hf.get("attention_bias", True)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), eos_token_id=eos[0],
        extra_stop_token_ids=tuple(eos[1:]), pad_token_id=hf.get("pad_token_id", 151329),
    )
    values.update(overrides)
    return _glm4(**values)


def to_hf_config(config: GLMConfig) -> dict[str, Any]:
    """The official `config.json` dict for `config` (inverse of `from_hf_config`)."""
    if config.family == "chatglm":
        hf: dict[str, Any] = {
            "_name_or_path": "THUDM/chatglm-6b",
            "architectures": ["ChatGLMModel"],
            "auto_map": {
                "AutoConfig": "configuration_chatglm.ChatGLMConfig",
                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            },
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "mask_token_id": config.mask_token_id, "gmask_token_id": config.gmask_token_id,
            "pad_token_id": config.pad_token_id, "hidden_size": config.hidden_size,
            "inner_hidden_size": config.ffn_hidden_size, "layernorm_epsilon": config.norm_eps,
            "max_sequence_length": config.max_sequence_length, "model_type": "chatglm",
            "num_attention_heads": config.num_heads, "num_layers": config.num_layers,
            "position_encoding_2d": True, "torch_dtype": "float16", "use_cache": True,
            "vocab_size": config.vocab_size,
        }
    elif config.family == "chatglm2":
        hf = {
            "_name_or_path": "THUDM/chatglm2-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
            "auto_map": {
                "AutoConfig": "configuration_chatglm.ChatGLMConfig",
                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
            },
            "add_bias_linear": config.dense_bias, "add_qkv_bias": config.qkv_bias,
            "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
            "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
            "ffn_hidden_size": config.ffn_hidden_size, "fp32_residual_connection": False, "hidden_dropout": 0.0,
            "hidden_size": config.hidden_size, "kv_channels": config.head_dim, "layernorm_epsilon": config.norm_eps,
            "multi_query_attention": config.num_kv_heads != config.num_heads,
            "multi_query_group_num": config.num_kv_heads, "num_attention_heads": config.num_heads,
            "num_layers": config.num_layers, "original_rope": True, "padded_vocab_size": config.vocab_size,
            "post_layer_norm": True, "rmsnorm": True, "seq_length": config.max_sequence_length, "use_cache": True,
            "torch_dtype": "float16", "tie_word_embeddings": config.tie_word_embeddings,
            "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        }
        if config.rope_ratio != 1.0:
            hf["rope_ratio"] = config.rope_ratio
    elif config.family == "glm4_hf":
        hf = {
            "architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "intermediate_size": config.ffn_hidden_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
            "max_position_embeddings": config.max_sequence_length, "rms_norm_eps": config.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base, "partial_rotary_factor": 0.5},
            "attention_bias": config.qkv_bias, "tie_word_embeddings": config.tie_word_embeddings,
            "pad_token_id": config.pad_token_id,
            "eos_token_id": [config.eos_token_id, *config.extra_stop_token_ids], "torch_dtype": "bfloat16",
        }
    else:
        raise ValueError(f"no Hugging Face config writer for family {config.family!r}")
    if config.pre_seq_len:
        hf["pre_seq_len"] = config.pre_seq_len
        hf["prefix_projection"] = config.prefix_projection
    if config.quantization_bit:
        hf["quantization_bit"] = config.quantization_bit
    return hf
