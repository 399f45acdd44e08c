"""Table A on a proxy: a small Swin Mask R-CNN trained on generated shapes, quantized.

COCO and the public checkpoints are not available on the development machine, so this script
builds a measurable stand-in, each stage resumable and skipped once done:

1. ``data``: generated COCO-format shapes (adalog.data.shapes), train/val/calib splits, seeded.
2. ``train``: ``mask_rcnn_swin_shapes`` from scratch on the train split (AdamW, CPU, about an
   hour on 2 cores); the state is saved every ``--save-every`` iterations and a cut run resumes.
3. ``table``: FP32, then W6A6/W4A4 with AdaLog and with the RepQ-ViT-like baseline (uniform
   post-GELU, log-sqrt2 post-Softmax), each calibrated on ``--calib-size`` images of the calib
   split, saved, reloaded and scored by box and mask AP on the val split; one JSON entry per
   row in benchmarks/logs/detection_proxy.json (rows already there are kept).

    python benchmarks/detection_proxy.py --stage all
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from adalog.config import AdaLogConfig
from adalog.data.coco import CocoInstances
from adalog.data.shapes import write_shapes_split
from adalog.io import atomic_write, atomic_write_json
from adalog.models import create_model
from adalog.models.detection import build_detector, detector_spec
from adalog.pipelines.calibrate import quantize
from adalog.pipelines.checkpoint import load_quantized, save_quantized
from adalog.pipelines.detection_eval import evaluate_detector

MODEL = "mask_rcnn_swin_shapes"
SPLITS = {"train": (3000, 11), "val": (300, 12), "calib": (16, 13)}  # images, seed


def make_data(root: Path) -> None:
    for split, (count, seed) in SPLITS.items():
        if not (root / f"annotations_{split}.json").is_file():
            write_shapes_split(root, split, count, seed=seed)
            print(f"data: wrote {count} {split} images under {root}", flush=True)


def train(root: Path, out: Path, iters: int, batch: int, lr: float, save_every: int) -> Path:
    weights = out / "fp32.safetensors"
    if weights.is_file():
        return weights
    spec = detector_spec(MODEL)
    data = CocoInstances(root / "train", root / "annotations_train.json", spec.classes)
    torch.manual_seed(0)
    model = build_detector(spec).train()
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 128  # few shapes per image: 512 is waste
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    state_path, start = out / "train_state.pt", 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["iteration"]
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"train: resumed at iteration {start}", flush=True)
    else:
        random.seed(0)
    began, running = time.time(), {}
    for iteration in range(start, iters):
        for group in optimizer.param_groups:
            group["lr"] = lr * _schedule(iteration, iters)
        images, targets = [], []
        for index in random.sample(range(len(data)), batch):
            _, image, target = data[index]
            if random.random() < 0.5:
                image, target = _flip(image, target)
            images.append(image)
            targets.append(target)
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + v.item()
        done = iteration + 1
        if done % 50 == 0:
            rate = (time.time() - began) / (done - start)
            parts = " ".join(f"{k[5:]} {v / 50:.3f}" for k, v in running.items())
            print(f"train {done}/{iters} ({rate:.2f} s/it) {parts}", flush=True)
            running = {}
        if done % save_every == 0 or done == iters:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "iteration": done, "python_rng": random.getstate(),
                     "torch_rng": torch.get_rng_state()}  # fmt: skip
            atomic_write(state_path, lambda tmp, s=state: torch.save(s, tmp))
    from safetensors.torch import save_file

    fp32 = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(fp32, str(tmp)))
    print(f"train: wrote {weights}", flush=True)
    return weights


def _schedule(iteration: int, iters: int, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    if iteration < warmup:
        return (iteration + 1) / warmup
    progress = (iteration - warmup) / max(iters - warmup, 1)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _flip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


#: row -> (preset, quantizer overrides); the baseline is RepQ-ViT-like: uniform post-GELU and
#: log-sqrt2 post-Softmax quantizers, everything else as the preset
ROWS = {
    "fp32": None,
    "w6a6_adalog": ("w6a6", {}),
    "w4a4_adalog": ("w4a4", {}),
    "w6a6_baseline": ("w6a6", {"post_gelu": "uniform", "post_softmax": "logsqrt2"}),
    "w4a4_baseline": ("w4a4", {"post_gelu": "uniform", "post_softmax": "logsqrt2"}),
}


def table(root: Path, out: Path, weights: Path, args: argparse.Namespace) -> dict:
    """Each row quantized (resumable), saved, reloaded and evaluated on the val split; the JSON
    is rewritten after every row, and rows already in it are kept."""
    results = json.loads(out.read_text()) if out.is_file() else {}
    search = {"eq_n": args.eq_n, "search_rounds": args.rounds, "calib_size": args.calib_size}
    for row, recipe in ROWS.items():
        if row in results or (args.rows and row not in args.rows):
            continue
        start = time.time()
        model = create_model(MODEL, weights=weights)
        entry: dict = {}
        if recipe is not None:
            preset, overrides = recipe
            config = AdaLogConfig.preset(preset).with_overrides(**overrides, **search)
            quantize(model, root / "calib", config, resume_dir=args.root / "progress" / row)
            save_quantized(model, args.root / row)
            model = load_quantized(args.root / row)
            entry = {"preset": preset, "overrides": overrides, "search": search,
                     "calibrate_s": round(time.time() - start, 1)}  # fmt: skip
        metrics = evaluate_detector(model, root / "val", root / "annotations_val.json")
        results[row] = entry | metrics
        atomic_write_json(out, results)
        shown = " ".join(f"{k} {metrics[k]:.4f}" for k in ("bbox_AP50", "bbox_AP", "segm_AP"))
        print(f"table: {row} {shown}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["data", "train", "table", "all"], default="all")
    parser.add_argument("--root", type=Path, default=Path("runs/detection_proxy"))
    parser.add_argument("--iters", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="only these table rows")
    parser.add_argument("--calib-size", type=int, default=4, help="calibration images")
    parser.add_argument("--eq-n", type=int, default=128, help="search candidates per step")
    parser.add_argument("--rounds", type=int, default=3, help="alternating search rounds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/logs/detection_proxy.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_root = args.root / "shapes"
    if args.stage in ("data", "train", "all"):
        make_data(data_root)
    weights = args.root / "fp32.safetensors"
    if args.stage in ("train", "all"):
        weights = train(data_root, args.root, args.iters, args.batch, args.lr, args.save_every)
    if args.stage in ("table", "all"):
        if not weights.is_file():
            print(f"table: no trained weights at {weights}; run --stage train", file=sys.stderr)
            return 1
        table(data_root, args.out, weights, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
