"""``cudcn demo``: does a deformable last layer help a small CNN read deformed digits?

A small CNN (:mod:`cudcn.cli.demo.models`) whose last convolution is plain,
DCNv1, DCNv2 or CoordConv is trained with the same budget on scikit-learn's
bundled handwritten digits, upscaled and randomly rotated, scaled, shifted
and elastically warped (:mod:`cudcn.cli.demo.data`); it is tested on digits it
never saw, deformed as mildly as the training set and more strongly. Ten
classes, cross-entropy, several seeds; the deformable layers run through
``cudcn.torch`` on the CPU or on CUDA, whichever torch has.

Writes into ``--out``: results.json (settings, every run's curves, the
summary), learning_curves.png, sampling_locations.png and data.png.
Needs torch, scikit-learn, scipy, matplotlib and tqdm; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from cudcn.cli.demo.models import MODEL_NAMES

#: Test digits drawn in sampling_locations.png.
PICTURE_DIGITS = 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=6, help="training epochs per run (default 6)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per model, seeds 0..SEEDS-1 (default 3)")
    parser.add_argument("--out", type=Path, default=Path("cudcn-demo"), help="output folder (default ./cudcn-demo)")
    parser.add_argument("--device", default="auto", help='"auto" (CUDA if torch has it, else CPU), "cpu" or "cuda"')
    parser.add_argument("--models", default=",".join(MODEL_NAMES),
                        help=f"comma-separated subset of {','.join(MODEL_NAMES)} (default all)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first LIMIT training and test images (quick tries)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the data set (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads when training on the CPU (default 1: the deformable layers "
                             "run in NumPy between torch operations, and a second torch thread mostly "
                             "competes with them for the cores)")


def _missing_dependencies() -> list[str]:
    missing = []
    for module, package in (("torch", "torch"), ("sklearn", "scikit-learn"), ("scipy", "scipy"),
                            ("matplotlib", "matplotlib"), ("tqdm", "tqdm")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return missing


def mean_std(values: list[float]) -> dict[str, float]:
    """{"mean", "std"}: mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list) -> dict:
    """The table row of one model from its runs (one per seed)."""
    strong = [r.test_strong_accuracy[-1] for r in runs]
    mild = [r.test_mild_accuracy for r in runs]
    seconds = [s for r in runs for s in r.epoch_seconds]
    return {
        "parameters": runs[0].parameters,
        "test_mild_accuracy": mean_std(mild),
        "test_strong_accuracy": mean_std(strong),
        "seconds_per_epoch": statistics.median(seconds),
    }


def format_table(summary: dict[str, dict], seeds: int) -> str:
    """Model, parameters, accuracies as mean +- std over seeds, seconds per epoch."""
    lines = [f"{'model':10} {'params':>7}  {'test acc, mild':>16}  {'test acc, strong':>16}  {'s/epoch':>7}"]
    for name, row in summary.items():
        mild, strong = row["test_mild_accuracy"], row["test_strong_accuracy"]
        lines.append(f"{name:10} {row['parameters']:>7,}  {mild['mean']:>9.3f} +- {mild['std']:.3f}  "
                     f"{strong['mean']:>9.3f} +- {strong['std']:.3f}  "
                     f"{row['seconds_per_epoch']:>7.2f}")
    lines.append(f"(accuracy: mean +- std over {seeds} seed{'s' if seeds > 1 else ''}; "
                 "s/epoch: median time of an epoch's training steps)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    missing = _missing_dependencies()
    if missing:
        print(f"cudcn demo needs {', '.join(missing)}: pip install {' '.join(missing)}", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown or not models or args.epochs < 1 or args.seeds < 1:
        print(f"bad arguments: models must be from {MODEL_NAMES} (got {unknown or models}), "
              "epochs and seeds at least 1", file=sys.stderr)
        return 2

    import torch
    from tqdm import tqdm

    from cudcn.cli.demo import plots
    from cudcn.cli.demo.data import MILD, STRONG, make_datasets
    from cudcn.cli.demo.training import pick_device, to_tensors, train

    started = time.perf_counter()
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    data = make_datasets(args.data_seed)
    if args.limit:
        data = {k: v.subset(args.limit) for k, v in data.items()}
    print(f"cudcn demo on {device.type}: {len(data['train'])} training digits, "
          f"{len(data['test_strong'])} test digits (mild and strong deformation), "
          f"{len(models)} models x {args.seeds} seeds x {args.epochs} epochs")

    runs: dict[str, list] = {name: [] for name in models}
    first_models = {}
    batches = -(-len(data["train"]) // 32)
    with tqdm(total=len(models) * args.seeds * args.epochs * batches, unit="batch", file=sys.stdout,
              dynamic_ncols=True) as progress:
        for name in models:
            for seed in range(args.seeds):
                progress.set_description(f"{name} seed {seed}")
                result, model = train(name, seed, data, args.epochs, device, progress=progress)
                runs[name].append(result)
                if seed == 0:
                    first_models[name] = model

    summary = {name: summarise(r) for name, r in runs.items()}
    print(format_table(summary, args.seeds))

    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "settings": {
            "epochs": args.epochs, "seeds": args.seeds, "models": models, "device": device.type,
            "data_seed": args.data_seed, "train_digits": len(data["train"]),
            "test_digits": len(data["test_strong"]), "deformation_train_and_mild": asdict(MILD),
            "deformation_strong": asdict(STRONG),
        },
        "summary": summary,
        "runs": [asdict(r) for rs in runs.values() for r in rs],
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(), "machine": platform.machine()},
        "wall_seconds": None,
    }
    plots.plot_data(data, args.out / "data.png")
    plots.plot_learning_curves(runs, args.out / "learning_curves.png")
    deformable = {k: m for k, m in first_models.items() if k in ("dcnv1", "dcnv2")}
    if deformable:
        images, labels = to_tensors(data["test_strong"].subset(PICTURE_DIGITS), device)
        plots.plot_sampling_locations(deformable, images, labels.cpu().numpy(), args.out / "sampling_locations.png")
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out} "
          f"in {results['wall_seconds']:.0f} s")
    return 0
