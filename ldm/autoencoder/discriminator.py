"""PatchGAN discriminator (Isola et al. 2017) as used by VQGAN / the LDM autoencoders.

A stack of stride-2 4x4 convolutions with BatchNorm and LeakyReLU; it outputs one logit per
overlapping patch (B, 1, h, w) rather than one per image.
"""

from __future__ import annotations

from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                    nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():  # DCGAN initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, h, w) patch logits
