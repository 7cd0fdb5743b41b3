"""Small user-style nn.Modules that no spec produces, shared by the calibration and exporter tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FlatNet(nn.Module):
    """VGG-style: the flatten of a 4×4 map feeds Linear layers (the QM flattens NHWC; torch NCHW)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.classifier = nn.Sequential(nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.classifier(f.view(f.size(0), -1))


class FireNet(nn.Module):
    """SqueezeNet-style fire module (torch.cat of two expand branches), then a max pool of the concat joined
    with another branch: the second concat's group reaches back through the pool to the first."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.squeeze, self.expand1 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.expand3 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool, self.side = nn.MaxPool2d(2), nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu(self.squeeze(x))
        y = self.pool(torch.cat([F.relu(self.expand1(y)), F.relu(self.expand3(y))], 1))
        z = torch.cat((y, F.relu(self.side(self.pool(x)))), dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


class SwishNet(nn.Module):
    """EfficientNet-style: SiLU after conv + BN, a squeeze-excite gate through a sigmoid (x · sigmoid(fc(gap(x)))),
    then LeakyReLU, GELU and tanh; module, function and method spellings of each."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16))
        self.se_reduce, self.se_expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.LeakyReLU(0.1))
        self.down = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.act = nn.Tanh()
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.dw(self.stem(x)))
        gate = self.se_expand(F.silu(self.se_reduce(x.mean((2, 3), keepdim=True)))).sigmoid()
        x = self.project(x * gate)
        x = F.leaky_relu(self.down(x), 0.2) + torch.tanh(self.down(F.gelu(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.act(x), 1), 1))


