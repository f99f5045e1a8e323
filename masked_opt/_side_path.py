"""The side path (`side_path=True`): kernels that train without their full weight gradient.

A kernel whose mask trains whole slices along one axis (rows, columns,
attention heads, a convolution's channels, an embedding's rows) trains
through its layer's forward pass (the S2FT rule: the full kernel is never
what the backward pass differentiates):

* `Dense`, `EinsumDense` (and a `ReversibleEmbedding`'s tied projection
  `h @ E^T`): the stock product under a custom gradient that gives the
  inputs `dy @ W^T`, the slices `x[..., rows]^T @ dy` or
  `x^T @ dy[..., columns]`, and the kernel nothing. An element mask of such
  a kernel gets the weight gradient of the smallest block of whole slices
  that holds its elements, gathered at once in the layer's backward step.
* `Conv1D/2D/3D`, `Embedding` (and a `ReversibleEmbedding`'s lookup): a side
  term (`conv(x[..., in], D - sg(D))`, `conv(x, D - sg(D))` scattered to
  its channels, `(D - sg(D))[rows]`), exactly zero, with the slices' gradient.

`D` is the kernel's compact-state proxy (its trainable elements,
row-major), made a trainable model variable held by a small layer in the
layer's `_layers` (which Keras's saving skips); the layer's `call` is
replaced on the instance. The forward pass is the stock layer's bit for
bit; each step the proxy is gathered from the kernel, updated with state of
its own size and written back, so there is nothing to merge and saved
files are stock layers with compact state (docs/sparse-fine-tuning.md).
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from masked_opt import _backend, _compat, _side_calls
from masked_opt._variable_table import Entry, VariableTable

_FIX = ("Use `masks.rows`/`masks.columns` (or a mask that trains whole slices along one axis), or "
        "`side_path=False`, which trains any mask through the full gradient.")


@dataclass(eq=False)
class Side:
    """The side path of one kernel."""

    layer: Any
    axis: int | None  # the kernel axis whose slices train (or hold the trainable elements); None: all
    indices: np.ndarray | None  # sorted, those slices along `axis`
    shape: tuple[int, ...]  # D's shape in the layer: the slice block's (elements: flat)
    proxy: keras.Variable  # D: the compact proxy, trainable and held by the layer
    within: np.ndarray | None = None  # elements: their flat positions in the block of slices (None: slices)

    @property
    def fixed(self) -> str:
        """What the layer's forward pass fixes at build, for errors."""
        return "trainable elements" if self.within is not None else f"slices along axis {self.axis}"


