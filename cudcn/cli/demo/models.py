"""The small CNN of the demo, with four choices of its last convolution.

    input (N, 1, 28, 28)
    conv 3x3, 1 -> 16, BN, ReLU, max-pool 2     -> (N, 16, 14, 14)
    conv 3x3, 16 -> 32, BN, ReLU, max-pool 2    -> (N, 32, 7, 7)
    LAST 3x3, 32 -> 32, BN, ReLU                -> (N, 32, 7, 7)
    global average pool, linear 32 -> 10    -> class scores

LAST is one of

- "plain":  an ordinary convolution;
- "dcnv1":  a deformable convolution whose offsets come from a zero-initialised
  convolution of the same input (so training starts from the plain network);
- "dcnv2":  the same with a sigmoid modulation mask (starting at 0.5);
- "coordconv": an ordinary convolution that also sees two coordinate channels.

The deformable layer works at 7x7, where one step is four input pixels, so
its offsets can move a sampling point across a large part of the digit.
"""

from __future__ import annotations

from typing import Any

#: Model names in the order they are trained and reported.
MODEL_NAMES = ("plain", "dcnv1", "dcnv2", "coordconv")

#: Channels of the last convolution.
LAST_CHANNELS = 32
#: Input pixels per step of the last convolution (two 2x poolings before it):
#: its pixel p is centred on input pixel STEP*p + (STEP - 1)/2.
STEP = 4


def make_last_layer(name: str) -> Any:
    """The last convolution (LAST_CHANNELS -> LAST_CHANNELS, 3x3, padding 1)."""
    import torch.nn as nn

    c = LAST_CHANNELS
    if name == "plain":
        return nn.Conv2d(c, c, 3, padding=1)
    import cudcn.torch as cudcn_torch

    if name == "dcnv1":
        return cudcn_torch.DeformConv2dPack(c, c, 3, padding=1)
    if name == "dcnv2":
        return cudcn_torch.ModulatedDeformConv2dPack(c, c, 3, padding=1)
    if name == "coordconv":
        return cudcn_torch.CoordConv2d(c, c, 3, padding=1)
    raise ValueError(f"model name must be one of {MODEL_NAMES}, got {name!r}")


def make_model(name: str) -> Any:
    """The demo network (a torch.nn.Module) with the named last convolution,
    available as ``model.last``."""
    import torch.nn as nn

    class DigitNet(nn.Module):
        """Small CNN for 28x28 digits; see the module docstring."""

        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=0.5), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, LAST_CHANNELS, 3, padding=1), nn.BatchNorm2d(LAST_CHANNELS, momentum=0.5), nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.last = make_last_layer(name)
            self.last_norm = nn.BatchNorm2d(LAST_CHANNELS, momentum=0.5)
            self.classifier = nn.Linear(LAST_CHANNELS, 10)

        def forward(self, images):
            x = self.last_norm(self.last(self.features(images))).relu()
            return self.classifier(x.mean(dim=(2, 3)))

    return DigitNet()


def count_parameters(model: Any) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
