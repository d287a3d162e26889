"""Hand-off to the diffusion stages: the frozen text encoder and precomputed embeddings."""

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from ldm.cli import LDMCLI
from ldm.contrastive import FrozenTextEncoder, OpenCLIP
from ldm.data import ShardDataModule
from ldm.data.precompute import precompute_embeddings, precompute_latents
from ldm.data.synthetic import write_synthetic_shards
from tests.conftest import REPO, run_ldm


def test_frozen_text_encoder_from_a_run_matches_the_model(shapes_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LDMCLI(args=["fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "configs/contrastive/clip-debug.yaml"),
                       f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar",
                       "--data.batch_size=16", "--data.num_workers=0", "--trainer.max_steps=3",
                       "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0"])
    enc = FrozenTextEncoder(checkpoint=cli.run_dir)
    assert not any(p.requires_grad for p in enc.parameters())
    tokens = enc.tokenizer(["a red circle above a blue square", ""])
    out = enc(tokens)
    assert out["tokens"].shape == (2, 32, 64) and out["pooled"].shape == (2, 64)
    assert out["mask"][1].sum() == 2 and out["mask"][0].sum() == 9  # start + 7 words + end; empty: start + end
    model = cli.model.model.eval()
    with torch.no_grad():
        assert torch.allclose(out["pooled"], model.encode_text(tokens), atol=1e-6)


def test_precomputed_embeddings_compose_with_latents(tmp_path):
    src = tmp_path / "src"
    write_synthetic_shards(src, train=10, val=0, size=32, shard_size=5, progress=False)
    clip = OpenCLIP(32, CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                    CLIPTextCfg(context_length=16, width=32, heads=2, layers=1))
    enc = FrozenTextEncoder.__new__(FrozenTextEncoder)
    torch.nn.Module.__init__(enc)
    enc.model = clip.eval()
    stats = precompute_embeddings(enc, f"{src}/train-*.tar", tmp_path / "emb", batch_size=4, progress=False)
    assert stats["splits"]["train"]["samples"] == 10
    ae_cli = LDMCLI(args=["-c", str(REPO / "configs/autoencoder/kl-f4-debug.yaml"), f"--data.train={src}/train-*.tar"],
                    run=False)
    precompute_latents(ae_cli.model.autoencoder, f"{tmp_path}/emb/train-*.tar", tmp_path / "lat", size=32, progress=False)
    dm = ShardDataModule(val=f"{tmp_path}/lat/train-*.tar", decode_images=False, batch_size=10, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    assert batch["latent"].shape == (10, 4, 8, 8) and "image" not in batch
    assert batch["clip_text"].shape == (10, 32) and batch["clip_image"].shape == (10, 32)
    assert batch["clip_tokens"].shape == (10, 16, 32) and batch["clip_mask"].dtype == torch.bool
    with torch.no_grad():
        expected = clip.embed_texts(batch["text"])
    assert torch.allclose(batch["clip_text"], expected, atol=1e-5)
    assert torch.allclose(batch["clip_text"].norm(dim=1), torch.ones(10), atol=1e-5)


def test_precompute_embeddings_command_errors_clearly(tmp_path):
    res = run_ldm(["precompute", "embeddings", "--shards", "x.tar", "--out", "o"], cwd=tmp_path)
    assert res.returncode == 2 and "give one of checkpoint (a contrastive run), model_name" in res.stderr