class _Holder(keras.layers.Layer):
    """Holds a side path's `D` among its layer's sublayers while the side path
    is in use (`on()`); after a recompile with another optimizer it holds
    nothing, so the model's variables are the stock layers' again."""

    def __init__(self, on: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self._on = on
        self.built = True

    @property
    def weights(self) -> list:
        return super().weights if self._on() else []

    @property
    def variables(self) -> list:
        return super().variables if self._on() else []


_HELD: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> a proxy a layer holds


def without_held(variables: list) -> list:
    """`variables` without any side path's proxy (the model's own variables)."""
    return [v for v in variables if _HELD.get(id(v)) is not v]


def check_arguments(side_path: Any, compact_state: bool, capacity: Any) -> None:
    if not isinstance(side_path, bool):
        raise TypeError(f"`side_path` must be True or False. Received: {side_path!r}.")
    if side_path and not compact_state:
        raise ValueError("`side_path=True` trains each slice's elements on compact state (state of the slices' "
                         "size): pass `compact_state=True` as well.")
    if side_path and capacity is not None:
        raise ValueError("`side_path=True` fixes each side-path kernel's slices at build, so compact state holds "
                         f"exactly them: leave `compact_capacity` at None. Received: {capacity!r}.")


def slice_axis(full: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(axis, trained indices) where `full` trains whole slices along one
    axis and freezes the rest, else None."""
    if full.ndim < 2 or full.all() or not full.any():
        return None
    for axis in range(full.ndim):
        others = tuple(a for a in range(full.ndim) if a != axis)
        along = full.any(axis=others)
        if np.array_equal(full, np.broadcast_to(np.expand_dims(along, others), full.shape)):
            return axis, np.flatnonzero(along)
    return None


def _layers_of(model: Any, variables: list) -> dict[int, Any]:
    """id(variable) -> the layer that owns it, from the model (else from every live layer)."""
    layers = _compat.flatten_layers(model) if model is not None else [
        o for o in gc.get_objects() if issubclass(type(o), keras.layers.Layer)]
    wanted = {id(v) for v in variables}
    out = {}
    for layer in layers:
        for v in _compat.own_trainable_variables(layer):
            if id(v) in wanted:
                out.setdefault(id(v), layer)
    return out


def _kind(layer: Any, variable: Any) -> str | None:
    L = keras.layers
    kinds = {L.Dense: "Dense", L.EinsumDense: "EinsumDense", L.Embedding: "Embedding", L.Conv1D: "Conv",
             L.Conv2D: "Conv", L.Conv3D: "Conv"}
    kind = kinds.get(type(layer))
    if type(layer).__name__ == "ReversibleEmbedding" and type(layer).__module__.startswith(("keras.", "keras_hub.")):
        kind = "ReversibleEmbedding"  # Keras's or KerasHub's: a lookup, and a tied output projection
    attr = "embeddings" if kind in ("Embedding", "ReversibleEmbedding") else "kernel"
    return kind if kind is not None and getattr(layer, attr, None) is variable else None


def _check_layer(layer: Any, kind: str | None, entry: Entry, axis: int) -> None:
    path = entry.path
    if kind is None:
        raise ValueError(
            f"`side_path=True`: variable '{path}' of layer '{layer.name}' ({type(layer).__name__}) trains whole "
            f"slices along axis {axis}, but the side path serves only the kernels of stock `Dense` and "
            "`EinsumDense` and `Conv1D/2D/3D` layers and the table of a stock `Embedding` or "
            "`ReversibleEmbedding` (a subclass may compute otherwise). "
            "Give this variable an element mask (it then trains on compact state through its full gradient), "
            "or use `side_path=False`.")
    if _is_modified(layer):
        raise ValueError(
            f"`side_path=True`: layer '{layer.name}' is quantized or has LoRA enabled, so its kernel is not the "
            "float weight its forward pass multiplies by. Train it with `side_path=False`, or before "
            "`quantize`/`enable_lora`.")
    if kind in ("Embedding", "ReversibleEmbedding") and axis != 0:
        raise ValueError(
            f"`side_path=True`: the mask of '{path}' trains columns (feature axis) of an embedding table, whose "
            "gradient spans every row; the side path trains rows (tokens) of a table. Use `masks.rows`, or "
            "an element mask with `side_path=False`.")
    if kind == "Conv" and (axis < len(entry.variable.shape) - 2 or getattr(layer, "groups", 1) != 1):
        raise ValueError(
            f"`side_path=True`: the mask of '{path}' (layer '{layer.name}') trains slices along axis {axis}; the side "
            "path trains a convolution's input or output channels (its kernel's last two axes) with `groups=1`. "
            f"{_FIX}")
    if kind == "EinsumDense":
        letter = _side_calls.einsum_specs(layer.equation)[1][axis]
        ins, _, out = _side_calls.einsum_specs(layer.equation)
        if (letter in ins) == (letter in out):
            raise ValueError(
                f"`side_path=True`: axis {axis} of '{path}' is '{letter}' in the equation '{layer.equation}', which "
                "is in both or neither of its input and output; the side path trains slices along an axis that "
                f"is contracted (input only) or produced (output only). {_FIX}")


def _takes_elements(layer: Any, kind: str | None) -> bool:
    """A stock Dense, or an EinsumDense each of whose kernel letters is in its input or output (so the
    kernel's weight gradient is one einsum), neither quantized nor LoRA-enabled."""
    if kind == "EinsumDense":
        ins, k_spec, out = _side_calls.einsum_specs(layer.equation)
        if not all(letter in ins + out for letter in k_spec):
            return False
    return kind in ("Dense", "EinsumDense") and not _is_modified(layer)


def _is_modified(layer: Any) -> bool:
    """Quantized or LoRA-enabled: the kernel is not the float weight the forward pass multiplies by."""
    return bool(getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False))


def attach(table: VariableTable, owner: Any, optimizer: Any) -> dict[Any, Side]:
    """Sets up the side path of every kernel whose mask trains whole slices:
    its proxy becomes a trainable variable held by its layer, whose `call`
    gains the side term while `optimizer` is its owner model's (a model
    recompiled with another optimizer trains its kernels as stock layers)."""

    def on() -> bool:
        model = owner.model()
        opt = None if model is None else getattr(model, "optimizer", None)
        return model is None or opt is optimizer or getattr(opt, "inner_optimizer", None) is optimizer

    candidates = []
    for entry in table.masked():
        if entry.compact is None or len(entry.variable.shape) < 2:
            continue
        count = int(_backend.to_numpy(entry.compact.count))
        if count != entry.compact.capacity:
            continue  # padded (a saved capacity): the compact path
        flat = _backend.to_numpy(entry.compact.indices)[:count]  # sorted: the proxy's order
        full = np.zeros(entry.size, bool)
        full[flat] = True
        candidates.append((entry, slice_axis(full.reshape(tuple(entry.variable.shape))), flat))
    owners = _layers_of(owner.model(), [e.variable for e, _, _ in candidates])
    sides = {}
    for entry, found, flat in candidates:
        layer = owners.get(id(entry.variable))
        if layer is None:
            continue  # not a layer's variable: the compact path
        kind = _kind(layer, entry.variable)
        if found is None:  # elements: a Dense or EinsumDense kernel gathers its own gradient, else the compact path
            if not _takes_elements(layer, kind) or len(flat) in (0, entry.size):
                continue
            axis, indices, within = _element_block(layer, tuple(entry.variable.shape), flat)
            shape = (len(flat),)
        else:
            (axis, indices), within = found, None
            _check_layer(layer, kind, entry, axis)
            shape = tuple(len(indices) if a == axis else n for a, n in enumerate(entry.variable.shape))
        proxy = entry.compact.proxy  # made trainable (`CompactLayout.trainable_proxies`): TF's tape watches it
        side = Side(layer, axis, indices, shape, proxy, within)
        _compat.hold_in_sublayers(layer, _Holder(on, name=f"{layer.name}_side_path"), proxy)
        _HELD[id(proxy)] = proxy
        layer.call = _side_calls.CALLS[kind](layer, side, on)
        entry.side = side
        sides[table.key(entry.variable)] = side
    return sides


def _element_block(layer: Any, shape: tuple[int, ...], flat: np.ndarray) -> tuple[Any, Any, np.ndarray]:
    """(axis, slices, positions): the smallest block of whole slices along one
    axis the side path can take (Dense: rows or columns; EinsumDense: an axis
    in the input only or the output only) that holds the trainable elements
    `flat`, and their flat positions in it (row-major, as in the kernel);
    (None, None, flat) where every slice holds one."""
    coords = np.unravel_index(flat, shape)
    if type(layer) is keras.layers.Dense:
        axes = range(len(shape))
    else:
        ins, k_spec, out = _side_calls.einsum_specs(layer.equation)
        axes = [a for a, letter in enumerate(k_spec) if (letter in ins) != (letter in out)]
    best, size = (None, None, flat), int(np.prod(shape))
    for a in axes:
        slices = np.unique(coords[a])
        block = tuple(len(slices) if i == a else n for i, n in enumerate(shape))
        if int(np.prod(block)) < size:
            inside = [np.searchsorted(slices, c) if i == a else c for i, c in enumerate(coords)]
            best, size = (a, slices, np.ravel_multi_index(inside, block)), int(np.prod(block))
    return best


def attach_loaded(table: VariableTable, owner: Any, optimizer: Any, key: Any) -> dict[Any, Side]:
    """`attach` for an optimizer built before its masks were loaded: the
    proxies join the lists it (and a LossScaleOptimizer around it) was built on."""
    sides = attach(table, owner, optimizer)
    outer = getattr(owner.model(), "optimizer", None)
    for opt in (optimizer, outer if getattr(outer, "inner_optimizer", None) is optimizer else None):
        if opt is not None:
            _compat.set_built_on(opt, with_proxies(_compat.built_on(opt), sides, key))
    return sides


def with_proxies(variables: list, sides: dict[Any, Side], key: Any) -> list:
    """`variables` with each side path's proxy right after its layer's own
    variables: the order of `model.trainable_variables` once they are held."""
    if not sides:
        return list(variables)
    last = {}
    layers = {id(s.layer): s for s in sides.values()}
    for i, v in enumerate(variables):
        for s in layers.values():
            if any(v is w for w in _compat.own_trainable_variables(s.layer)):
                last[id(s.layer)] = i
    out = []
    for i, v in enumerate(variables):
        out.append(v)
        out.extend(s.proxy for s in sides.values() if last.get(id(s.layer)) == i)
    return out


# --------------------------------------------------------------- a step


def fold(table: VariableTable, owner: Any, sides: dict[Any, Side], grads: list, variables: list) -> tuple[list, list]:
    """Hands each side-path kernel its proxy's gradient, flat (the compact
    gradient), in its own place; the kernel's own gradient, which its layer
    stops, is dropped. A step that differentiated the kernel but not its
    proxy (TensorFlow's first trace, which builds the optimizer after the
    forward pass; a custom loop's list taken before build) keeps the
    kernel's full gradient, which compact state gathers; in `fit` the next
    step traces anew with the side path."""
    if not sides:
        return grads, variables
    proxy_at = {id(s.proxy): k for k, s in sides.items()}
    from_proxy, out_g, out_v = {}, [], []
    for g, v in zip(grads, variables):
        k = proxy_at.get(id(v))
        if k is None:
            out_g.append(g)
            out_v.append(v)
        elif g is not None:
            from_proxy[k] = ops.reshape(_backend.densify(g), (-1,))
            _backend.release_grad(v)  # torch: the trainer's `zero_grad` does not reach it
    stale = False
    for i, v in enumerate(out_v):
        k = table.key(v)
        if k in sides:
            stale = stale or (k not in from_proxy and out_g[i] is not None)
            out_g[i] = from_proxy.pop(k, out_g[i])
    for k, g in from_proxy.items():  # differentiated the proxy without the kernel
        out_g.append(g)
        out_v.append(next(e.variable for e in table if table.key(e.variable) == k))
    if stale and owner.in_train_step():
        owner.retrace_train_function()
    return out_g, out_v
