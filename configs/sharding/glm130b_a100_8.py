"""GLM-130B on one node of 8 x A100-40GB in float16 (the official fp16 setup): 8-way tensor parallel,
heads / MLP columns / vocabulary split like the SAT checkpoint's ranks."""

import ml_collections


def get_config():
    plan = ml_collections.ConfigDict()
    plan.name = "8xA100-40GB fp16"
    plan.preset = "glm-130b"
    plan.num_devices = 8
    plan.device_memory_gib = 40.0
    plan.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=8))
    plan.dtype = "float16"  # compute and stored params
    plan.quantization_bit = 0
    plan.batch = 1
    plan.prefill_length = 2048
    plan.cache_length = 2048  # max_sequence_length
    return plan
