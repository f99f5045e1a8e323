"""The side path's forward passes (`side_path=True`): what each stock layer kind runs.

`Dense`, `EinsumDense` and a `ReversibleEmbedding`'s tied projection run
their stock product under a custom gradient (`_sliced_product`): the inputs
get `dy @ W^T`, the trained slices (or the block of slices that holds the
trainable elements, gathered at once) their gradient, the kernel none.
Convolutions and embeddings add a side term `f(x, D - stop_gradient(D))`,
exactly zero, whose gradient is the slices'. Each call falls back to the
stock one when the side path is off (`on()`: the model was recompiled with
another optimizer). `side` is a `_side_path.Side`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from masked_opt import _backend


def einsum_specs(equation: str) -> tuple[str, str, str]:
    inputs, out = equation.split("->")
    x, kernel = inputs.split(",")
    return x, kernel, out


def axis_in(spec: str, letter: str) -> int:
    """The axis of `letter` in an einsum operand spec (negative after an ellipsis)."""
    if "..." in spec:
        left, right = spec.split("...")
        return left.index(letter) if letter in left else right.index(letter) - len(right)
    return spec.index(letter)


def _zero_term(side: Any, dtype: Any) -> Any:
    """D - stop_gradient(D), in the slice block's shape: zero, with D's gradient."""
    d = ops.cast(ops.reshape(side.proxy, side.shape), dtype)
    return ops.subtract(d, ops.stop_gradient(d))


def _positions(indices: np.ndarray, size: int) -> np.ndarray:
    """Each of `size` positions' place in `indices`, `len(indices)` where absent."""
    pos = np.full(size, len(indices), np.int32)
    pos[indices] = np.arange(len(indices), dtype=np.int32)
    return pos


def _scatter_along(values: Any, indices: np.ndarray, size: int, axis: int) -> Any:
    """`values` (with len(indices) entries along `axis`) placed at `indices`
    of an axis of `size`, zero elsewhere, as a gather (an exact gradient)."""
    pos = _positions(indices, size)
    zero = ops.zeros_like(ops.take(values, np.zeros(1, np.int32), axis=axis))
    return ops.take(ops.concatenate([values, zero], axis=axis), pos, axis=axis)


def _sliced_product(forward: Any, specs: tuple[str, str, str], side: Any, inputs: Any, kernel: Any) -> Any:
    """`forward(inputs, kernel)` (the stock product, bit for bit), whose
    backward pass gives the inputs their gradient and the side path's proxy
    the slices' gradient (`x[..., rows]^T dy` or `x^T dy[..., columns]`) and
    the kernel none, with nothing kernel- or output-sized on the side: a
    custom gradient (falls back to the zero-valued side term where the
    backend has none)."""
    x_spec, k_spec, o_spec = specs
    letter = None if side.axis is None else k_spec[side.axis]
    contracted = None if letter is None else letter in x_spec
    kernel = ops.stop_gradient(kernel)
    d = ops.cast(ops.reshape(side.proxy, side.shape), inputs.dtype)

    @ops.custom_gradient
    def product(x: Any, d: Any) -> Any:
        kept = ops.take(x, side.indices, axis=axis_in(x_spec, letter)) if contracted else x
        wants_dx = _backend.requires_grad(x)  # torch: not below frozen layers (compilers drop it themselves)

        def grad(*args: Any, upstream: Any = None) -> Any:
            dy = args[0] if upstream is None else upstream
            dx = _contract(dy, o_spec, kernel, k_spec, x_spec) if wants_dx else None
            g = dy if contracted is not False else ops.take(dy, side.indices, axis=axis_in(o_spec, letter))
            (kept_, xs), (g_, os) = _collapse(kept, x_spec), _collapse(g, o_spec)
            dk = _contract(kept_, xs, g_, os, k_spec)
            if side.within is not None:  # elements: the block's weight gradient, gathered at once
                dk = ops.take(ops.reshape(dk, (-1,)), side.within, axis=0)
            return dx, dk

        return forward(x, kernel), grad

    return product(inputs, d)


def _contract(a: Any, a_spec: str, b: Any, b_spec: str, out: str) -> Any:
    """`einsum(f"{a_spec},{b_spec}->{out}", a, b)`; a plain matrix product where
    it is one (torch runs such an einsum as a slower batched product)."""
    if len(a_spec) == len(b_spec) == len(out) == 2 and a_spec[0] == b_spec[0] and a_spec[0] not in out:
        if out == a_spec[1] + b_spec[1]:  # Z?, Z? -> ??: the contraction over rows
            return ops.matmul(ops.transpose(a), b)
        if out == b_spec[1] + a_spec[1]:
            return ops.matmul(ops.transpose(b), a)
    return ops.einsum(f"{a_spec},{b_spec}->{out}", a, b)


