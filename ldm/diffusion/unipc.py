"""UniPC: the unified predictor-corrector multistep sampler (Zhao et al. 2023, arXiv:2302.04867).

Data prediction (``predict_x0``), the B_2(h) = e^h - 1 variant ("bh2"), in sigma space
(``x = x0 + sigma * eps``, see :mod:`ldm.diffusion.samplers`): the configuration of diffusers'
``UniPCMultistepScheduler`` defaults, which it equals step for step
(tests/diffusion/test_vs_diffusers.py).

In half-log-SNR time lambda = -log(sigma), a step from level j to j + 1 of size
h = lambda_{j+1} - lambda_j starts from x_j and the data prediction D_j = D(x_j, sigma_j), and uses
the earlier predictions D_{j-k} as divided differences over r_k = (lambda_{j-k} - lambda_j) / h:

    x_{j+1} = D_j + (sigma_{j+1} / sigma_j)(x_j - D_j) + (1 - sigma_{j+1} / sigma_j) sum_k rho_k Delta_k,
    Delta_k = (D_{j-k} - D_j) / r_k.

This is the paper's data-prediction update in VP terms (alpha_t, sigma_t of x_t = alpha_t x0 + sigma_t eps),
x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D_s - alpha_t B(-h) sum_k rho_k Delta_k, divided by alpha_t:
with B_2(-h) = e^-h - 1 both coefficients are sigma_{j+1} / sigma_j - 1 in sigma space. The weights solve
the order conditions sum_k rho_k r_k^(m-1) = g_m for m = 1..K, the paper's R_p(h) a_p = g_p(h) / B(h) with
its rows divided by h^(m-1): g_m = m! z phi_{m+1}(z) / (e^z - 1) at z = -h, where phi_1(z) = (e^z - 1) / z
and phi_{m+1}(z) = (phi_m(z) - 1/m!) / z.

* UniP-p, the predictor, extrapolates with the p - 1 earlier predictions (K = p - 1).
* UniC-p, the corrector, runs once the model has been called at the predicted x_{j+1}: it redoes the
  step from x_j with D_{j+1} added as one more difference, r = 1 and Delta = D_{j+1} - D_j (K = p),
  and replaces x_{j+1}. The model is not called again on the corrected sample: D_{j+1} serves both
  the corrector and the next predictor, so the order rises by one at no extra model call.

A 1x1 system (UniP-2, UniC-1) uses its h -> 0 limit rho = 1/2, as the reference implementation and
diffusers do. The order warms up (1 on the first step, 2 on the second, ...) and drops to 1 on the
last step ("lower_order_final"): the step to sigma = 0 (lambda = inf) is first order and lands on the
data prediction, so the corrector that would precede it is skipped as its result is discarded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Cond, Denoiser, StepCallback, batch_sigma
from ldm.diffusion.denoiser import report_step as _report
from ldm.diffusion.denoiser import sigma_levels as _levels


def _weights(h: float, rks: list[float]) -> list[float]:
    """rho solving sum_k rho_k r_k^(m-1) = g_m(-h), m = 1..len(rks) (1/2 for a single weight)."""
    if len(rks) == 1:
        return [0.5]
    z = -h
    z_phi = math.expm1(z)  # z phi_1(z), also B_2(z)
    b = z_phi
    g, factorial = [], 1
    for m in range(1, len(rks) + 1):
        z_phi = z_phi / z - 1 / factorial  # z phi_{m+1}(z) = phi_m(z) - 1/m!
        g.append(factorial * z_phi / b)
        factorial *= m + 1
    vandermonde = torch.tensor([[r**m for r in rks] for m in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(vandermonde, torch.tensor(g, dtype=torch.float64)).tolist()  # on the CPU: no device sync


def _unipc_step(x: Tensor, history: list[Tensor], lambdas: list[float], sigmas: list[float], j: int, order: int,
                denoised_next: Tensor | None = None) -> Tensor:
    """From x at level j to level j + 1: UniP-``order``, or UniC-``order`` given ``denoised_next`` = D_{j+1}.

    ``history`` ends with the data predictions D_{j-order+1} .. D_j (oldest first); all tensors (B, ...).
    """
    h = lambdas[j + 1] - lambdas[j]
    d = history[-1]  # D_j
    rks = [(lambdas[j - k] - lambdas[j]) / h for k in range(1, order)]
    deltas = [(history[-1 - k] - d) / r for k, r in enumerate(rks, 1)]  # (B, ...) each
    if denoised_next is not None:
        rks.append(1.0)
        deltas.append(denoised_next - d)
    if deltas:
        d = d + sum(rho * delta for rho, delta in zip(_weights(h, rks), deltas))
    return torch.lerp(d, x, sigmas[j + 1] / sigmas[j])  # D + (s'/s)(x - D), the correction scaled by 1 - s'/s


@torch.no_grad()
def sample_unipc(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, order: int = 2, cond: Cond = None,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """UniPC-``order`` (bh2, data prediction): one model call per step; UniC corrects the sample after every
    model call but the first (nothing to correct yet) and the last (the step to sigma = 0 discards it)."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    levels = _levels(sigmas)
    lambdas = [-math.log(s) if s > 0 else math.inf for s in levels]
    n = len(levels) - 1
    history: list[Tensor] = []  # the last `order` data predictions, newest last
    x_start: Tensor | None = None  # the corrected sample the last predictor started from
    last_order = 0
    for i in range(n):
        sigma_next = levels[i + 1]
        denoised = model_fn(x, batch_sigma(sigmas[i], x), cond)  # (B, ...)
        if x_start is not None and sigma_next > 0:
            x = _unipc_step(x_start, history, lambdas, levels, i - 1, last_order, denoised_next=denoised)  # UniC
        history = (history + [denoised])[-order:]
        last_order = min(order, i + 1, n - i)  # warm-up, and first order on the last step
        if sigma_next == 0:
            x = denoised  # lambda = inf: the first-order step lands on the data prediction
        else:
            x_start = x
            x = _unipc_step(x, history, lambdas, levels, i, last_order)  # UniP
        _report(callback, i, n, x, sigmas, denoised)
    return x
