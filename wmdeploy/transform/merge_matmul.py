"""Merge MatMuls that read the same activation with constant weights into one MatMul and a Split.

A transformer layer projects one normalised hidden state three times (q, k, v) and its MLP twice (gate, up):
five weight reads, five kernel launches. One MatMul over the concatenated weights reads the same bytes in one
pass and launches once; a ``Split`` along the last axis gives the original outputs back, so everything
downstream is untouched. ONNX Runtime GenAI's builder packs the same projections; with 4-bit weights at batch
1, where a step is a handful of memory-bound kernels, the launches are a measurable part of it
(``bench/bench_lm.py``). Exact: each output column is the same dot product as before.

Only MatMuls whose second input is a 2-D float initializer that nothing else reads (no other node or subgraph,
not a graph input or output) are merged (what ``int4`` then quantizes), in groups that share the first input
and the weight's row count, at opset 13 or later (``Split``'s sizes input); else the graph is unchanged.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from .graph_reads import default_opset, reads


def merge_sibling_matmuls(model: Any) -> int:
    """Rewrite ``model`` (an ``onnx.ModelProto``) in place; return how many MatMuls were merged away."""
    import numpy as np  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    if default_opset(model) < 13:
        return 0  # Split takes its sizes as an input from opset 13 on
    inits = {i.name: i for i in graph.initializer}
    uses = reads(graph)  # subgraphs (If/Loop/Scan bodies) read outer-scope weights by name too
    for vi in (*graph.input, *graph.output):  # an overridable default (an input too) or a graph output
        uses[vi.name] += 1
    groups: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = inits.get(node.input[1])
        # a weight another node also reads stays where it is (tied embeddings, shared projections)
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT or uses[node.input[1]] != 1:
            continue
        groups[(node.input[0], int(w.dims[0]))].append(node)
    merged = 0
    order = {id(n): i for i, n in enumerate(graph.node)}  # the nodes' own order within a group
    for (x, _rows), nodes in groups.items():
        if len(nodes) < 2:
            continue
        nodes.sort(key=lambda n: order[id(n)])
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        base = nodes[0].name or nodes[0].output[0]
        wname, yname, sname = f"{base}.merged_weight", f"{base}.merged_out", f"{base}.merged_split"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), wname))
        graph.initializer.append(numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), sname))
        matmul = helper.make_node("MatMul", [x, wname], [yname], name=f"{base}.merged")
        split = helper.make_node("Split", [yname, sname], [n.output[0] for n in nodes], axis=-1,
                                 name=f"{base}.merged_split")
        # where the first of them is: its input is ready there and every consumer of any output comes later
        at = next(i for i, n in enumerate(graph.node) if n is nodes[0] or n == nodes[0])
        graph.node.insert(at, split)
        graph.node.insert(at, matmul)
        for n in nodes:
            graph.node.remove(n)
            graph.initializer.remove(inits[n.input[1]])
        merged += len(nodes) - 1
    return merged
