"""What one training run is: ``TrainConfig``, the rules its fields obey, and its device.

The command line (``splinelens sweep``) checks its options with the same rules, so an option and a
field refuse the same values with the same words:

>>> TrainConfig(dataset="digits", arch="mlp", lam=1).lam
1.0
>>> TrainConfig(epochs=0)
Traceback (most recent call last):
...
ValueError: TrainConfig.epochs: expected an integer >= 1 and <= 2147483647, got 0
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from splinelens.paper.data import DATASETS
from splinelens.paper.models import MODELS
from splinelens.penalty import PENALTY_KINDS

__all__ = ["INT_MAX", "TrainConfig", "device_name", "field_value", "parse_number", "resolve_device"]


@dataclass
class TrainConfig:
    """Everything that defines one training run (its id is a hash of these values)."""

    dataset: str = "fashion-mnist"
    arch: str = "small-cnn"
    lam: float = 0.0  # weight of the template penalty
    penalty_kind: str = field(  # eq13 (printed), reference (the 2018 code), row-norm (diagonal)
        default="eq13", metadata={"alias": "--penalty"}
    )
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3  # Adam's initial learning rate
    lr_decay: float = 0.95  # per-epoch factor of the exponential decay
    balanced: bool = False  # class-balanced batches: batch_size / C examples of each class
    batchnorm: bool = True
    bias: bool = True
    train_subset: int = 0  # use the first N training examples (0: all)
    test_subset: int = 0  # use the first N test examples (0: all)
    data_dir: str = ""  # dataset directory or archive ("": default); in the id as written
    device: str = "auto"  # "auto": cuda when available
    bf16: bool = False  # bf16 autocast for the forward pass (GPU)
    threads: int = 1  # torch CPU threads during the run (results may depend on it)
    progress: bool = field(default=True, metadata={"identity": False})

    def __post_init__(self) -> None:
        """Normalise types (lam=1 and lam=1.0 are the same run, and the same id) and refuse
        values out of range with a ValueError naming the field."""
        for f in fields(self):
            if f.name not in _RULES:
                continue
            try:
                setattr(self, f.name, field_value(f.name, getattr(self, f.name)))
            except ValueError as e:
                raise ValueError(f"TrainConfig.{f.name}: {e}") from None
        for name, choices in (
            ("penalty_kind", PENALTY_KINDS),
            ("dataset", sorted(DATASETS)),
            ("arch", sorted(MODELS)),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"TrainConfig.{name}: expected one of {', '.join(choices)}, "
                    f"got {getattr(self, name)!r}"
                )
        try:
            self.device = device_name(self.device)
        except ValueError as e:
            raise ValueError(f"TrainConfig.device: {e}") from None

    def identity(self) -> dict[str, object]:
        """The fields that define the run's result (not how it is displayed or where it runs).

        ``threads`` and ``penalty_kind`` are left out at their defaults, so that runs keep the
        ids they had before those fields existed (``penalty_kind`` also at lam = 0, where it
        changes nothing: every penalty's lambda = 0 arm is one run).
        """
        skip = {"progress", "device"} | ({"threads"} if self.threads == 1 else set())
        skip |= {"penalty_kind"} if self.penalty_kind == "eq13" or self.lam == 0 else set()
        return {k: v for k, v in asdict(self).items() if k not in skip}


INT_MAX = 2**31 - 1  # int fields fit a C int (torch, numpy and the OS take them as such)
_THREADS_MAX = 1024  # torch starts that many OpenMP threads; 10**5 crashes the process


def _ints(low: int, high: int = INT_MAX, note: str = "") -> tuple[type, Callable, str]:
    """The rule of an int field in [low, high]."""
    return (int, lambda v: low <= v <= high, f"an integer >= {low} and <= {high}{note}")


_RULES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "lam": (float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "seed": _ints(0),
    "epochs": _ints(1),
    "batch_size": _ints(1),
    "lr": (float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "lr_decay": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "train_subset": _ints(0, note=" (0: all)"),
    "test_subset": _ints(0, note=" (0: all)"),
    "threads": _ints(1, _THREADS_MAX),
}

# numbers as text: plain ASCII decimal notation (int() would also take "1_0" and "\u0663")
_NUMBER_TEXT = {
    int: re.compile(r"[+-]?[0-9]+"),
    float: re.compile(
        r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)", re.I
    ),
}


def parse_number(text: str, kind: type = float) -> Any:
    """``text`` as an int or float, in plain decimal notation; else a ValueError.

    >>> parse_number("1e-3"), parse_number("12", int)
    (0.001, 12)
    >>> parse_number("1_0", int)
    Traceback (most recent call last):
    ...
    ValueError: invalid literal for int(): '1_0'
    """
    if not _NUMBER_TEXT[kind].fullmatch(text):
        raise ValueError(f"invalid literal for {kind.__name__}(): {text!r}")
    return kind(text)


def field_value(name: str, value: Any) -> Any:
    """``value`` (a number or its text) as TrainConfig field ``name`` takes it, range-checked.

    >>> field_value("lr", "0.01"), field_value("epochs", 3.0)
    (0.01, 3)
    >>> field_value("lr_decay", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: expected a number in (0, 1], got 1.5
    >>> field_value("epochs", True)
    Traceback (most recent call last):
    ...
    ValueError: True is a bool, not an integer; expected an integer >= 1 and <= 2147483647
    """
    kind, ok, what = _RULES[name]
    noun = "an integer" if kind is int else "a number"
    if isinstance(value, bool):  # int(True) == 1, but True is not a number of epochs
        raise ValueError(f"{value!r} is a bool, not {noun}; expected {what}")
    try:  # int("3") == 3, int(2.5) == 2: refused below
        converted = parse_number(value, kind) if isinstance(value, str) else kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{value!r} is not {noun}; expected {what}") from None
    if kind is int and not isinstance(value, str) and converted != value:
        raise ValueError(f"{value!r} is not an integer; expected {what}")
    if not ok(converted):
        raise ValueError(f"expected {what}, got {value!r}")
    return converted


_DEVICES = "expected auto, cpu, cuda, cuda:N or mps"


def device_name(device: Any) -> str:
    """``device`` as TrainConfig keeps it: "auto" or a device torch can parse (not "meta").

    Only the syntax: whether this machine has the device is ``resolve_device``'s question.

    >>> device_name("cuda:1"), device_name(torch.device("cpu"))
    ('cuda:1', 'cpu')
    >>> device_name("gpu")
    Traceback (most recent call last):
    ...
    ValueError: 'gpu' is not a device; expected auto, cpu, cuda, cuda:N or mps
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):  # torch.device(0) would be cuda:0
        raise ValueError(f"{device!r} is not a device name; {_DEVICES}")
    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{device!r} is not a device; {_DEVICES}") from None
    if parsed.type == "meta":
        raise ValueError(f"{device!r} holds shapes, no data: nothing can run on it; {_DEVICES}")
    return device


def resolve_device(device: str) -> torch.device:
    """The torch device of ``device`` ("auto": cuda when available, else cpu), which must exist
    on this machine; else a one-line ValueError.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parsed = torch.device(device_name(device))
    why = _unavailable(parsed)
    if why:
        raise ValueError(f"device {device!r}: {why}")
    return parsed


def _unavailable(device: torch.device) -> str:
    """Why this machine cannot run on ``device``; "" when it can."""
    if device.type == "cpu":
        return ""
    if device.type == "mps":
        ok, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...
        if not callable(getattr(backend, "is_available", None)):
            return f"splinelens cannot run on {device.type}; {_DEVICES}"
        ok = backend.is_available()
        count = backend.device_count() if ok else 0
    if not ok:
        return f"{device.type} is not available on this machine (torch {torch.__version__})"
    if device.index is not None and device.index >= count:
        return f"this machine has {count} {device.type} device(s), numbered from 0"
    return ""
