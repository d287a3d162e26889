"""The autoencoder's training objective: reconstruction + perceptual + regulariser + adversarial.

Generator side (Esser et al. 2021, eq. 5-7; Rombach et al. 2022, appendix G):

    L = rec + perceptual_weight * LPIPS + kl_weight * KL          (KL bottleneck)
                                       + codebook + beta * commit  (VQ bottleneck)
        + [step >= disc_start] * lambda * disc_weight * L_G,      L_G = -mean D(x_hat)

with the adaptive weight lambda = |grad_last L_rec| / (|grad_last L_G| + 1e-4) taken at
the decoder's last layer (clamped to [0, 1e4]). Discriminator side: hinge loss
mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))) or the vanilla (non-saturating) loss,
switched on at ``disc_start``. Terms come back named, per batch, for the system to log.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.autoencoder.discriminator import PatchDiscriminator


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def vanilla_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """|grad rec| / (|grad g| + 1e-4) at ``last_layer``, detached (Esser et al. 2021, eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class AutoencoderLoss(nn.Module):
    """Named loss terms for the generator (autoencoder) and the discriminator.

    Args:
        reconstruction: ``l1`` or ``l2`` pixel loss.
        perceptual_weight: weight of LPIPS (0 = off; then no weights are needed).
        perceptual_weights: local path of torchvision's VGG16 weights for LPIPS.
        kl_weight: weight of the KL term (KL bottleneck).
        commit_beta: weight of the commitment term (VQ bottleneck).
        disc_weight: weight of the adversarial term (0 = no GAN).
        disc_start: global step from which the discriminator trains and the GAN term is used.
        disc_loss: ``hinge`` or ``vanilla``.
        discriminator: the discriminator (default: a 3-layer PatchGAN).
    """

    def __init__(self, reconstruction: Literal["l1", "l2"] = "l1", perceptual_weight: float = 0.0,
                 perceptual_weights: str | None = None, kl_weight: float = 1e-6, commit_beta: float = 0.25,
                 disc_weight: float = 0.5, disc_start: int = 50001, disc_loss: Literal["hinge", "vanilla"] = "hinge",
                 discriminator: nn.Module | None = None):
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
        self.reconstruction = reconstruction
        self.perceptual_weight = perceptual_weight
        self.perceptual = None
        if perceptual_weight > 0:
            from ldm.autoencoder.perceptual import LPIPS

            self.perceptual = LPIPS(os.path.expanduser(perceptual_weights) if perceptual_weights else None)
        self.kl_weight, self.commit_beta = kl_weight, commit_beta
        self.disc_weight, self.disc_start = disc_weight, disc_start
        self.d_loss_fn = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}[disc_loss]
        self.discriminator = discriminator if discriminator is not None else PatchDiscriminator()

    def uses_gan(self, step: int) -> bool:
        return self.disc_weight > 0 and step >= self.disc_start

    @property
    def reconstruction_names(self) -> list[str]:
        """The names :meth:`reconstruction_terms` returns, known before any batch (validation sums them by name)."""
        return ["rec", "perceptual"] if self.perceptual is not None else ["rec"]

    def reconstruction_terms(self, x: Tensor, recon: Tensor) -> dict[str, Tensor]:
        """Per-sample pixel (and perceptual) losses (B,)."""
        diff = (x - recon).abs() if self.reconstruction == "l1" else (x - recon) ** 2
        terms = {"rec": diff.flatten(1).mean(1)}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(x.contiguous(), recon.contiguous())
        return terms

    def generator_loss(self, x: Tensor, recon: Tensor, info: dict, last_layer: Tensor, step: int
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        terms = {k: v.mean() for k, v in self.reconstruction_terms(x, recon).items()}
        nll = terms["rec"] + self.perceptual_weight * terms.get("perceptual", 0.0)
        loss = nll
        if "kl" in info:
            terms["kl"] = info["kl"].mean()
            loss = loss + self.kl_weight * terms["kl"]
        if "commit_loss" in info:
            terms["codebook"], terms["commit"] = info["codebook_loss"].mean(), info["commit_loss"].mean()
            loss = loss + terms["codebook"] + self.commit_beta * terms["commit"]
        if self.uses_gan(step):
            terms["g_adv"] = -self.discriminator(recon).mean()
            terms["adaptive_weight"] = adaptive_weight(nll, terms["g_adv"], last_layer) if recon.requires_grad \
                else torch.ones((), device=x.device)
            loss = loss + self.disc_weight * terms["adaptive_weight"] * terms["g_adv"]
        terms["total"] = loss
        return loss, terms

    def discriminator_loss(self, x: Tensor, recon: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        real, fake = self.discriminator(x.detach()), self.discriminator(recon.detach())
        loss = self.d_loss_fn(real, fake)
        return loss, {"d_loss": loss, "logits_real": real.mean(), "logits_fake": fake.mean()}
