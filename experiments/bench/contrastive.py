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


def ours(shards: str, steps: int, batch: int, work: Path) -> float:
    ldm = Path(sys.executable).with_name("ldm")
    return timed([str(ldm), "fit", "-c", str(REPO / "configs/trainer/debug.yaml"),
                  "-c", str(REPO / "configs/contrastive/clip-debug.yaml"), f"--data.train={shards}",
                  f"--data.batch_size={batch}", "--data.num_workers=2", f"--trainer.max_steps={steps}",
                  "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                  "--trainer.enable_checkpointing=false", "--run.wandb_mode=disabled", "--run.csv=false",
                  "--model.init_args.zero_shot=[]"], work)


def reference(python: str, shards: str, steps: int, batch: int, work: Path) -> float:
    cfg = work / "cfg"
    cfg.mkdir(exist_ok=True)
    (cfg / "ldm-clip-debug.json").write_text(json.dumps(MODEL_JSON))
    (work / "run_open_clip_train.py").write_text(WRAPPER)
    return timed([python, "run_open_clip_train.py", str(cfg), "--train-data", shards, "--dataset-type", "webdataset",
                  "--train-num-samples", str(steps * batch), "--batch-size", str(batch), "--epochs", "1",
                  "--workers", "2", "--model", "ldm-clip-debug", "--lr", "1e-3", "--wd", "0.1", "--warmup", "20",
                  "--precision", "fp32", "--local-loss", "--gather-with-grad", "--report-to", "",
                  "--save-frequency", "0", "--zeroshot-frequency", "0", "--log-every-n-steps", "1000",
                  "--logs", str(work / "logs"), "--name", f"bench-{steps}-{time.time_ns()}"], work)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-python", required=True, help="python of an environment with open_clip_train")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, nargs=2, default=[20, 120])
    p.add_argument("--samples", type=int, default=4000)
    args = p.parse_args()
    from ldm.data.synthetic import write_synthetic_shards

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stats = write_synthetic_shards(work / "shards", train=args.samples, val=0, size=64, progress=False)
        shards = stats["splits"]["train"]["pattern"]
        s1, s2 = args.steps
        t_ours = [ours(shards, s, args.batch, work) for s in (s1, s2)]
        t_ref = [reference(args.reference_python, shards, s, args.batch, work) for s in (s1, s2)]
    rate_ours = (s2 - s1) * args.batch / (t_ours[1] - t_ours[0])
    rate_ref = (s2 - s1) * args.batch / (t_ref[1] - t_ref[0])
    print(f"# clip-debug towers, batch {args.batch}, fp32, 2 workers, steps {s1} and {s2}; "
          f"wall times ldm {t_ours[0]:.1f} / {t_ours[1]:.1f} s, open_clip_train {t_ref[0]:.1f} / {t_ref[1]:.1f} s\n")
    print("| trainer | training samples/s |\n|---|---:|")
    print(f"| ldm fit | {rate_ours:.0f} |\n| open_clip_train.main | {rate_ref:.0f} |\n| ratio ldm / open_clip_train | {rate_ours / rate_ref:.2f} |")


if __name__ == "__main__":
    main()
