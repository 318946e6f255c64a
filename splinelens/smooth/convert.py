"""``splinify``: a copy of a network in which every smooth activation is a certified spline.

The paper (Sec. 4, after Theorem 2) notes that sigmoid, arctan and friends "can be approximated
arbitrarily closely by an affine spline operator but not by a MASO". ``splinify`` does it for a
whole PyTorch network: each activation module (``nn.GELU``, ``nn.Tanh``, ...) becomes a
``SplineActivation`` whose certified sup-norm error over all of R is ``.sup_error``;
``nn.RNN(nonlinearity="tanh")`` becomes an unrolled ``SplineRNN``; functional calls inside
``forward`` (``torch.tanh``, ``F.gelu``, ``x.sigmoid()``) are redirected, by forward hooks on the
copy, to splines the hooks keep (``functional_splines(splined)`` lists them). The result is
piecewise affine, so every spline tool of splinelens is exact for it; the input model is left
untouched.

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(2, 8), nn.GELU(), nn.Linear(8, 2)).eval()
>>> splined = sl.splinify(net, tol=1e-2)
>>> splined[1]
SplineActivation(gelu, pieces=..., sup_error=...)
>>> splined[1].sup_error <= 1e-2
True
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode

from splinelens._capture import as_op
from splinelens.smooth.fit import fit_activation
from splinelens.smooth.module import ActivationRedirect, SplineActivation, write_back
from splinelens.smooth.rnn import SplineRNN

__all__ = ["functional_splines", "spline_for", "splinify"]

Tensor = torch.Tensor

# Activation modules: class -> (activation name, its parameters read from the module).
_MODULES: dict[type, Callable[[nn.Module], tuple[str, dict[str, float]]]] = {
    nn.Sigmoid: lambda m: ("sigmoid", {}),
    nn.Tanh: lambda m: ("tanh", {}),
    nn.GELU: lambda m: (_gelu(m.approximate), {}),
    nn.SiLU: lambda m: ("silu", {}),
    nn.Mish: lambda m: ("mish", {}),
    nn.ELU: lambda m: ("elu", {"alpha": m.alpha}),
    nn.CELU: lambda m: ("celu", {"alpha": m.alpha}),
    nn.SELU: lambda m: ("selu", {}),
    nn.Softplus: lambda m: ("softplus", {"beta": m.beta, "threshold": m.threshold}),
    nn.LogSigmoid: lambda m: ("logsigmoid", {}),
    nn.Softsign: lambda m: ("softsign", {}),
    nn.Hardswish: lambda m: ("hardswish", {}),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", {}),
    nn.Softshrink: lambda m: ("softshrink", {"lambd": m.lambd}),
    nn.Tanhshrink: lambda m: ("tanhshrink", {}),
}

# Functional calls: function -> (activation name, names of its arguments after the input).
_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    **{f: ("tanh", ()) for f in (torch.tanh, torch.Tensor.tanh, torch.tanh_, torch.Tensor.tanh_)},
    **{
        f: ("sigmoid", ())
        for f in (
            torch.sigmoid,
            torch.Tensor.sigmoid,
            torch.sigmoid_,
            torch.Tensor.sigmoid_,
            torch.special.expit,
        )
    },
    F.gelu: ("gelu", ("approximate",)),
    F.silu: ("silu", ("inplace",)),
    F.mish: ("mish", ("inplace",)),
    F.elu: ("elu", ("alpha", "inplace")),
    F.elu_: ("elu", ("alpha",)),
    **{f: ("celu", ("alpha", "inplace")) for f in (F.celu, torch.celu, torch.celu_)},
    **{f: ("selu", ("inplace",)) for f in (F.selu, torch.selu, torch.selu_)},
    F.softplus: ("softplus", ("beta", "threshold")),
    F.logsigmoid: ("logsigmoid", ()),
    F.softsign: ("softsign", ()),
    F.hardswish: ("hardswish", ("inplace",)),
    F.hardsigmoid: ("hardsigmoid", ("inplace",)),
    F.softshrink: ("softshrink", ("lambd",)),
    F.tanhshrink: ("tanhshrink", ()),
}
_IN_PLACE = {torch.tanh_, torch.Tensor.tanh_, torch.sigmoid_, torch.Tensor.sigmoid_}
_IN_PLACE |= {F.elu_, torch.celu_, torch.selu_}


def splinify(
    model: nn.Module,
    tol: float | None = 1e-3,
    *,
    pieces: int | None = None,
    example_input: Tensor | None = None,
) -> nn.Module:
    """A copy of ``model`` with every smooth activation replaced by a certified spline.

    ``tol``: each spline uses the fewest pieces whose certified sup-norm error over R is at
    most ``tol``; ``pieces``: exactly that many pieces (K, tails included) instead. Functional
    calls in ``forward`` are fitted on the copy's first call; ``example_input`` makes that call
    here, so the copy's structure is final when it is returned (do it, or call the copy once,
    before capturing it with ``torch.export`` yourself; splinelens' own tools run it first).

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).eval()
    >>> splined = splinify(net, tol=1e-3)  # GELU replaced by a certified spline
    >>> x = torch.randn(5, 3)
    >>> bool((splined(x) - net(x)).abs().max() < 1e-2)
    True
    """
    if pieces is not None:
        tol = None
    if (tol is None) == (pieces is None):
        raise ValueError("give tol (a certified error bound) or pieces (the number of pieces)")
    splined = copy.deepcopy(model)
    budget = {"tol": tol, "pieces": pieces}
    splined = _replacement(splined, budget) or splined  # the model itself an activation / RNN
    _replace_modules(splined, budget)
    redirect = Redirect(budget)
    splined.register_forward_pre_hook(redirect.enter)
    splined.register_forward_hook(redirect.exit, always_call=True)
    if example_input is not None:
        with torch.no_grad():
            splined(example_input)
    return splined


def functional_splines(splined: nn.Module) -> dict[str, SplineActivation]:
    """The splines that stand for functional calls in ``splined``'s forward, by name."""
    return {
        k: v
        for hook in splined._forward_pre_hooks.values()
        if isinstance(getattr(hook, "__self__", None), Redirect)
        for k, v in hook.__self__.splines.items()
    }


