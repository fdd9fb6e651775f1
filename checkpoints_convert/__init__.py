"""Checkpoint conversion between the official ChatGLM PyTorch layout and this project's format.

`from_pytorch.convert` (official directory -> converted checkpoint) and `to_pytorch.export`
(converted checkpoint -> official directory), both streaming with bounded memory; `cli` is the
`glm-convert` console script.
"""

from checkpoints_convert.staging import ConversionError

__all__ = ["ConversionError"]
