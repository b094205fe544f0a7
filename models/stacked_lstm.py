"""StackedLSTMRegressor: continuous features in, LSTM(128) then LSTM(64), a linear head at every step.

Two separate ``nn.LSTM`` layers of different widths, so the working memory is four states of two
shapes (``[1, batch, 128]`` and ``[1, batch, 64]``): a model whose states are not one uniform block.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec


class StackedLSTMRegressor(nn.Module):
    def __init__(self, in_features: int = 16, hidden1: int = 128, hidden2: int = 64, out_features: int = 4) -> None:
        super().__init__()
        self.in_features, self.hidden1, self.hidden2, self.out_features = in_features, hidden1, hidden2, out_features
        self.lstm1 = nn.LSTM(in_features, hidden1, batch_first=True)
        self.lstm2 = nn.LSTM(hidden1, hidden2, batch_first=True)
        self.head = nn.Linear(hidden2, out_features)

    @property
    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "hidden1": self.hidden1, "hidden2": self.hidden2,
                "out_features": self.out_features}

    def streaming_spec(self) -> StreamingSpec:
        H1, H2 = self.hidden1, self.hidden2
        return StreamingSpec(
            inputs=[TensorSpec("features", ["batch", "time", self.in_features], "float32")],
            outputs=[TensorSpec("prediction", ["batch", "time", self.out_features], "float32")],
            states=[StateSpec("h1", [1, "batch", H1], "float32"), StateSpec("c1", [1, "batch", H1], "float32"),
                    StateSpec("h2", [1, "batch", H2], "float32"), StateSpec("c2", [1, "batch", H2], "float32")],
            chunk_invariant=True,
            meta={"task": "regression"},
        )

    def forward(self, features: torch.Tensor, h1: torch.Tensor, c1: torch.Tensor, h2: torch.Tensor,
                c2: torch.Tensor):
        y1, (h1n, c1n) = self.lstm1(features, (h1, c1))
        y2, (h2n, c2n) = self.lstm2(y1, (h2, c2))
        return self.head(y2), h1n, c1n, h2n, c2n
