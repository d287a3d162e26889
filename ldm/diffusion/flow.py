"""Flow matching with the rectified-flow path (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024, SD3):
``x_t = (1 - t) x0 + t eps``, t in [0, 1], the network predicting the velocity ``v = eps - x0``.

One preconditioner, two views of the same model:

* **training and validation** see it in the sigma space of the core (``x = x0 + sigma * eps``), where it is the
  preconditioner with ``sigma = t / (1 - t)``: ``x_t = x / (1 + sigma)`` so ``c_in = 1 / (1 + sigma)``, and
  ``x0 = x_t - t v`` gives ``c_skip = 1 / (1 + sigma)``, ``c_out = -t = -sigma / (1 + sigma)``; the network's
  regression target ``(x0 - c_skip x) / c_out`` is then ``eps - x0`` (the velocity), ``c_out^2 = t^2`` relates its
  error to the x0 error, and the SNR is ``((1 - t) / t)^2 = 1 / sigma^2``, so :class:`~ldm.diffusion.DenoisingLoss`,
  its weightings (min-SNR, ...) and the fixed-level validation loss work unchanged.
* **sampling with Euler or Heun** (:data:`FLOW_SAMPLERS`) runs in the flow space itself, from pure noise at t = 1
  (sigma = infinity, out of reach of the sigma space): the levels are t (:meth:`FlowPrecond.sampling_levels`), the
  denoiser ``D(x_t, t) = x_t - t v``, and the initial noise is unscaled. The probability-flow ODE there,
  ``dx_t/dt = v = (x_t - D) / t``, has the form of the sigma-space one, so :func:`~ldm.diffusion.sample_euler`
  (= diffusers' ``FlowMatchEulerDiscreteScheduler``) and :func:`~ldm.diffusion.sample_heun`
  (= ``FlowMatchHeunDiscreteScheduler``) are the flow samplers as they are (tests/diffusion/test_flow_matching.py).
* **every other sampler** (DDIM, DDPM, Euler-ancestral, DPM-Solver++, UniPC) runs in the sigma space like any model,
  from t = 1 - 1/1000 (sigma = 999) down, the levels ``t / (1 - t)`` of diffusers' ``use_flow_sigmas`` (times
  ``shift(linspace(1 - 1/N, 0, steps + 1))``; ``karras`` spacing gives Karras levels instead), the initial noise
  ``(1 + sigma) eps`` (x_t = eps, as diffusers starts): DPM-Solver++(2M) equals diffusers'
  ``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")`` step for step. The
  editing pipelines (img2img, inpainting, inversion) use this view too.

Time shift (SD3, sec. 5.3.2): ``t' = s t / (1 + (s - 1) t)`` moves the levels toward noise for larger images
(``s = 3`` for SD3 at 1024 px); it applies to the sampling levels and, with ``shift_training``, to the training
times too. The network's noise conditioning is ``1000 t`` (SD3's and diffusers' timestep scale).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.diffusion.precond import Preconditioner

#: samplers that run in the flow space (their steps have the same form there as in the sigma space); the others run
#: in the sigma-space view
FLOW_SAMPLERS = ("euler", "heun")


def time_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution-dependent shift of flow times: s t / (1 + (s - 1) t) (identity for s = 1)."""
    return shift * t / (1 + (shift - 1) * t)


