"""GLM-130B on 4 x RTX 3090 (24 GB) with INT4 weights (the official INT4 setup): 4-way tensor
parallel, float16 activations, Linear weights packed two per byte with per-row float16 scales."""

import ml_collections


def get_config():
    plan = ml_collections.ConfigDict()
    plan.name = "4xRTX3090-24GB int4"
    plan.preset = "glm-130b"
    plan.num_devices = 4
    plan.device_memory_gib = 24.0
    plan.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=4))
    plan.dtype = "float16"
    plan.quantization_bit = 4
    plan.batch = 1
    plan.prefill_length = 2048
    plan.cache_length = 2048
    return plan