class GroupNet(nn.Module):
    """ResNeXt / RegNet-style grouped convolutions (3, 8 and 2 groups; one strided, one 1×1) around a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(24, 48, 3, stride=2, padding=1, groups=3), nn.BatchNorm2d(48), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=8), nn.BatchNorm2d(48), nn.ReLU(),
                                 nn.Conv2d(48, 48, 1, groups=2), nn.BatchNorm2d(48))
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        x = F.relu(x + self.mix(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ShuffleNet(nn.Module):
    """ShuffleNet V2-style channel movement: x.chunk, torch.split and x[:, a:b] slices, torchvision's own
    channel_shuffle (view → transpose → contiguous → view, sizes from x.size()), and a 4-group shuffle written
    with reshape / permute / flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12), nn.ReLU(),
                                    nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12),
                                    nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(24, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.models.shufflenetv2 import channel_shuffle

        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)
        a, b = torch.split(self.mix(x), [8, 16], dim=1)
        n, c, h, w = b.shape
        b = b.reshape(n, 4, c // 4, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)
        y = torch.cat((a, b[:, 8:], x[:, 3:11]), dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class PickNet(nn.Module):
    """A channel selection that is neither a slice nor a shuffle (reordered, one channel twice): a `gather` that
    TFLite's GATHER runs and ExecuTorch runs as index_select outside the XNNPACK delegate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(5, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.stem(x)[:, [6, 0, 3, 3, 1]])
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EluNet(nn.Module):
    """ELU as a module (alpha 1) and as a function (alpha 0.5), around a residual add: a table op each, which
    TFLite runs as a GATHER and ExecuTorch on its portable kernels, beside the XNNPACK delegate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ELU())
        self.conv = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.elu(self.conv(x) + x, alpha=0.5)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MishNet(nn.Module):
    """CSPDarknet-style (YOLOv4's backbone): conv-BN-Mish layers, a cross-stage-partial split (two 1×1 branches,
    one through a residual block whose sum takes F.mish), joined by a cat, clamped to [-0.2, 3] (a hardtanh), and a
    Softplus(beta=2, threshold=5) head. All three are table ops: a GATHER in the .tflite; in ExecuTorch each runs
    whole on the portable kernels in float64 between delegate partitions."""

    def __init__(self) -> None:
        super().__init__()

        def cbm(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out),
                                 nn.Mish())

        self.stem = cbm(3, 16, 3, 2)
        self.part1, self.part2 = cbm(16, 8, 1), cbm(16, 8, 1)
        self.block = nn.Sequential(cbm(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.join = cbm(16, 16, 1)
        self.head = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = self.part1(x), self.part2(x)
        b = F.mish(b + self.block(b))
        x = self.join(torch.cat([a, b], 1)).clamp(-0.2, 3.0)  # a clamp with its own scale: a hardtanh table op
        x = F.softplus(self.head(x), beta=2.0, threshold=5.0)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _SlopedPReLU(nn.PReLU):
    """A PReLU whose slopes are given (reset_parameters, which the tests' seeded init calls, restores them)."""

    def __init__(self, slopes: torch.Tensor) -> None:
        self.slopes = slopes
        super().__init__(len(slopes))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.slopes)


class PReluNet(nn.Module):
    """MobileFaceNet-style: conv-BN-PReLU(C) (a slope per channel: one table per channel), a depthwise-separable
    residual block, and a one-slope PReLU after the Linear (LeakyReLU's function). The slopes are set, not
    learned (torch's init is 0.25 everywhere): negative, zero and above one included."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  _SlopedPReLU(torch.linspace(-0.5, 1.5, 16)))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16),
                                _SlopedPReLU(torch.linspace(0.6, -0.2, 16)))
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 12)
        self.act = _SlopedPReLU(torch.tensor([0.1]))
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        return self.head(self.act(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))))


class SoftmaxNet(nn.Module):
    """LeNet as tutorials write it, ending in F.softmax(x, dim=1): probabilities out, an integer softmax op (its
    output fixed at scale 1/256, zero point -128)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return F.softmax(self.fc2(x), dim=1)


class TorchPoolNet(nn.Module):
    """Pools as user code writes them: functions (pytorch-cifar's ResNet ends in F.avg_pool2d(out, 4)), ceil-mode
    max pools on an odd map (extra bottom/right padding that is TFLite SAME) and on an even one with padding (not
    SAME, and not after a ReLU: the .tflite pads with PADV2's lowest code), and an Inception-style
    F.avg_pool2d(x, 3, 1, 1) that averages its zero padding in (count_include_pad=True, torch's default)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.conv = nn.Conv2d(12, 16, 3, padding=1)  # no activation: the pool after it sees negative values
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.valid = nn.Sequential(nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.stem(x), 2)              # 32 → 16
        x = self.pool(self.conv(x))                    # 16 → 9: padding [1, 2, 1, 2]
        x = F.max_pool2d(self.valid(x), 2, ceil_mode=True)  # 9 → 7 → 4: padding [0, 1, 0, 1]
        x = F.avg_pool2d(x, 3, 1, 1)                   # a pad op (real 0), then a VALID average
        x = F.avg_pool2d(x, 4)                         # 4 → 1
        return self.fc(x.view(x.size(0), -1))


class PadNet(nn.Module):
    """Zero pads as TF-ported nets write them: a ZeroPad2d((0, 1, 0, 1)) before the stride-2 stem (TF "same"
    padding, read straight from the image), F.pad on a map with negative values before a depthwise conv, and
    ConstantPad2d(value 0) before a stride-2 conv; then a width-only F.pad before a max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2), nn.BatchNorm2d(12), nn.ReLU())  # 33 → 16
        self.expand = nn.Conv2d(12, 16, 1)  # no activation: the pad after it writes 0 among negative values
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, groups=16), nn.BatchNorm2d(16), nn.ReLU6())  # 18 → 16
        self.down_pad = nn.ConstantPad2d((0, 1, 0, 1), 0.0)
        self.down = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2), nn.BatchNorm2d(24), nn.ReLU())  # 17 → 8
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.stem_pad(x))
        x = self.dw(F.pad(self.expand(x), (1, 1, 1, 1)))
        x = self.down(self.down_pad(x))
        x = F.max_pool2d(F.pad(x, (1, 1)), 2)  # 8 × 10 → 4 × 5
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class HSigmoid(nn.Module):
    """MobileNetV3 code as it is widely copied: hard sigmoid spelled out in arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + 3) / 6


class HSwish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sigmoid = HSigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(x)


class SpelledNet(nn.Module):
    """Activations spelled out (x * relu6(x + 3) / 6, relu6(x + 3) / 6 in modules, (z + 3).clamp(0, 6) / 6,
    x * x.sigmoid(), x.clamp(min=0)) and a squeeze-excite of Linear layers on the pooled vector, viewed back to
    [N, C, 1, 1] for the product."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), HSwish())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(16, 4), nn.ReLU(inplace=True), nn.Linear(4, 16), HSigmoid())
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.down = nn.Conv2d(24, 32, 3, 2, 1)
        self.gate = nn.Conv2d(32, 32, 1)
        self.head = nn.Sequential(nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.stem(x)).clamp(min=0)  # a ReLU spelled as a clamp
        b, c, _, _ = x.size()
        x = x * self.fc(self.pool(x).view(b, c)).view(b, c, 1, 1)
        x = self.pw(x)
        x = x * F.relu6(x + 3.0) / 6.0
        x = self.down(x)
        x = x * x.sigmoid()  # swish as EfficientNet code writes it
        x = x * ((self.gate(x.mean((2, 3), keepdim=True)) + 3).clamp(0, 6) / 6)
        return self.head(F.adaptive_avg_pool2d(x, 1).view(b, -1))


