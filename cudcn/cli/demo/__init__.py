"""``cudcn demo``: does a deformable last layer help a small CNN read deformed digits?

A small CNN (:mod:`cudcn.cli.demo.models`) whose last convolution is plain,
DCNv1, DCNv2 or CoordConv is trained with the same budget on scikit-learn's
bundled handwritten digits, upscaled and randomly rotated, scaled, shifted
and elastically warped (:mod:`cudcn.cli.demo.data`); it is tested on digits it
never saw, deformed as mildly as the training set and more strongly. Ten
classes, cross-entropy, several seeds; the deformable layers run through
``cudcn.torch`` on the CPU or on CUDA, whichever torch has.

Writes into ``--out``: results.json (settings, every run's per-epoch
losses, accuracies and times, the summary, date, machine and versions),
results.md (the text README quotes, rebuilt from results.json by
:mod:`cudcn.cli.demo.report`), learning_curves.png, sampling_locations.png and
data.png. Needs torch, scikit-learn, scipy, matplotlib and tqdm (the extra
``cudcn[demo]``); nothing is downloaded. Progress bars go to stderr, and only
when it is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cudcn.cli.arguments import CommandError, int_range, plural, require, seed_int
from cudcn.cli.demo.data import TRAINING_DIGITS
from cudcn.cli.demo.models import MODEL_NAMES

#: Test digits drawn in sampling_locations.png (each of another class).
PICTURE_DIGITS = 6
#: Packages the demo needs: importable name -> name on PyPI.
NEEDS = {"torch": "torch", "sklearn": "scikit-learn", "scipy": "scipy", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def model_list(text: str) -> list[str]:
    """argparse type: a comma-separated subset of MODEL_NAMES."""
    models = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown or not models:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(MODEL_NAMES)}, "
                                         f"got {text!r}" + (f" ({', '.join(unknown)} unknown)" if unknown else ""))
    return list(dict.fromkeys(models))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int_range(1, 100), default=6,
                        help="training epochs per run, 1 to 100 (default 6)")
    parser.add_argument("--seeds", type=int_range(1, 20), default=3,
                        help="runs per model, seeds 0..SEEDS-1, 1 to 20 (default 3)")
    parser.add_argument("--out", type=Path, default=Path("cudcn-demo"), help="output folder (default ./cudcn-demo)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help='"auto" (CUDA if torch has it, else the CPU), "cpu" or "cuda"')
    parser.add_argument("--models", type=model_list, default=list(MODEL_NAMES),
                        help=f"comma-separated subset of {','.join(MODEL_NAMES)} (default all)")
    parser.add_argument("--limit", type=int_range(1, TRAINING_DIGITS), default=None,
                        help=f"use only the first LIMIT training and test images, 1 to {TRAINING_DIGITS} "
                             "(quick tries; default all)")
    parser.add_argument("--data-seed", type=seed_int, default=0, help="seed of the data set (default 0)")
    cpus = os.cpu_count() or 1
    parser.add_argument("--threads", type=int_range(1, cpus), default=1,
                        help=f"torch threads, and NumPy's BLAS threads, when training on the CPU, 1 to {cpus} "
                             "(the CPUs here; default 1: the deformable layers run in NumPy between torch "
                             "operations, with threads of their own; a second torch or BLAS thread mostly "
                             "competes with them for the cores)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar and no line per run: only the table and where the files went")


def picture_indices(labels: np.ndarray, count: int) -> list[int]:
    """The first test digit of each class, classes in order of first appearance, count of them."""
    first = {}
    for index, label in enumerate(labels.tolist()):
        first.setdefault(label, index)
    return list(first.values())[:count]


def run(args: argparse.Namespace) -> int:
    require(NEEDS, "cudcn demo", 'install the demo extra: pip install "cudcn[demo]"')
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out expects a folder, got the file {str(args.out)!r}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"--out: cannot create {str(args.out)!r} ({error.strerror})") from None

    import threadpoolctl
    import torch
    from tqdm import tqdm

    from cudcn.cli.demo import plots, report
    from cudcn.cli.demo.data import MILD, STRONG, Digits, make_datasets
    from cudcn.cli.demo.training import pick_device, to_tensors, train
    from cudcn.cli.info import load_average, machine_record

    started = time.perf_counter()
    load_at_start = load_average()
    device = pick_device(args.device)
    blas_threads = contextlib.nullcontext()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        # NumPy's BLAS too: its idle threads spin and take the cores that
        # torch and the NumPy backend's own threads are using.
        blas_threads = threadpoolctl.threadpool_limits(args.threads, user_api="blas")
    data = make_datasets(args.data_seed)
    if args.limit:
        data = {k: v.subset(args.limit) for k, v in data.items()}
    models = args.models
    if not args.quiet:
        print(f"cudcn demo on {device.type}: {plural(len(data['train']), 'training digit')}, "
              f"{plural(len(data['test_strong']), 'test digit')} (mild and strong deformation), "
              f"{plural(len(models), 'model')} x {plural(args.seeds, 'seed')} x "
              f"{plural(args.epochs, 'epoch')}")

    runs: dict[str, list] = {name: [] for name in models}
    first_models = {}
    batches = -(-len(data["train"]) // 32)
    bar = tqdm(total=len(models) * args.seeds * args.epochs * batches, unit="batch", file=sys.stderr,
               dynamic_ncols=True, disable=args.quiet or not sys.stderr.isatty())
    with bar, blas_threads:
        for name in models:
            for seed in range(args.seeds):
                bar.set_description(f"{name} seed {seed}")
                result, model = train(name, seed, data, args.epochs, device, progress=bar)
                runs[name].append(result)
                if seed == 0:
                    first_models[name] = model
                if not args.quiet:
                    bar.write(f"{name:9} seed {seed}: final training loss {result.train_loss[-1]:.3f}, "
                              f"strong-test accuracy {result.test_strong_accuracy[-1]:.3f}, "
                              f"{sum(result.epoch_seconds):.1f} s of training", file=sys.stdout)

    stored_runs = {name: [asdict(r) for r in model_runs] for name, model_runs in runs.items()}
    summary = {name: report.summarise(model_runs) for name, model_runs in stored_runs.items()}
    print(report.format_table(summary, args.seeds))

    results = {
        "settings": {
            "epochs": args.epochs, "seeds": args.seeds, "models": models, "device": device.type,
            "data_seed": args.data_seed, "limit": args.limit, "train_digits": len(data["train"]),
            "test_digits": len(data["test_strong"]), "deformation_train_and_mild": asdict(MILD),
            "deformation_strong": asdict(STRONG),
        },
        "summary": summary,
        "training_speed": report.training_speed(stored_runs) if "plain" in models else None,
        "runs": [r for model_runs in stored_runs.values() for r in model_runs],
        "environment": machine_record(("numpy", "scipy", "torch", "scikit-learn", "matplotlib"))
        | {"torch_threads": torch.get_num_threads(), "blas_threads": args.threads if device.type == "cpu" else None,
           "load_average_at_start": load_at_start},
        "wall_seconds": None,
    }
    plots.plot_data(data, args.out / "data.png")
    plots.plot_learning_curves(runs, args.out / "learning_curves.png")
    deformable = {k: m for k, m in first_models.items() if k in ("dcnv1", "dcnv2")}
    if deformable:
        strong = data["test_strong"]
        chosen = picture_indices(strong.labels, PICTURE_DIGITS)
        images, _ = to_tensors(Digits(strong.images[chosen], strong.labels[chosen]), device)
        plots.plot_sampling_locations(deformable, images, strong.labels[chosen], args.out / "sampling_locations.png")
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(report.markdown(results))
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out} "
          f"in {results['wall_seconds']:.0f} s")
    return 0
