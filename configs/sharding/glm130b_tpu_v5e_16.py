"""GLM-130B on a TPU v5e-16 slice: 16 chips of 16 GiB HBM. bfloat16 weights alone (260 GB, 16.3 GB
per chip) exceed 16 GiB, so the Linear weights are INT8 (per-row scales) with bfloat16 activations,
16-way tensor parallel."""

import ml_collections


def get_config():
    plan = ml_collections.ConfigDict()
    plan.name = "TPU v5e-16 (16 chips x 16 GiB) int8"
    plan.preset = "glm-130b"
    plan.num_devices = 16
    plan.device_memory_gib = 16.0
    plan.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=16))
    plan.dtype = "bfloat16"
    plan.quantization_bit = 8
    plan.batch = 1
    plan.prefill_length = 2048
    plan.cache_length = 2048
    return plan
