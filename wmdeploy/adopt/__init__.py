"""Adopt a decoder file another exporter made: rewrite its graph into the layout of our ``export hf:`` files.

``wmdeploy annotate FILE -o OUT`` with no ``--state`` lands here. The convention is recognised from the graph
(or forced with ``--convention``):

* ``genai`` (:mod:`.genai`): ONNX Runtime GenAI's builder — ``GroupQueryAttention`` with one shared
  past/present buffer per layer, which becomes an in-place state;
* ``optimum`` (:mod:`.growing`): Optimum / transformers.js / onnx-community — a cache that grows by the chunk,
  wrapped into a fixed-capacity ping-pong state.

Either way the adopted file takes ``tokens [batch, time]`` int64, returns ``logits``, carries a per-row
``position [batch]`` int64 state, and computes ``attention_mask``/``position_ids`` (and so GenAI's ``seqlens_k``
and ``total_sequence_length``) inside the graph from that position (:mod:`.feeds`); the tokenizer, chat template,
eos/bos and context length come from the files beside it (:mod:`.beside`) into the metadata ``export hf:``
writes. The runtime therefore needs nothing new: an adopted file streams, pools streams at different positions,
snapshots, generates, chats and serves exactly like one of ours. Needs ``onnx`` (an authoring-time tool).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract import BATCH, ONNX_TYPE_CODES, StateSpec, StreamingSpec, TensorSpec, write_spec
from ..errors import ModelFileError, SpecError
from ..index_bounds import with_index_bounds
from . import genai, growing
from .beside import Beside, read_beside
from .feeds import POSITION, POSITION_OUT, TOKENS, PositionFeeds
from .graph import Surgery, dims, dtype
from .pairs import CachePair, pair_caches

CONVENTIONS = {"genai": genai.rewrite, "optimum": growing.rewrite}
#: the longest default context, as for ``export hf:`` (a KV cache costs capacity x layers x heads x head x 8 bytes)
DEFAULT_MAX_CONTEXT_CAP = 2048
#: inputs a convention feeds that the adopted graph computes (the attention mask is the convention module's)
_COMPUTED = ("attention_mask", "position_ids", "use_cache_branch")


@dataclass
class AdoptResult:
    path: Path
    spec: StreamingSpec
    convention: str
    notes: list[str] = field(default_factory=list)


def detect(s: Surgery, path: Path) -> str:
    """The convention of the file: GenAI when a graph input is a ``GroupQueryAttention`` past, else Optimum's
    growing cache when it has ``past*`` inputs."""
    if genai.uses_gqa(s):
        return "genai"
    if any(name.startswith("past") for name in s.inputs):
        return "optimum"
    raise SpecError(f"{path}: no past* cache inputs and no GroupQueryAttention, so it follows no known decoder "
                    "layout; name its state pairs with --state IN=OUT (or force one with --convention)")


def _capacity(pairs: list[CachePair], beside: Beside, requested: int | None, path: Path, notes: list[str]) -> int | None:
    """Rows per attention cache: ``--max-context`` or the files' context length (capped like ``export hf:``)."""
    kv = [p for p in pairs if p.kind != "state"]
    if not kv:
        return None
    limit = beside.context_length()
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 2:
            raise SpecError(f"--max-context {requested!r}: expected a token count of at least 2")
        if limit is not None and requested > limit:
            raise SpecError(f"--max-context {requested}: the files beside {path.name} allow at most {limit} positions")
        return requested
    if limit is None:
        raise SpecError(f"input '{kv[0].input}': the context length (the rows its cache holds) is unknown: no "
                        f"genai_config.json or config.json beside {path} gives one; pass --max-context N")
    value = min(limit, DEFAULT_MAX_CONTEXT_CAP)
    notes.append(f"--max-context {value} (the files allow {limit}; the default is capped at {DEFAULT_MAX_CONTEXT_CAP}: "
                 "pass --max-context to change it)")
    return value


def _tokens(s: Surgery, path: Path) -> Any:
    """``input_ids`` becomes our ``tokens`` (int64; a cast feeds an int32 graph); returns its batch dim name."""
    vi = s.inputs.get("input_ids")
    if vi is None:
        raise SpecError(f"{path}: no 'input_ids' input (inputs are {sorted(s.inputs)}); a decoder of this convention "
                        "takes token ids (adopt other files by hand with --state IN=OUT)")
    d = dims(vi)
    if len(d) != 2:
        raise SpecError(f"input 'input_ids': rank {len(d)}; expected [batch, sequence_length]")
    s.replace_input("input_ids")
    if dtype(vi) == "int64":
        s.rename_uses("input_ids", TOKENS)
    else:
        s.op("Cast", [TOKENS], "input_ids", out="input_ids", to=ONNX_TYPE_CODES[dtype(vi)])
    batch = d[0] if isinstance(d[0], str) else "batch_size"
    s.declare(TOKENS, "int64", [batch, "time"], output=False)
    return batch


