"""MFU needs FLOPs: a latent-diffusion system counts its training FLOPs per sample (3 x its network's forward, by
torch's FlopCounterMode) without disturbing training, and the throughput monitor turns them into flops_per_batch
where the device's peak is known."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm.callbacks.throughput import SampleThroughput, batch_size
from ldm.diffusion import UNet
from ldm.systems import LatentDiffusion


def _system() -> LatentDiffusion:
    torch.manual_seed(0)
    unet = UNet(in_channels=3, channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], heads=2,
                context_dim=None, groups=4)
    return LatentDiffusion(unet)  # pixel space, unconditional


def test_flops_per_sample_is_three_forwards_and_leaves_the_random_state():
    system = _system()
    batch = {"image": torch.randn(4, 3, 16, 16), "text": ["a"] * 4}
    state = torch.get_rng_state()
    flops = system.flops_per_sample(batch)
    assert torch.equal(torch.get_rng_state(), state)  # training draws the same noise with or without counting
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        system.unet(torch.randn(1, 3, 16, 16), torch.tensor([500.0]))
    assert flops == 3 * counter.get_total_flops() > 0


def test_the_monitor_sets_flops_per_batch_where_the_peak_is_known():
    system = _system()
    batch = {"image": torch.randn(4, 3, 16, 16)}
    monitor = SampleThroughput()
    monitor._module_has_flops = False
    monitor.available_flops = None  # a CPU: no peak, no MFU, nothing counted
    monitor.on_train_batch_start(None, system, batch, 0)
    assert not hasattr(system, "flops_per_batch")
    monitor.available_flops = 989e12  # an H100's bf16 dense peak, as Lightning's table gives it
    monitor.on_train_batch_start(None, system, batch, 0)
    assert system.flops_per_batch == system.flops_per_sample(batch) * batch_size(batch) and monitor._module_has_flops
