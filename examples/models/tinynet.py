"""A model defined in your own code, for `fullgrad dump ... --model examples/models/tinynet.py:build`.

fgcli imports this file, calls ``build(**model_args)`` and reads the optional module
attributes below for preprocessing and class names (see README, "Your own model").
"""

from torch import nn

INPUT_SIZE = 96  # int, (height, width) or (3, height, width)
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
CLASSES = ["sky", "face", "food", "machine"]


class TinyNet(nn.Module):
    """Conv / BatchNorm / SiLU blocks with a squeeze-excitation gate and a linear head."""

    def __init__(self, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(blocks):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out),
                       nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1),
                                  nn.Sigmoid())
        self.head = nn.Linear(channels, len(CLASSES))

    def forward(self, x):
        x = self.features(x)
        x = x * self.gate(x)
        return self.head(x.mean((2, 3)))


def build(width: int = 16, blocks: int = 3) -> nn.Module:
    return TinyNet(width, blocks)