def _others(s: Surgery, feeds: PositionFeeds, path: Path, caches: set[str]) -> None:
    """position_ids and use_cache_branch from the position; anything else left over is refused by name."""
    if "position_ids" in s.inputs:
        feeds.position_ids("position_ids", dtype(s.inputs.pop("position_ids")))
    if "use_cache_branch" in s.inputs:  # legacy merged decoders: our past is always given (maybe 0 rows long)
        feeds.constant("use_cache_branch", True, dtype(s.inputs.pop("use_cache_branch")))
    left = sorted(set(s.inputs) - caches)
    if left:
        name = left[0]
        raise SpecError(f"input '{name}': not an input of the recognised decoder conventions (tokens, {', '.join(_COMPUTED)}, "
                        "past*); adopt the file by hand with --state IN=OUT and --const")


def adopt(model_path: str | Path, out_path: str | Path, *, convention: str | None = None,
          max_context: int | None = None) -> AdoptResult:
    """Rewrite the decoder at ``model_path`` into our layout at ``out_path``; see the module doc."""
    try:
        import onnx  # noqa: PLC0415
    except ImportError:
        raise ModelFileError("annotate needs the 'onnx' package (pip install 'wmdeploy[export]')") from None
    path = Path(model_path)
    if convention is not None and convention not in CONVENTIONS:
        raise SpecError(f"--convention {convention!r}: expected one of {sorted(CONVENTIONS)}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    s = Surgery(model)
    beside = read_beside(path)
    notes: list[str] = []
    name = convention or detect(s, path)
    pairs = pair_caches(s.inputs, s.outputs, name)
    if "logits" not in s.outputs:
        raise SpecError(f"{path}: no 'logits' output (outputs are {sorted(s.outputs)}); expected a causal LM's logits")
    vocab = dims(s.outputs["logits"])[-1]
    if not isinstance(vocab, int):
        raise SpecError(f"output 'logits': its last axis is '{vocab or '?'}'; expected the vocabulary size as a fixed int")
    capacity = _capacity(pairs, beside, max_context, path, notes)
    feeds = PositionFeeds(s)
    states, extra = CONVENTIONS[name](s, feeds, pairs, capacity, beside)
    batch = _tokens(s, path)
    _others(s, feeds, path, {p.input for p in pairs})
    s.declare(POSITION, "int64", [batch], output=False)
    feeds.next_position()
    s.declare(POSITION_OUT, "int64", [batch], output=True)
    s.reshape(s.outputs["logits"], [batch, "time", vocab])
    dropped = [o for o in s.outputs if o != "logits" and o not in {p.output for p in pairs}]
    for o in dropped:
        s.drop_output(o)
    if dropped:
        notes.append(f"outputs {dropped} are not part of the streaming layout and were dropped")

    position = StateSpec(POSITION, [BATCH], "int64", output=POSITION_OUT,
                         doc="tokens this stream holds (the next token's position)")
    meta: dict[str, Any] = {
        "tokens_input": TOKENS, "logits_output": "logits", "vocab_size": vocab, "vocab": beside.vocab_meta(),
        "position_state": POSITION, **({"max_context": capacity} if capacity is not None else {}), **extra,
        "adopted": {"convention": name, "source": path.name, "model_type": beside.family},
    }
    spec = StreamingSpec([TensorSpec(TOKENS, [BATCH, "time"], "int64", doc="token ids")],
                         [TensorSpec("logits", [BATCH, "time", vocab], dtype(s.outputs["logits"]))],
                         [position, *states], meta=meta)
    s.finish(spec.graph_input_names, spec.graph_output_names)
    spec = with_index_bounds(spec, model)
    write_spec(model, spec)
    _write(model, beside, Path(out_path))
    if beside.tokenizer_json is None:
        notes.append(f"no tokenizer.json beside {path.name}: generate/chat take token ids only")
    return AdoptResult(Path(out_path), spec, name, notes)


def _write(model: Any, beside: Beside, out: Path) -> None:
    import onnx  # noqa: PLC0415

    from ..text._require import CHAT_TEMPLATE_KEY, TOKENIZER_KEY  # noqa: PLC0415  (the keys the runtime reads)

    kept = [p for p in model.metadata_props if p.key not in (TOKENIZER_KEY, CHAT_TEMPLATE_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in ((TOKENIZER_KEY, beside.tokenizer_json), (CHAT_TEMPLATE_KEY, beside.chat_template)):
        if value:
            model.metadata_props.add(key=key, value=value)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # protobuf's 2 GB limit: a bigger model keeps its weights in one external file beside it, as it came
        big = model.ByteSize() > 1_800_000_000
        onnx.save(model, str(out), save_as_external_data=big, all_tensors_to_one_file=True,
                  location=f"{out.name}.data" if big else None)
    except Exception as exc:
        raise ModelFileError(f"{out}: cannot write the adopted model ({type(exc).__name__}: {exc})") from None


__all__ = ["AdoptResult", "CONVENTIONS", "adopt", "detect"]
