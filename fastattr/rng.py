"""The reference definition of fastattr's random numbers (shared/DESIGN.md).

Everything random in fastattr -- the projection matrix, diffusion noise, output compression --
is a pure function of (seed, ensemble_id, stream, index) computed with Philox4x32-10. This
module is the readable, pure-torch definition; the C++, CUDA and Triton kernels implement the
same function and the tests hold them to it.

Integer arithmetic is done in int64 tensors on values below 2**32; the 32x32 -> 64 bit products
are split into 16-bit halves so that no intermediate overflows int64. Gaussian entries are
computed in float64 from the exact uniforms and rounded once to float32, so this module is the
"true" value the fp32 kernels are compared against.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch

__all__ = [
    "Stream",
    "KINDS",
    "splitmix64",
    "philox_key",
    "philox4x32_10",
    "projection_scale",
    "matrix_rows",
]

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85

KINDS = ("rademacher", "gaussian")


class Stream(IntEnum):
    """Counter word c3: separates the uses of one seed."""

    PROJECTION = 0
    NOISE = 1
    OUTPUT = 2
    KRON_LEFT = 3
    KRON_RIGHT = 4
    GGN = 5  # GGN-model random output vectors (fastattr.curvature)
    TIMESTEP = 6  # random timesteps of the diffusion protocol (fastattr.diffusion)


def splitmix64(z: int) -> int:
    """The splitmix64 finaliser on a Python int, modulo 2**64."""
    z &= MASK64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & MASK64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z


def philox_key(seed: int, ensemble_id: int = 0) -> tuple[int, int]:
    """Philox key (k0, k1) of a 64-bit seed and ensemble id: mix(seed ^ mix(ensemble_id)).

    A linear ``seed + 1000 * id`` would collide across models; the mixed key does not.
    """
    for name, value in (("seed", seed), ("ensemble_id", ensemble_id)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= value <= MASK64:
            raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    key = splitmix64(seed ^ splitmix64(ensemble_id))
    return key & MASK32, key >> 32


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for int64 tensors a in [0, 2**32) and a constant b."""
    p_lo = a * (b & 0xFFFF)  # < 2**48
    p_hi = a * (b >> 16)  # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    return (p_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 tensors (values in [0, 2**32)) -> 4 int64 words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def projection_scale(k: int) -> float:
    """The entry scale 1/sqrt(k), rounded to float32 as every backend uses it."""
    return float(torch.tensor(1.0 / math.sqrt(k), dtype=torch.float32))


def _uniform(w: torch.Tensor) -> torch.Tensor:
    """u = ((w >> 8) + 0.5) * 2**-24 in float64 (exact; never 0 or 1)."""
    return ((w >> 8).to(torch.float64) + 0.5) * 2.0**-24


def matrix_rows(
    rows: torch.Tensor,
    k: int,
    kind: str,
    key: tuple[int, int],
    stream: int = Stream.PROJECTION,
    scale: float | None = None,
) -> torch.Tensor:
    """Rows ``rows`` (int64 indices < 2**63) of the p x k matrix, as float32 ``[len(rows), k]``.

    Entry (i, j) uses counter (lo32(i), hi32(i), j_block, stream):
    - rademacher: j_block = j // 128, bit j % 32 of word (j % 128) // 32; 1 -> +scale, 0 -> -scale.
    - gaussian: j_block = j // 4; Box-Muller on words (0, 1) for j % 4 in {0, 1} (cos, sin)
      and (2, 3) for j % 4 in {2, 3}; times scale.
    ``scale`` defaults to ``projection_scale(k)``; pass 1.0 for unscaled entries.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1, 1)
    scale = projection_scale(k) if scale is None else scale
    k0, k1 = key
    c0, c1 = rows & MASK32, rows >> 32
    if kind == "rademacher":
        blocks = torch.arange((k + 127) // 128, dtype=torch.int64, device=rows.device)
        words = torch.stack(philox4x32_10(c0, c1, blocks, int(stream), k0, k1), dim=-1)
        shifts = torch.arange(32, dtype=torch.int64, device=rows.device)
        bits = (words.unsqueeze(-1) >> shifts) & 1  # [n, blocks, 4, 32]
        bits = bits.reshape(rows.shape[0], -1)[:, :k]
        return torch.where(bits == 1, scale, -scale).to(torch.float32)
    blocks = torch.arange((k + 3) // 4, dtype=torch.int64, device=rows.device)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, blocks, int(stream), k0, k1)
    radius0 = torch.sqrt(-2.0 * torch.log(_uniform(w0)))
    radius1 = torch.sqrt(-2.0 * torch.log(_uniform(w2)))
    angle0 = (2.0 * math.pi) * _uniform(w1)
    angle1 = (2.0 * math.pi) * _uniform(w3)
    z = torch.stack(
        (
            radius0 * torch.cos(angle0),
            radius0 * torch.sin(angle0),
            radius1 * torch.cos(angle1),
            radius1 * torch.sin(angle1),
        ),
        dim=-1,
    )
    return (z.reshape(rows.shape[0], -1)[:, :k] * scale).to(torch.float32)
