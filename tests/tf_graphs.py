"""Walking a traced TensorFlow graph (tests and `benchmarks/bench_sparse.py`).

No pytest here, so a benchmark script can import it
(`harness.use_test_support()`).
"""

from __future__ import annotations


def graph_ops(graph):
    """Every op of a traced TF graph, those inside `cond`/`while` branches included."""
    for op in graph.get_operations():
        yield op
        for attr in ("then_branch", "else_branch", "body", "cond"):
            try:
                name = op.get_attr(attr).name
            except (ValueError, AttributeError):
                continue
            function = graph._get_function(name)
            if function is not None:
                yield from graph_ops(function.graph)
