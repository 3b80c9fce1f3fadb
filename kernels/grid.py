"""Host-side integer helpers for launch grids and tile sizes.

Triton's own ``triton.next_power_of_2`` and ``triton.cdiv`` are constexpr functions usable inside kernels too,
and cost about 2 us a call on the host (1.8-2.5 us, Triton 3.8, 2-core Xeon; these take 0.1): a launcher calling them a few times adds
more than a small kernel takes on the GPU. These are plain Python, for launchers only.
"""

from __future__ import annotations


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as ``triton.next_power_of_2`` (which gives 0 for 0)."""
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b, as ``triton.cdiv``."""
    return -(-int(a) // int(b))
