"""FID / KID / IS / FD-CLIP: closed-form behaviour, equality with torch-fidelity, exactness over ranks.

The Inception weights are random (written by the ``inception_file`` fixture): the numbers test
the code path and the agreement with torch-fidelity, they are not meaningful FIDs. Inception
costs about 0.7 s per image on the 2-core CI machine, so the sets are small.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.data.shapes import render, sample_scene
from ldm.metrics.generation import (
    ClipImageFeatures,
    GenerationMetrics,
    InceptionFeatures,
    frechet_distance,
    kernel_inception_distance,
)

N = 10
SETTINGS = dict(kid_subsets=10, kid_subset_size=N, is_splits=2)


def _images(n: int = N, size: int = 64, seed: int = 0) -> torch.Tensor:
    arrays = [np.asarray(render(sample_scene(seed, i, size, "val"))) for i in range(n)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _noisy(x: torch.Tensor, std: float) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)


def _real_fake():
    return _images(seed=0), _noisy(_images(seed=1), 0.2)


def _fill(m: GenerationMetrics, real: torch.Tensor, fake: torch.Tensor, batch: int = 4) -> dict[str, float]:
    for lo in range(0, len(real), batch):
        m.update(real[lo:lo + batch], torch.arange(lo, min(lo + batch, len(real))), real=True)
    for lo in range(0, len(fake), batch):
        m.update(fake[lo:lo + batch], torch.arange(lo, min(lo + batch, len(fake))))
    return m.compute()


@pytest.fixture(scope="module")
def single_process(inception_file):
    """Our metrics on (real, fake) in one process."""
    return _fill(GenerationMetrics(InceptionFeatures(str(inception_file)), **SETTINGS), *_real_fake())


@pytest.fixture(scope="module")
def tiny_clip():
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from ldm.contrastive import OpenCLIP

    torch.manual_seed(0)
    return OpenCLIP(32, CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
                    CLIPTextCfg(context_length=16, width=32, heads=2, layers=1)).eval()


def test_a_set_against_itself_is_zero_and_noise_increases_the_distance(inception_file, tiny_clip):
    inception = InceptionFeatures(str(inception_file))
    x = _images()
    pool = {std: inception(_noisy(x, std) if std else x)[0] for std in (0.0, 0.1, 0.5)}
    assert abs(frechet_distance(pool[0.0], pool[0.0])) < 1e-6 * frechet_distance(pool[0.0], pool[0.5])
    assert 0 < frechet_distance(pool[0.0], pool[0.1]) < frechet_distance(pool[0.0], pool[0.5])
    assert kernel_inception_distance(pool[0.0], pool[0.1], 10, N)[0] < kernel_inception_distance(pool[0.0], pool[0.5], 10, N)[0]
    # FD-CLIP through the metric, on more images (the CLIP tower is cheap)
    xs = _images(24)
    fd = {std: _fill(GenerationMetrics(None, ClipImageFeatures(tiny_clip)), xs, _noisy(xs, std) if std else xs)["fd_clip"]
          for std in (0.0, 0.1, 0.5)}
    assert abs(fd[0.0]) < 1e-6 and 0 < fd[0.1] < fd[0.5]


def test_values_equal_torch_fidelity(inception_file, single_process):
    import torch_fidelity

    class Uint8(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    real, fake = _real_fake()
    ref = torch_fidelity.calculate_metrics(
        input1=Uint8(fake), input2=Uint8(real), fid=True, kid=True, isc=True, cuda=False, batch_size=5,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(inception_file),
        kid_subsets=10, kid_subset_size=N, isc_splits=2, verbose=False, cache=False)
    assert single_process["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert single_process["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4)
    assert single_process["is"] == pytest.approx(ref["inception_score_mean"], rel=1e-4)


def _rank_worker(rank, world, port, weights, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    real, fake = _real_fake()
    m = GenerationMetrics(InceptionFeatures(weights), **SETTINGS)
    lo, hi = rank * N // world, (rank + 1) * N // world
    for a in range(lo, hi, 3):  # batches that differ from the single process's
        b = min(a + 3, hi)
        m.update(real[a:b], torch.arange(a, b), real=True)
        m.update(fake[a:b], torch.arange(a, b))
    result = m.compute()
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes (about 20 s); ldm eval over two processes is checked in tests/tools/test_distributed_tools.py
@pytest.mark.timeout(240)
def test_two_ranks_give_the_single_process_values(inception_file, single_process, tmp_path):
    out = tmp_path / "two.pt"
    mp.spawn(_rank_worker, args=(2, 29700 + os.getpid() % 1000, str(inception_file), str(out)), nprocs=2, join=True)
    two = torch.load(out)
    for key in ("fid", "kid", "is"):
        assert two[key] == pytest.approx(single_process[key], rel=1e-5), key


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist: download https://github.com/toshas"):
        InceptionFeatures(str(tmp_path / "nope.pth"))