class FlowPrecond(Preconditioner):
    """Rectified-flow velocity prediction (see the module docstring).

    Args:
        shift: the time shift of the sampling levels (SD3: 3.0 at 1024 px; 1 = none).
        shift_training: apply the shift to training times drawn by :class:`~ldm.diffusion.LogitNormalSigmas` too.
        num_timesteps: the timestep scale of the noise conditioning (``1000 t``) and of the smallest sampling level
            (``1 / num_timesteps``), as diffusers' flow schedulers.
    """

    def __init__(self, shift: float = 1.0, shift_training: bool = False, num_timesteps: int = 1000):
        super().__init__()
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift, self.shift_training, self.num_timesteps = shift, shift_training, num_timesteps

    # -- the sigma-space view (training, validation) ----------------------------------------------
    @staticmethod
    def sigma_to_time(sigma: Tensor) -> Tensor:
        return sigma / (1 + sigma)

    @staticmethod
    def time_to_sigma(t: Tensor) -> Tensor:
        return t / (1 - t)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_in = 1 / (1 + sigma)
        return c_in, -sigma * c_in, c_in

    def noise_cond(self, sigma: Tensor) -> Tensor:
        return self.sigma_to_time(sigma) * self.num_timesteps

    def sigma_from_noise_cond(self, c_noise: Tensor) -> Tensor:
        return self.time_to_sigma(c_noise / self.num_timesteps)

    @property
    def sigma_min(self) -> float:
        return float(self.time_to_sigma(torch.tensor(1.0 / self.num_timesteps)))

    @property
    def sigma_max(self) -> float:
        return float(self.time_to_sigma(torch.tensor(1.0 - 1.0 / self.num_timesteps)))

    def training_sigma(self, u: Tensor) -> Tensor:
        """Sigma of training times ``u`` in (0, 1) (shifted with ``shift_training``)."""
        t = time_shift(u, self.shift) if self.shift_training else u
        return self.time_to_sigma(t.clamp(max=1 - 1e-7))

    def sigma_levels(self, steps: int, spacing: str = "leading") -> Tensor:
        """Sigma-space levels for the samplers that run there: ``t / (1 - t)`` of the shifted times
        ``linspace(1 - 1/N, 0, steps + 1)`` (diffusers' ``use_flow_sigmas``), float64; Karras levels for ``karras``."""
        if spacing == "karras":
            return super().sigma_levels(steps, spacing)
        t = time_shift(torch.linspace(1.0 - 1.0 / self.num_timesteps, 0.0, steps + 1, dtype=torch.float64), self.shift)
        return self.time_to_sigma(t)

    # -- the flow-space view (sampling with Euler / Heun) ------------------------------------------------
    def flow_space(self, sampler: str | None) -> bool:
        return sampler in FLOW_SAMPLERS

    def initial_noise_scale(self, level: Tensor | float, flow: bool = False) -> Tensor:
        """x_t = eps where sampling starts: 1 at t = 1 in the flow space; ``1 + sigma`` in the sigma space
        (x = x_t / (1 - t))."""
        return torch.ones(()) if flow else 1 + torch.as_tensor(level)

    def sampling_levels(self, steps: int) -> Tensor:
        """The flow times of ``steps`` sampling steps, from 1 down, then 0 (length steps + 1), as diffusers'
        ``FlowMatchEulerDiscreteScheduler(shift=...).set_timesteps(steps)`` (float64). Like diffusers, the lowest
        level is shifted twice (the schedule's own shifted minimum, then the levels)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        lowest = time_shift(torch.tensor(1.0 / self.num_timesteps, dtype=torch.float64), self.shift)
        t = torch.linspace(1.0, float(lowest), steps, dtype=torch.float64)
        return torch.cat([time_shift(t, self.shift), t.new_zeros(1)])

    def flow_denoise(self, net: nn.Module, x: Tensor, t: Tensor, cond=None) -> Tensor:
        """x0 estimate ``x_t - t v`` of flow-space samples ``x`` (B, ...) at times ``t`` (B,)."""
        v = net(x, t * self.num_timesteps, **(cond or {}))  # (B, ...)
        return x - t.reshape(-1, *([1] * (x.ndim - 1))).to(v.dtype) * v

    def bind(self, net: nn.Module, flow: bool = False):
        """The denoiser for the samplers: ``model_fn(x_t, t, cond) -> x0_hat`` in the flow space (``flow``), else
        the sigma-space one every preconditioner has."""
        if not flow:
            return super().bind(net)
        return lambda x, t, cond=None: self.flow_denoise(net, x, t, cond)
