"""Which names an ONNX graph reads, subgraphs included: what the graph rewrites ask before they move or drop
a tensor (``merge_matmul``: is this weight read elsewhere; ``static_shapes``: is this node or initializer dead,
may this tensor be renamed); and which default-domain opset a model imports (which op versions they may write)."""
from __future__ import annotations

from collections import Counter
from typing import Any


def reads(graph: Any) -> Counter[str]:
    """How many node inputs of ``graph`` name each tensor, counting the nodes of every subgraph (If/Loop/Scan
    bodies read outer-scope names, weights included) at any depth. Graph outputs are not counted: callers that
    must keep them add them."""
    counts: Counter[str] = Counter()
    for node in graph.node:
        counts.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                counts.update(reads(sub))
    return counts


def default_opset(model: Any) -> int:
    """The version of the default ONNX domain ``model`` imports (0 if none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
