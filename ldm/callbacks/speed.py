"""GPU speed options of a run, applied to whatever system it trains: matmul precision, regional ``torch.compile``,
channels_last, and a check that training steps never wait for the GPU.

``ldm fit`` reads them from the config's ``speed`` section (this class's arguments; ``configs/trainer/gpu.yaml``
turns them on), so they compose with any stage config, whose ``trainer.callbacks`` list would replace a second
list; a ``Speedups`` listed in ``trainer.callbacks`` is used instead. The options the systems own stay there:
``fused: true`` in an optimizer's ``init_args`` (one fused AdamW kernel per step instead of a dozen ``foreach``
launches; non-finite steps are then skipped on the device, :mod:`ldm.callbacks.divergence`), and the backbones'
``gradient_checkpointing`` (:class:`~ldm.diffusion.UNet`, :class:`~ldm.diffusion.DiT`,
:class:`~ldm.diffusion.MMDiT`). Mixed precision is the trainer's ``precision`` (``bf16-mixed``).

When each is applied, and why then:

* ``matmul_precision`` at ``setup``: ``torch.set_float32_matmul_precision`` (``high``: TF32 for the fp32 matmuls
  left under bf16 autocast, e.g. the optimizer-side and loss math); restored at ``teardown``.
* ``channels_last`` at ``setup``, before the optimizer is built and the EMA copy is taken (both then share the
  layout, so the fused optimizer and ``_foreach`` EMA kernels see uniform strides; the EMA copy is converted too
  if it exists already). A conv whose weight is channels_last returns channels_last, so the activations follow.
* ``compile`` at ``on_fit_start``, once the model is on its device (and wrapped for DDP): each block named in
  ``compile_blocks`` (:func:`ldm.nn.compile.compile_blocks`) is compiled in place. The EMA copy stays eager (it
  only evaluates and samples).
* ``sync_debug`` (CUDA only): ``torch.cuda.set_sync_debug_mode`` from the start of every training batch that is not
  a logging step (nor the first) to the start of the next, so any ``.item()``, ``bool(tensor)`` or blocking copy in
  the training step, the optimizer, EMA or the monitors warns (or raises). Logging steps read their metrics (and
  checkpoints their weights) on purpose, so a checkpoint saved on a non-logging step warns too.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ldm.callbacks.ema import averaged_module
from ldm.nn.compile import DEFAULT_BLOCKS, compile_blocks

log = logging.getLogger(__name__)


class Speedups(Callback):
    """Args:
        matmul_precision: ``torch.set_float32_matmul_precision`` for the run (``high``: TF32 on Ampere and later);
            None leaves torch's setting.
        compile: compile each block of the system in place (regional compilation).
        compile_blocks: class names of the blocks to compile (the outermost match wins; default:
            :data:`ldm.nn.compile.DEFAULT_BLOCKS`).
        compile_backend: ``torch.compile`` backend: ``inductor`` (generated kernels); ``eager`` / ``aot_eager``
            check graph capture without generating code (CPU tests).
        compile_mode: ``torch.compile`` mode (None = default; ``max-autotune-no-cudagraphs`` searches kernels longer).
        compile_dynamic: ``torch.compile``'s ``dynamic`` (None: make a dimension dynamic once it changes).
        channels_last: store conv weights (and so activations) channels-last (NHWC), the layout of cuDNN's fast
            bf16 convolutions; no effect on linear layers.
        sync_debug: on CUDA, ``warn`` or ``error`` on any host synchronisation inside training steps between
            logging steps; None = off.
    """

    def __init__(self, matmul_precision: Literal["highest", "high", "medium"] | None = None, compile: bool = False,
                 compile_blocks: list[str] | None = None, compile_backend: str = "inductor",
                 compile_mode: str | None = None, compile_dynamic: bool | None = None, channels_last: bool = False,
                 sync_debug: Literal["warn", "error"] | None = None):
        self.matmul_precision = matmul_precision
        self.compile, self.compile_blocks = compile, list(compile_blocks or DEFAULT_BLOCKS)
        self.compile_backend, self.compile_mode, self.compile_dynamic = compile_backend, compile_mode, compile_dynamic
        self.channels_last = channels_last
        self.sync_debug = sync_debug
        self.compiled: list[str] = []  # qualified names of the blocks compiled
        self._previous_precision: str | None = None
        self._debugging = False

    @property
    def active(self) -> bool:
        """Whether any option is on (``ldm fit`` adds the callback only then)."""
        return bool(self.matmul_precision or self.compile or self.channels_last or self.sync_debug)

    # -- setup: precision and memory format, before the optimizer and the EMA copy exist ----------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.matmul_precision is not None:
            self._previous_precision = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(self.matmul_precision)
        if self.channels_last and stage == "fit":
            modules = {id(m): m for m in (pl_module, averaged_module(trainer, pl_module))}
            for module in modules.values():
                module.to(memory_format=torch.channels_last)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._set_sync_debug(False)
        if self._previous_precision is not None:
            torch.set_float32_matmul_precision(self._previous_precision)
            self._previous_precision = None

    # -- compilation, once the model is on its device -------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.compile or self.compiled:
            return
        kwargs: dict[str, Any] = {"backend": self.compile_backend, "dynamic": self.compile_dynamic}
        if self.compile_mode is not None:
            kwargs["mode"] = self.compile_mode
        self.compiled = compile_blocks(pl_module, self.compile_blocks, **kwargs)
        if not self.compiled:
            log.warning("speed.compile: %s has no block of the classes %s; nothing was compiled (name its blocks in "
                        "speed.compile_blocks)", type(pl_module).__name__, ", ".join(self.compile_blocks))
            return
        kinds = sorted({type(pl_module.get_submodule(name)).__name__ for name in self.compiled})
        rank_zero_info(f"speed.compile: {len(self.compiled)} blocks compiled in place ({', '.join(kinds)}; "
                       f"backend {self.compile_backend}); they compile at their first call")

    # -- the host-sync check ------------------------------------------------------------------------
    def _set_sync_debug(self, on: bool) -> None:
        if self.sync_debug is None or not torch.cuda.is_available() or on == self._debugging:
            return
        torch.cuda.set_sync_debug_mode(self.sync_debug if on else "default")
        self._debugging = on

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        checked = (pl_module.device.type == "cuda" and trainer.global_step > 0
                   and not trainer._logger_connector.should_update_logs)
        self._set_sync_debug(checked)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_sync_debug(False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_sync_debug(False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._set_sync_debug(False)