def spline_for(name: str, params: dict[str, Any], budget: dict[str, Any]) -> SplineActivation:
    """The spline of activation ``name`` with ``params`` under ``budget`` (tol or pieces)."""
    fit = fit_activation(name, tol=budget["tol"], pieces=budget["pieces"], **params)
    return SplineActivation.from_fit(fit)


def _replace_modules(model: nn.Module, budget: dict[str, Any]) -> None:
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = _replacement(child, budget)
            if new is not None:
                setattr(parent, child_name, new)


def _replacement(m: nn.Module, budget: dict[str, Any]) -> nn.Module | None:
    """The spline module standing for m (its hooks carried over; ``inplace=True`` kept), or
    None if m is not replaced."""
    if type(m) in _MODULES:
        name, params = _MODULES[type(m)](m)
        new: nn.Module = spline_for(name, params, budget)
        new.inplace = bool(getattr(m, "inplace", False))
    elif type(m) is nn.RNN and m.nonlinearity == "tanh":
        new = SplineRNN.of(m, spline_for("tanh", {}, budget))
    else:
        return None
    for k in _HOOKS:  # (a hook that changes the output must keep changing it)
        if isinstance(getattr(new, k), dict):
            getattr(new, k).update(getattr(m, k))
        else:  # (_is_full_backward_hook: how backward hooks are called)
            setattr(new, k, getattr(m, k))
    return new


_HOOKS = [k for k in vars(nn.Module()) if "hook" in k]  # every kind, with its flags and kwargs


