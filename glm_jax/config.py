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
# "none": no rotary embedding (the original GLM adds learned position embeddings instead).
RotaryKind = Literal["2d", "half_adjacent", "full", "none"]
# Learned absolute position embeddings added to the word embeddings: "none" (every rotary model) or
# "learned_2d": a position table and a block position table of max_sequence_length + 1 rows each,
# indexed by the two rows of `position_ids` (original GLM, spec 4.3).
PositionEmbedding = Literal["none", "learned_2d"]
# How fused checkpoint QKV rows are ordered: per head [q_h, k_h, v_h] (ChatGLM-6B, GLM-130B) or in
# blocks [Q | K | V] (ChatGLM2, GLM-4). Only the converters read this; the model keeps q/k/v separate.
QKVLayout = Literal["per_head", "blocks"]
# "glm_2d": prefix-LM positions/mask of ChatGLM-6B (context bidirectional, [sop] onward causal).
# "causal": 1D positions and a causal mask (ChatGLM2/3, GLM-4).
# "glm130b": 1D positions, context before <sop> bidirectional; with [MASK]/[sMASK] the positions from
#       <sop> on are reset to the mask position, with [gMASK] they simply continue (GLM-130B, spec 3.1).
PositionScheme = Literal["glm_2d", "causal", "glm130b"]
# "layer_scaled": scores scaled by 1/(layer+1) before masking, masked with -10000, rescaled in fp32
#       (ChatGLM-6B: masked logits end at -10000*(layer+1), fully masked rows become uniform).
# "standard": masked with the most negative finite float (ChatGLM2 SDPA path).
# "fp16_min": masked scores become -65504, no layer scaling (original GLM: score*mask - 65504*(1-mask)).
MaskFill = Literal["layer_scaled", "standard", "fp16_min"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

DTYPES = ("float32", "bfloat16", "float16")
# Modules LoRA can adapt, by their official ChatGLM names (what PEFT's `target_modules` match).
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


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
    position_embedding: PositionEmbedding = "none"
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
    smask_token_id: int | None = None
    # P-Tuning v2.
    pre_seq_len: int = 0
    prefix_projection: bool = False
    # The projected prefix embeds in the hidden size (ChatGLM-6B) or in the kv size (ChatGLM2).
    prefix_embed_in_kv_size: bool = False
    prefix_dropout: float = 0.1
    # LoRA (PEFT's lora_A/lora_B, `y += alpha/rank · B(A(dropout(x)))`) on the official fused modules
    # named in `lora_targets` (see LORA_TARGETS); a fused module (query_key_value, a gated
    # dense_h_to_4h) has one A shared by its parts and one B split by rows. rank 0 = off.
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()
    # Numerics and memory.
    dtype: str = "float32"
    param_dtype: str = "float32"
    logits_dtype: str = "float32"
    remat_policy: RematPolicy = "none"
    # True: one scanned block over weights stacked on a leading layer axis (compile time independent of
    # depth; the layout of training and of every checkpoint). False: one block per layer with its own
    # weights, which decoding reads in place, float Linear kernels output-major
    # (`glm_jax.modeling.layer_stack.unstack_layers`).
    scan_layers: bool = True
    quantization_bit: int = 0
    # Also store the (tied) word embedding quantized per token row with `quantization_bit`, as the
    # official chatglm-6b-int4-qe does; the output layer reads the same packed bytes.
    quantize_embeddings: bool = False
    # > 0: one scale per this many consecutive input values of each quantized Linear (a group-wise,
    # higher-accuracy mode with no official checkpoint layout) instead of one per output row.
    quantization_group_size: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # JSON gives lists
        object.__setattr__(self, "extra_stop_token_ids", tuple(self.extra_stop_token_ids))  # hashable, as above
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
        if self.quantize_embeddings and not (self.quantization_bit and self.tie_word_embeddings):
            problems.append("quantize_embeddings needs quantization_bit 4 or 8 and tie_word_embeddings")
        if self.quantization_group_size:
            group, bits = self.quantization_group_size, self.quantization_bit
            # Last input axis of each quantized Linear: hidden (qkv, up, gate), head_dim (dense), ffn (down).
            sizes = (self.hidden_size, self.head_dim, self.ffn_hidden_size)
            if not bits or group < 0 or any(size % group for size in sizes) or (bits == 4 and group % 2):
                problems.append(f"quantization_group_size={group} needs quantization_bit 4 or 8 and must divide "
                                f"hidden_size, head_dim and ffn_hidden_size {sizes} (and be even for INT4)")
        if self.position_scheme == "glm_2d" and None in (self.bos_token_id, self.mask_token_id, self.gmask_token_id):
            problems.append("position_scheme 'glm_2d' needs bos_token_id, mask_token_id and gmask_token_id")
        if self.position_scheme == "glm130b" and None in (self.bos_token_id, self.mask_token_id):
            problems.append("position_scheme 'glm130b' needs bos_token_id and mask_token_id")
        if self.position_embedding != "none" and self.rotary != "none":
            problems.append(f"learned position embeddings exclude rotary embeddings, got rotary={self.rotary!r}")
        unknown_targets = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown_targets:
            problems.append(f"lora_targets {unknown_targets} are not among {LORA_TARGETS}")
        if self.lora_rank < 0 or bool(self.lora_rank) != bool(self.lora_targets):
            problems.append(f"lora_rank={self.lora_rank} and lora_targets={self.lora_targets} must be set together")
        if problems:
            raise ValueError("invalid GLMConfig: " + "; ".join(problems))

    @property
    def num_position_rows(self) -> int:
        """Rows of `position_ids`: 2 for GLM 2D positions (position, block position), else 1."""
        return 2 if self.rotary == "2d" or self.position_embedding == "learned_2d" else 1

    @property
    def gated_mlp(self) -> bool:
        return self.mlp_type in ("swiglu", "geglu")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

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


def _glm130b(**overrides: Any) -> GLMConfig:
    """GLM-130B (spec 3.1). The official code runs the model `.half()`: its rotary buffer, the position
    ramp, the angles and their cos/sin are all float16, which `rope_fp16_inv_freq` / `rope_dtype` reproduce."""
    values: dict[str, Any] = dict(
        family="glm130b", vocab_size=150528, hidden_size=12288, num_layers=70, num_heads=96, head_dim=128,
        num_kv_heads=96, ffn_hidden_size=32768, residual_alpha=math.sqrt(2.0 * 70), mlp_type="geglu",
        rotary="full", rope_dtype="float16", position_scheme="glm130b", bos_token_id=150004, eos_token_id=150005,
        extra_stop_token_ids=(20002,), pad_token_id=0, mask_token_id=150000, gmask_token_id=150001,
        smask_token_id=150002,
    )
    values.update(overrides)
    return GLMConfig(**values)


def _glm_original(**overrides: Any) -> GLMConfig:
    """The original GLM (spec 4.3): pre-LN, learned position + block position embeddings, [Q|K|V] blocks,
    tanh-GELU MLP, tied head, -65504 masking. Special ids of GLM-Large (BERT word pieces + block symbols)."""
    values: dict[str, Any] = dict(
        family="glm", vocab_size=30592, hidden_size=1024, num_layers=24, num_heads=16, head_dim=64, num_kv_heads=16,
        ffn_hidden_size=4096, max_sequence_length=512, residual_style="pre_norm", residual_alpha=1.0,
        qkv_layout="blocks", rotary="none", position_embedding="learned_2d", mask_fill="fp16_min",
        bos_token_id=30522, eos_token_id=30523, pad_token_id=0, mask_token_id=103, gmask_token_id=30524,
        smask_token_id=30525,
    )
    values.update(overrides)
    return GLMConfig(**values)


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
    "glm-130b": _glm130b,
    # Every size divides 8 ways, as the 8-way tensor-parallel SAT checkpoint needs.
    "glm130b-tiny": lambda **o: _glm130b(
        vocab_size=1024, hidden_size=64, num_layers=2, num_heads=8, head_dim=8, num_kv_heads=8, ffn_hidden_size=128,
        residual_alpha=math.sqrt(2.0 * 2), bos_token_id=1004, eos_token_id=1005, extra_stop_token_ids=(1006,),
        mask_token_id=1000, gmask_token_id=1001, smask_token_id=1002, **o),
    "glm-large": _glm_original,
    # GLM-10B (English, GPT-2 BPE + block symbols and task masks).
    "glm-10b": lambda **o: _glm_original(
        vocab_size=50304, hidden_size=4096, num_layers=48, num_heads=64, head_dim=64, num_kv_heads=64,
        ffn_hidden_size=16384, max_sequence_length=1024, bos_token_id=50257, eos_token_id=50258, pad_token_id=50256,
        mask_token_id=50260, gmask_token_id=50263, smask_token_id=50264, **o),
    "glm-tiny": lambda **o: _glm_original(
        vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, num_kv_heads=4, ffn_hidden_size=256,
        max_sequence_length=64, bos_token_id=1004, eos_token_id=1005, pad_token_id=0, mask_token_id=1000,
        gmask_token_id=1001, smask_token_id=1002, **o),
}


