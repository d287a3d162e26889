"""A Stable Diffusion pipeline folder (diffusers' ``save_pretrained`` layout) -> ldm run folders, and back.

Import (``ldm convert diffusers PIPELINE --out RUN``) writes::

    RUN/config.yaml, RUN/checkpoints/last.ckpt   the latent-diffusion run (U-Net, conditioner, schedule)
    RUN/autoencoder/config.yaml, .../last.ckpt   the KL autoencoder as a stage-1 run (the run's first_stage)
    RUN/text_encoder/model.safetensors            the CLIP text model as open_clip's TextTransformer
    RUN/text_encoder/tokenizer/                   the pipeline's tokenizer folder, copied
    RUN/IMPORTED.md                               where it came from and what was (not) imported
    RUN/diffusers.json                            the layout choices export needs to write the same files back

Every ``ldm`` command takes ``RUN`` as any trained run: ``ldm sample --ckpt RUN``, ``ldm eval --ckpt RUN``; a config
points ``first_stage`` at ``RUN/autoencoder``; ``ldm fit`` fine-tunes it with the run's ``model`` section and
``--model.init_args.init_from RUN`` (the weights to start from; docs/interop.md).

The imported model reproduces the pipeline: eps or v prediction on the pipeline scheduler's beta schedule
(``scheduler/scheduler_config.json``), cross-attention to all 77 token features including padding
(``Conditioner(mask_padding=False)``), and the unconditional branch of guidance the empty prompt's features
(``Conditioner(null="empty_prompt")``): ``ldm sample --sampler ddim --spacing trailing`` gives diffusers'
``DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True)`` images (tests/interop/test_sd_pipeline.py).

Export (``ldm convert to-diffusers RUN --out PIPELINE``) writes the U-Net, the autoencoder and the scheduler in
diffusers' layout; the text encoder and tokenizer too when the run's text encoder is an imported text tower.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ldm.contrastive.text_tower import read_state_dict

SCHEDULE_KEYS = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")
SUPPORTED_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PRECONDS = {"epsilon": "ldm.diffusion.EpsPrecond", "v_prediction": "ldm.diffusion.VPrecond",
            "sample": "ldm.diffusion.X0Precond"}


def _json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {path.parent.parent} a diffusers pipeline folder "
                                "(StableDiffusionPipeline.save_pretrained)?")
    return json.loads(path.read_text())


def component_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of one pipeline component folder: ``*.safetensors`` preferred, else ``*.bin``; fp16 variants
    are read only when they are the only file (and upcast to float32)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    plain = [f for f in files if ".fp16." not in f.name and "index" not in f.name]
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors or *.bin) in {folder}")
    if len(plain) > 1:
        raise ValueError(f"{folder} holds sharded weights {[f.name for f in plain]}: merge them first")
    state = read_state_dict((plain or files)[0])
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def schedule_spec(scheduler: dict) -> dict:
    """The run's ``precond`` config from a diffusers scheduler config."""
    if scheduler.get("trained_betas") is not None:
        raise ValueError("scheduler_config.json: trained_betas (an explicit beta list) is not supported")
    betas = scheduler.get("beta_schedule", "linear")
    if betas not in SUPPORTED_BETAS:
        raise ValueError(f"scheduler_config.json: beta_schedule {betas!r} is not supported "
                         f"(use one of {', '.join(SUPPORTED_BETAS)})")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PRECONDS:
        raise ValueError(f"scheduler_config.json: prediction_type {prediction!r} is not supported")
    init = {"beta_schedule": SUPPORTED_BETAS[betas], "num_timesteps": int(scheduler.get("num_train_timesteps", 1000))}
    if betas != "squaredcos_cap_v2":
        init.update(beta_start=float(scheduler.get("beta_start", 0.0001)),
                    beta_end=float(scheduler.get("beta_end", 0.02)))
    if scheduler.get("rescale_betas_zero_snr"):
        init["zero_terminal_snr"] = True
    return {"class_path": PRECONDS[prediction],
            "init_args": {"schedule": {"class_path": "ldm.diffusion.DiscreteSchedule", "init_args": init}}}


