"""The fine-tuning job (`glm-finetune`): full, P-Tuning v2 or LoRA on the pre-training stack.

`default_config()` is the schema (defaults = the official ChatGLM-6B P-Tuning v2 `train.sh`);
`configs/finetune/*.py` start from it. `finetune(config, workdir)` runs or resumes a job:

    config.json          the resolved config
    model_config.json    the GLMConfig trained (adapter fields included)
    checkpoints/         orbax steps: the trainable params + optimizer state (+ loader position); the
                         frozen base is not copied into them, it is reloaded from `base`
    metrics.jsonl        one record per logged step (and tensorboard/)
    adapter/             P-Tuning v2: official pytorch_model.bin + config.json; LoRA: PEFT directory
    predict/             generated_predictions.txt + predict_results.json (BLEU-4, ROUGE-1/2/L)

The train step is the pre-training one with a `trainable` predicate: gradients and Adam state exist
for the trainable params only, and a frozen INT8/INT4 base is passed through untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from glm_jax.config import GLMConfig, preset
from glm_jax.data import sft
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.pretrained import abstract_params, load_pretrained
from glm_jax.quantization import quantize_params
from glm_jax.sharding import DEFAULT_RULES, logical_shardings, make_mesh
from glm_jax.training import peft
from glm_jax.training.checkpoint import Checkpointer
from glm_jax.training.loop import _Preemption, _say, _write_json
from glm_jax.training.metrics import MetricWriter
from glm_jax.training.optimizer import OptimizerConfig, make_optimizer
from glm_jax.training.state import TrainState, count_params
from glm_jax.training.train_step import (
    StepConfig, Trainable, combine_params, global_batch, make_train_step, partition_params,
)

_QUANTIZATION = {"": 0, "int8": 8, "int4": 4}


def default_config() -> ml_collections.ConfigDict:
    """Every knob of a fine-tuning job; defaults follow the official P-Tuning v2 `train.sh`."""
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.method = "ptuning"  # "full" | "ptuning" | "lora"
    c.base = ""  # official Hugging Face / converted checkpoint; "" = randomly initialised `model.preset`
    c.steps = 3000
    c.batch_size = 16  # rows per optimizer step (all micro-batches, all processes)

    c.model = ml_collections.ConfigDict()
    c.model.preset = "chatglm-tiny"  # only used without `base`
    c.model.overrides = ml_collections.ConfigDict()
    c.model.dtype = "float16"  # base weights and compute; adapters are float32
    c.model.quantization = "int4"  # "", "int8", "int4": weight-only quantized frozen base
    c.model.remat_policy = "full"  # gradient checkpointing, as the official recipe enables it

    c.ptuning = ml_collections.ConfigDict({"pre_seq_len": 128, "prefix_projection": False, "prefix_dropout": 0.1})
    # target_modules: PEFT's syntax (comma-separated names, or a regex over the official module names).
    c.lora = ml_collections.ConfigDict({"rank": 8, "alpha": 32.0, "dropout": 0.1, "target_modules": "query_key_value"})

    c.data = ml_collections.ConfigDict()
    c.data.kind = "jsonl"  # "jsonl": train_file / validation_file; "synthetic": generated instruction pairs
    c.data.train_file = ""
    c.data.validation_file = ""
    c.data.prompt_column = "content"
    c.data.response_column = "summary"
    c.data.history_column = ""
    c.data.source_prefix = ""
    c.data.tokenizer = ""  # default: `base`
    c.data.max_source_length = 64
    c.data.max_target_length = 64
    c.data.synthetic_train = 512
    c.data.synthetic_validation = 64

    c.optimizer = ml_collections.ConfigDict(dataclasses.asdict(OptimizerConfig(
        learning_rate=2e-2, warmup_steps=0, decay_steps=1, schedule="linear", min_lr_ratio=0.0, b2=0.999,
        weight_decay=0.0, clip_norm=1.0)))
    c.optimizer.decay_steps = -1  # -1: linear decay to 0 over `steps` (the transformers default)
    c.step = ml_collections.ConfigDict(dataclasses.asdict(StepConfig(grad_accum=16, dropout=True)))
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.devices = 0  # use the first N devices of this process set (0 = all)

    c.log_every = 10
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.async_checkpoint = True

    c.predict = ml_collections.ConfigDict()
    c.predict.enabled = True  # after training, when there is validation data
    c.predict.max_samples = 0  # 0 = all
    c.predict.batch_size = 8
    c.predict.do_sample = True
    c.predict.top_p = 0.7
    c.predict.temperature = 0.95
    c.predict.top_k = 0
    c.predict.max_length = 0  # prompt + new tokens; 0 = max_source + max_target + 1
    return c


# ----------------------------------------------------------------------------------- the model


def adapter_fields(config: ml_collections.ConfigDict, base: GLMConfig) -> dict[str, Any]:
    """GLMConfig fields of the method (prefix or LoRA settings), resolved against the base model."""
    if config.method == "ptuning":
        return dict(pre_seq_len=config.ptuning.pre_seq_len, prefix_projection=config.ptuning.prefix_projection,
                    prefix_dropout=config.ptuning.prefix_dropout)
    if config.method == "lora":
        spec = config.lora.target_modules
        is_regex = any(ch in spec for ch in "^$*+?()[]|\\")
        patterns = spec if is_regex else [p.strip() for p in spec.split(",") if p.strip()]
        return dict(lora_rank=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                    lora_targets=peft.resolve_lora_targets(patterns, base))
    return {}


def _adapter_init(model: GLMForCausalLM, trainable: Trainable, seed: int, shardings: Any) -> Any:
    """Fresh adapter params only: the rest of `model.init` is dead code that XLA drops, so this is cheap
    even for a 6B model."""
    ids = jnp.zeros((1, 4), jnp.int32)
    init = jax.jit(lambda rng: partition_params(nn.unbox(model.init(rng, ids)["params"]), trainable)[0],
                   out_shardings=shardings)
    return init(jax.random.key(seed))


def build_model(config: ml_collections.ConfigDict, mesh: Any) -> tuple[GLMForCausalLM, Any]:
    """The model to fine-tune and its params: the base (loaded or random, optionally quantized) plus
    freshly initialised adapters."""
    bits = _QUANTIZATION[config.model.quantization]
    dtype = config.model.dtype
    if config.base:
        base_model, params = load_pretrained(config.base, dtype=dtype, quantization=config.model.quantization or None,
                                             mesh=mesh, **dict(config.model.overrides))
        base = base_model.config
    else:
        base = preset(config.model.preset, dtype=dtype, param_dtype=dtype, **dict(config.model.overrides))
        params = None
    model_config = base.replace(remat_policy=config.model.remat_policy, **adapter_fields(config, base))
    peft.check_method(model_config.replace(quantization_bit=bits or model_config.quantization_bit), config.method)
    model = GLMForCausalLM(model_config)
    trainable = peft.trainable_predicate(config.method)
    if params is None:
        ids = jnp.zeros((1, 4), jnp.int32)
        params = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.key(config.seed), ids)["params"]))
        if bits:
            params = quantize_params(params, bits)
            model = GLMForCausalLM(model_config.replace(quantization_bit=bits))
        shardings = logical_shardings(abstract_params(model), mesh, DEFAULT_RULES)
        params = jax.tree.map(jax.device_put, params, shardings)
    elif trainable is not None:
        shardings = logical_shardings(abstract_params(model), mesh, DEFAULT_RULES)
        adapters = _adapter_init(model, trainable, config.seed, partition_params(shardings, trainable)[0])
        params = combine_params(adapters, params)
    return model, params


def finetune_state(
    model: GLMForCausalLM, tx: optax.GradientTransformation, params: Any, trainable: Trainable | None, mesh: Any,
) -> tuple[TrainState, Any]:
    """(state, its shardings) from given params: Adam state for the trainable params only."""
    boxed = abstract_params(model)
    train_boxed = partition_params(boxed, trainable)[0]
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(step=scalar, params=boxed, opt_state=jax.eval_shape(tx.init, train_boxed),
                          loss_ema=jax.ShapeDtypeStruct((), jnp.float32), skipped=scalar)
    shardings = logical_shardings(abstract, mesh, DEFAULT_RULES)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(partition_params(params, trainable)[0])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                       loss_ema=jnp.zeros((), jnp.float32), skipped=jnp.zeros((), jnp.int32))
    return jax.device_put(state, shardings), shardings


def saved_part(state: TrainState, trainable: Trainable | None) -> TrainState:
    """What a checkpoint stores: the state with only the trainable params (the base is reloaded)."""
    return state.replace(params=partition_params(state.params, trainable)[0])


# ------------------------------------------------------------------------------------- the data


@dataclasses.dataclass
class Data:
    train: list[sft.Example]
    prompts: list[list[int]]  # prediction prompts (validation)
    references: list[str]  # their reference texts
    decode: Callable[[list[int]], str]


def build_data(config: ml_collections.ConfigDict, model_config: GLMConfig) -> Data:
    d = config.data
    src, tgt = d.max_source_length, d.max_target_length
    if d.kind == "synthetic":
        fmt = sft.SFTFormat.for_model(model_config, gmask=model_config.gmask_token_id, sop=model_config.bos_token_id)
        high = min(x for x in (model_config.mask_token_id, model_config.gmask_token_id, model_config.vocab_size) if x)
        pairs = sft.synthetic_instructions(d.synthetic_train, low=10, high=high, seed=config.seed)
        held_out = sft.synthetic_instructions(d.synthetic_validation, low=10, high=high, seed=config.seed + 1)
        train = [sft.build_example(p, a, fmt, src, tgt) for p, a in pairs]
        prompts = [sft.generation_prompt(p, fmt, src) for p, _ in held_out]

        def decode(ids: list[int]) -> str:
            return " ".join(str(i) for i in ids if i != fmt.eos)

        return Data(train, prompts, [decode(a) for _, a in held_out], decode)
    if d.kind != "jsonl":
        raise ValueError(f"unknown data.kind {d.kind!r}; expected 'jsonl' or 'synthetic'")
    if not d.train_file:
        raise ValueError("data.train_file is required for data.kind='jsonl'")
    from glm_jax.tokenizer import ChatGLMTokenizer

    if model_config.position_scheme != "glm_2d":
        raise ValueError("text data needs the ChatGLM-6B tokenizer; other families are supported with token data only")
    tokenizer = ChatGLMTokenizer.from_pretrained(d.tokenizer or config.base)
    fmt = sft.SFTFormat.for_model(model_config)
    columns = sft.Columns(d.prompt_column, d.response_column, d.history_column or None)
    records = sft.read_records(d.train_file, columns)
    train = [sft.encode_example(tokenizer, r, fmt, src, tgt, bool(d.history_column), d.source_prefix) for r in records]
    prompts, references = [], []
    if d.validation_file:
        for record in sft.read_records(d.validation_file, columns):
            prompts.append(sft.eval_prompt_ids(tokenizer, record, fmt, src, d.source_prefix))
            answer = tokenizer.encode(record.response, add_special_tokens=False)[: tgt - 2]
            references.append(tokenizer.decode(answer, clean_up_tokenization_spaces=True).strip())

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, clean_up_tokenization_spaces=True)

    return Data(train, prompts, references, decode)


# -------------------------------------------------------------------------------------- the job


def export_adapter(directory: str, method: str, params: Any, model_config: GLMConfig, base: str = "") -> str | None:
    """Writes the adapter in its official layout; full fine-tuning has none (the params are in the
    checkpoint)."""
    host = jax.device_get(params)
    if method == "ptuning":
        return peft.export_prefix(directory, host, model_config)
    if method == "lora":
        return peft.export_lora(directory, host, model_config, base)
    return None


def predict(config: ml_collections.ConfigDict, model: GLMForCausalLM, params: Any, data: Data, directory: str) -> dict:
    """Generates on the validation prompts and scores them like the official `--do_predict`."""
    from glm_jax.evaluation import generate_predictions, write_predictions

    count = config.predict.max_samples or len(data.prompts)
    d = config.data
    max_length = config.predict.max_length or d.max_source_length + d.max_target_length + 1
    serving = GLMForCausalLM(model.config.replace(remat_policy="none"))
    predictions = generate_predictions(
        serving, params, data.prompts[:count], data.decode, max_length=max_length,
        batch_size=config.predict.batch_size, do_sample=config.predict.do_sample, top_p=config.predict.top_p,
        temperature=config.predict.temperature, top_k=config.predict.top_k, seed=config.seed)
    return write_predictions(directory, predictions, data.references[:count])


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the fine-tuning job of `config` in `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    primary = jax.process_index() == 0
    if primary:
        _write_json(os.path.join(workdir, "config.json"), config.to_dict())
    if config.batch_size % config.step.grad_accum:
        raise ValueError(f"batch_size={config.batch_size} is not a multiple of "
                         f"step.grad_accum={config.step.grad_accum}")
    mesh = make_mesh(**dict(config.mesh), devices=jax.devices()[:config.devices] if config.devices else None)
    model, params = build_model(config, mesh)
    if primary:
        _write_json(os.path.join(workdir, "model_config.json"), model.config.to_dict())
    data = build_data(config, model.config)
    trainable = peft.trainable_predicate(config.method)

    optimizer_values = dict(config.optimizer)
    if optimizer_values["decay_steps"] < 0:
        optimizer_values["decay_steps"] = max(config.steps, optimizer_values["warmup_steps"])
    tx, schedule = make_optimizer(OptimizerConfig(**optimizer_values))
    state, shardings = finetune_state(model, tx, params, trainable, mesh)
    step_fn = make_train_step(model, tx, schedule, StepConfig(**dict(config.step)), mesh, shardings, trainable)

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                async_save=config.async_checkpoint)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            saved_part(state, trainable), saved_part(shardings, trainable))
    restored = checkpointer.restore_latest(abstract)
    loader_state, start = None, 0
    if restored is not None:
        start, saved, data_state = restored
        state = saved.replace(params=combine_params(saved.params, partition_params(state.params, trainable)[1]))
        loader_state = data_state["loader"]
        _say(f"resumed from step {start} ({checkpointer.directory})")
    trained = count_params(partition_params(state.params, trainable)[0])
    _say(f"{config.method} fine-tuning: {trained / 1e6:.3f}M trainable of {count_params(state.params) / 1e6:.2f}M "
         f"params, {len(data.train)} examples, mesh {dict(mesh.shape)}")

    loader = sft.SFTLoader(data.train, model.config, config.batch_size, seed=config.seed, state=loader_state,
                           process_index=jax.process_index(), process_count=jax.process_count())
    writer = MetricWriter(workdir, enabled=primary)
    preemption = _Preemption()
    step, last, window_start = start, None, time.perf_counter()
    try:
        while step < config.steps and not preemption.requested:
            state, metrics = step_fn(state, global_batch(next(loader), mesh))
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values["steps_per_s"] = config.log_every / (time.perf_counter() - window_start)
                writer.write(step, values)
                last, window_start = values, time.perf_counter()
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpointer.save(step, saved_part(state, trainable), {"loader": loader.state}, force=True)
        if preemption.requested and step not in checkpointer.steps():
            checkpointer.save(step, saved_part(state, trainable), {"loader": loader.state}, force=True)
        checkpointer.wait()
    finally:
        preemption.restore()
        writer.close()
        checkpointer.close()

    result: dict[str, Any] = {"step": step, "last_metrics": last, "preempted": preemption.requested, "state": state,
                              "model": model, "data": data}
    if step >= config.steps and primary:
        result["adapter"] = export_adapter(os.path.join(workdir, "adapter"), config.method, state.params,
                                           model.config, config.base)
    if step >= config.steps and config.predict.enabled and data.prompts:
        result["scores"] = predict(config, model, state.params, data, os.path.join(workdir, "predict"))
        _say("predict: " + json.dumps(result["scores"]))
    return result

