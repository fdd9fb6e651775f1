"""GLM-130B on 4 nodes of 8 x A100-40GB in float16: tensor parallel inside a node (8), FSDP across
nodes (4), so each device holds 1/32 of the weights; a batch of 4 requests splits over the FSDP axis."""

import ml_collections


def get_config():
    plan = ml_collections.ConfigDict()
    plan.name = "32xA100-40GB fp16 (FSDP 4 x TP 8)"
    plan.preset = "glm-130b"
    plan.num_devices = 32
    plan.device_memory_gib = 40.0
    plan.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=8))
    plan.dtype = "float16"
    plan.quantization_bit = 0
    plan.batch = 4
    plan.prefill_length = 2048
    plan.cache_length = 2048
    return plan
