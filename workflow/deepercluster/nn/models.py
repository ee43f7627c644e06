"""The convnets of the papers, each a plain ``nn.Module`` whose ``forward`` returns "the feature".

- ``vgg16_bn``: VGG-16 with BatchNorm, DeeperCluster's backbone (Caron et al., 2019,
  https://arxiv.org/abs/1905.01278).
- ``alexnet_bn``: AlexNet with BatchNorm, DeepCluster's backbone (Caron et al., 2018,
  https://arxiv.org/abs/1807.05520).
- ``small_convnet``: the same shape at 28-64 px, for laptops and tests.

Every model is ``sobel`` (optional) -> ``features`` (convs) -> ``avgpool`` -> ``classifier``;
the classifier's last Linear output, before any ReLU, is the feature used for clustering.
The training heads (``nn.heads``) put ReLU then Linear on top of it. ``fold_sobel`` composes
the Sobel layer into the first conv (RGB input), as the DeeperCluster paper does before its
supervised training; ``build_model(arch, sobel=False, folded_sobel=True)`` is that model's shape.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from deepercluster.errors import ConfigError

# Conv widths, "M" a 2x2 max-pool (torchvision's table for VGG-16, config "D").
CFGS: dict[str, list[int | str]] = {
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "small_convnet": [32, "M", 64, "M", 128, "M"],
}


class Sobel(nn.Module):
    """Frozen greyscale (1x1 conv averaging RGB) then the two Sobel kernels (3x3 conv): 2 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.grayscale = nn.Conv2d(3, 1, kernel_size=1)
        self.grayscale.weight.data.fill_(1.0 / 3.0)
        self.grayscale.bias.data.zero_()
        self.sobel = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        dx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.sobel.weight.data.copy_(torch.stack([dx, dx.t()]).unsqueeze(1))
        self.sobel.bias.data.zero_()
        for p in self.parameters():
            p.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sobel(self.grayscale(x))


