"""Which kernel ``scaled_dot_product_attention`` runs: FlashAttention, memory-efficient, cuDNN or the math path.

``F.scaled_dot_product_attention`` picks its kernel at run time from the shapes, dtype, device, mask and the
enabled backends, and falls back to the slow math path (a materialised (N, T) score matrix) without a word: a
boolean mask rules out FlashAttention on CUDA, fp32 rules out FlashAttention, a head width the kernel does not
support rules out others. Issue 19 asks to verify the kernel that runs rather than assume it.

:class:`SDPABackends` records the kernel of every attention call made while it is active, by the ATen op the
call dispatches to (below autograd, so what actually runs, on any device); :func:`sdpa_backend` answers for
one call's q / k / v. The benchmarks print them for the attention shapes of the real networks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

#: fused SDPA ops -> backend name (anything else under an attention call is the math path)
KERNELS: dict[str, str] = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "_flash_attention_forward": "flash",
    "_efficient_attention_forward": "efficient",
}
#: the softmax of SDPA's math path (a plain ``softmax`` elsewhere is ``_softmax``): it marks one math-path call
_MATH_SOFTMAX = ("_safe_softmax",)


class SDPABackends(TorchDispatchMode):
    """A dispatch mode counting the SDPA kernels run while it is active (``counts``: backend -> calls).

    Forward calls only: a backward kernel (``..._backward``) is not counted. Calls on the math path are counted as
    ``math`` by the ``_safe_softmax`` that path runs (torch 2.5 and later; other softmaxes are not counted).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._math_calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.__name__.split(".")[0]  # aten._scaled_dot_product_flash_attention.default -> the op's name
        if name in KERNELS:
            self.counts[KERNELS[name]] += 1
        elif name in _MATH_SOFTMAX:
            self.counts["math"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def fused(self) -> Counter[str]:
        """The counts of the fused kernels only."""
        return Counter({k: v for k, v in self.counts.items() if k != "math"})

    def summary(self) -> str:
        """``flash 16, efficient 16`` (most used first), or ``none``."""
        return ", ".join(f"{k} {v}" for k, v in self.counts.most_common()) or "none"


@torch.no_grad()
def sdpa_backend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                 dropout_p: float = 0.0) -> str:
    """The kernel ``F.scaled_dot_product_attention(q, k, v, ...)`` runs for these inputs (``flash``, ``flash (cpu)``,
    ``efficient``, ``cudnn`` or ``math``), found by running it once."""
    with SDPABackends() as probe:
        F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)
    fused = probe.fused
    return fused.most_common(1)[0][0] if fused else "math"
