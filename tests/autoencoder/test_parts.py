import pytest
import torch

from ldm.autoencoder import (
    Autoencoder,
    Decoder,
    DiagonalGaussian,
    Encoder,
    VectorQuantizer,
    adaptive_weight,
    hinge_d_loss,
    vanilla_d_loss,
)


def tiny(mult, bottleneck):
    enc = Encoder(out_channels=bottleneck.in_channels, channels=8, channel_mult=mult, num_res_blocks=1, groups=4)
    dec = Decoder(in_channels=bottleneck.latent_channels, channels=8, channel_mult=mult, num_res_blocks=1, groups=4)
    return Autoencoder(enc, dec, bottleneck)


@pytest.mark.parametrize("mult,f", [((1, 2, 2), 4), ((1, 2, 2, 4), 8), ((1, 1, 2, 2, 4), 16)])
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_shapes_for_each_downsampling_factor(mult, f, kind):
    bottleneck = DiagonalGaussian(8, 4) if kind == "kl" else VectorQuantizer(4, num_codes=32)
    ae = tiny(mult, bottleneck)
    x = torch.randn(2, 3, 64, 64)
    recon, z, info = ae(x)
    assert ae.downsample_factor == f
    assert z.shape == (2, 4, 64 // f, 64 // f) and recon.shape == x.shape
    assert ae.encode(x).shape == z.shape and ae.decode(ae.encode(x)).shape == x.shape


def test_kl_equals_the_closed_form():
    g = DiagonalGaussian(in_channels=4, latent_channels=2)
    with torch.no_grad():  # identity 1x1 conv: mean = h[:, :2], logvar = h[:, 2:]
        g.to_moments.weight.copy_(torch.eye(4).reshape(4, 4, 1, 1))
        g.to_moments.bias.zero_()
    mean = torch.tensor([1.0, -2.0]).reshape(1, 2, 1, 1).expand(1, 2, 3, 3)
    logvar = torch.tensor([0.0, 0.5]).reshape(1, 2, 1, 1).expand(1, 2, 3, 3)
    _, info = g(torch.cat([mean, logvar], dim=1), sample=False)
    per_element = 0.5 * (mean**2 + logvar.exp() - 1 - logvar)
    assert torch.allclose(info["kl"], per_element.sum().reshape(1))
    # 9 pixels: 0.5 * 1 for channel 0, 0.5 * (4 + e^0.5 - 1.5) for channel 1
    assert info["kl"].item() == pytest.approx(9 * (0.5 + 0.5 * (4 + 0.5**0 * 2.718281828459045**0.5 - 1.5)), rel=1e-6)
    z_mode, _ = g(torch.cat([mean, logvar], dim=1), sample=False)
    assert torch.equal(z_mode, mean)


def test_vq_straight_through_and_loss_formulas():
    vq = VectorQuantizer(in_channels=2, num_codes=3)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]))
    h = torch.tensor([[0.9, 1.2], [-0.8, 1.9], [0.1, -0.1], [1.1, 0.7]]).t().reshape(1, 2, 2, 2).requires_grad_(True)
    vq.eval()
    z, info = vq(h)
    assert info["indices"].flatten().tolist() == [1, 2, 0, 1]
    expected_q = torch.tensor([[1.0, 1.0], [-1.0, 2.0], [0.0, 0.0], [1.0, 1.0]])
    flat_h = h.detach().reshape(2, 4).t()
    assert torch.allclose(z.detach().reshape(2, 4).t(), expected_q)
    mse = ((expected_q - flat_h) ** 2).mean()
    assert info["codebook_loss"].item() == pytest.approx(mse.item()) and info["commit_loss"].item() == pytest.approx(mse.item())
    z.sum().backward()
    assert torch.equal(h.grad, torch.ones_like(h))  # straight-through: d z / d h = I
    info["codebook_loss"].sum().backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0  # codebook loss trains the codes
    assert info["perplexity"].item() == pytest.approx(torch.exp(-(torch.tensor([0.25, 0.5, 0.25]).log() * torch.tensor([0.25, 0.5, 0.25])).sum()).item())


def test_vq_ema_moves_codes_toward_their_inputs_and_restarts_dead_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(in_channels=2, num_codes=4, ema=True, decay=0.5, restart_after=2)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0], [-100.0, 50.0]]))
        vq.ema_sum.copy_(vq.codebook)
    target = torch.tensor([1.0, 1.0])
    h = (target.reshape(1, 2, 1, 1) + 0.01 * torch.randn(1, 2, 4, 4))  # all nearest to code 0
    before = (vq.codebook[0] - target).norm().item()
    vq.train()
    vq(h)
    assert (vq.codebook[0] - target).norm().item() < before  # EMA pulled code 0 toward its inputs
    _, info = vq(h)
    assert info["codebook_loss"].abs().sum() == 0  # with EMA the codebook has no loss term
    # codes 1-3 were unused for 2 steps: restarted at batch vectors (near the target)
    assert ((vq.codebook[1:] - target).norm(dim=1) < 0.2).all()


def test_gan_losses_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert vanilla_d_loss(real, fake).item() == pytest.approx(
        0.5 * (torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean()).item())
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec, g = (w**2).sum(), (3 * w).sum()
    # |grad rec| = |2w| = sqrt(20), |grad g| = sqrt(18)
    assert adaptive_weight(rec, g, w).item() == pytest.approx(20**0.5 / (18**0.5 + 1e-4), rel=1e-6)