def make_layers(cfg: list[int | str], in_channels: int) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU per width; max-pool at each "M"."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [
                nn.Conv2d(in_channels, int(v), 3, padding=1),
                nn.BatchNorm2d(int(v)),
                nn.ReLU(inplace=True),
            ]
            in_channels = int(v)
    return nn.Sequential(*layers)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ConvNet(nn.Module):
    """``sobel`` -> ``features`` -> ``avgpool`` -> ``classifier``; ``forward`` returns the feature."""

    def __init__(self, features: nn.Sequential, pool: int, hidden: int, sobel: bool) -> None:
        super().__init__()
        self.sobel = Sobel() if sobel else None
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        channels = [m.out_channels for m in features if isinstance(m, nn.Conv2d)][-1]
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(channels * pool * pool, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
        )
        self.feature_dim = hidden
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def conv_layers(self) -> list[nn.Module]:
        """The ReLU after each conv, in order: where the linear probes read activations."""
        return [m for m in self.features if isinstance(m, nn.ReLU)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sobel is not None:
            x = self.sobel(x)
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16_bn(*, sobel: bool = True) -> ConvNet:
    """VGG-16 with BatchNorm after every conv; classifier 25088 -> 4096 -> 4096 (DeeperCluster).

    Args:
        sobel: put the frozen Sobel filter in front (2 input channels instead of 3).
    """
    features = make_layers(CFGS["vgg16_bn"], in_channels=2 if sobel else 3)
    return ConvNet(features, pool=7, hidden=4096, sobel=sobel)


def alexnet_bn(*, sobel: bool = True) -> ConvNet:
    """AlexNet with BatchNorm: convs 96-11/4, 256-5, 384-3, 384-3, 256-3; classifier -> 4096 (DeepCluster).

    Args:
        sobel: put the frozen Sobel filter in front (2 input channels instead of 3).
    """
    pool = nn.MaxPool2d(kernel_size=3, stride=2)
    features = nn.Sequential(
        *conv_bn(2 if sobel else 3, 96, 11, stride=4, padding=2),
        pool,
        *conv_bn(96, 256, 5, padding=2),
        pool,
        *conv_bn(256, 384, 3, padding=1),
        *conv_bn(384, 384, 3, padding=1),
        *conv_bn(384, 256, 3, padding=1),
        pool,
    )
    return ConvNet(features, pool=6, hidden=4096, sobel=sobel)


def small_convnet(*, sobel: bool = True) -> ConvNet:
    """Three conv-BN-ReLU-pool stages (32, 64, 128) and a 256-d feature, for 28-64 px images.

    Args:
        sobel: put the frozen Sobel filter in front (2 input channels instead of 3).
    """
    features = make_layers(CFGS["small_convnet"], in_channels=2 if sobel else 3)
    return ConvNet(features, pool=4, hidden=256, sobel=sobel)


ARCHITECTURES = {"vgg16_bn": vgg16_bn, "alexnet_bn": alexnet_bn, "small_convnet": small_convnet}


def build_model(arch: str, sobel: bool, folded_sobel: bool = False) -> ConvNet:
    """The model named ``arch``; an unknown name raises ``ConfigError`` listing the valid ones.

    With ``folded_sobel`` (and no ``sobel``), the first conv takes RGB with the kernel of
    ``fold_sobel``: 2 larger, padding 1 larger (5x5 after 3x3 convs, 13x13 for AlexNet).
    """
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown model.arch {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    if sobel and folded_sobel:
        raise ValueError("folded_sobel is the shape of a model without its Sobel layer: pass sobel=False")
    model = ARCHITECTURES[arch](sobel=sobel)
    if folded_sobel:
        model.features[0] = grown_conv(model.features[0])
    return model


def grown_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """An RGB conv as wide as ``conv`` that also spans the Sobel's 3x3 window: kernel +2, padding +1, same stride."""
    return nn.Conv2d(3, conv.out_channels, conv.kernel_size[0] + 2, conv.stride, conv.padding[0] + 1)


def fold_sobel(model: ConvNet) -> ConvNet:
    """A copy of ``model`` without its Sobel layer, whose first conv takes RGB: greyscale, Sobel and conv1 composed.

    The three are linear, so their composition is one conv. It equals the original wherever conv1's window
    lies inside the image. conv1 zero-pads the Sobel output; the folded conv instead sees the Sobel response
    one pixel outside the image, which is not zero where the greyscale of the image's outermost pixels is
    not 0 (after normalisation): conv1's outputs whose window overhangs the border (its first and last row
    and column, for every architecture here) differ, and through them the rest of the network. (The Sobel's
    own zero padding of the greyscale image is reproduced exactly, its biases being zero.)
    """
    if model.sobel is None:
        raise ValueError("the model has no Sobel layer to fold")
    conv = model.features[0]
    grey, edges = model.sobel.grayscale, model.sobel.sobel
    width = conv.kernel_size[0]
    composed = conv.weight.new_zeros(conv.out_channels, width + 2, width + 2)
    for a in range(3):  # conv1's tap i on the Sobel's tap a reads grey pixel i + a - (padding + 1)
        for b in range(3):
            composed[:, a : a + width, b : b + width] += torch.einsum(
                "omij,m->oij", conv.weight, edges.weight[:, 0, a, b]
            )
    edge_bias = edges.bias + grey.bias * edges.weight.sum((1, 2, 3))  # the Sobel output of a black image
    folded = copy.deepcopy(model)
    folded.sobel = None
    folded.features[0] = grown_conv(conv)
    with torch.no_grad():
        folded.features[0].weight.copy_(composed[:, None] * grey.weight[0, :, 0, 0][None, :, None, None])
        folded.features[0].bias.copy_(conv.bias + torch.einsum("omij,m->o", conv.weight, edge_bias))
    return folded
