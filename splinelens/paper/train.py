"""Training with the orthogonal-template penalty (Sec. 6): Adam with exponential decay.

One run = one ``TrainConfig``; the data stays on the training device as tensors; per-epoch
metrics go to the returned history. The settings and the rules they obey are in ``config``;
here: the loop, the reproducible context it runs in, and checkpoints of its models. Run one from
the shell with ``splinelens sweep`` (one lambda, one seed) or in Python:

>>> cfg = TrainConfig(dataset="digits", arch="mlp", lam=0.1, epochs=1, progress=False)
>>> result = train(cfg)
>>> sorted(result.history[-1])
['epoch', 'lr', 'penalty', 'seconds', 'test_acc', 'train_err', 'train_loss']
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from splinelens._io import atomic_path
from splinelens.paper.config import TrainConfig, resolve_device
from splinelens.paper.data import Data, load_dataset
from splinelens.paper.models import build_model
from splinelens.penalty import classifier, orthogonality_penalty

__all__ = [
    "DivergedError",
    "RunResult",
    "batch_indices",
    "checkpoint_problem",
    "evaluate",
    "load_checkpoint",
    "load_data",
    "make_model",
    "reproducible",
    "runtime",
    "save_checkpoint",
    "summarize",
    "train",
    "train_epoch",
]

Tensor = torch.Tensor


class DivergedError(RuntimeError):
    """The loss became NaN or infinite, or the optimizer's state did."""


@dataclass
class RunResult:
    """What ``train`` returns: the config, one history row per epoch and the trained model."""

    config: TrainConfig
    history: list[dict[str, float]]
    model: nn.Module
    runtime: dict[str, Any] = field(default_factory=dict)  # see ``runtime``


def load_data(cfg: TrainConfig) -> Data:
    """The run's dataset, cut to ``cfg.train_subset`` / ``cfg.test_subset`` examples."""
    data = load_dataset(cfg.dataset, cfg.data_dir or None)
    for split, n, have in (
        ("train", cfg.train_subset, len(data.train_y)),
        ("test", cfg.test_subset, len(data.test_y)),
    ):
        if n > have:
            raise ValueError(
                f"{split}_subset={n} is more than the {have} {split} examples of "
                f"{cfg.dataset}; use 0 (all) or at most {have}"
            )
    return data.subset(cfg.train_subset or None, cfg.test_subset or None)


def make_model(cfg: TrainConfig, data: Data) -> nn.Module:
    """The run's untrained model, shaped for ``data`` (channels, image size, classes)."""
    c, h, _ = data.shape
    return build_model(cfg.arch, c, h, data.num_classes, cfg.batchnorm, cfg.bias)


def runtime(cfg: TrainConfig) -> dict[str, Any]:
    """How a run executes, recorded beside its result: the same wherever it runs.

    >>> runtime(TrainConfig(device="cpu", threads=2))["threads"]
    2
    """
    device = resolve_device(cfg.device)
    return {
        "threads": cfg.threads,
        "deterministic": True if device.type == "cpu" else "warn_only",  # (see the README)
        "torch": torch.__version__,
        "device": str(device),
    }


@contextlib.contextmanager
def reproducible(threads: int, device: torch.device) -> Iterator[None]:
    """Fixed CPU threads and deterministic algorithms for a block; restored afterwards.

    A run's numbers then depend on its config alone, not on the process that trains it (a Ray
    worker starts with 1 thread, a shell with one per core).

    >>> before = torch.get_num_threads()
    >>> with reproducible(1, torch.device("cpu")):
    ...     torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    (1, True)
    >>> torch.get_num_threads() == before
    True
    """
    old = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if device.type == "cuda":  # cuBLAS reads it when its first handle is created
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_num_threads(old[0])
        torch.use_deterministic_algorithms(old[1], warn_only=old[2])
        torch.backends.cudnn.benchmark = old[3]


def train(cfg: TrainConfig, data: Data | None = None) -> RunResult:
    """Train one model; raises DivergedError if the loss stops being finite.

    The run uses ``cfg.threads`` CPU threads and deterministic algorithms (see
    ``reproducible``), whatever the caller's settings, which are restored afterwards.
    """
    device = resolve_device(cfg.device)
    with reproducible(cfg.threads, device):
        return _train(cfg, data, device)