def _write_run(folder: Path, config: dict, state: dict[str, torch.Tensor], source: str) -> None:
    """A run folder: ``config.yaml`` and ``checkpoints/last.ckpt`` (the system's weights, step 0)."""
    import pytorch_lightning as L

    from ldm.checkpoint_files import atomic_save

    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    atomic_save({"state_dict": state, "global_step": 0, "epoch": 0, "pytorch-lightning_version": L.__version__,
                 "ldm_import": {"source": source}}, folder / "checkpoints" / "last.ckpt")


def _module_config(module_cfg: dict) -> dict:
    return {"model": module_cfg}


def prepare_output(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """The empty folder ``out`` to import into (a FileExistsError when it holds files and ``overwrite`` is off)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_sd_run(out: Path, *, autoencoder: nn.Module, unet: nn.Module, unet_kwargs: dict, text_encoder: dict,
                 precond: dict, image_size: int, source: str, autoencoder_source: str, unet_options: dict,
                 inpainting: bool = False) -> None:
    """Write the run-folder layout of the module docstring around converted modules: ``out/autoencoder`` (a stage-1
    run of our KL ``autoencoder``), the latent-diffusion run (``unet``, built from ``unet_kwargs``; the empty-prompt
    conditioner of ``text_encoder``, the ``FrozenTextEncoder`` init_args, whose files the caller wrote under
    ``out/text_encoder``; ``precond`` the run's precond config) and ``diffusers.json`` (``unet_options``: the
    :func:`~ldm.interop.unet.unet_to_diffusers` layout choices). ``IMPORTED.md`` is the caller's."""
    from ldm.interop.autoencoder import autoencoder_spec
    from ldm.systems.loading import build_system

    ae_cfg = {"class_path": "ldm.systems.AutoencoderSystem", "init_args": {
        "autoencoder": autoencoder_spec(autoencoder),
        "loss": {"class_path": "ldm.autoencoder.AutoencoderLoss",
                 "init_args": {"reconstruction": "l1", "perceptual_weight": 0.0, "kl_weight": 1.0e-6}}}}
    ae_system = build_system(ae_cfg)
    ae_system.autoencoder.load_state_dict(autoencoder.state_dict())
    _write_run(out / "autoencoder", _module_config(ae_cfg), ae_system.state_dict(), autoencoder_source)
    del ae_system

    conditioner = {"text_encoder": {"class_path": "ldm.contrastive.FrozenTextEncoder", "init_args": text_encoder},
                   "null": "empty_prompt", "mask_padding": False}
    if inpainting:
        conditioner["inpainting"] = True
    ldm_cfg = {"class_path": "ldm.systems.LatentDiffusion", "init_args": {
        "unet": {"class_path": "ldm.diffusion.UNet", "init_args": _plain(unet_kwargs)},
        "first_stage": {"class_path": "ldm.autoencoder.AutoencoderFirstStage",
                        "init_args": {"checkpoint": str(out / "autoencoder")}},
        "conditioner": {"class_path": "ldm.diffusion.Conditioner", "init_args": conditioner},
        "precond": precond,
        "cond_drop": 0.1,
    }}
    system = build_system(ldm_cfg)
    system.unet.load_state_dict(unet.state_dict())
    config = {"model": ldm_cfg, "data": {"init_args": {"image_size": image_size}}}
    _write_run(out, config, system.state_dict(), source)
    (out / "diffusers.json").write_text(json.dumps({"unet": unet_options}, indent=2))


def import_diffusers(pipeline: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                     image_size: int | None = None) -> Path:
    """Import a Stable-Diffusion-style diffusers pipeline folder into the run folder ``out`` (see the module
    docstring for the layout); returns ``out``. ``image_size``: the run's default sampling size (default: the
    U-Net's ``sample_size`` x the autoencoder's factor)."""
    from ldm.interop.autoencoder import autoencoder_from_diffusers
    from ldm.interop.text import text_config_from_transformers, text_state_from_transformers
    from ldm.interop.unet import unet_export_options, unet_from_diffusers, unet_kwargs_from_diffusers

    src = Path(pipeline).expanduser()
    index = _json(src / "model_index.json")
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if c not in index]
    if missing:
        raise ValueError(f"{src}/model_index.json has no {', '.join(missing)}: ldm imports text-to-image pipelines "
                         "with one U-Net, a VAE, a CLIP text encoder, its tokenizer and a scheduler")
    out = prepare_output(out, overwrite)

    vae_config = _json(src / "vae" / "config.json")
    autoencoder = autoencoder_from_diffusers(vae_config, component_weights(src / "vae"))

    # the text encoder: open_clip's text tower and the pipeline's tokenizer
    text_config = _json(src / "text_encoder" / "config.json")
    text, quick_gelu = text_config_from_transformers(text_config)
    embed_dim = text.pop("embed_dim", None)
    state = text_state_from_transformers(component_weights(src / "text_encoder"), text["layers"])
    from safetensors.torch import save_file

    (out / "text_encoder").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "text_encoder" / "model.safetensors"))
    shutil.copytree(src / "tokenizer", out / "text_encoder" / "tokenizer")
    if embed_dim is not None:
        raise ValueError("text_encoder: a CLIPTextModelWithProjection is not a Stable Diffusion text encoder")

    # the U-Net and the latent-diffusion run
    unet_config = _json(src / "unet" / "config.json")
    unet = unet_from_diffusers(unet_config, component_weights(src / "unet"))
    scheduler = _json(src / "scheduler" / "scheduler_config.json")
    factor = 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)
    size = image_size or int(unet_config.get("sample_size") or 64) * factor
    write_sd_run(out, autoencoder=autoencoder, unet=unet, unet_kwargs=unet_kwargs_from_diffusers(unet_config),
                 text_encoder={"text": text, "quick_gelu": quick_gelu,
                               "pretrained": str(out / "text_encoder" / "model.safetensors"),
                               "tokenizer": str(out / "text_encoder" / "tokenizer")},
                 precond=schedule_spec(scheduler), image_size=size, source=str(src),
                 autoencoder_source=str(src / "vae"), unet_options=unet_export_options(unet_config))
    (out / "IMPORTED.md").write_text(_imported_note(src, index, scheduler, size))
    return out


