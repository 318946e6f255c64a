"""A zoo of piecewise-affine architectures for the tests: name -> (model factory, input shape)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class Abs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


def _bn_randomise(model: nn.Module) -> nn.Module:
    """Give batchnorm layers non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def small_cnn() -> nn.Module:
    return _bn_randomise(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 5),
        )
    )


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )
        self.relu = nn.ReLU()  # one module object, called twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = ResBlock(4, 6, 2)
        self.block2 = ResBlock(6, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.block2(self.block1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseNet(nn.Module):
    """Concatenation skips, functional and method activations, avg pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.c3 = nn.Conv2d(10, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = torch.relu(self.c1(x))
        x = torch.cat([x, y1], 1)
        y2 = self.c2(x).relu()
        x = torch.cat([x, y2], 1)
        x = F.avg_pool2d(F.relu(self.c3(x)), 2)
        return self.fc(x.flatten(1))


def conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 6, 5, padding=2),
        nn.LeakyReLU(0.2),
        nn.MaxPool1d(3, 2, 1),
        nn.Conv1d(6, 6, 3),
        nn.ReLU(),
        nn.AdaptiveMaxPool1d(4),
        nn.Flatten(),
        nn.Linear(24, 3),
    )


class Maxout(nn.Module):
    """Channel max-pooling (maxout) with amax and with torch.max(dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc1 = nn.Linear(4 * 4 * 4, 12)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)  # (N, 8, 6, 6)
        z = z.view(z.shape[0], 4, 2, 6, 6).amax(2)  # channel max: (N, 4, 6, 6)
        z = F.max_pool2d(z, 3, stride=2, padding=1)  # overlapping windows: (N, 4, 3, 3)
        z = self.fc1(F.pad(z, (0, 1, 0, 1)).flatten(1))  # (N, 12)
        z, _ = z.view(-1, 4, 3).max(dim=2)  # maxout: (N, 4)
        return self.fc2(z)


class SharedLinear(nn.Module):
    """A module object called several times, and constant scalings."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.hidden = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x))
        for _ in range(3):
            h = self.act(self.hidden(h) * 0.5 + h / 2.0)
        return self.out(h)


class MixedActivations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 10)
        self.l4, self.l5 = nn.Linear(10, 10), nn.Linear(10, 3)
        self.prelu = nn.PReLU(10, init=0.3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.l1(x))
        x = F.leaky_relu(self.l2(x), 0.1).abs()
        x = F.hardtanh(self.l3(x), -0.5, 0.5)
        x = F.relu6(self.l4(self.drop(x)) * 4)
        x = torch.clamp(x - 1.0, min=0.0)
        return self.l5(torch.maximum(x, -x * 0.5))


class RNNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 8, num_layers=2, nonlinearity="relu", batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


class HandRNN(nn.Module):
    """A hand-written ReLU recurrence, time-major inside."""

    def __init__(self) -> None:
        super().__init__()
        self.wx = nn.Linear(3, 6)
        self.wh = nn.Linear(6, 6, bias=False)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.transpose(0, 1)  # (T, N, 3)
        h = torch.zeros(x.shape[0], 6, dtype=x.dtype)
        for t in range(xs.shape[0]):
            h = F.relu(self.wx(xs[t]) + self.wh(h))
        return self.fc(h)


def conv3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2), nn.Flatten(), nn.Linear(3 * 8, 2)
    )


class Decoder(nn.Module):
    """Transposed convolution, nearest and bilinear upsampling, permute, stack, matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
        self.mix = nn.Parameter(torch.randn(3, 3))
        self.fc = nn.Linear(3 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.leaky_relu(self.up(x), 0.3)  # (N, 3, 7, 7)
        z = F.interpolate(z, size=(8, 8), mode="bilinear", align_corners=False)
        z = torch.relu(z.permute(0, 2, 3, 1) @ self.mix).permute(0, 3, 1, 2)  # channel mix
        z = torch.stack([z, F.interpolate(z[:, :, ::2, ::2], scale_factor=2.0)], 0).sum(0)
        return self.fc(z.reshape(z.shape[0], -1))


def with_softmax() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.LogSoftmax(dim=-1))


def splined_gelu_mlp() -> nn.Module:
    """sl.splinify of a GELU / sigmoid MLP (few pieces: a few hundred regions in a slice)."""
    from splinelens import splinify

    net = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 3))
    return splinify(net.eval(), pieces=5)


def splined_tanh_cnn() -> nn.Module:
    from splinelens import splinify

    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    return splinify(net.eval(), pieces=5)  # (SiLU's 4-piece fit repeats a piece: no MASO form)


class SmoothFunctional(nn.Module):
    """Functional smooth activations in forward (torch.tanh, F.elu with alpha, x.sigmoid())."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.c(F.elu(self.b(h), 0.5).sigmoid() + F.relu(h))


def splined_functional() -> nn.Module:
    from splinelens import splinify

    return splinify(SmoothFunctional().eval(), pieces=4, example_input=torch.randn(2, 5))


ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (6,)),
    "small_cnn": (small_cnn, (3, 8, 8)),
    "resnet": (ResNet, (3, 8, 8)),
    "densenet": (DenseNet, (2, 8, 8)),
    "conv1d": (conv1d, (2, 16)),
    "maxout": (Maxout, (1, 8, 8)),
    "shared_module": (SharedLinear, (5,)),
    "mixed_activations": (MixedActivations, (6,)),
    "rnn": (RNNNet, (5, 3)),
    "hand_rnn": (HandRNN, (4, 3)),
    "conv3d": (conv3d, (1, 4, 4, 4)),
    "softmax_output": (with_softmax, (4,)),
    "decoder": (Decoder, (2, 4, 4)),
    "splined_gelu_mlp": (splined_gelu_mlp, (6,)),
    "splined_tanh_cnn": (splined_tanh_cnn, (3, 8, 8)),
    "splined_functional": (splined_functional, (5,)),
}


def build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name][0]().to(dtype).eval()


def inputs(
    name: str, n: int = 4, dtype: torch.dtype = torch.float64, seed: int = 1
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *ZOO[name][1], generator=g).to(dtype)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output before a trailing log-softmax (the reference for f)."""
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.LogSoftmax):
        return model[:-1](x)
    return model(x)


def jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference slopes: torch.func.jacrev of each sample's logits, (N, C, *x.shape[1:])."""
    return torch.stack([torch.func.jacrev(lambda xi: logits(model, xi[None])[0])(xi) for xi in x])
