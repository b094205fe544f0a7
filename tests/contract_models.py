"""Models written only against the documented contract (DESIGN.md), unseen by the library.

They exercise what the zoo does not: several states of different ranks and dtypes, a state whose batch
axis is not 0, a data input without a time axis, a factory function, and deliberate contract breaches.
"""
from __future__ import annotations

import torch
from torch import nn

from wmdeploy import StateSpec, StreamingSpec, TensorSpec


class MixedStateModel(nn.Module):
    """A GRU over features plus a per-call condition vector; four states of three ranks and two dtypes."""

    def __init__(self, features: int = 6, hidden: int = 8, cond: int = 4, out: int = 5, slots: int = 3):
        super().__init__()
        self.features, self.hidden, self.cond, self.out, self.slots = features, hidden, cond, out, slots
        self.cond_proj = nn.Linear(cond, features)
        self.gru = nn.GRU(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, out)
        self.mix = nn.Linear(hidden, hidden)

    def streaming_spec(self) -> StreamingSpec:
        return StreamingSpec(
            inputs=[TensorSpec("x", ["batch", "time", self.features]), TensorSpec("cond", ["batch", self.cond])],
            outputs=[TensorSpec("y", ["batch", "time", self.out]), TensorSpec("summary", ["batch", self.hidden])],
            states=[
                StateSpec("h", [2, "batch", self.hidden]),                      # batch on axis 1
                StateSpec("slots", ["batch", self.slots, self.hidden], init=0.5),  # rank 3
                StateSpec("count", ["batch"], "int64"),                          # rank 1, int64
                StateSpec("last_step", ["batch", 1], "int64", init=-1),
            ],
            chunk_invariant=False,
        )

    def forward(self, x, cond, h, slots, count, last_step):
        x = x + self.cond_proj(cond).unsqueeze(1)
        y, h_next = self.gru(x, h)
        last = y[:, -1]
        summary = torch.tanh(self.mix(last) + slots.mean(dim=1))
        slots_next = torch.cat([slots[:, 1:], last.unsqueeze(1)], dim=1)
        steps = torch.ones_like(count) * x.shape[1]
        count_next = count + steps
        last_step_next = (count_next - 1).unsqueeze(1)
        return self.head(y), summary, h_next, slots_next, count_next, last_step_next


def make_mixed(hidden: int = 8) -> MixedStateModel:
    """A factory function instead of a class."""
    return MixedStateModel(hidden=hidden)


class TinyLSTM(nn.Module):
    """A chunk-invariant LSTM regressor."""

    def __init__(self, features: int = 4, hidden: int = 12):
        super().__init__()
        self.features, self.hidden = features, hidden
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def streaming_spec(self) -> StreamingSpec:
        return StreamingSpec(
            inputs=[TensorSpec("x", ["batch", "time", self.features])],
            outputs=[TensorSpec("y", ["batch", "time", 2])],
            states=[StateSpec("h", [1, "batch", self.hidden]), StateSpec("c", [1, "batch", self.hidden])],
            chunk_invariant=True,
        )

    def forward(self, x, h, c):
        y, (h2, c2) = self.lstm(x, (h, c))
        return self.head(y), h2, c2


class NoSpec(nn.Module):
    def forward(self, x):
        return x


class WrongCount(TinyLSTM):
    def forward(self, x, h, c):
        y, (h2, c2) = self.lstm(x, (h, c))
        return self.head(y), h2


class WrongStateShape(TinyLSTM):
    def forward(self, x, h, c):
        y, (h2, c2) = self.lstm(x, (h, c))
        return self.head(y), h2, c2[:, :, :-1]


class TimeSpecialised(TinyLSTM):
    """Python control flow on the chunk length: traced at one length, wrong at the others."""

    def forward(self, x, h, c):
        y, (h2, c2) = self.lstm(x, (h, c))
        if x.shape[1] > 2:
            y = y * 2.0
        return self.head(y), h2, c2


class BatchMixing(TinyLSTM):
    """Leaks information between the streams of a batch: the self-check must catch it."""

    def forward(self, x, h, c):
        y, (h2, c2) = self.lstm(x, (h, c))
        return self.head(y), h2 + 0.1 * h2.mean(dim=1, keepdim=True), c2
