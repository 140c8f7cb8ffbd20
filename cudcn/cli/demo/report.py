"""What the demo reports, computed from its results alone.

:func:`summarise` turns a model's runs into its row of the table;
:func:`training_speed` compares the training-loss curves with the plain
network's; :func:`markdown` writes both, with the date, machine and versions
of the run, as the text README quotes (results.md). Every function here takes
the plain dicts stored in results.json, so the text can be rebuilt from the
stored results and checked against README.
"""

from __future__ import annotations

import statistics

import numpy as np

from cudcn.cli.arguments import plural
from cudcn.cli.info import load_text

#: Names of the models in tables and pictures.
LABELS = {"plain": "plain", "dcnv1": "DCNv1", "dcnv2": "DCNv2", "coordconv": "CoordConv"}


def mean_std(values: list[float]) -> dict[str, float]:
    """{"mean", "std"}: mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict]) -> dict:
    """The table row of one model from its runs (one per seed, as stored)."""
    return {
        "parameters": runs[0]["parameters"],
        "test_mild_accuracy": mean_std([r["test_mild_accuracy"] for r in runs]),
        "test_strong_accuracy": mean_std([r["test_strong_accuracy"][-1] for r in runs]),
        "seconds_per_epoch": statistics.median(s for r in runs for s in r["epoch_seconds"]),
    }


def with_spread(statistic: dict[str, float], seeds: int, plus_minus: str = "±") -> str:
    """"0.850 ± 0.065" (mean ± std over the seeds), or "0.850" for one seed, which has no spread."""
    return f"{statistic['mean']:.3f}" + (f" {plus_minus} {statistic['std']:.3f}" if seeds > 1 else "")


def format_table(summary: dict[str, dict], seeds: int) -> str:
    """Model, parameters, accuracies (mean +- std over seeds), seconds per epoch (for the terminal)."""
    width = 16 if seeds > 1 else 7
    lines = [f"{'model':10} {'params':>7}  {'test acc, mild':>{width}}  {'test acc, strong':>{width}}  {'s/epoch':>7}"]
    for name, row in summary.items():
        mild, strong = (with_spread(row[key], seeds, "+-") for key in ("test_mild_accuracy", "test_strong_accuracy"))
        lines.append(f"{name:10} {row['parameters']:>7,}  {mild:>{width}}  {strong:>{width}}  "
                     f"{row['seconds_per_epoch']:>7.2f}")
    accuracy = f"mean +- std over {seeds} seeds" if seeds > 1 else "1 seed"
    lines.append(f"(accuracy: {accuracy}; s/epoch: median time of an epoch's training steps)")
    return "\n".join(lines)


def _mean_curves(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds of the loss after each epoch and of the training time
    up to the end of each epoch, both with a leading epoch 0 (time 0, no loss)."""
    loss = np.array([r["train_loss"] for r in runs]).mean(axis=0)
    seconds = np.cumsum(np.array([r["epoch_seconds"] for r in runs]), axis=1).mean(axis=0)
    return np.concatenate(([np.nan], loss)), np.concatenate(([0.0], seconds))


def _reaches(loss: np.ndarray, seconds: np.ndarray, target: float) -> tuple[float, float] | None:
    """(epochs, seconds) at which a mean loss curve first falls to target,
    interpolated linearly between the ends of two epochs (the first epoch's
    loss counts at its end); None when it never does."""
    for epoch in range(1, len(loss)):
        if loss[epoch] <= target:
            if epoch == 1 or loss[epoch - 1] == loss[epoch]:
                return float(epoch), float(seconds[epoch])
            part = (loss[epoch - 1] - target) / (loss[epoch - 1] - loss[epoch])
            return epoch - 1 + part, float(seconds[epoch - 1] + part * (seconds[epoch] - seconds[epoch - 1]))
    return None


