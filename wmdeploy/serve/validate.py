"""What a step may carry, checked on the event loop before anything is queued (so a rejected step never
reaches a batch, never touches its session, and never delays another).

On top of :func:`wmdeploy._inputs.check_inputs` (names, dtypes, ranks, fixed dims, batch axis 1):

* **chunk length** (the spec's time axis, ``meta.time_axis`` or ``"time"``) at most ``--max-chunk``:
  413, because one giant chunk would hold the engine (and every session batched with it) for as long
  as it likes;
* **NaN / Inf in float inputs**: refused with 400 naming the tensor. A recurrent state that once takes
  a NaN keeps it forever: every later output of that session is NaN, and with ``--persist`` the poisoned
  state is made durable. No streaming model of ours has a use for non-finite inputs, so the server
  refuses them at the door, where the client still has the chunk and can fix it;
* **token ids** of a language model (``meta.tokens_input`` in ``[0, meta.vocab_size)``): 400. An
  out-of-range id makes the engine's Gather fail, and an engine failure would otherwise fail the whole
  batch it was in (the batcher also isolates such failures, see :mod:`.batcher`, but a clear message
  naming the tensor is better than an engine error).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .._inputs import check_inputs
from ..contract import StreamingSpec
from ..errors import InputError, WmdeployError

DEFAULT_MAX_CHUNK = 4096


class TooLarge(InputError):
    """A request over a size limit (body bytes or chunk length): 413."""


class Overloaded(WmdeployError):
    """The engine queue is full: 503, retry later."""


def resolve_max_chunk(spec: StreamingSpec, flag: int | None) -> int:
    """``--max-chunk``, else the model's ``meta.max_chunk``, else 4096; never above ``meta.max_chunk``."""
    meta = spec.meta.get("max_chunk")
    limit = int(flag) if flag is not None else int(meta) if meta else DEFAULT_MAX_CHUNK
    return min(limit, int(meta)) if meta else limit


class StepCheck:
    """``check(inputs) -> feeds`` for one session's step (batch axis 1); raises ``InputError``/``TooLarge``."""

    def __init__(self, spec: StreamingSpec, max_chunk: int) -> None:
        self.spec, self.max_chunk = spec, max_chunk
        self.time_axis = str(spec.meta.get("time_axis", "time"))
        self.floats = tuple(t.name for t in spec.inputs if t.np_dtype.kind == "f")

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # 1e300 -> inf as float32: refused below
                feeds, sizes = check_inputs(self.spec, inputs, 1)
        except (TypeError, OverflowError, RecursionError) as exc:  # exotic nesting that numpy trips over
            raise InputError(f"inputs: cannot make arrays of them ({type(exc).__name__}: {exc})") from None
        chunk = sizes.get(self.time_axis)
        if chunk is not None and chunk > self.max_chunk:
            raise TooLarge(f"chunk length {chunk} (axis '{self.time_axis}'): the limit is {self.max_chunk} "
                           "(--max-chunk); split it into several steps")
        for name in self.floats:
            if not np.isfinite(feeds[name]).all():
                raise InputError(f"input '{name}': holds NaN or Inf; the server refuses non-finite values "
                                 "(they would poison the session's memory for good)")
        return feeds  # token ids outside the vocabulary were refused by check_inputs
