"""Contrastive training throughput: `ldm fit` next to `open_clip_train.main`, same model, shards and batch.

    python experiments/bench/contrastive.py --reference-python /path/to/venv/bin/python [--batch 64]

Both train the `clip-debug` towers (open_clip's CLIP: 2-layer ViT on 32 px, 2-layer text
transformer, 64-d embeddings) with the CLIP loss, AdamW, fp32, 2 data workers, on the same
shapes shards. Each side runs twice, for ``--steps`` S1 and S2 optimizer steps; the
throughput is (S2 - S1) * batch / (t2 - t1), so start-up (imports, model building, worker
start) cancels out.

open_clip_train 3.3 (shipped in open_clip_torch) reads shards with webdataset internals and
fails with the webdataset releases whose shard iterator yields an end-of-shard marker
(``KeyError: 'fname'`` in ``group_by_keys_nothrow``; seen with 0.2.100 and 1.0.2, the version
this project uses); give it its own environment with webdataset 0.2.86:

    python3 -m venv /tmp/ocvenv && /tmp/ocvenv/bin/pip install torch torchvision \\
        open_clip_torch==3.3.0 webdataset==0.2.86 pandas

(or, lighter, a venv of the same Python whose ``.pth`` file points at this project's site-packages, with only
``webdataset==0.2.86 pandas`` installed in it: its own webdataset comes first.)

Issue 19's goal (``ldm fit`` of CLIP ViT-B/32 >= 1.0x open_clip_train's samples/s on the same GPU and shards):

    python experiments/bench/contrastive.py --reference-python PY --model vit-b32 --gpu --batch 256 \\
        --workers 8 --steps 20 220 [--peak-tflops 989]

``--model vit-b32``: ``configs/contrastive/clip-vit-b32.yaml`` against open_clip's ``ViT-B-32`` at 224 px (the
shapes shards written at 224 px). ``--gpu``: ours composed with ``configs/trainer/gpu.yaml`` (bf16 autocast,
regional compile, channels_last, no per-step host sync) and fused AdamW; open_clip_train with ``--precision
amp_bf16 --torchcompile`` (its whole-model compile; it has no fused-AdamW option). With ``--peak-tflops`` the MFU of
each is printed from the training FLOPs per sample (3 x the forward's, FlopCounterMode, on the meta device).
``--tiny``: a CPU smoke run of the debug towers, a few steps (under a minute).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL_JSON = {"embed_dim": 64,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
WRAPPER = """import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - start


CONFIGS = {"debug": "clip-debug.yaml", "vit-b32": "clip-vit-b32.yaml"}
IMAGE_SIZE = {"debug": 32, "vit-b32": 224}


def ours(args, shards: str, steps: int, work: Path) -> float:
    ldm = Path(sys.executable).with_name("ldm")
    trainer = "gpu.yaml" if args.gpu else "debug.yaml"
    cmd = [str(ldm), "fit", "-c", str(REPO / "configs/trainer" / trainer),
           "-c", str(REPO / "configs/contrastive" / CONFIGS[args.model]), f"--data.train={shards}",
           f"--data.batch_size={args.batch}", f"--data.num_workers={args.workers}", f"--trainer.max_steps={steps}",
           "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
           "--trainer.enable_checkpointing=false", "--run.wandb_mode=disabled", "--run.csv=false",
           "--model.init_args.zero_shot=[]"]
    if args.gpu:
        cmd += ["--model.init_args.optimizer=torch.optim.AdamW", "--model.init_args.optimizer.init_args.fused=true"]
    return timed(cmd, work)