def _train(cfg: TrainConfig, data: Data | None, device: torch.device) -> RunResult:
    data = (data or load_data(cfg)).to(device)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, data).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    bar = _progress(range(1, cfg.epochs + 1), cfg)
    for epoch in bar:
        t0 = time.perf_counter()
        loss, err, pen = train_epoch(model, opt, data, cfg, gen, device)
        _check_optimizer(opt, cfg)
        row = {"epoch": epoch, **_epoch_row(model, opt, data, (loss, err, pen), t0)}
        history.append(row)
        sched.step()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", test_acc=f"{row['test_acc']:.4f}")
    return RunResult(cfg, history, model, runtime(cfg))


def _check_optimizer(opt: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Refuse an optimizer state that overflowed (a finite gradient of 1e20 squares to inf in
    float32: Adam's steps become 0, the weights frozen while the loss stays finite)."""
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    if not all(bool(v.isfinite().all()) for v in states if v.is_floating_point()):
        raise DivergedError(f"the optimizer's state overflowed (lam={cfg.lam}): use a smaller lam")


def _epoch_row(
    model: nn.Module, opt: torch.optim.Optimizer, data: Data, train: tuple, t0: float
) -> dict[str, float]:
    """An epoch's row of the history (without the epoch number): its (loss, error, penalty)
    on the training set, as running means over the epoch's batches in training mode (weights
    changing between batches, batchnorm on batch statistics); the test accuracy after the
    epoch, in eval mode; the learning rate, and seconds since ``t0``."""
    loss, err, pen = train
    return {
        "train_loss": loss,
        "train_err": err,
        "penalty": pen,
        "test_acc": evaluate(model, data.test_x, data.test_y),
        "lr": opt.param_groups[0]["lr"],
        "seconds": time.perf_counter() - t0,
    }


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Data,
    cfg: TrainConfig,
    gen: torch.Generator,
    device: torch.device,
) -> tuple[float, float, float]:
    """One pass over the training set (cross-entropy + ``cfg.lam`` x eq. (13)'s penalty, one Adam
    step per batch of ``batch_indices``); returns the mean loss, the training error and the
    penalty after the pass. Raises DivergedError if the loss stops being finite."""
    model.train()
    head = classifier(model)
    tot_loss = tot_wrong = seen = 0.0
    for idx in batch_indices(data.train_y, cfg, gen):
        x, y = data.train_x[idx], data.train_y[idx]  # (B, C, H, W), (B,)
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        total = loss
        if cfg.lam:  # without the penalty, its value is only logged, once per epoch
            pen = orthogonality_penalty(head.weight, cfg.penalty_kind)
            total = loss + cfg.lam * pen
        if not torch.isfinite(total):
            raise DivergedError(f"loss became {total.item()} (lam={cfg.lam}, seed={cfg.seed})")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        tot_loss += loss.item() * len(y)
        tot_wrong += (logits.argmax(1) != y).sum().item()
        seen += len(y)
    with torch.no_grad():
        pen = orthogonality_penalty(head.weight, cfg.penalty_kind)
    return tot_loss / seen, tot_wrong / seen, float(pen)


def batch_indices(y: Tensor, cfg: TrainConfig, gen: torch.Generator) -> list[Tensor]:
    """Index batches of the labels ``y`` for one epoch: a shuffle split into batches of
    ``cfg.batch_size``, or with ``cfg.balanced`` class-balanced draws (batch/C of each class).

    >>> y = torch.tensor([0, 0, 1, 1, 1, 1])
    >>> cfg = TrainConfig(batch_size=4, balanced=True)
    >>> [sorted(y[b].tolist()) for b in batch_indices(y, cfg, torch.Generator().manual_seed(0))]
    [[0, 0, 1, 1]]
    """
    n = len(y)
    if not cfg.balanced:
        perm = torch.randperm(n, generator=gen).to(y.device)
        return list(perm.split(cfg.batch_size))
    classes = [torch.nonzero(y == c).flatten().cpu() for c in range(int(y.max()) + 1)]
    if cfg.batch_size < len(classes):  # (it silently became one of each class)
        raise ValueError(
            f"batch_size {cfg.batch_size} is smaller than the {len(classes)} classes, and "
            f"balanced batches hold batch_size // {len(classes)} of each: --batch-size "
            f"{len(classes)} or more"
        )
    per = cfg.batch_size // len(classes)
    steps = max(1, n // (per * len(classes)))
    out = []
    for _ in range(steps):
        picks = [c[torch.randint(len(c), (per,), generator=gen)] for c in classes if len(c)]
        out.append(torch.cat(picks).to(y.device))
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1024) -> float:
    """Accuracy in eval mode; the model is put back in its previous mode."""
    was = model.training
    model.eval()
    try:
        right = sum(
            (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
            for i in range(0, len(x), batch)
        )
    finally:
        model.train(was)
    return right / max(1, len(x))


def _progress(epochs: range, cfg: TrainConfig):
    """``epochs`` wrapped in a tqdm bar when ``cfg.progress`` and tqdm is installed."""
    if not cfg.progress:
        return epochs
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return epochs
    return tqdm(epochs, desc=f"{cfg.arch} lam={cfg.lam:g} seed={cfg.seed}", leave=False)


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Write the model's state dict atomically (safetensors when installed)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights saved by ``save_checkpoint`` (never unpickles arbitrary objects).

    A file that is not such a checkpoint, or whose tensors do not fit ``model``, is a
    ValueError naming the file and saying in one line what is wrong.
    """
    path = Path(path)
    state = _read_state(path)
    why = _mismatch(state, model.state_dict())
    if why:
        raise ValueError(f"{path}: {why}; is it a checkpoint of this architecture and options?")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: does not fit the model ({_first_line(e)})") from None
    return model


def checkpoint_problem(path: str | Path) -> str:
    """What keeps ``path`` from being a readable checkpoint ("" if nothing): missing, truncated,
    or not a state dict (a safetensors file by its header and size, without reading it)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                f.keys()
        else:
            _read_state(path)
    except Exception as e:  # OSError, ValueError, ImportError, safetensors' own errors
        return f"{type(e).__name__}: {_first_line(e)}"
    return ""


def _read_state(path: Path) -> dict[str, Tensor]:
    """The state dict stored at ``path`` (safetensors, or a ``torch.save``d dict of tensors)."""
    load = _loader(path)  # outside the try: a missing safetensors is an ImportError
    try:
        state = load()
    except OSError:  # missing, unreadable: the OSError names the file
        raise
    except pickle.UnpicklingError:  # weights_only refused it, or not a pickle at all
        what = "not a PyTorch checkpoint, or one holding objects other than tensors"
        raise ValueError(f"{path}: {what} (only tensors are loaded)") from None
    except Exception as e:  # torch, zipfile and safetensors each raise their own
        raise ValueError(f"{path}: not a valid checkpoint ({_first_line(e)})") from None
    if not isinstance(state, dict):
        what = f"a {type(state).__name__}"
    else:
        bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
        if not bad:
            return state
        what = f"{bad[0]!r}: {type(state[bad[0]]).__name__}"
    raise ValueError(f"{path}: holds {what}, not a state dict (names to tensors)")


def _loader(path: Path) -> Callable[[], Any]:
    """How to read ``path``: safetensors by its suffix, else ``torch.load`` of tensors only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return lambda: load_file(str(path))
    return lambda: torch.load(path, map_location="cpu", weights_only=True)


def _mismatch(state: dict[str, Tensor], expected: dict[str, Tensor]) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``expected``."""
    for word, keys in (
        ("missing", [k for k in expected if k not in state]),
        ("unexpected", [k for k in state if k not in expected]),
    ):
        if keys:
            more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
            return f"{word} keys {', '.join(keys[:3])}{more}"
    for k, v in expected.items():
        if state[k].shape != v.shape:
            theirs, ours = tuple(state[k].shape), tuple(v.shape)
            return f"shape mismatch for key {k}: checkpoint {theirs} vs model {ours}"
    return ""


def _first_line(e: BaseException) -> str:
    """An exception's first line of text (or its type), at most 160 characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def summarize(history: list[dict[str, float]]) -> dict[str, float]:
    """test_acc: mean of the last 3 epochs; best_test_acc; final train_err and penalty."""
    last = history[-3:]
    return {
        "test_acc": sum(h["test_acc"] for h in last) / len(last),
        "best_test_acc": max(h["test_acc"] for h in history),
        "train_err": history[-1]["train_err"],
        "penalty": history[-1]["penalty"],
        "seconds": sum(h["seconds"] for h in history),
    }