def _collapse(t: Any, spec: str) -> tuple[Any, str]:
    """`t` with the dimensions its spec's ellipsis covers merged into one
    named `Z` (TensorFlow's einsum cannot sum over an ellipsis)."""
    if "..." not in spec:
        return t, spec
    left, right = spec.split("...")
    shape = ops.shape(t)
    tail = [shape[len(shape) - len(right) + i] for i in range(len(right))]
    return ops.reshape(t, [shape[i] for i in range(len(left))] + [-1] + tail), f"{left}Z{right}"


def _linear_call(layer: Any, side: Any, on: Any, specs: tuple[str, str, str], forward: Any) -> Any:
    stock = type(layer).call.__get__(layer)

    def call(inputs: Any, training: Any = None) -> Any:
        if not on():
            return stock(inputs, training=training)
        x = _sliced_product(forward, specs, side, inputs, layer.kernel)
        if layer.bias is not None:
            x = ops.add(x, layer.bias)
        return layer.activation(x) if layer.activation is not None else x

    return call


def _dense_call(layer: Any, side: Any, on: Any) -> Any:
    return _linear_call(layer, side, on, ("...i", "io", "...o"), ops.matmul)


def _einsum_call(layer: Any, side: Any, on: Any) -> Any:
    return _linear_call(layer, side, on, einsum_specs(layer.equation),
                        lambda x, kernel: ops.einsum(layer.equation, x, kernel))


def _embedding_call(layer: Any, side: Any, on: Any) -> Any:
    stock = type(layer).call.__get__(layer)
    vocabulary = layer.embeddings.shape[0]
    pos = _positions(side.indices, vocabulary)

    def call(inputs: Any) -> Any:
        if not on():
            return stock(inputs)
        if inputs.dtype != "int32" and inputs.dtype != "int64":
            inputs = ops.cast(inputs, "int32")
        table = ops.stop_gradient(layer.embeddings)
        outputs = ops.take(table, inputs, axis=0)
        d = _zero_term(side, outputs.dtype)
        rows = ops.concatenate([d, ops.zeros((1, d.shape[1]), d.dtype)], axis=0)
        outputs = ops.add(outputs, ops.take(rows, ops.take(pos, inputs, axis=0), axis=0))
        return ops.cast(outputs, dtype=layer.compute_dtype)

    return call


def _conv_call(layer: Any, side: Any, on: Any) -> Any:
    stock = type(layer).call.__get__(layer)
    channels = -1 if layer.data_format == "channels_last" else 1
    n_out = layer.kernel.shape[-1]

    def call(inputs: Any) -> Any:
        if not on():
            return stock(inputs)
        x = layer.convolution_op(inputs, ops.stop_gradient(layer.kernel))
        d = _zero_term(side, x.dtype)
        if side.axis == len(side.shape) - 2:  # input channels
            extra = layer.convolution_op(ops.take(inputs, side.indices, axis=channels), d)
        else:  # output channels
            extra = _scatter_along(layer.convolution_op(inputs, d), side.indices, n_out, channels)
        x = ops.add(x, extra)
        if layer.use_bias:
            shape = (1,) * (layer.rank + 1) + (layer.filters,) if channels == -1 else (1, layer.filters) + (1,) * layer.rank
            x = ops.add(x, ops.reshape(layer.bias, shape))
        return layer.activation(x) if layer.activation is not None else x

    return call


def _reversible_call(layer: Any, side: Any, on: Any) -> Any:
    """A `ReversibleEmbedding`: the lookup as `Embedding`'s; the tied output
    projection `h @ E^T` as a sliced product (rows of E are logits' columns)."""
    stock = type(layer).call.__get__(layer)
    lookup = _embedding_call(layer, side, on)

    def call(inputs: Any, reverse: bool = False) -> Any:
        if not on() or (reverse and not layer.tie_weights):  # untied: its own `reverse_embeddings`
            return stock(inputs, reverse=reverse)
        if not reverse:
            return lookup(inputs)
        table = layer.embeddings
        if layer.reverse_dtype is not None:
            inputs, table = ops.cast(inputs, layer.reverse_dtype), ops.cast(table, layer.reverse_dtype)
        logits = _sliced_product(lambda x, k: ops.matmul(x, ops.transpose(k)), ("...d", "vd", "...v"), side,
                                 inputs, table)
        if layer.logit_soft_cap is not None:
            cap = layer.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    return call


CALLS = {"Dense": _dense_call, "EinsumDense": _einsum_call, "Embedding": _embedding_call, "Conv": _conv_call,
          "ReversibleEmbedding": _reversible_call}