def reference(args, shards: str, steps: int, work: Path) -> float:
    cfg = work / "cfg"
    cfg.mkdir(exist_ok=True)
    (cfg / "ldm-clip-debug.json").write_text(json.dumps(MODEL_JSON))
    (work / "run_open_clip_train.py").write_text(WRAPPER)
    model = "ldm-clip-debug" if args.model == "debug" else "ViT-B-32"
    precision = ["--precision", "amp_bf16", "--torchcompile"] if args.gpu else ["--precision", "fp32"]
    return timed([args.reference_python, "run_open_clip_train.py", str(cfg), "--train-data", shards,
                  "--dataset-type", "webdataset", "--train-num-samples", str(steps * args.batch),
                  "--batch-size", str(args.batch), "--epochs", "1", "--workers", str(args.workers), "--model", model,
                  "--lr", "1e-3", "--wd", "0.1", "--warmup", "20", *precision, "--local-loss", "--gather-with-grad",
                  "--report-to", "", "--save-frequency", "0", "--zeroshot-frequency", "0",
                  "--log-every-n-steps", "1000", "--logs", str(work / "logs"),
                  "--name", f"bench-{steps}-{time.time_ns()}"], work)


def train_flops_per_sample(model: str) -> int:
    """3 x the forward FLOPs of one (image, text) pair through the towers, counted on the meta device."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        clip = open_clip.model.CLIP(**(MODEL_JSON if model == "debug" else open_clip.get_model_config("ViT-B-32")))
        size = IMAGE_SIZE[model]
        image = torch.empty(1, 3, size, size)
        text = torch.zeros(1, clip.context_length, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter:
            clip(image, text)
    return 3 * counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-python", required=True, help="python of an environment with open_clip_train")
    p.add_argument("--model", choices=sorted(CONFIGS), default="debug")
    p.add_argument("--gpu", action="store_true", help="ours with configs/trainer/gpu.yaml, open_clip_train in bf16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, nargs=2, default=[20, 120])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, help="the device's dense peak at the precision used, for MFU")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: debug towers, batch 32, a few steps")
    args = p.parse_args()
    if args.tiny:
        args.model, args.gpu, args.batch, args.steps, args.samples = "debug", False, 32, [2, 10], 1200
    from ldm.data.synthetic import write_synthetic_shards

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stats = write_synthetic_shards(work / "shards", train=args.samples, val=0,  # open_clip_train: a shard per worker
                                       size=max(64, IMAGE_SIZE[args.model]), progress=False,
                                       shard_size=min(1000, args.samples // (2 * max(1, args.workers))))
        shards = stats["splits"]["train"]["pattern"]
        s1, s2 = args.steps
        t_ours = [ours(args, shards, s, work) for s in (s1, s2)]
        t_ref = [reference(args, shards, s, work) for s in (s1, s2)]
    rate_ours = (s2 - s1) * args.batch / (t_ours[1] - t_ours[0])
    rate_ref = (s2 - s1) * args.batch / (t_ref[1] - t_ref[0])
    precision = "bf16 autocast (ours: gpu.yaml, fused AdamW; open_clip_train: amp_bf16, --torchcompile)" \
        if args.gpu else "fp32"
    print(f"# {CONFIGS[args.model]} towers, batch {args.batch}, {precision}, {args.workers} workers, steps {s1} and "
          f"{s2}; wall times ldm {t_ours[0]:.1f} / {t_ours[1]:.1f} s, open_clip_train {t_ref[0]:.1f} / "
          f"{t_ref[1]:.1f} s\n")
    flops = train_flops_per_sample(args.model) if args.peak_tflops else None
    mfu = (lambda rate: f" | {flops * rate / (args.peak_tflops * 1e12):.1%}") if flops else (lambda rate: "")
    head = " | MFU" if flops else ""
    print(f"| trainer | training samples/s{head} |\n|---|---:{'|---:' if flops else ''}|")
    print(f"| ldm fit | {rate_ours:.0f}{mfu(rate_ours)} |\n| open_clip_train.main | {rate_ref:.0f}{mfu(rate_ref)} |")
    print(f"| ratio ldm / open_clip_train | {rate_ours / rate_ref:.2f}{' | ' if flops else ''} |")


if __name__ == "__main__":
    main()