def _plain(value: Any) -> Any:
    """Tuples -> lists (YAML-safe)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _imported_note(src: Path, index: dict, scheduler: dict, size: int) -> str:
    return (
        f"# Imported from {src}\n\n"
        f"- pipeline: {index.get('_class_name', '?')} (diffusers {index.get('_diffusers_version', '?')})\n"
        f"- scheduler: {scheduler.get('_class_name', '?')}, {scheduler.get('beta_schedule')} betas, "
        f"prediction {scheduler.get('prediction_type', 'epsilon')}; the sampler is chosen at sampling time "
        f"(`ldm sample --sampler ... --spacing ...`): `ddim --spacing trailing` equals "
        f"`DDIMScheduler(timestep_spacing='trailing', set_alpha_to_one=True)`\n"
        f"- default image size: {size} px\n"
        "- not imported: the safety checker and feature extractor; the autoencoder's discriminator is freshly "
        "initialised (diffusers does not ship it)\n"
    )


def scheduler_config(precond_cfg: dict) -> dict:
    """A diffusers ``DDIMScheduler`` config of a run's ``precond`` config (the inverse of :func:`schedule_spec`),
    with the spacing that equals ldm's ``--spacing trailing`` sampling."""
    prediction = {v: k for k, v in PRECONDS.items()}.get(precond_cfg.get("class_path"))
    if prediction is None:
        raise ValueError(f"precond {precond_cfg.get('class_path')!r}: only discrete VP models (eps, v, x0 "
                         "prediction) export to a diffusers scheduler")
    sched = ((precond_cfg.get("init_args") or {}).get("schedule") or {}).get("init_args") or {}
    betas = {v: k for k, v in SUPPORTED_BETAS.items()}[sched.get("beta_schedule", "linear")]
    defaults = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (0.0001, 0.02)}
    start, end = defaults[betas]
    return {"_class_name": "DDIMScheduler", "beta_schedule": betas,
            "beta_start": sched.get("beta_start") or start, "beta_end": sched.get("beta_end") or end,
            "num_train_timesteps": sched.get("num_timesteps", 1000), "prediction_type": prediction,
            "rescale_betas_zero_snr": bool(sched.get("zero_terminal_snr", False)), "clip_sample": False,
            "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "trailing"}


def _save_component(folder: Path, config: dict, state: dict[str, torch.Tensor], weights_name: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / weights_name))


