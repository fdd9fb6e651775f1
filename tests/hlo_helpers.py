"""Reading compiled HLO text: which float buffers a program writes to memory, which matmuls run in float32."""

import re

import numpy as np


def materialised_float_buffers(hlo_text: str, min_elements: int) -> list[str]:
    """Float arrays of at least `min_elements` that a compiled program writes to memory: results of
    instructions outside fused computations (fusion internals stay in registers), parameters and
    aliases (tuple / get-tuple-element / bitcast) excluded."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
        elif current is not None and line.startswith("  "):
            current.append(line)
    fused = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo_text))
    found = []
    for name, lines in computations.items():
        if name in fused:
            continue
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%(\S+) = (f32|bf16|f16)\[([\d,]*)\]\S* ([\w\-]+)\(", line)
            if m and m.group(4) not in ("parameter", "get-tuple-element", "bitcast", "tuple", "constant"):
                size = int(np.prod([int(d) for d in m.group(3).split(",") if d]))
                if size >= min_elements:
                    found.append(f"{m.group(1)}: {m.group(2)}[{m.group(3)}] {m.group(4)}")
    return found


def float32_dot_operands(hlo_text: str) -> list[str]:
    """Operand pairs of the dots of an optimized HLO module that read a float32 operand (XLA's
    instruction names are unique within a module)."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo_text))
    dots = re.findall(r"= \w+\[[^\]]*\]\{[^}]*\} dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo_text)
    return [f"{a}, {b}" for a, b in dots if "f32" in (types.get(a), types.get(b))]
