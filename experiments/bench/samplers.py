"""Samplers: quality against steps on a problem with a known answer, and speed against diffusers.

    python experiments/bench/samplers.py [--n 20000] [--device cpu|cuda]

1. Quality. Data: a mixture of 8 Gaussians (std 0.1) on the unit circle in 2-d, whose
   exact denoiser is known in closed form (the posterior mean over the components), on
   Stable Diffusion's scaled-linear VP noise range (sigma 0.029 ... 14.6) with Karras
   spacing. For each sampler and step count it prints the sliced Wasserstein-1 distance
   between the samples and fresh draws of the data (the floor is the distance between two
   draws of the data), and for the deterministic samplers the RMSE to the probability-flow
   ODE solution from the same noise (Heun, 2000 steps).
2. Speed. Wall time per step of our sampler loop vs the diffusers scheduler loop
   (DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler) with the same eps
   network, 50 steps: an elementwise "network" (loop overhead only) and a small conv net
   on (4, 4, 64, 64) latents.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from ldm.diffusion import SAMPLERS, DiscreteSchedule, EpsPrecond, karras_sigmas

MODES = torch.stack([torch.tensor([math.cos(a), math.sin(a)]) for a in torch.arange(8) * (2 * math.pi / 8)])
STD = 0.1


def data(n: int, g: torch.Generator) -> torch.Tensor:
    return MODES[torch.randint(0, 8, (n,), generator=g)] + STD * torch.randn(n, 2, generator=g)


def exact_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    """E[x0 | x] for the mixture: responsibilities times each component's posterior mean."""
    s2 = sigma.reshape(-1, 1, 1) ** 2  # (B, 1, 1)
    var = STD**2 + s2
    diff = x.unsqueeze(1) - MODES.to(x).unsqueeze(0)  # (B, 8, 2)
    logits = -(diff**2).sum(-1, keepdim=True) / (2 * var)  # (B, 8, 1)
    resp = logits.softmax(dim=1)
    post = MODES.to(x).unsqueeze(0) + STD**2 / var * diff  # (B, 8, 2)
    return (resp * post).sum(1)


def _directions(projections: int = 256) -> torch.Tensor:
    angles = torch.arange(projections, dtype=torch.float64) * (math.pi / projections)
    return torch.stack([angles.cos(), angles.sin()])  # (2, P)


class SlicedW1:
    """Sliced Wasserstein-1 between samples (n, 2) and a large reference sample (m, 2).

    Fixed projection directions; the reference's sorted projections are read at the
    quantiles of the sample's ranks.
    """

    def __init__(self, reference: torch.Tensor, projections: int = 256):
        self.dirs = _directions(projections)
        self.ref = (reference.double() @ self.dirs).sort(dim=0).values  # (m, P)

    def __call__(self, a: torch.Tensor) -> float:
        pa = (a.double() @ self.dirs).sort(dim=0).values  # (n, P)
        idx = ((torch.arange(len(a), dtype=torch.float64) + 0.5) / len(a) * len(self.ref)).long()
        return float((pa - self.ref[idx]).abs().mean())


def quality(n: int) -> None:
    schedule = DiscreteSchedule("scaled_linear")
    g = torch.Generator().manual_seed(0)
    sliced_w1 = SlicedW1(data(20 * n, g))
    floors = [sliced_w1(data(n, g)) for _ in range(5)]
    floor = sum(floors) / len(floors)
    print(f"## Quality: sliced W1 between {n} samples and the data (floor, {n} true draws: "
          f"{floor:.4f} +- {max(floors) - min(floors):.4f})\n")
    steps = [10, 20, 50, 100]
    print("| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ode_rows = {}
    ref_sigmas = karras_sigmas(2000, schedule.sigma_min, schedule.sigma_max).double()
    x_ref = SAMPLERS["heun"](exact_denoiser, noise * (1 + ref_sigmas[0] ** 2).sqrt(), ref_sigmas)
    for name, fn in SAMPLERS.items():
        row, ode = [], []
        for s in steps:
            sigmas = karras_sigmas(s, schedule.sigma_min, schedule.sigma_max).double()
            out = fn(exact_denoiser, noise * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                     generator=torch.Generator().manual_seed(2))
            row.append(f"{sliced_w1(out):.4f}")
            ode.append(f"{float((out - x_ref).pow(2).sum(1).mean().sqrt()):.4f}")
        calls = " (2 calls/step)" if name == "heun" else ""
        print(f"| {name}{calls} | " + " | ".join(row) + " |")
        if name in ("ddim", "euler", "heun", "dpmpp_2m"):
            ode_rows[name] = ode
    print("\n## Deterministic samplers: RMSE to the ODE solution (Heun, 2000 steps) from the same noise\n")
    print("| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for name, ode in ode_rows.items():
        print(f"| {name} | " + " | ".join(ode) + " |")


class ConvEps(torch.nn.Module):
    def __init__(self, channels: int = 4, width: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(channels + 1, width, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        return self.net(torch.cat([x, (t / 1000).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])], dim=1))


class ElementwiseEps(torch.nn.Module):
    def forward(self, x, t):
        return torch.tanh(x) * 0.1


def _time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def speed(device: str, steps: int = 50) -> None:
    import diffusers

    print(f"\n## Speed: ms per step, {steps} steps, best of 3, {device}\n")
    print("| network | sampler | ldm | diffusers | ldm / diffusers |")
    print("|---|---|---:|---:|---:|")
    kw = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    pairs = [("ddim", diffusers.DDIMScheduler(clip_sample=False, **kw)),
             ("euler", diffusers.EulerDiscreteScheduler(timestep_spacing="leading", **kw)),
             ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **kw))]
    for net_name, net in (("elementwise", ElementwiseEps()), ("conv 3x64", ConvEps())):
        net = net.to(device).eval()
        for name, sched in pairs:
            sched.set_timesteps(steps, device=device)
            schedule = DiscreteSchedule(alphas_cumprod=sched.alphas_cumprod).to(device)
            precond = EpsPrecond(schedule).to(device)
            model_fn = precond.bind(net)
            if name == "ddim":
                sigmas = schedule.sigmas_for(steps, "leading").to(device)
            else:
                sigmas = torch.as_tensor(sched.sigmas, device=device, dtype=torch.float64)
            sigmas = sigmas.float()
            x0 = torch.randn(4, 4, 64, 64, device=device, generator=torch.Generator(device).manual_seed(0))

            @torch.no_grad()
            def run_diffusers():
                sched.set_timesteps(steps, device=device)
                x = x0 * sched.init_noise_sigma
                for t in sched.timesteps:
                    x = sched.step(net(sched.scale_model_input(x, t), t), t, x).prev_sample
                return x

            def run_ours():
                return SAMPLERS[name](model_fn, x0 * (1 + sigmas[0] ** 2).sqrt(), sigmas)

            ours, ref = _time(run_ours) / steps * 1e3, _time(run_diffusers) / steps * 1e3
            print(f"| {net_name} | {name} | {ours:.2f} | {ref:.2f} | {ours / ref:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-quality", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not args.skip_quality:
        quality(args.n)
    speed(args.device)


if __name__ == "__main__":
    main()
