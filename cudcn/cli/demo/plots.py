"""The demo's pictures: the data, the learning curves, and where the
deformable layers learned to look (the classic DCN picture).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cudcn.cli.demo.data import MILD, STRONG, Digits
from cudcn.cli.demo.models import STEP
from cudcn.cli.demo.report import LABELS

COLOURS = {"plain": "tab:gray", "dcnv1": "tab:blue", "dcnv2": "tab:red", "coordconv": "tab:green"}
#: Colours of the units drawn in sampling_locations.png, most active first.
UNIT_COLOURS = ("tab:red", "tab:cyan")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_data(data: dict[str, Digits], path: Path, count: int = 10) -> None:
    """Rows: training images, mildly and strongly deformed test images (the
    first count of each, or as many as there are), with the ranges of the two
    deformations under them."""
    plt = _pyplot()
    count = min(count, *(len(digits) for digits in data.values()))
    rows = (("train", "training set\n(mild)"), ("test_mild", "test, mild"), ("test_strong", "test, strong"))
    caption = 0.4  # inches under the images for the two lines of ranges
    height = len(rows) * 1.05 + caption
    fig, axes = plt.subplots(len(rows), count, figsize=(max(count, 7) * 0.9, height), squeeze=False)
    for r, (key, title) in enumerate(rows):
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(data[key].images[c, 0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(title, fontsize=8)
    fig.text(0.01, 0.02, f"mild: {MILD.describe()}\nstrong: {STRONG.describe()}", fontsize=7.5,
             ha="left", va="bottom", linespacing=1.4)
    fig.tight_layout(pad=0.3, rect=(0, caption / height, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_learning_curves(summaries: dict[str, list[Any]], path: Path) -> None:
    """Training loss and strong-test accuracy per epoch; mean over seeds, band min..max.

    summaries maps a model name to its RunResults (one per seed).
    """
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, runs in summaries.items():
        loss = np.array([r.train_loss for r in runs])
        acc = np.array([r.test_strong_accuracy for r in runs])
        epochs = np.arange(1, loss.shape[1] + 1)
        for ax, values in ((ax_loss, loss), (ax_acc, acc)):
            ax.plot(epochs, values.mean(0), "o-", ms=3, color=COLOURS[name], label=LABELS[name])
            ax.fill_between(epochs, values.min(0), values.max(0), color=COLOURS[name], alpha=0.15)
    if "plain" in summaries:  # the level the README's comparison of training speed refers to
        plain_final = float(np.mean([r.train_loss[-1] for r in summaries["plain"]]))
        ax_loss.axhline(plain_final, color=COLOURS["plain"], linestyle=":", linewidth=0.9,
                        label="plain's final loss")
    ax_loss.set(xlabel="epoch", ylabel="training cross-entropy", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="test accuracy, strongly deformed digits")
    seeds = len(next(iter(summaries.values())))
    # The loss panel's lower left stays empty (losses start high), so the legend goes there.
    ax_loss.legend(title=f"mean of {seeds} seeds (band: min..max)" if seeds > 1 else "1 seed",
                   fontsize=8, title_fontsize=8, loc="lower left")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sampling_points(model: Any, images: Any) -> dict[str, np.ndarray]:
    """Where the model's deformable layer samples, in input-image pixels.

    Returns arrays for every image n, output pixel (h, w) of the layer and
    kernel point k = i*3 + j:
    "y", "x": (n, H, W, 9) sampling points; "regular_y", "regular_x": (H, W, 9)
    the regular grid; "mask": (n, H, W, 9) modulation (ones for DCNv1);
    "activation": (n, H, W) the norm of the layer's output; "predicted": (n,)
    the class the model gives each image.

    The offsets are recomputed from the layer's input exactly as the layer's
    forward does (``conv_offset``; for DCNv2 its three chunks are row/column
    offsets and mask logits), so the picture shows what the layer used.
    """
    import torch

    layer = model.last
    captured = {}
    hook = layer.register_forward_pre_hook(lambda module, inputs: captured.update(input=inputs[0]))
    outputs = {}
    hook_out = layer.register_forward_hook(lambda module, inputs, output: outputs.update(out=output))
    model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
        raw = layer.conv_offset(captured["input"])
    hook.remove()
    hook_out.remove()

    k = layer.kernel_size[0] * layer.kernel_size[1]
    if raw.shape[1] == 3 * k:  # DCNv2: (o1, o2, mask logits)
        o1, o2, logits = torch.chunk(raw, 3, dim=1)
        offset, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(logits)
    else:
        offset, mask = raw, torch.ones_like(raw[:, :k])
    n, _, height, width = offset.shape
    offset = offset.reshape(n, k, 2, height, width).permute(0, 3, 4, 1, 2).cpu().numpy()
    i, j = np.divmod(np.arange(k), layer.kernel_size[1])
    rows = np.arange(height)[:, None, None] * layer.stride[0] - layer.padding[0] + i * layer.dilation[0]
    cols = np.arange(width)[None, :, None] * layer.stride[1] - layer.padding[1] + j * layer.dilation[1]
    y = rows + offset[..., 0]
    x = cols + offset[..., 1]

    def to_pixels(p):  # layer coordinates -> input-image pixels
        return STEP * p + (STEP - 1) / 2

    return {
        "y": to_pixels(y), "x": to_pixels(x),
        "regular_y": to_pixels(np.broadcast_to(rows, y.shape[1:]).astype(float)),
        "regular_x": to_pixels(np.broadcast_to(cols, x.shape[1:]).astype(float)),
        "mask": mask.permute(0, 2, 3, 1).cpu().numpy(),
        "activation": outputs["out"].norm(dim=1).cpu().numpy(),
        "predicted": predicted.cpu().numpy(),
    }


def _panel_limits(drawn: list[np.ndarray], size: int) -> tuple[float, float]:
    """One view for every panel: the image and every drawn point with a margin,
    but at most 3/4 of an image beyond each edge (farther points are drawn on
    the panel's edge)."""
    coordinates = np.concatenate([d.ravel() for d in drawn] + [np.array([-0.5, size - 0.5])])
    low = max(float(coordinates.min()) - 1.5, -0.75 * size)
    high = min(float(coordinates.max()) + 1.5, 1.75 * size)
    return low, high


def plot_sampling_locations(models: dict[str, Any], images: Any, labels: np.ndarray, path: Path,
                            units_per_image: int = len(UNIT_COLOURS)) -> None:
    """For each deformable model (a row) and test digit (a column): the
    layer's most active output units (stars; a colour per unit: red the most
    active, cyan the next), the regular 3x3 grid of each (hollow circles),
    lines to the learned sampling points (dots; for DCNv2 their opacity is
    the mask). Coordinates are input-image pixels; each panel's title gives
    the digit's class and the model's answer, green when right, red when
    wrong. The view reaches past the image (white) as far as the points do,
    at most 3/4 of an image; a point beyond the view is drawn on the panel's
    edge as a cross."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    count = len(labels)
    size = images.shape[-1]
    panels = {}  # (row, column) -> [(colour, regular x, regular y, x, y, mask, unit centre)]
    predictions = {}
    for r, (name, model) in enumerate(models.items()):
        points = sampling_points(model, images)
        predictions[name] = points["predicted"]
        for c in range(count):
            activation = points["activation"][c]
            units = []
            for u, flat in enumerate(np.argsort(activation.ravel())[::-1][:units_per_image]):
                h, w = np.unravel_index(flat, activation.shape)
                units.append((UNIT_COLOURS[u % len(UNIT_COLOURS)],
                              points["regular_x"][h, w], points["regular_y"][h, w],
                              points["x"][c, h, w], points["y"][c, h, w], points["mask"][c, h, w],
                              (STEP * w + (STEP - 1) / 2, STEP * h + (STEP - 1) / 2)))
            panels[r, c] = units
    low, high = _panel_limits([u[k] for units in panels.values() for u in units for k in (1, 2, 3, 4)], size)

    fig, axes = plt.subplots(len(models), count, figsize=(count * 2.2, len(models) * 2.45 + 0.6), squeeze=False)
    beyond_any = False
    for r, name in enumerate(models):
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(images[c, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1,
                      extent=(-0.5, size - 0.5, size - 0.5, -0.5))
            for colour, regular_x, regular_y, x, y, mask, (centre_x, centre_y) in panels[r, c]:
                beyond = (x < low) | (x > high) | (y < low) | (y > high)
                beyond_any |= bool(beyond.any())
                x, y = np.clip(x, low, high), np.clip(y, low, high)
                ax.scatter(regular_x, regular_y, s=14, facecolors="none", edgecolors=colour, linewidths=0.6,
                           alpha=0.7)
                for k in range(len(x)):  # a faint line from each regular point to where it moved
                    ax.plot([regular_x[k], x[k]], [regular_y[k], y[k]], color=colour, linewidth=0.5, alpha=0.5)
                rgba = np.zeros((len(x), 4))
                rgba[:, :3] = plt.matplotlib.colors.to_rgb(colour)
                rgba[:, 3] = np.clip(mask, 0.15, 1.0)
                ax.scatter(x[~beyond], y[~beyond], s=12, c=rgba[~beyond])
                ax.scatter(x[beyond], y[beyond], s=18, marker="x", c=rgba[beyond], linewidths=1.0)
                ax.scatter([centre_x], [centre_y], marker="*", s=70, color=colour, edgecolors="white",
                           linewidths=0.5, zorder=3)
            ax.set_xlim(low, high)
            ax.set_ylim(high, low)
            ax.set_xticks([])
            ax.set_yticks([])
            predicted = predictions[name][c]
            right = predicted == labels[c]
            ax.set_title(f"digit {labels[c]}: read as {predicted} {'(right)' if right else '(wrong)'}",
                         fontsize=8, color="tab:green" if right else "tab:red")
        axes[r, 0].set_ylabel(LABELS[name], fontsize=9)

    handles = [
        Line2D([], [], marker="*", color=UNIT_COLOURS[0], linestyle="", markersize=9,
               label="most active unit of the layer (at its output pixel)"),
        Line2D([], [], marker="*", color=UNIT_COLOURS[1], linestyle="", markersize=9,
               label="second most active unit"),
        Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor="gray", linestyle="",
               label="the unit's regular 3x3 sampling grid"),
        Line2D([0, 1], [0, 0], marker="o", color="gray", linewidth=0.6,
               label="its learned sampling point (DCNv2: opacity = mask)"),
    ]
    if low < -0.5 or high > size - 0.5:
        # The view reaches past the image so that points learned there stay in sight.
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=0.6,
                             label=f"white: outside the {size}x{size} image (what the layer samples there fades to 0)"))
    if beyond_any:
        handles.append(Line2D([], [], marker="x", color="gray", linestyle="",
                              label="learned point beyond the view, drawn on the edge"))
    fig.legend(handles=handles, loc="lower center", ncol=3 if len(handles) > 4 else 4, fontsize=8,
               frameon=False)
    fig.suptitle(f"Where the deformable layer samples, in input-image pixels, for {count} strongly deformed test digits "
                 "(colour = unit; one step of the layer = 4 pixels)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07 if len(handles) > 4 else 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
