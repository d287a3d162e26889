"""The recipe of diffusers' text-to-image training example, on the study's data: the baseline of issue 20's question
(does a user of ``ldm`` get more quality per GPU hour than from the diffusers training examples at the same budget?).

    python experiments/recipes/diffusers_example.py --template RUN --out OUT [--steps 400] [--seed 0] [--lr 1e-4]

What it trains is diffusers' own model and recipe: a ``diffusers.UNet2DConditionModel`` (diffusers' initialisation)
of the same architecture as the study's U-Net (``ldm.interop.unet_to_diffusers`` of the template's U-Net: equal
parameter count and function), its noise added by ``diffusers.DDPMScheduler.add_noise`` on the template's schedule
(SD's scaled-linear betas), and the loop of ``examples/text_to_image/train_text_to_image.py`` with its defaults:
timesteps uniform over the 1000, epsilon target, mean-squared error without weighting (``--snr_gamma`` unset), AdamW
lr 1e-4 (betas 0.9 / 0.999, weight decay 1e-2, eps 1e-8), constant learning rate, gradients clipped at norm 1.0, no
EMA (``--use_ema`` unset), no caption dropout (the example has none), no noise offset.

The data and the frozen stages are the study's: batches of the template run's latent shards in its order, its frozen
text encoder (the demo CLIP's text tokens; the example's CLIP text model is replaced by ours, which the template
loads) and its autoencoder for evaluation. The example encodes images with the VAE at every step; here the latents are
precomputed, as in every arm of the study.

The template is an ``ldm fit`` run of the same U-Net with eps prediction on that schedule (``study.py`` makes one of
one step, with ``null: empty_prompt`` so that guidance's unconditional branch is the empty prompt's encoding, as in
diffusers' pipelines). The trained weights go back into our U-Net (``ldm.interop.unet_state_from_diffusers``) in
``OUT/checkpoints/last.ckpt`` beside the template's ``config.yaml``, so ``ldm eval --ckpt OUT`` scores it with the same
sampler, captions and metrics as every other arm; ``OUT/diffusers/unet`` holds it in diffusers' format too.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--template", type=Path, required=True, help="an ldm fit run of the eps recipe (config + checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="the run folder to write (ldm eval --ckpt OUT)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4, help="the example's --learning_rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="the example's --adam_weight_decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="the example's --max_grad_norm")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)

    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ldm.checkpoint_files import find_checkpoint, find_config, load_checkpoint_file
    from ldm.data.datamodule import EpochDataLoader, ShardDataModule
    from ldm.interop.pipeline import scheduler_config
    from ldm.interop.unet import unet_state_from_diffusers, unet_to_diffusers
    from ldm.systems.loading import load_system

    torch.manual_seed(args.seed)
    template_ckpt = find_checkpoint(args.template)
    config_path = find_config(template_ckpt)
    config = yaml.safe_load(config_path.read_text())
    system = load_system(args.template)  # frozen: the text encoder and first stage are used as they are
    precond = config["model"]["init_args"]["precond"]
    scheduler = DDPMScheduler.from_config({**scheduler_config(precond), "_class_name": "DDPMScheduler"})
    if scheduler.config.prediction_type != "epsilon":
        raise SystemExit(f"{config_path}: the template must predict eps (the example's default), not "
                         f"{scheduler.config.prediction_type}")

    dconfig, _ = unet_to_diffusers(system.unet)
    unet = UNet2DConditionModel.from_config(dconfig)  # diffusers' own initialisation, not the template's weights
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  eps=1e-8)

    data_args = dict(config["data"]["init_args"])
    data_args.pop("tokenizer", None)
    data = ShardDataModule(**data_args)
    data.tokenizer = system.tokenizer
    loader = EpochDataLoader(data.train_stream(), num_workers=data.num_workers)

    args.out.mkdir(parents=True, exist_ok=True)
    log_rows, step, start = [], 0, time.perf_counter()
    print(f"[diffusers-example] {sum(q.numel() for q in unet.parameters()) / 1e6:.2f}M parameters, "
          f"{args.steps} steps, lr {args.lr:g}, batch {data.batch_size}", flush=True)
    while step < args.steps:
        for batch in loader:
            with torch.no_grad():
                latents = system.latents(batch)
                cond = system.condition(batch)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),)).long()
            noisy = scheduler.add_noise(latents, noise, timesteps)
            pred = unet(noisy, timesteps, cond["context"], encoder_attention_mask=cond.get("context_mask")).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            log_rows.append({"step": step, "loss": loss.item(), "seconds": round(time.perf_counter() - start, 2)})
            if step % args.log_every == 0 or step == args.steps:
                recent = [r["loss"] for r in log_rows[-args.log_every:]]
                print(f"[diffusers-example] step {step}/{args.steps} loss {sum(recent) / len(recent):.4f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            if step >= args.steps:
                break
    seconds = time.perf_counter() - start

    unet.eval()
    unet.save_pretrained(args.out / "diffusers" / "unet")
    ours = unet_state_from_diffusers(dict(unet.config), unet.state_dict())
    ckpt = load_checkpoint_file(template_ckpt, map_location="cpu")
    state = ckpt["state_dict"]
    missing = [f"unet.{k}" for k in ours if f"unet.{k}" not in state]
    if missing:
        raise SystemExit(f"the template's checkpoint has no {missing[:3]}: not a run of the same U-Net")
    state.update({f"unet.{k}": v.detach().clone() for k, v in ours.items()})
    ckpt.pop("current_model_state", None)  # no EMA: the only weights are the trained ones
    for key in ("optimizer_states", "lr_schedulers", "callbacks", "loops"):
        ckpt.pop(key, None)
    ckpt["global_step"] = step
    (args.out / "checkpoints").mkdir(exist_ok=True)
    torch.save(ckpt, args.out / "checkpoints" / "last.ckpt")
    shutil.copy(config_path, args.out / "config.yaml")
    with open(args.out / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(log_rows[0]))
        w.writeheader()
        w.writerows(log_rows)
    (args.out / "fit.json").write_text(json.dumps({"steps": step, "seconds": round(seconds, 1), "lr": args.lr,
                                                   "seed": args.seed, "template": str(args.template)}, indent=2))
    print(f"[diffusers-example] {step} steps in {seconds:.1f} s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
