"""The diffusion prior system on the shapes' precomputed CLIP embeddings."""

from __future__ import annotations

import csv

import pytest
import torch

from ldm.cli import LDMCLI
from ldm.contrastive import FrozenTextEncoder
from ldm.data import ShardDataModule
from ldm.data.precompute import precompute_embeddings
from tests.conftest import REPO
from tests.stages import DEBUG, fit

PRIOR_DEBUG = str(REPO / "configs/prior/debug.yaml")
TEXT_DIFF_BOUND = 0.02  # measured 0.0032 (20 DDIM steps, decoder trained 40 steps)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """CLIP embeddings of 1200 + 200 scenes from a debug CLIP trained for 200 steps (informative embeddings:
    with an untrained CLIP all image embeddings are nearly one vector and any prior matches them)."""
    from ldm.data.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("prior-data")
    write_synthetic_shards(root / "shapes", train=1200, val=200, size=32, seed=11, shard_size=400, progress=False)
    clip = fit(["-c", *DEBUG, "-c", str(REPO / "configs/contrastive/clip-debug.yaml"),
                f"--data.train={root}/shapes/train-*.tar", f"--data.val={root}/shapes/val-*.tar", "--data.num_workers=0",
                "--data.image_size=32", "--trainer.limit_val_batches=0", "--trainer.max_steps=150",
                "--trainer.max_epochs=-1", "--trainer.val_check_interval=1.0", f"--run.root={root}", "--run.version=v"])
    precompute_embeddings(FrozenTextEncoder(checkpoint=clip.run_dir), f"{root}/shapes/*-*.tar", root / "emb",
                          progress=False)
    return root / "emb"


@pytest.fixture(scope="module")
def prior_run(embeddings, tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    return fit(["-c", *DEBUG, "-c", PRIOR_DEBUG, f"--data.train={embeddings}/train-*.tar",
                f"--data.val={embeddings}/val-*.tar", "--data.num_workers=0", "--data.batch_size=32",
                "--trainer.max_steps=200", "--trainer.max_epochs=-1", "--trainer.val_check_interval=1.0",
                "--trainer.check_val_every_n_epoch=1", f"--run.root={root}", "--run.version=v"])


def test_prior_training_lowers_the_loss_and_beats_the_no_prior_baseline(prior_run):
    with open(f"{prior_run.run_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/cos_prior")]
    assert len(rows) >= 3
    first, last = rows[0], rows[-1]
    assert float(last["val/loss"]) < float(first["val/loss"])
    # measured (docs/unclip.md), 64 validation scenes, 200 steps: cosine with the true image embedding 0.85-0.87
    # for the prior's sample against 0.75 for the text embedding itself ("no prior"); R@1 0.31-0.34 against 0.44
    assert float(last["val/cos_prior"]) > float(last["val/cos_text"]) + 0.05, last
    assert float(last["val/r1_prior"]) > 5 / 64, last  # five times chance


def test_best_of_n_never_scores_below_a_single_draw(prior_run, embeddings):
    system = prior_run.model.eval()
    dm = ShardDataModule(val=f"{embeddings}/val-*.tar", decode_images=False, batch_size=30, num_workers=0)  # 30 of 200
    cond = system.condition(next(iter(dm.val_dataloader())))
    text = torch.nn.functional.normalize(cond["text_emb"], dim=-1)
    single = system.sample(cond, seed=4, best_of=1)
    best = system.sample(cond, seed=4, best_of=4)
    assert single.shape == best.shape == (30, 64)
    assert torch.allclose(single.norm(dim=-1), torch.ones(30), atol=1e-5)
    assert ((best * text).sum(-1) >= (single * text).sum(-1) - 1e-6).all()
    assert ((best * text).sum(-1) > (single * text).sum(-1) + 1e-6).any()  # and it does pick other draws
    assert torch.equal(system.sample(cond, seed=4, best_of=4), best)  # deterministic for a seed


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs/prior").glob("*.yaml")))
def test_every_prior_config_parses_and_instantiates(config, embeddings):
    cli = LDMCLI(args=["-c", *DEBUG, "-c", str(REPO / "configs/prior" / config), f"--data.train={embeddings}/train-*.tar",
                       f"--data.val={embeddings}/val-*.tar"], run=False)
    prior = cli.model.prior
    assert cli.datamodule.decode_images is False
    assert prior(torch.randn(2, prior.embed_dim), torch.tensor([1.0, 2.0]), torch.randn(2, prior.embed_dim),
                 torch.randn(2, 5, prior.token_dim), torch.ones(2, 5, dtype=torch.bool)).shape == (2, prior.embed_dim)


def test_missing_embeddings_are_named(prior_run):
    with pytest.raises(ValueError, match="lacks clip_image, clip_tokens, clip_mask"):
        prior_run.model.condition({"clip_text": torch.randn(2, 64)})


@pytest.fixture(scope="module")
def decoder_shards(embeddings, stage_runs, tmp_path_factory):
    from ldm.data.precompute import precompute_latents
    from ldm.systems import load_autoencoder

    out = tmp_path_factory.mktemp("lat")
    precompute_latents(load_autoencoder(stage_runs["ae"]), f"{embeddings}/*-*.tar", out, size=32, progress=False)
    return out


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs/unclip").glob("*.yaml")))
def test_unclip_decoder_configs_build_and_train_on_image_embeddings(config, decoder_shards, stage_runs):
    args = ["-c", *DEBUG, "-c", str(REPO / "configs/unclip" / config), f"--data.train={decoder_shards}/train-*.tar",
            f"--data.val={decoder_shards}/val-*.tar", "--data.num_workers=0", "--data.batch_size=8",
            f"--model.init_args.first_stage.init_args.checkpoint={stage_runs['ae']}", "--trainer.precision=32-true"]
    if config == "debug.yaml":
        args.append(f"--model.init_args.conditioner.init_args.text_encoder.init_args.checkpoint={stage_runs['clip']}")
    system = LDMCLI(args=args, run=False).model
    dm = ShardDataModule(val=f"{decoder_shards}/val-*.tar", decode_images=False, batch_size=8, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    cond = system.condition(batch)
    assert torch.allclose(cond["y"], batch["clip_image"] * batch["clip_image"].shape[-1] ** 0.5)  # unit variance per entry
    text_tokens = 32 if system.conditioner.text_context else 0
    assert cond["context"].shape == (8, text_tokens + 4, system.unet.context_dim)
    # the 4 embedding tokens follow the image embedding: another image, other tokens
    other = dict(batch, clip_image=batch["clip_image"].roll(1, dims=0))
    assert not torch.allclose(system.condition(other)["context"][:, -4:], cond["context"][:, -4:])
    opt = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):
        loss = system.loss(system.precond, system.unet, system.latents(batch), system.condition(batch),
                           generator=torch.Generator().manual_seed(0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert system.conditioner.embedding_proj.weight.grad is not None  # the projection is trained with the U-Net
    if system.conditioner.text_encoder is None:  # image-embedding only: prompts need the CLIP the embeddings came from
        from ldm.pipelines import TextToImage

        with pytest.raises(ValueError, match="ldm sample --clip RUN"):
            TextToImage(system).embeddings(["a red circle"])


@pytest.fixture(scope="module")
def unclip(embeddings, decoder_shards, stage_runs, prior_run, tmp_path_factory):
    """The unCLIP chain: the prior above and the debug decoder trained 40 steps on the same CLIP's embeddings.
    ``.runs`` holds the two run folders (for ``ldm sample``)."""
    from ldm.pipelines.unclip import UnCLIP

    clip_run = embeddings.parent / "clip-debug" / "v"
    decoder = fit(["-c", *DEBUG, "-c", str(REPO / "configs/unclip/debug.yaml"), f"--data.train={decoder_shards}/train-*.tar",
                   f"--data.val={decoder_shards}/val-*.tar", "--data.num_workers=0", "--data.batch_size=16",
                   "--data.image_size=32", f"--model.init_args.first_stage.init_args.checkpoint={stage_runs['ae']}",
                   f"--model.init_args.conditioner.init_args.text_encoder.init_args.checkpoint={clip_run}", "--trainer.max_steps=40",
                   "--trainer.limit_val_batches=0", f"--run.root={tmp_path_factory.mktemp('decoder')}"])
    pipe = UnCLIP(decoder.model.eval(), prior_run.model.eval(), prior_steps=5)
    pipe.runs = {"decoder": decoder.run_dir, "prior": prior_run.run_dir}
    return pipe


def _val_images(shapes_root, n=2):
    from ldm.data import ShardDataModule as DM

    dm = DM(val=f"{shapes_root}/val-*.tar", image_size=32, batch_size=n, num_workers=0)
    return next(iter(dm.val_dataloader()))["image"]


def test_unclip_text_to_image_through_the_prior_and_directly(unclip):
    from ldm.pipelines import SamplerSettings

    settings = SamplerSettings(sampler="ddim", steps=5, cfg=2.0, seed=0)
    prompts = ["a red circle", "a large blue square"]
    through_prior = unclip(prompts, settings, image_size=32)
    assert through_prior.shape == (2, 3, 32, 32) and torch.equal(unclip(prompts, settings, image_size=32), through_prior)
    prior = unclip.prior
    unclip.prior = None  # the text embedding itself drives the decoder (seed 004)
    try:
        direct = unclip(prompts, settings, image_size=32)
    finally:
        unclip.prior = prior
    assert direct.shape == through_prior.shape and not torch.allclose(direct, through_prior)
    # a plain TextToImage on the decoder (what SampleLogger, ldm eval and ldm sample without --prior use)
    # reads prompts the same way: the CLIP text embedding as the image embedding
    from ldm.pipelines import TextToImage

    assert torch.allclose(TextToImage(unclip.decoder)(prompts, settings, image_size=32, progress=False), direct,
                          atol=1e-5)


def test_interpolation_ends_are_the_images_own_decodings(unclip, embeddings):
    from ldm.pipelines import SamplerSettings

    images = _val_images(embeddings.parent / "shapes")
    settings = SamplerSettings(sampler="ddim", steps=5, cfg=1.0, seed=2)
    strip = unclip.interpolate(images[:1], images[1:2], 4, settings, image_size=32)
    assert strip.shape == (4, 3, 32, 32)
    # each image's own embedding decoded alone with the same seed: the same decoder noise as every frame
    own_a = unclip.decode(unclip.encode_images(images[:1]), settings, image_size=32)
    own_b = unclip.decode(unclip.encode_images(images[1:2]), settings, image_size=32)
    assert torch.allclose(strip[0], own_a[0], atol=1e-4) and torch.allclose(strip[-1], own_b[0], atol=1e-4)
    # the path between the embeddings: unit norm, moving monotonically from a to b
    from ldm.pipelines import slerp

    a, b = unclip.encode_images(images[:1]), unclip.encode_images(images[1:2])
    path = torch.cat([slerp(a, b, t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)])
    assert torch.allclose(path.norm(dim=-1), torch.ones(5), atol=1e-5)
    to_b = (path * torch.nn.functional.normalize(b, dim=-1)).sum(-1)
    assert (to_b[1:] > to_b[:-1]).all() and torch.allclose(path[-1], torch.nn.functional.normalize(b, dim=-1)[0], atol=1e-5)
    variations = unclip.variations(images[:1], 3, SamplerSettings(sampler="ddim", steps=5, eta=1.0, seed=0),
                                   image_size=32)
    assert variations.shape == (3, 3, 32, 32) and not torch.allclose(variations[0], variations[1])


def test_variations_of_an_image_set_decode_each_images_own_embedding(unclip, embeddings):
    from ldm.pipelines import SamplerSettings

    images = _val_images(embeddings.parent / "shapes", n=4)
    settings = SamplerSettings(sampler="euler", steps=4, cfg=2.0, seed=3)
    pipe = unclip.variations_of(images)
    every = pipe(["x"] * 4, settings, image_size=32, progress=False)
    assert every.shape == (4, 3, 32, 32)
    # row 0: image 0's embedding from the noise of the seed itself, as the image decoded alone
    own = unclip.decode(unclip.encode_images(images[:1]), settings, image_size=32)
    assert torch.allclose(every[0], own[0], atol=1e-3)  # batch of 4 against batch of 1: float32 rounding
    # a block of rows (another rank's share) gives the same images as the whole set
    assert torch.allclose(pipe(["x"] * 2, settings, image_size=32, progress=False, index_offset=2), every[2:], atol=1e-3)
    # the rows decode the images' embeddings in order: the pipeline with those embeddings given, exactly
    embeddings = unclip.encode_images(images)
    assert torch.equal(every, unclip.pipe(["x"] * 4, settings, image_size=32, progress=False, embeddings=embeddings))
    # the same noise with the images in another order: other images (the 40-step decoder barely reads its embedding,
    # so only that they differ is asserted)
    rolled = unclip.variations_of(images.roll(1, dims=0))(["x"] * 4, settings, image_size=32, progress=False)
    assert not torch.equal(rolled, every)
    with pytest.raises(ValueError, match="variations of 4 images"):
        pipe(["x"] * 2, settings, image_size=32, index_offset=3)


def test_text_diff_starts_at_the_image_and_moves_with_the_amount(unclip, embeddings):
    from ldm.pipelines import SamplerSettings

    images = _val_images(embeddings.parent / "shapes")[:1]
    settings = SamplerSettings(sampler="ddim", steps=20, cfg=1.0, seed=0)
    frames = unclip.text_diff(images, "a red circle", "a blue square", [0.0, 0.25, 0.5], settings, image_size=32)
    assert frames.shape == (3, 3, 32, 32)
    fs = unclip.decoder.first_stage
    recon = fs.decode(fs.encode(images)).clamp(-1, 1)[0]
    # amount 0: deterministic DDIM from the image's inverted noise with its own embedding reconstructs it
    error = float((frames[0] - recon).abs().mean())
    assert error < TEXT_DIFF_BOUND, error
    moved = [float((f - frames[0]).abs().mean()) for f in frames[1:]]
    assert 0 < moved[0] < moved[1], moved
    # the path: unit norm, turning monotonically from the image's embedding toward the caption difference
    text = unclip.text_embeddings(["a red circle", "a blue square"])["pooled"]
    z_d = torch.nn.functional.normalize(text[1] - text[0], dim=-1)
    z_i = unclip.encode_images(images)[0]
    path = unclip.text_diff_embeddings(images, "a red circle", "a blue square", [0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(path.norm(dim=-1), torch.ones(4), atol=1e-5) and torch.allclose(path[0], z_i, atol=1e-5)
    assert ((path @ z_d)[1:] > (path @ z_d)[:-1]).all() and ((path @ z_i)[1:] < (path @ z_i)[:-1]).all()
    assert torch.allclose(path[-1], z_d, atol=1e-5)


def test_sample_cli_unclip_modes(unclip, embeddings, tmp_path, monkeypatch, capsys):
    import json

    from ldm.data.transforms import to_pil
    from ldm.tools.sample import main

    monkeypatch.chdir(tmp_path)
    for i, image in enumerate(to_pil(_val_images(embeddings.parent / "shapes"))):
        image.save(tmp_path / f"in{i}.png")
    common = ["--ckpt", str(unclip.runs["decoder"]), "--steps", "3", "--quiet", "--sampler", "ddim"]
    assert main([*common, "--prior", str(unclip.runs["prior"]), "--prior-steps", "3", "--prior-best-of", "2",
                 "--prompt", "a red circle", "--prompt", "a blue square", "--n", "2", "--out", "t/grid.png"]) == 0
    record = json.loads((tmp_path / "t/grid.json").read_text())
    assert record["mode"] == "text" and record["prior"].endswith(".ckpt") and len(record["images"]) == 4
    assert record["prompts_read_by"] == "the diffusion prior"
    assert [i["seed"] for i in record["images"]] == [0, 1, 2, 3] and (tmp_path / "t/grid.png").stat().st_size > 0
    assert main([*common, "--mode", "variations", "--image", "in0.png", "--n", "3", "--eta", "1",
                 "--out", "v/grid.png"]) == 0
    assert len(list((tmp_path / "v/grid").glob("*.png"))) == 4  # the input and 3 variations
    assert main([*common, "--mode", "interpolate", "--image", "in0.png", "--image", "in1.png", "--frames", "3",
                 "--out", "i/strip.png"]) == 0
    assert [f["caption"] for f in json.loads((tmp_path / "i/strip.json").read_text())["images"]] == [
        "t = 0.00", "t = 0.50", "t = 1.00"]
    assert main([*common, "--mode", "text-diff", "--image", "in0.png", "--from-prompt", "a red circle",
                 "--prompt", "a blue circle", "--amounts", "0,0.25,0.5", "--out", "d/strip.png"]) == 0
    assert json.loads((tmp_path / "d/strip.json").read_text())["amounts"] == [0.0, 0.25, 0.5]
    # ldm eval samples the whole chain too
    from ldm.tools.evaluate import main as evaluate

    assert evaluate(["--ckpt", str(unclip.runs["decoder"]), "--prior", str(unclip.runs["prior"]), "--data",
                     f"{embeddings.parent}/shapes/val-*.tar", "--n", "6", "--steps", "3", "--quiet",
                     "--out", "e"]) == 0
    report = json.loads((tmp_path / "e/report.json").read_text())
    assert report["prior"] == str(unclip.runs["prior"])
    assert {"clip_score", "fd_clip", "compositional/count"} <= set(report["results"][0]["metrics"])
    # variations: each validation image's own embedding decoded, checked against its own metadata
    assert evaluate(["--ckpt", str(unclip.runs["decoder"]), "--variations", "--data",
                     f"{embeddings.parent}/shapes/val-*.tar", "--n", "6", "--steps", "3", "--quiet", "--out", "ev"]) == 0
    report = json.loads((tmp_path / "ev/report.json").read_text())
    assert report["variations"] is True and report["prior"] is None and report["n"] == 6
    assert {"clip_score", "compositional/color", "compositional/shape"} <= set(report["results"][0]["metrics"])
    assert "variations of the first 6 images" in (tmp_path / "ev/report.md").read_text()
    assert evaluate(["--ckpt", str(unclip.runs["decoder"]), "--variations", "--prior", str(unclip.runs["prior"]),
                     "--data", f"{embeddings.parent}/shapes/val-*.tar", "--n", "2", "--quiet", "--out", "x"]) == 2
    assert "--variations decodes the validation images' own embeddings" in capsys.readouterr().err
    # errors name what is wrong
    assert main([*common, "--mode", "interpolate", "--image", "in0.png", "--out", "x.png"]) == 2
    assert "needs 2 --image" in capsys.readouterr().err
    assert main([*common, "--mode", "text-diff", "--image", "in0.png", "--prompt", "a", "--out", "x.png"]) == 2
    assert "--from-prompt" in capsys.readouterr().err
    assert main([*common, "--prior", str(unclip.runs["decoder"]), "--prompt", "a", "--out", "x.png"]) == 2
    assert "not a diffusion-prior run" in capsys.readouterr().err


@pytest.mark.slow  # two prior fits (about 25 s); the LDM and CLIP resume tests stay in make test
@pytest.mark.timeout(400)
def test_prior_resume_is_exact(embeddings, tmp_path):
    from tests.training.test_resume import assert_same_second_half, interrupted_vs_straight

    args = ["-c", *DEBUG, "-c", PRIOR_DEBUG, f"--data.train={embeddings}/train-*.tar",
            f"--data.val={embeddings}/val-*.tar", "--data.num_workers=1", "--data.batch_size=16",
            "--data.samples_per_epoch=96", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1"]
    straight, resumed = interrupted_vs_straight(tmp_path, args)
    assert_same_second_half(straight, resumed)
