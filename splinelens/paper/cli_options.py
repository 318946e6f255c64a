"""What a valid command-line option is: the ``type=`` parsers of ``splinelens``'s options.

Each turns the option's text into its value or raises ``argparse.ArgumentTypeError`` with one line
saying what was expected; argparse prefixes the option's name. The options of ``TrainConfig``'s
fields are generated from the dataclass (``add_train_options``) and checked by the same rules as
the Python API (``config.field_value``), so ``--epochs 0`` and ``TrainConfig(epochs=0)`` are
refused in the same words. Everything is checked before any work starts.

>>> lambdas("0, 0.01,1"), count("3"), device("cpu")
([0.0, 0.01, 1.0], 3, 'cpu')
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splinelens.paper.config import (
    INT_MAX,
    TrainConfig,
    field_value,
    parse_number,
    resolve_device,
)
from splinelens.penalty import PENALTY_KINDS

__all__ = [
    "add_train_options",
    "analyses",
    "count",
    "data_dir",
    "device",
    "existing",
    "field_option",
    "lambdas",
    "out_dir",
    "positive_lam",
    "sweep_dir",
]

_LAMBDAS = "expected comma-separated non-negative numbers such as 0,0.01,0.1"


def lambdas(text: str) -> list[float]:
    """``--lambdas``: distinct finite non-negative numbers, comma-separated.

    >>> lambdas("0, 0.01,1")
    [0.0, 0.01, 1.0]
    >>> lambdas("0,,1")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: an empty value in '0,,1'; expected comma-separated ...
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(f"no values; {_LAMBDAS}")
    values: list[float] = []
    items = [t.strip() for t in text.split(",")]
    for item in items:
        value = _lambda(item, text)
        if value in values:
            same = items[values.index(value)]
            how = "appears twice" if same == item else f"equals {same!r} as a number"
            raise argparse.ArgumentTypeError(f"{item!r} {how} in {text!r}; {_LAMBDAS}")
        values.append(value)
    return values


def _lambda(item: str, text: str) -> float:
    """One value of ``--lambdas`` (the whole ``text`` is quoted in errors)."""
    if not item:
        raise argparse.ArgumentTypeError(f"an empty value in {text!r}; {_LAMBDAS}")
    try:
        value = parse_number(item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{item!r} is not a number; {_LAMBDAS}") from None
    if not math.isfinite(value) or value < 0:
        why = "negative" if value < 0 else "not finite"
        raise argparse.ArgumentTypeError(f"{item!r} is {why}; {_LAMBDAS}")
    return value + 0.0  # -0.0 is 0.0 (and the same run id)


def count(text: str) -> int:
    """A positive integer that fits a C int, in plain digits (``--seeds``, ``--n``, ``--batch``).

    >>> count("3")
    3
    >>> count("1_000")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected an integer >= 1 and <= 2147483647, got '1_000'
    """
    try:
        value = parse_number(text, int)
    except ValueError:
        value = 0
    if not 1 <= value <= INT_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 and <= {INT_MAX}, got {text!r}")
    return value


def field_option(name: str) -> Callable[[str], Any]:
    """The option parser of TrainConfig field ``name``: the rules of ``config.field_value``.

    >>> field_option("lr")("0.01")
    0.01
    """

    def parse(text: str) -> Any:
        try:
            return field_value(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def positive_lam(text: str) -> float:
    """``demo --lam``: a finite number > 0 (the demo compares lambda = 0 with it).

    >>> positive_lam("0.5")
    0.5
    """
    lam = field_option("lam")(text)
    if lam == 0:
        raise argparse.ArgumentTypeError(
            "expected a number > 0: the demo compares lambda = 0 with this lambda"
        )
    return lam


def device(text: str) -> str:
    """``--device``: "auto" or a device that this machine has (the rules of
    ``config.resolve_device``), checked before any work starts.

    >>> device("cpu")
    'cpu'
    """
    try:
        resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"device {text!r}: ")) from None
    return text


def out_dir(text: str) -> str:
    """``--out``: a directory that exists or can be created, and that we can write into."""
    path = Path(text).absolute()
    if not text:
        raise argparse.ArgumentTypeError("expected a directory path, got ''")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; expected a directory")
    base = next(p for p in (path, *path.parents) if p.exists())
    if not base.is_dir():
        raise argparse.ArgumentTypeError(f"{base} is a file, so {text} cannot be a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{base} is not writable; expected a directory you own")
    return text


def sweep_dir(text: str) -> str:
    """``sweep --out``: an ``--out`` directory in which runs/, sweep.json and results.csv can be
    written (not a file runs, nor a directory results.csv)."""
    from splinelens.paper.sweep import out_problem

    why = out_problem(out_dir(text))
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def data_dir(text: str) -> str:
    """``--data-dir``: "" (the dataset's default) or an existing directory or archive, made
    absolute; part of a run's id, so a path that does not exist is refused even where a dataset
    ignores it, and a relative one resumed from another folder is another sweep."""
    if text and not Path(text).exists():
        raise argparse.ArgumentTypeError(
            f"{text}: not found; expected an existing directory or archive"
        )
    return str(Path(text).resolve()) if text else text  # (the same data from any folder)


def existing(kind: str) -> Callable[[str], str]:
    """A path that must already exist as a ``kind`` ("file" or "directory")."""

    def parse(text: str) -> str:
        path = Path(text)
        ok = path.is_file() if kind == "file" else path.is_dir()
        if not ok:
            what = "not found" if not path.exists() else f"not a {kind}"
            raise argparse.ArgumentTypeError(f"{text}: {what}; expected an existing {kind}")
        return text

    return parse


def analyses(text: str) -> tuple[str, ...]:
    """``--what``: a comma-separated subset of the analyses."""
    from splinelens.paper.analyze import ANALYSES

    what = tuple(w.strip() for w in text.split(","))
    bad = [w for w in what if w not in ANALYSES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"{bad[0]!r} is not an analysis; expected a comma-separated subset of "
            + ",".join(ANALYSES)
        )
    return what


_OPTION_TYPES: dict[str, Callable[[str], Any]] = {  # text fields with rules
    "device": device,
    "data_dir": data_dir,
}


def add_train_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (except lam and seed, which the sweep sets)."""
    from splinelens.paper.data import DATASETS
    from splinelens.paper.models import MODELS

    choices = {"dataset": sorted(DATASETS), "arch": sorted(MODELS), "penalty_kind": PENALTY_KINDS}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("lam", "seed"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            plain = str if isinstance(f.default, str) else field_option(f.name)
            p.add_argument(
                flag,
                *([f.metadata["alias"]] if "alias" in f.metadata else []),
                type=_OPTION_TYPES.get(f.name, plain),
                default=f.default,
                choices=choices.get(f.name),
                help=f"default: {f.default}",
            )
