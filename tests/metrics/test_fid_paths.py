"""One FID path: the autoencoder's rFID and the generation metrics' FID share loading, features and distance."""

import torch

from ldm.metrics.generation import GenerationMetrics, InceptionFeatures, StreamingFID
from ldm.systems.autoencoder import AutoencoderSystem


def _images():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(24, 3, 32, 32, generator=g) * 2 - 1
    fake = (real + 0.3 * torch.randn(24, 3, 32, 32, generator=g)).clamp(-1, 1)
    return real, fake


def test_reconstruction_and_generation_fid_agree_on_the_same_images(inception_file):
    real, fake = _images()
    generation = GenerationMetrics(InceptionFeatures(str(inception_file)), kid_subset_size=10)
    generation.update(real, torch.arange(24), real=True)
    generation.update(fake, torch.arange(24))
    fid = generation.compute()["fid"]
    rfid = AutoencoderSystem._make_fid(str(inception_file))  # the autoencoder's rFID, fed as its validation does
    assert isinstance(rfid, StreamingFID)
    for i in range(0, 24, 8):
        rfid.update(real[i:i + 8], real=True)
        rfid.update(fake[i:i + 8], real=False)
    value = float(rfid.compute())
    print(f"FID generation {fid!r} reconstruction {value!r}")
    assert fid > 0 and abs(value - fid) <= 1e-6 * fid


def test_inception_weights_stay_out_of_checkpoints_and_old_copies_are_skipped(inception_file):
    rfid = StreamingFID(InceptionFeatures(str(inception_file)))
    assert not any(k.startswith("inception.") for k in rfid.state_dict())
    before = {k: v.clone() for k, v in rfid.inception.net.state_dict().items()}
    old = {f"inception.{k}": torch.zeros_like(v) for k, v in before.items()}  # torchmetrics FID's layout
    rfid.load_state_dict(old)  # strict: nothing missing, nothing unexpected, the file's weights kept
    assert all(torch.equal(v, rfid.inception.net.state_dict()[k]) for k, v in before.items())
