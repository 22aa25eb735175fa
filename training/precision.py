"""Which precision is fast on this machine (standard library only).

`mixed_bfloat16` is about 3x faster than float32 on CPUs that compute bfloat16 natively (the
`avx512_bf16` or `amx_bf16` flags of `/proc/cpuinfo`), and several times slower where TensorFlow
emulates it (AVX2 only: measured 3.4x slower for RevNet-38); `mixed_float16` is for GPUs.
`native_bfloat16()` reads the flags, `advice(policy)` says in one line what the chosen policy
means here; `python -m training.train` prints it at start-up and in `--help`.
"""

from __future__ import annotations

__all__ = ["BF16_FLAGS", "native_bfloat16", "advice"]

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bfloat16(cpuinfo="/proc/cpuinfo"):
    """The CPU flag that says this CPU computes bfloat16 natively, or None.

    Args:
        cpuinfo: path of the Linux CPU description (other systems: None, unknown).

    Returns:
        str (`"amx_bf16"` or `"avx512_bf16"`) or None.
    """
    try:
        with open(cpuinfo) as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f
                          if line.startswith("flags")), set())
    except OSError:
        return None
    return next((flag for flag in BF16_FLAGS if flag in flags), None)


def advice(policy, gpus=0, cpuinfo="/proc/cpuinfo"):
    """One line on the dtype policy `policy` on this machine.

    Args:
        policy: str. `"none"` (float32), `"mixed_bfloat16"` or `"mixed_float16"`.
        gpus: int. Number of GPUs the run uses.
        cpuinfo: path of `/proc/cpuinfo`.

    Returns:
        str, e.g. "this CPU computes bfloat16 natively (avx512_bf16): --mixed-precision
        mixed_bfloat16 is about 3x faster than float32 here".
    """
    if gpus:
        fast = "mixed_float16 is the fast choice on GPUs"
        return f"{fast} (in use)" if policy == "mixed_float16" else f"{fast}"
    flag = native_bfloat16(cpuinfo)
    if flag:
        note = f"this CPU computes bfloat16 natively ({flag}): mixed_bfloat16 is about 3x faster "
        return note + ("than float32 here (in use)" if policy == "mixed_bfloat16"
                       else "than float32 here (--mixed-precision mixed_bfloat16)")
    note = ("this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16): float32 is the fast "
            "choice here")
    return note + ("; mixed_bfloat16 is emulated, several times slower"
                   if policy == "mixed_bfloat16" else "")