class PreActNet(nn.Module):
    """Pre-activation BN as PreActResNet and DenseNet write it: BN → ReLU → conv on a residual sum and on a
    concat (no conv before the BN to fold it into); adaptive pools whose bins are equal, and a pool whose kernel
    and stride are computed in forward() (SENet's F.avg_pool2d(x, x.size(3)))."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1, self.conv1 = nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3, self.grow = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 3, stride=2, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.bn4 = nn.BatchNorm2d(24)
        self.adapt = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.conv1(F.relu(self.bn1(x)))
        x = self.conv2(F.relu(self.bn2(out))) + x           # pre-activation residual block
        x = torch.cat([self.grow(F.relu(self.bn3(x))), self.pool(x)], 1)  # 16 → 8 spatial, 8 + 16 channels
        x = F.relu(self.bn4(x))                              # BN on a concat
        x = F.adaptive_max_pool2d(self.adapt(x), (2, None))  # 16 → 4 (average), 4 × 4 → 2 × 4 (max)
        x = F.avg_pool2d(x, x.size(2), x.size(3))            # 2 × 4 → 1 (a 2 × 2 window, stride 4)
        return self.fc(x.view(x.size(0), -1))


class WidePoolNet(nn.Module):
    """Average pools of more than 9 taps at many output positions (XNNPACK runs them in passes of 9 in
    ExecuTorch): 4×4 with stride 2 and padding, 5×5 (three passes) whose border windows count fewer taps, and an
    unequal 3×5 window."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool4 = nn.AvgPool2d(4, 2, 1, count_include_pad=False)  # 32 → 16
        self.mix = nn.Conv2d(8, 12, 1)  # no activation: the pools see negative values
        self.pool5 = nn.AvgPool2d(5, 1, 2, count_include_pad=False)  # 16 → 16, 9 to 25 taps in range
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool5(self.mix(self.pool4(self.stem(x))))
        x = F.avg_pool2d(x, (3, 5), stride=(2, 3))  # 16 × 16 → 7 × 4
        return self.fc(x.mean((2, 3)))


class DualPathNet(nn.Module):
    """DPN's block (kuangliu/pytorch-cifar's Bottleneck): a residual sum over the first channels and a dense
    concat of the rest, then a relu of the whole concat. The shortcut's channels are read by both the add and the
    concat, so no layer before can take the relu: it stays a standalone clamp. A relu6 of a mean (no layer
    makes a mean's output) is one too; before it, a difference of two maps (SUB)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.conv1, self.bn1 = nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 20, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(20)
        self.shortcut = nn.Sequential(nn.Conv2d(16, 20, 1, stride=2, bias=False), nn.BatchNorm2d(20))
        self.mix, self.fc = nn.Conv2d(28, 28, 1), nn.Linear(28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x, d = self.shortcut(x), 12
        out = F.relu(torch.cat([x[:, :d] + out[:, :d], x[:, d:], out[:, d:]], 1))  # 12 + 8 + 8 channels
        return self.fc(F.relu6((out - self.mix(out)).mean((2, 3))))


class UpsampleNet(nn.Module):
    """Nearest upsampling by whole factors: an FPN-style top-down merge (F.interpolate to a size computed in
    forward(), factor 4, its ReLU fused into the conv before), nn.Upsample(scale_factor=2), and VGG-at-32-px's
    adaptive pool of a small map to a larger one (2×2 → 6×6, factor 3), flattened into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)      # 32 → 16
        self.down2 = nn.Conv2d(8, 12, 3, stride=4, padding=1)    # 16 → 4
        self.lateral = nn.Conv2d(12, 8, 1)
        self.up = nn.Upsample(scale_factor=2)                     # 16 → 32
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.down(self.stem(x))
        top = F.relu(F.interpolate(self.lateral(self.down2(a)), size=(a.size(2), a.size(3)), mode="nearest"))
        y = F.adaptive_max_pool2d(self.up(a + top), 2)           # 32 → 2
        return self.fc(torch.flatten(self.pool(y), 1))           # 2 → 6: each pixel repeated 3 × 3 times


# Every net above by its test id (the exporter tests' parameter lists).
USER_NETS: dict[str, type[nn.Module]] = {
    "flatnet": FlatNet, "firenet": FireNet, "swishnet": SwishNet, "groupnet": GroupNet, "shufflenet": ShuffleNet,
    "picknet": PickNet, "elunet": EluNet, "torchpoolnet": TorchPoolNet, "padnet": PadNet, "spellednet": SpelledNet,
    "preactnet": PreActNet, "widepoolnet": WidePoolNet, "dualpathnet": DualPathNet,
    "upsamplenet": UpsampleNet, "mishnet": MishNet, "prelunet": PReluNet,
    "softmaxnet": SoftmaxNet}
