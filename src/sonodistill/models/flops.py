"""FLOPs and parameter counts with torch's flop counter (1 multiply-accumulate = 2 FLOPs).

torch.utils.flop_counter counts matmuls, convolutions and the CUDA fused attention kernels, but
on CPU `scaled_dot_product_attention` dispatches to `_scaled_dot_product_flash_attention_for_cpu`,
which it does not know: without the formula below a ViT's attention would silently count 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _cpu_flash_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Same count as the math path: Q @ K^T and attn @ V, 2 FLOPs per MAC.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa}


@torch.no_grad()
def count_flops(model: nn.Module, *inputs: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total forward FLOPs (2 per MAC) and a per-operator breakdown."""
    model = model.eval()
    return flops_of(lambda: model(*inputs))


def flops_of(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs of everything `fn` runs, backward passes included (a training step), and the
    per-operator breakdown."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
