"""GPU speed options, checked for wiring on the CPU (issue 19): regional compilation and channels_last change no
number, the matmul precision is set for the run only, and the SDPA probe names the kernel that runs.

Compilation uses the ``eager`` backend: Dynamo captures each block's graph, guards and recompiles exactly as for
inductor, and the captured graph then runs eagerly. Inductor on this 2-core CPU generates and builds C++ for every
block (minutes); ``aot_eager`` (AOTAutograd's forward/backward split as well) doubles the compile time for little
more coverage of our wiring. The kernels inductor generates are measured on a GPU, by the benchmarks."""

from __future__ import annotations

import pytest
import pytorch_lightning as L
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.callbacks.speed import Speedups
from ldm.diffusion import UNet
from ldm.nn.compile import find_blocks, is_compiled
from ldm.nn.sdpa import SDPABackends, sdpa_backend


def _unet() -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=4, channels=16, channel_mult=[1], num_res_blocks=1, attention_levels=[0], heads=2,
                context_dim=8, groups=4)


class _Wrapped(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.unet = _unet()


def _two_losses(module: _Wrapped) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss before and after one AdamW step on a fixed batch."""
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    t, target = torch.tensor([10.0, 700.0]), torch.randn(2, 4, 8, 8, generator=g)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss = (module.unet(x, t, context=ctx) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses[0], losses[1]


def test_compiled_channels_last_blocks_give_the_eager_loss_before_and_after_a_step():
    torch._dynamo.reset()
    eager, fast = _Wrapped(), _Wrapped()
    speed = Speedups(compile=True, compile_backend="eager", channels_last=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[speed])
    speed.setup(trainer, fast, "fit")  # as the trainer calls them: the layout first, compilation at fit start
    speed.on_fit_start(trainer, fast)
    speed.teardown(trainer, fast, "fit")
    conv = fast.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert speed.compiled == [name for name, _ in find_blocks(fast)] and len(speed.compiled) == 5
    assert all(is_compiled(fast.get_submodule(name)) for name in speed.compiled)
    assert not is_compiled(eager.unet.input_blocks[0])

    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ref, ours = _two_losses(eager), _two_losses(fast)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before  # the blocks ran compiled
    assert ref[1] < ref[0]  # the step changed the loss
    for a, b in zip(ref, ours):
        assert abs(a.item() - b.item()) < 1e-5, (a, b)
    assert list(fast.state_dict()) == list(eager.state_dict())  # compiled in place: the same checkpoint keys


def test_blocks_inside_a_compiled_block_are_not_compiled_again():
    unet = _unet()
    names = [name for name, _ in find_blocks(unet)]
    assert names and all(name.startswith(("input_blocks.", "middle_block", "output_blocks.")) for name in names)
    inner = [name for name, _ in find_blocks(unet, ["TransformerBlock"])]
    assert inner and not set(inner) & set(names)  # found alone, but inside UNetBlocks by default


def test_the_matmul_precision_is_the_runs_and_restored_after_it():
    before = torch.get_float32_matmul_precision()
    speed = Speedups(matmul_precision="medium" if before != "medium" else "high")
    assert speed.active and not Speedups().active
    speed.setup(None, torch.nn.Linear(2, 2), "fit")
    assert torch.get_float32_matmul_precision() == speed.matmul_precision
    speed.teardown(None, torch.nn.Linear(2, 2), "fit")
    assert torch.get_float32_matmul_precision() == before


def test_the_sdpa_probe_names_the_kernel_that_runs():
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 5, 8)
    assert sdpa_backend(q, k, k) == "flash (cpu)"  # torch's fused CPU kernel
    with sdpa_kernel(SDPBackend.MATH):
        assert sdpa_backend(q, k, k) == "math"
    with pytest.raises(RuntimeError, match="No viable backend"), sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        sdpa_backend(q, k, k)  # a kernel the CPU lacks is an error, never a wrong answer

    unet = _unet().eval()  # every attention call of a real forward
    with SDPABackends() as probe, torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([5.0]), context=torch.randn(1, 5, 8))
    assert probe.counts == {"flash (cpu)": 8} and probe.summary() == "flash (cpu) 8"  # 4 transformers: self + cross


def test_the_autoencoders_pixel_attention_runs_a_fused_kernel_in_either_layout():
    """Its q, k, v come out of a 1x1 conv: in NCHW their channels are strided, and SDPA silently took the math path
    (an (HW, HW) score matrix: 4096 x 4096 per image in the middle of SD's VAE at 512 px) until they were made
    contiguous; channels_last activations need no copy."""
    from ldm.nn.attention import SpatialSelfAttention

    torch.manual_seed(0)
    attention, x = SpatialSelfAttention(64, groups=8).eval(), torch.randn(2, 64, 8, 8)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        expected = attention(x)
    for layout in (torch.contiguous_format, torch.channels_last):
        attention.to(memory_format=layout)
        with SDPABackends() as probe, torch.no_grad():
            out = attention(x.contiguous(memory_format=layout))
        assert probe.counts == {"flash (cpu)": 1}, (layout, probe.counts)
        assert (out - expected).abs().max() < 1e-5
