"""Bottlenecks between encoder and decoder, as pluggable regularisers (sgm's design).

Each takes the encoder's features ``h`` (B, in_channels, h, w) and returns
``(z, info)``: the latent the decoder reads (B, latent_channels, h, w) and a dict of
per-sample regularisation terms and statistics.

* :class:`DiagonalGaussian` (Kingma & Welling 2014; the LDM "KL" autoencoder): a 1x1 conv
  to mean and log-variance; ``z`` is a sample in training and the mean (mode) otherwise;
  ``info["kl"]`` is KL(N(mu, sigma^2) || N(0, I)) summed over latent elements, per sample.
* :class:`VectorQuantizer` (van den Oord et al. 2017, eq. 3): nearest-code lookup,
  ``codebook = |sg(h) - e|^2``, ``commitment = |h - sg(e)|^2`` (weighted by beta in the loss),
  straight-through gradient ``z = h + sg(e - h)``. Options: EMA codebook updates (appendix A.1;
  the codebook loss is then 0), l2-normalised codes (Yu et al. 2022, "ViT-VQGAN"), and
  restarting codes unused for ``restart_after`` training steps at random encoder outputs.
  Reports perplexity exp(H(code usage)) and the fraction of codes used in the batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class DiagonalGaussian(nn.Module):
    def __init__(self, in_channels: int = 8, latent_channels: int = 4, logvar_clamp: tuple[float, float] = (-30.0, 20.0)):
        super().__init__()
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.to_moments = nn.Conv2d(in_channels, 2 * latent_channels, 1)
        self.logvar_clamp = logvar_clamp

    def moments(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.to_moments(h).chunk(2, dim=1)  # (B, C, h, w) each
        return mean, logvar.clamp(*self.logvar_clamp)

    def forward(self, h: Tensor, sample: bool | None = None, generator: torch.Generator | None = None):
        mean, logvar = self.moments(h)
        std = (0.5 * logvar).exp()
        sample = self.training if sample is None else sample
        z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype) if sample else mean
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)  # (B,)
        return z, {"kl": kl, "mean": mean, "std": std}


def code_perplexity(counts: Tensor) -> Tensor:
    """exp(H(p)) of the code usage p = counts / sum(counts) (K,): the number of codes in effective use."""
    probs = counts / counts.sum()
    return torch.exp(-(probs * (probs + 1e-10).log()).sum())


class VectorQuantizer(nn.Module):
    def __init__(self, in_channels: int = 4, num_codes: int = 512, latent_channels: int | None = None,
                 ema: bool = False, decay: float = 0.99, l2_normalize: bool = False, restart_after: int = 0,
                 eps: float = 1e-5):
        super().__init__()
        dim = latent_channels or in_channels
        self.in_channels, self.latent_channels, self.num_codes = in_channels, dim, num_codes
        self.project = nn.Conv2d(in_channels, dim, 1) if in_channels != dim else nn.Identity()
        self.ema, self.decay, self.l2_normalize, self.restart_after, self.eps = ema, decay, l2_normalize, restart_after, eps
        codes = torch.randn(num_codes, dim) / dim**0.5
        if ema:
            self.register_buffer("codebook", codes)
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", codes.clone())
        else:
            self.codebook = nn.Parameter(codes)
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))

    def codes(self) -> Tensor:
        return F.normalize(self.codebook, dim=1) if self.l2_normalize else self.codebook

    def lookup(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> latents (B, dim, h, w)."""
        return rearrange(self.codes()[indices], "b h w d -> b d h w")

    def forward(self, h: Tensor):
        h = self.project(h)  # (B, D, h, w)
        b, d, hh, ww = h.shape
        flat = rearrange(h, "b d h w -> (b h w) d")  # (N, D)
        if self.l2_normalize:
            flat = F.normalize(flat, dim=1)
        codes = self.codes()  # (K, D)
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]  # (N, K)
        indices = dist2.argmin(dim=1)  # (N,)
        quant = codes[indices]  # (N, D)
        onehot = F.one_hot(indices, self.num_codes).type(flat.dtype)  # (N, K)
        counts = onehot.sum(0)  # (K,)
        if self.training:
            self._update(flat.detach(), onehot, counts)
        per_sample = lambda t: rearrange(t, "(b n) d -> b (n d)", b=b).mean(1)  # noqa: E731
        codebook_loss = per_sample((quant - flat.detach()) ** 2) if not self.ema else flat.new_zeros(b)
        commit_loss = per_sample((flat - quant.detach()) ** 2)
        z = flat + (quant - flat).detach()  # straight-through
        z = rearrange(z, "(b h w) d -> b d h w", b=b, h=hh, w=ww)
        perplexity = code_perplexity(counts)
        return z, {"codebook_loss": codebook_loss, "commit_loss": commit_loss, "perplexity": perplexity,
                   "usage": (counts > 0).float().mean(), "indices": rearrange(indices, "(b h w) -> b h w", b=b, h=hh)}

    @torch.no_grad()
    def _update(self, flat: Tensor, onehot: Tensor, counts: Tensor) -> None:
        sums = onehot.t() @ flat  # (K, D)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        if self.ema:
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.ema_count.sum()
            count = (self.ema_count + self.eps) / (n + self.num_codes * self.eps) * n  # Laplace smoothing
            self.codebook.copy_(self.ema_sum / count[:, None])
        if self.restart_after:
            self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
            dead = (self.steps_unused >= self.restart_after).nonzero().flatten()
            if len(dead):
                picks = flat[torch.randint(0, len(flat), (len(dead),), device=flat.device)]
                if dist.is_available() and dist.is_initialized():
                    dist.broadcast(picks, 0)
                self.codebook.data[dead] = picks
                if self.ema:
                    self.ema_sum[dead] = picks
                    self.ema_count[dead] = 1.0
                self.steps_unused[dead] = 0
