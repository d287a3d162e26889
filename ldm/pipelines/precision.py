"""Sampling in reduced precision: the networks under ``torch.autocast``, the sampler in float32.

The names are Lightning's ``Trainer(precision=...)`` vocabulary, so a run trained in ``bf16-mixed`` samples
with the same word: ``32-true`` (or ``32``) is plain float32; ``bf16-mixed`` (``bf16``) and ``16-mixed``
(``16``, ``fp16``) run the networks (U-Net, text encoder, first-stage decoder, CLIP) under
``torch.autocast`` on the model's device. ``bf16-mixed`` is the GPU choice (Ampere and newer: float32's
range, so nothing overflows); ``16-mixed`` is for GPUs without bfloat16. Both also run on the CPU (this
torch autocasts CPU matmuls and convolutions to either type), where they are for testing, not speed.

Only the networks' matmuls and convolutions run in low precision: autocast leaves element-wise arithmetic
alone, and the denoiser's x0 estimate comes back in float32 (the preconditioner adds its network's output to
the float32 ``c_skip * x``, which promotes to float32), so the sampler's steps, the noise and the sigmas stay
float32. :func:`float32_images` / :class:`PrecisionPipe` hand back float32 images.

    with sampling_precision("bf16-mixed", pipe.system):
        images = pipe(prompts, settings, image_size=256).float()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

#: accepted names -> (the canonical name, the autocast dtype or None for float32)
PRECISIONS: dict[str, tuple[str, torch.dtype | None]] = {
    "32-true": ("32-true", None), "32": ("32-true", None),
    "bf16-mixed": ("bf16-mixed", torch.bfloat16), "bf16": ("bf16-mixed", torch.bfloat16),
    "16-mixed": ("16-mixed", torch.float16), "16": ("16-mixed", torch.float16), "fp16": ("16-mixed", torch.float16),
}

PRECISION_HELP = ("precision of the networks while sampling: 32-true (float32, the default), bf16-mixed "
                  "(bfloat16 autocast: the GPU choice) or 16-mixed (float16 autocast, for GPUs without bfloat16); "
                  "also 32, bf16, 16, fp16. The sampler's arithmetic stays float32")


def parse_precision(value: str | int) -> str:
    """The canonical name (``32-true``, ``bf16-mixed``, ``16-mixed``) of a precision; ``ValueError`` naming the
    allowed values otherwise."""
    key = str(value).strip().lower()
    if key not in PRECISIONS:
        raise ValueError(f"precision {value!r} is not a sampling precision: choose one of "
                         f"{', '.join(PRECISIONS)} (32-true = float32, bf16-mixed = bfloat16 autocast, "
                         "16-mixed = float16 autocast)")
    return PRECISIONS[key][0]


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision, None for float32."""
    return PRECISIONS[parse_precision(precision)][1]


def _device_of(where: nn.Module | torch.device | str | None) -> torch.device:
    if isinstance(where, nn.Module):
        tensor = next(where.parameters(), None)
        if tensor is None:
            tensor = next(where.buffers(), None)
        return tensor.device if tensor is not None else torch.device("cpu")
    return torch.device(where if where is not None else "cpu")


@contextlib.contextmanager
def sampling_precision(precision: str, where: nn.Module | torch.device | str | None = None) -> Iterator[None]:
    """Run the block with the networks in ``precision`` (:data:`PRECISIONS`) on ``where``'s device (a module,
    e.g. the system, a device or its name; default CPU). ``32-true`` runs in float32 even inside an enclosing
    autocast region.

    Raises ``ValueError`` for an unknown precision, and for bfloat16 on a CUDA GPU without it (pre-Ampere:
    use ``16-mixed``) or a device type that autocast does not support.
    """
    name = parse_precision(precision)
    dtype = PRECISIONS[name][1]
    device = _device_of(where)
    if dtype is None:
        enclosing = device.type if torch.amp.is_autocast_available(device.type) else None
        with torch.autocast(enclosing, enabled=False) if enclosing else contextlib.nullcontext():
            yield
        return
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"--precision {name}: torch cannot autocast on {device.type} devices; use 32-true")
    no_bf16 = device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False)
    if dtype == torch.bfloat16 and no_bf16:
        raise ValueError(f"--precision bf16-mixed: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         "use 16-mixed (or 32-true)")
    with torch.autocast(device.type, dtype=dtype):
        yield


def autocast_denoiser(model_fn, precision: str, where: nn.Module | torch.device | str | None = None):
    """``model_fn(x, sigma, cond) -> x0_hat`` with only the network call in ``precision`` and its output float32:
    the wrapper a pipeline puts around ``system.denoiser()`` so that guidance and the sampler never run under
    autocast."""
    name = parse_precision(precision)
    if PRECISIONS[name][1] is None:
        return model_fn

    def denoise(x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        with sampling_precision(name, where):
            out = model_fn(x, sigma, cond)
        return out.float()

    return denoise


def float32_images(images: Tensor) -> Tensor:
    """Images of a low-precision run as float32 (a decoder under autocast returns its dtype)."""
    return images.float() if images.is_floating_point() else images


class PrecisionPipe:
    """A pipeline (:class:`~ldm.pipelines.TextToImage` or a subclass) whose calls run in ``precision`` and return
    float32 images; every other attribute is the pipeline's.

    For code that calls a pipeline and then scores its images (``ldm eval``'s evaluator): only the generation
    runs under autocast, never the Inception or CLIP scoring.
    """

    def __init__(self, pipe: Any, precision: str):
        self.pipe = pipe
        self.precision = parse_precision(precision)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        with sampling_precision(self.precision, self.pipe.system):
            return float32_images(self.pipe(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        if name == "pipe":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.pipe, name)