def training_speed(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """For every model: its final training loss (mean over seeds), and when
    its mean loss curve reaches the plain network's final loss, in epochs and
    in seconds of training (None when it does not). Needs the plain model."""
    plain_loss, plain_seconds = _mean_curves(runs["plain"])
    target = float(plain_loss[-1])
    speed = {}
    for name, model_runs in runs.items():
        loss, seconds = _mean_curves(model_runs)
        reached = _reaches(loss, seconds, target)
        speed[name] = {
            "final_loss": float(loss[-1]),
            "epochs_to_plain_final_loss": None if reached is None else reached[0],
            "seconds_to_plain_final_loss": None if reached is None else reached[1],
        }
    speed["plain"].update(epochs_to_plain_final_loss=float(len(plain_loss) - 1),
                          seconds_to_plain_final_loss=float(plain_seconds[-1]))
    return speed


def _times(ratio: float, more: str, fewer: str, same: str) -> str:
    """"1.8× fewer than plain" or "2.1× more than plain" for a ratio of this
    model's figure to plain's; ``same`` when it rounds to 1.0×."""
    factor = max(ratio, 1 / ratio)
    if f"{factor:.1f}" == "1.0":
        return same
    return f"{factor:.1f}× {more if ratio > 1 else fewer} than plain"


def markdown(results: dict) -> str:
    """results.md: the run, the accuracy table and what the loss curves show."""
    settings, env = results["settings"], results["environment"]
    runs: dict[str, list[dict]] = {name: [] for name in settings["models"]}
    for run in results["runs"]:
        runs[run["model_name"]].append(run)
    summary = {name: summarise(model_runs) for name, model_runs in runs.items()}
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# cudcn demo: results",
        "",
        f"`cudcn demo` with {plural(settings['epochs'], 'epoch')} and {plural(settings['seeds'], 'seed')} "
        f"on {'the CPU' if settings['device'] == 'cpu' else settings['device'].upper()}: "
        f"{results['wall_seconds']:.0f} s in all, data and pictures included; "
        f"{env['date']}, {env['machine']}, {env['cpu_count']} CPUs"
        + (f", {load_text(env['load_average_at_start'])} at the start" if "load_average_at_start" in env else "")
        + f", {plural(env['torch_threads'], 'torch thread')}; "
        f"python {env['python']}, {versions}.",
        "",
        "| model | params | test acc., mild | test acc., strong | s/epoch |",
        "|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        mild, strong = (with_spread(row[key], settings["seeds"])
                        for key in ("test_mild_accuracy", "test_strong_accuracy"))
        lines.append(f"| {LABELS[name]} | {row['parameters']:,} | {mild} | {strong} | {row['seconds_per_epoch']:.2f} |")
    if "plain" in runs:
        speed = training_speed(runs)
        plain = speed["plain"]
        lines += [
            "",
            f"Training loss (cross-entropy, mean over an epoch's batches and over the seeds) against the plain "
            f"network's after its {plural(settings['epochs'], 'epoch')}, {plain['final_loss']:.2f}, reached "
            f"after {plain['seconds_to_plain_final_loss']:.1f} s of training steps:",
            "",
        ]
        for name, row in speed.items():
            if name == "plain":
                continue
            loss_ratio = plain["final_loss"] / row["final_loss"]
            text = (f"- {LABELS[name]}: final loss {row['final_loss']:.2f}, "
                    f"{_times(loss_ratio, 'lower', 'higher', 'about as low as plain')}'s; ")
            if row["epochs_to_plain_final_loss"] is None:
                text += f"plain's final loss not reached in {plural(settings['epochs'], 'epoch')}."
            else:
                epochs, seconds = row["epochs_to_plain_final_loss"], row["seconds_to_plain_final_loss"]
                epoch_ratio = epochs / plain["epochs_to_plain_final_loss"]
                time_ratio = seconds / plain["seconds_to_plain_final_loss"]
                text += (f"plain's final loss reached after {epochs:.1f} epochs "
                         f"({_times(epoch_ratio, 'more', 'fewer', 'about as many as plain')}) "
                         f"and {seconds:.1f} s of training "
                         f"({_times(time_ratio, 'longer', 'shorter', 'about as long as plain')}).")
            lines.append(text)
    return "\n".join(lines) + "\n"
