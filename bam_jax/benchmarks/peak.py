"""The peak FLOP rate that MFU is measured against."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peaks from the vendors' data sheets, per device, in FLOP/s.
DATASHEET_PEAKS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v6 lite': 918e12,
}


def measured_matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one large square matmul on device 0: the attainable peak where no data sheet applies."""
    x = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def peak_flops(dtype=jnp.float32) -> tuple[float, str]:
    """(peak FLOP/s of all devices, where the figure comes from)."""
    device = jax.devices()[0]
    for name, peak in DATASHEET_PEAKS.items():
        if name.lower() in device.device_kind.lower():
            return peak * jax.device_count(), f'{device.device_kind} data sheet, bf16 dense, x{jax.device_count()}'
    peak = measured_matmul_peak(dtype)
    return peak, f'measured {jnp.dtype(dtype).name} 2048^3 matmul on {device.device_kind}'