def preset(name: str, **overrides: Any) -> GLMConfig:
    """A named configuration, optionally with fields replaced (any field, the preset's own included)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)


def from_hf_config(hf: dict[str, Any], **overrides: Any) -> GLMConfig:
    """Reads an official Hugging Face `config.json` (as a dict) into a GLMConfig.

    ChatGLM-6B and ChatGLM2/3 share `model_type == "chatglm"`; they are told apart by the fields only
    one of them has (`position_encoding_2d`/`inner_hidden_size` vs `multi_query_attention`/`rmsnorm`).
    """
    model_type = hf.get("model_type")
    if model_type == "glm" and "num_layers" in hf and "num_hidden_layers" not in hf:
        return _from_hf_glm_original(hf, **overrides)
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
    eos = hf.get("eos_token_id", 2)  # GLM-4's remote-code config lists its stop ids: [eos, <|user|>, <|observation|>]
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if not hf.get("rmsnorm", True) or hf.get("apply_residual_connection_post_layernorm", False):
        raise ValueError("ChatGLM2 configs without rmsnorm or with post-layernorm residuals are not supported")
    values: dict[str, Any] = dict(
        vocab_size=hf["padded_vocab_size"], hidden_size=hidden, num_layers=hf["num_layers"], num_heads=heads,
        head_dim=hf.get("kv_channels") or hidden // heads,
        num_kv_heads=hf.get("multi_query_group_num", 1) if hf.get("multi_query_attention", False) else heads,
        ffn_hidden_size=hf["ffn_hidden_size"], max_sequence_length=hf.get("seq_length", 32768),
        norm_eps=hf.get("layernorm_epsilon", 1e-5), qkv_bias=bool(hf.get("add_qkv_bias", True)),
        dense_bias=bool(hf.get("add_bias_linear", False)), mlp_bias=bool(hf.get("add_bias_linear", False)),
        rope_ratio=float(hf.get("rope_ratio", 1.0)), eos_token_id=eos[0], extra_stop_token_ids=tuple(eos[1:]),
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


# Special ids of the original GLM's tokenizers (word pieces / BPE + block symbols + task masks), by
# vocabulary size: the Hugging Face `glm-*` config.json does not carry them (our writer adds them).
_GLM_SPECIAL_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "gmask_token_id",
                          "smask_token_id")
_GLM_ORIGINAL_SPECIAL_IDS = {
    30592: dict(bos_token_id=30522, eos_token_id=30523, pad_token_id=0, mask_token_id=103, gmask_token_id=30524,
                smask_token_id=30525),
    50304: dict(bos_token_id=50257, eos_token_id=50258, pad_token_id=50256, mask_token_id=50260,
                gmask_token_id=50263, smask_token_id=50264),
}


def _from_hf_glm_original(hf: dict[str, Any], **overrides: Any) -> GLMConfig:
    """The original GLM's remote-code config (`THUDM/glm-large`, `glm-10b`, ...; model_type "glm")."""
    _require(hf, "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "max_sequence_length")
    if not hf.get("block_position_encoding", True) or hf.get("relative_encoding", False):
        raise ValueError("original GLM configs need block_position_encoding=true and relative_encoding=false")
    if hf.get("attention_scale", 1.0) != 1.0:
        raise ValueError(f"original GLM configs with attention_scale={hf['attention_scale']} are not supported")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    values: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_layers"], num_heads=heads,
        head_dim=hidden // heads, num_kv_heads=heads, ffn_hidden_size=4 * hidden,
        max_sequence_length=hf["max_sequence_length"], norm_eps=hf.get("layernorm_epsilon", 1e-5),
    )
    values.update(_GLM_ORIGINAL_SPECIAL_IDS.get(hf["vocab_size"], {}))
    values.update({k: hf[k] for k in _GLM_SPECIAL_ID_FIELDS if hf.get(k) is not None})
    values.update(overrides)
    missing = [k for k in _GLM_SPECIAL_ID_FIELDS if k not in values]
    if missing:
        raise ValueError(f"no known special ids for an original GLM with vocab_size {hf['vocab_size']}: "
                         f"config.json or the caller must give {missing}")
    return _glm_original(**values)


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
            "eos_token_id": [config.eos_token_id, *config.extra_stop_token_ids] if config.extra_stop_token_ids
            else config.eos_token_id, "pad_token_id": config.pad_token_id,
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
    elif config.family == "glm":
        hf = {
            "architectures": ["GLMModel"], "model_type": "glm",
            "auto_map": {
                "AutoConfig": "configuration_glm.GLMConfig",
                "AutoModel": "modeling_glm.GLMModel",
                "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
                "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
            },
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
            "num_attention_heads": config.num_heads, "max_sequence_length": config.max_sequence_length,
            "layernorm_epsilon": config.norm_eps, "block_position_encoding": True, "relative_encoding": False,
            "attention_scale": 1.0, "embedding_dropout_prob": 0.1, "attention_dropout_prob": 0.1,
            "output_dropout_prob": 0.1, "checkpoint_activations": False, "checkpoint_num_layers": 1,
            "parallel_output": True, "output_predict": True, "spell_length": None, "spell_func": "lstm",
            "initializer_range": 0.02, "pool_token": "cls", "torch_dtype": "float32",
            **{k: getattr(config, k) for k in _GLM_SPECIAL_ID_FIELDS},
        }
    else:
        raise ValueError(f"no Hugging Face config writer for family {config.family!r}")
    if config.pre_seq_len:
        hf["pre_seq_len"] = config.pre_seq_len
        hf["prefix_projection"] = config.prefix_projection
    if config.quantization_bit:
        hf["quantization_bit"] = config.quantization_bit
    return hf
