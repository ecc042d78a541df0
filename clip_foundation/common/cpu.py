"""What this CPU's vector units are, read once from Linux's /proc/cpuinfo: what picks a precision at run time
(bf16 training steps, an int8 or bf16 image tower) and what every speed figure names beside it."""
from __future__ import annotations

import functools

UNITS = {  # a unit -> the CPU flags that provide it (any one of them)
    "avx2": {"avx2"},
    "avx512": {"avx512f"},
    "bf16": {"avx512_bf16", "amx_bf16"},  # bf16 dot products: AVX-512 BF16 or AMX
    "vnni": {"avx512_vnni", "avx_vnni", "amx_int8"},  # int8 dot products: AVX-512 VNNI, AVX-VNNI or AMX
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first CPU in /proc/cpuinfo; empty where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def has(unit: str) -> bool:
    """Whether this CPU has `unit` (a key of UNITS): False where the flags cannot be read."""
    return bool(cpu_flags() & UNITS[unit])


def units() -> str:
    """The units this CPU has, e.g. "avx2+avx512+bf16+vnni", for a speed figure's label."""
    return "+".join(unit for unit in UNITS if has(unit)) or "none of " + "/".join(UNITS)
