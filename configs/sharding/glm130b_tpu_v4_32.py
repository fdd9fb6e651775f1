"""GLM-130B on a TPU v4-32 slice in bfloat16: 16 chips (32 TensorCores, one JAX device per chip in
megacore mode) of 32 GiB HBM, 16-way tensor parallel (96 heads, 32768 MLP columns and the 150528-row
vocabulary all divide by 16)."""

import ml_collections


def get_config():
    plan = ml_collections.ConfigDict()
    plan.name = "TPU v4-32 (16 chips x 32 GiB) bf16"
    plan.preset = "glm-130b"
    plan.num_devices = 16
    plan.device_memory_gib = 32.0
    plan.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=16))
    plan.dtype = "bfloat16"
    plan.quantization_bit = 0
    plan.batch = 1
    plan.prefill_length = 2048
    plan.cache_length = 2048
    return plan
