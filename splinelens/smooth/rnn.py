"""``SplineRNN``: ``nn.RNN`` unrolled in time, with any activation module in place of tanh.

PyTorch runs ``nn.RNN`` as one fused kernel (``aten.rnn_tanh``), with tanh inside it; to put a
spline there, ``splinify`` swaps the module for this one: the same parameters under the same
names (``weight_ih_l0``, ...), the same inputs and outputs (batch first or not, batched or not,
several layers, both directions), and h_t = act(W_ih x_t + b_ih + W_hh h_(t-1) + b_hh).

>>> import torch, torch.nn as nn
>>> rnn = nn.RNN(3, 4, num_layers=2, batch_first=True).eval()
>>> unrolled = SplineRNN.of(rnn, nn.Tanh())
>>> x = torch.randn(2, 5, 3)
>>> all(torch.allclose(a, b, atol=1e-6) for a, b in zip(unrolled(x), rnn(x)))
True
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SplineRNN"]

Tensor = torch.Tensor


class SplineRNN(nn.RNN):
    """An ``nn.RNN`` whose nonlinearity is the module ``act`` (a ``SplineActivation``)."""

    @classmethod
    def of(cls, rnn: nn.RNN, act: nn.Module) -> SplineRNN:
        """The unrolled copy of ``rnn`` (its parameters copied) with activation ``act``."""
        if getattr(rnn, "proj_size", 0):
            raise ValueError("nn.RNN has no projections; proj_size must be 0")
        new = cls(
            rnn.input_size,
            rnn.hidden_size,
            num_layers=rnn.num_layers,
            nonlinearity=rnn.nonlinearity,
            bias=rnn.bias,
            batch_first=rnn.batch_first,
            dropout=rnn.dropout,
            bidirectional=rnn.bidirectional,
            device=rnn.weight_ih_l0.device,
            dtype=rnn.weight_ih_l0.dtype,
        )
        new.load_state_dict(rnn.state_dict())
        new.train(rnn.training)
        new.act = act
        return new

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_inputs(input, hx)
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(0 if self.batch_first else 1)
        x = x.transpose(0, 1) if self.batch_first else x  # (T, N, H_in)
        dirs = 2 if self.bidirectional else 1
        if hx is None:
            hx = x.new_zeros(self.num_layers * dirs, x.shape[1], self.hidden_size)
        elif not batched:
            hx = hx.unsqueeze(1)
        last = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                seq, h = self._direction(x, hx[layer * dirs + d], layer, d)
                outs.append(seq)
                last.append(h)
            x = torch.cat(outs, -1) if dirs == 2 else outs[0]  # (T, N, dirs * H)
            if self.training and self.dropout and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout)
        out, h_n = (x.transpose(0, 1) if self.batch_first else x), torch.stack(last)
        return (out, h_n) if batched else (out.squeeze(0 if self.batch_first else 1), h_n[:, 0])

    def _direction(self, x: Tensor, h: Tensor, layer: int, d: int) -> tuple[Tensor, Tensor]:
        """One layer in one direction over x (T, N, H_in) from h (N, H): outputs (T, N, H)."""
        sfx = f"l{layer}" + ("_reverse" if d else "")
        w_ih, w_hh = getattr(self, f"weight_ih_{sfx}"), getattr(self, f"weight_hh_{sfx}")
        b_ih = getattr(self, f"bias_ih_{sfx}") if self.bias else None
        b_hh = getattr(self, f"bias_hh_{sfx}") if self.bias else None
        steps = range(len(x) - 1, -1, -1) if d else range(len(x))
        outs: list[Tensor] = [h] * len(x)
        for t in steps:
            h = self.act(F.linear(x[t], w_ih, b_ih) + F.linear(h, w_hh, b_hh))  # (N, H)
            outs[t] = h
        return torch.stack(outs), h


def _check_inputs(input: object, hx: object) -> None:
    """Refuse what nn.RNN refuses: a packed sequence (not supported here), an input that is not
    2-D or 3-D, and an hx of another rank than the input (it would broadcast over the batch)."""
    if not isinstance(input, Tensor):
        raise TypeError(
            f"SplineRNN takes a padded tensor, got {type(input).__name__} (packed sequences are "
            f"not supported: pad them, torch.nn.utils.rnn.pad_packed_sequence)"
        )
    if input.dim() not in (2, 3):
        raise ValueError(f"SplineRNN: input must be 2-D or 3-D, got {input.dim()}-D")
    if hx is not None and (not isinstance(hx, Tensor) or hx.dim() != input.dim()):
        got = f"{hx.dim()}-D" if isinstance(hx, Tensor) else type(hx).__name__
        raise ValueError(
            f"SplineRNN: for {input.dim()}-D input, hx must be {input.dim()}-D (as nn.RNN), "
            f"got {got}"
        )