def export_diffusers(run: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                     weights: str = "ema") -> Path:
    """Write a latent-diffusion run as a diffusers pipeline folder: ``unet/``, ``vae/``, ``scheduler/`` and, when the
    run's text encoder is a text tower (an imported one), ``text_encoder/`` and ``tokenizer/``; returns ``out``."""
    from ldm.autoencoder import AutoencoderFirstStage
    from ldm.checkpoint_files import run_config
    from ldm.interop.autoencoder import autoencoder_to_diffusers
    from ldm.interop.text import text_config_to_transformers, text_state_to_transformers
    from ldm.interop.tokenizer import write_clip_tokenizer
    from ldm.interop.unet import unet_to_diffusers
    from ldm.systems.loading import load_latent_diffusion

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(out)
    model_cfg = (run_config(run).get("model") or {}).get("init_args") or {}
    system = load_latent_diffusion(run, weights=weights)
    if not isinstance(system.first_stage, AutoencoderFirstStage):
        raise ValueError("only latent-space runs (an autoencoder first stage) export to a diffusers pipeline")
    layout = Path(run) / "diffusers.json" if Path(run).is_dir() else Path(run).parent.parent / "diffusers.json"
    options = json.loads(layout.read_text())["unet"] if layout.is_file() else {}
    unet_cfg, unet_state = unet_to_diffusers(system.unet, **options)
    _save_component(out / "unet", {"_class_name": "UNet2DConditionModel", **unet_cfg}, unet_state,
                    "diffusion_pytorch_model.safetensors")
    vae_cfg, vae_state = autoencoder_to_diffusers(system.first_stage.autoencoder)
    _save_component(out / "vae", {"_class_name": "AutoencoderKL", **vae_cfg}, vae_state,
                    "diffusion_pytorch_model.safetensors")
    (out / "scheduler").mkdir(parents=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config(model_cfg.get("precond") or {}), indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}
    encoder = ((model_cfg.get("conditioner") or {}).get("init_args") or {}).get("text_encoder") or {}
    text_args = encoder.get("init_args") or {}
    if text_args.get("text"):
        text, quick_gelu = text_args["text"], bool(text_args.get("quick_gelu", False))
        state = system.conditioner.text_encoder.model.text.state_dict()
        _save_component(out / "text_encoder", text_config_to_transformers(text, quick_gelu),
                        text_state_to_transformers(state, int(text["layers"])), "model.safetensors")
        if text_args.get("tokenizer"):
            shutil.copytree(Path(text_args["tokenizer"]).expanduser(), out / "tokenizer")
        else:  # open_clip's BPE tokenizer pads with 0, which is "!"
            write_clip_tokenizer(out / "tokenizer", pad_token="!", context_length=int(text.get("context_length", 77)))
        index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
