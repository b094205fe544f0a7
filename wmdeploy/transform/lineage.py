"""What was done to a model file: the ``wmdeploy.lineage`` metadata entry, and the checked write.

Every transform (optimize, quantize) appends one record to a JSON list under ``wmdeploy.lineage`` in
the file's ``metadata_props``: the transform, the SHA-256 of the file it read, the options it ran with,
what it changed, and the tool versions. The list keeps the whole history (export -> optimize ->
quantize), so a shipped file says where it came from without side files.

``load_transform_source`` (``load_onnx`` behind a refusal to overwrite the source) and ``save_checked``
are the two ends every transform goes through: a clear error for a file that is not ONNX, and a write
that re-reads the result and checks that the spec survived (transform libraries rebuild the ModelProto
and some drop or rewrite ``metadata_props``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

from ..contract import METADATA_KEY, StreamingSpec, read_spec, spec_from_metadata, write_spec
from ..errors import ModelFileError

LINEAGE_KEY = "wmdeploy.lineage"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_onnx(path: str | Path, *, need_spec: bool = True) -> tuple[Any, StreamingSpec | None]:
    """``onnx.load`` with one-line errors for a missing, corrupted or non-ONNX file (and its spec)."""
    import onnx  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node and not model.graph.output:
        # protobuf parses many byte strings as an empty message: an empty graph means "not ONNX"
        raise ModelFileError(f"{path}: not an ONNX model (no graph nodes or outputs after parsing)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelFileError(f"{path}: the ONNX model is invalid: {' '.join(str(exc).split())[:300]}") from None
    spec = None
    meta = {p.key: p.value for p in model.metadata_props}
    if need_spec or METADATA_KEY in meta:
        spec = spec_from_metadata(meta, str(path))
    return model, spec


def read_lineage(source: Any) -> list[dict[str, Any]]:
    """The lineage records of a path or ``onnx.ModelProto`` (``[]`` when none)."""
    if hasattr(source, "metadata_props"):
        meta = {p.key: p.value for p in source.metadata_props}
    else:
        import onnx  # noqa: PLC0415

        try:
            model = onnx.load(str(source), load_external_data=False)
        except Exception as exc:
            raise ModelFileError(f"{source}: not a readable ONNX model ({type(exc).__name__})") from None
        meta = {p.key: p.value for p in model.metadata_props}
    text = meta.get(LINEAGE_KEY)
    if not text:
        return []
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        raise ModelFileError(f"{source}: the '{LINEAGE_KEY}' metadata is not valid JSON") from None
    return records if isinstance(records, list) else []


def load_transform_source(source: Path, output: Path, error: type[Exception] = ModelFileError,
                          ) -> tuple[Any, StreamingSpec, list[dict[str, Any]]]:
    """The start of every transform: refuse an ``output`` that is the ``source`` itself (raising ``error``,
    the transform's own error type), then load the source with its spec and its lineage records."""
    if source.resolve() == output.resolve():
        raise error(f"{output}: the output must be a new file, not the source")
    model, spec = load_onnx(source)
    assert spec is not None
    return model, spec, read_lineage(model)


def _set_meta(model: Any, key: str, value: str) -> None:
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    for k, v in kept:
        model.metadata_props.add(key=k, value=v)
    model.metadata_props.add(key=key, value=value)


def make_record(transform: str, source: str | Path, options: dict[str, Any], **facts: Any) -> dict[str, Any]:
    import onnxruntime  # noqa: PLC0415

    from .. import __version__  # noqa: PLC0415

    return {
        "transform": transform,
        "source": Path(source).name,
        "source_sha256": file_sha256(source),
        "options": options,
        **facts,
        "tools": {"wmdeploy": __version__, "onnxruntime": onnxruntime.__version__},
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def save_checked(model: Any, path: str | Path, spec: StreamingSpec, lineage: list[dict[str, Any]],
                 record: dict[str, Any]) -> None:
    """Write ``model`` with ``spec`` and ``lineage + [record]`` in its metadata, then re-read and check both."""
    import onnx  # noqa: PLC0415

    path = Path(path)
    write_spec(model, spec)
    _set_meta(model, LINEAGE_KEY, json.dumps([*lineage, record]))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        onnx.save(model, str(path))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot write the model ({exc})") from None
    back = read_spec(path)
    if back.to_dict() != spec.to_dict():
        raise ModelFileError(f"{path}: the '{METADATA_KEY}' metadata did not survive the write")
    if read_lineage(path)[-1:] != [record]:
        raise ModelFileError(f"{path}: the '{LINEAGE_KEY}' metadata did not survive the write")