class Redirect:
    """Forward hooks that run the copy's forward under ``_Functional``, which sends smooth
    functional activations to splines (picklable, so the splined model can be saved)."""

    def __init__(self, budget: dict[str, Any]) -> None:
        self.budget = budget
        self.splines = nn.ModuleDict()  # not a submodule: nn.Sequential would call it

    def enter(self, module: nn.Module, args: Any) -> None:
        modes = self._modes()
        while modes and not modes[-1].live():  # (a forward stopped by a KeyboardInterrupt)
            stale = modes.pop()
            if _get_current_function_mode() is stale:
                stale.__exit__(None, None, None)
        caller = None if torch.compiler.is_compiling() else sys._getframe(1)  # (dynamo: no frames)
        mode = _Functional(self.splines, self.budget, caller)
        mode.__enter__()
        modes.append(mode)

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        opened = _open()
        modes = opened.get(id(self))
        if modes:
            modes.pop().__exit__(None, None, None)
            if not modes:
                del opened[id(self)]

    def _modes(self) -> list[TorchFunctionMode]:
        """This thread's open modes of this redirect (kept apart from the copy: a forward
        running in one thread is not a change of the model seen from another; an entry lives
        while a forward is open)."""
        return _open().setdefault(id(self), [])

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.pop("modes", None)  # (saved before the modes were kept per thread)
        self.__dict__.update(state)


_THREAD = threading.local()


def _open() -> dict[int, list[_Functional]]:
    """This thread's open modes, by id of their ``Redirect``."""
    if not hasattr(_THREAD, "open"):
        _THREAD.open = {}
    return _THREAD.open


class _Functional(ActivationRedirect):
    """Replaces calls to smooth activation functions by the matching spline module."""

    def __init__(self, splines: nn.ModuleDict, budget: dict[str, Any], caller: Any) -> None:
        super().__init__()
        self.splines, self.budget, self.caller = splines, budget, caller  # (caller: a frame)

    def live(self) -> bool:
        """Whether the forward that opened the mode still runs (its hook's caller is on this
        thread's stack): a KeyboardInterrupt skips the exit hook, which runs on an Exception
        only, and left the mode redirecting activations of any code in the thread."""
        if self.caller is None:  # (opened while torch.compile traced: taken as running)
            return True
        frame = sys._getframe(1)
        while frame is not None and frame is not self.caller:
            frame = frame.f_back
        return frame is not None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _FUNCTIONS:  # (first: every op of the forward comes here)
            return func(*args, **kwargs)
        z = args[0] if args else kwargs.get("input", kwargs.get("self"))
        if not isinstance(z, Tensor) or not self.live():
            return func(*args, **kwargs)
        name, params, inplace = _call(func, args[1:], kwargs)
        y = self._spline(name, params, z)(z)
        if inplace:
            return write_back(z, y)
        out = kwargs.get("out")  # torch.tanh(h, out=buffer), resized as torch does
        if not isinstance(out, Tensor):
            return y
        if out.shape != y.shape and torch.can_cast(y.dtype, out.dtype):
            out.resize_(y.shape)
        return write_back(out, y)

    def _spline(self, name: str, params: dict[str, Any], z: Tensor) -> SplineActivation:
        key = "_".join([name, *(f"{k}{v}" for k, v in sorted(params.items()))]).replace(".", "p")
        if key not in self.splines:
            if as_op() or torch._C._functorch.maybe_current_level() is not None:
                raise RuntimeError(
                    f"the splinified model calls {name} in forward for the first time while "
                    "being captured or transformed (torch.func: jacrev, vmap...); run it once "
                    "on an input first (or pass example_input to splinify)"
                )
            with torch.inference_mode(False):  # (made in inference mode, its tables could
                self.splines[key] = spline_for(name, params, self.budget)  # not be captured)
        if self.splines[key].knots.device != z.device:
            with torch.inference_mode(False):
                self.splines[key].to(z.device)
        return self.splines[key]


def _call(func: Any, rest: tuple, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], bool]:
    """(activation name, its parameters, in place) of a functional activation call, from the
    arguments after its input (``rest``) and its keyword arguments."""
    name, arg_names = _FUNCTIONS[func]
    bound = dict(zip(arg_names, rest))
    bound.update({k: v for k, v in kwargs.items() if k in arg_names})
    inplace = func in _IN_PLACE or bool(bound.pop("inplace", False))
    if name == "gelu":
        name = _gelu(bound.pop("approximate", "none"))
    return name, {k: float(v) for k, v in bound.items()}, inplace


def _gelu(approximate: object) -> str:
    """The GELU of ``approximate``, as torch reads it (another value: torch's own error)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(
            f"GELU's approximate must be 'none' or 'tanh', got {approximate!r} (torch refuses it "
            f"too: the smooth network does not run)"
        )
    return "gelu_tanh" if approximate == "tanh" else "gelu"
