"""`wmdeploy export tests/third_party/outside_lm/models/net.py:OutsideLM` must import this as part of its
package: the relative imports below failed with "attempted relative import with no known parent package"."""
import torch

from ..config import EMBED, HIDDEN, VOCAB
from ..layers import Head
from wmdeploy import StateSpec, StreamingSpec, TensorSpec


class OutsideLM(torch.nn.Module):
    """A token LM that declares no vocabulary in its spec (the common case for a user's own model)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(VOCAB, EMBED)
        self.gru = torch.nn.GRU(EMBED, HIDDEN, batch_first=True)
        self.head = Head()

    def streaming_spec(self) -> StreamingSpec:
        return StreamingSpec(inputs=[TensorSpec("tokens", ["batch", "time"], "int64")],
                             outputs=[TensorSpec("logits", ["batch", "time", VOCAB])],
                             states=[StateSpec("h", [1, "batch", HIDDEN])], chunk_invariant=True)

    def forward(self, tokens: torch.Tensor, h: torch.Tensor):  # type: ignore[no-untyped-def]
        y, h2 = self.gru(self.embed(tokens), h)
        return self.head(y), h2
