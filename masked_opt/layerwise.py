"""Layer-wise learning-rate decay (LLRD) as `multipliers=` for `MaskedOptimizer`.

`layerwise_decay(model, decay)` orders the layers of a model that hold
trainable weights from the input up, groups them into blocks, and gives the
top block the multiplier 1 and each block below `decay` times the block above
(the LLRD of ELECTRA, BEiT and DeBERTa fine-tuning). The result is a plain
dict of string keys, so it can be printed, edited and passed on::

    multipliers = layerwise_decay(model, 0.8)
    opt = MaskedOptimizer(keras.optimizers.AdamW(1e-4), multipliers=multipliers)

Order. A layer's *depth* is the longest chain of layers with trainable
weights from the model's inputs to it, following the functional graph (a
`Sequential` is a chain; nested functional models are followed inside;
other models' `layers` are taken as a chain in their listed order). Layers on
parallel branches at the same depth share a multiplier.

Blocks. By default a layer belongs to a block when its name looks like a
KerasHub backbone block (``transformer_layer_3``, ``decoder_block_0``,
``encoder_layer_1``, ...) or a `keras.applications` block prefix
(MobileNetV2 ``block_4_expand`` -> ``block_4``, ResNet ``conv3_block2_1_conv``
-> ``conv3_block2``, EfficientNet ``block2b_dwconv`` -> ``block2b``). When
some layer does, layers below the first block form one group (the stem:
embeddings, the first convolution), each block is a group, layers between
blocks join the block below them, and layers above the last block form the
head. When none does, every depth is its own group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras

from masked_opt import _compat
from masked_opt.keys import match_key

__all__ = ["DEFAULT_BLOCKS", "Blocks", "layerwise_decay"]

Blocks = None | str | Sequence[str] | Callable[[keras.layers.Layer], str | None]
"""`None` (the default patterns), a regex or a sequence of regexes matched at
the start of layer names (`re.match`; the block is group 1 if the pattern has
a group, else the matched text), or a callable `layer -> block name or None`.
An empty sequence turns grouping off: every depth is its own group."""

DEFAULT_BLOCKS: tuple[str, ...] = (
    # KerasHub backbones: transformer_layer_3, decoder_block_0, encoder_layer_1,
    # transformer_encoder_layer_2, disentangled_attention_encoder_layer_0,
    # xlnet_encoder_4, f_net_layer_1, rwkv_layer_0.
    r"([a-z_]*(?:transformer|encoder|decoder|f_net|rwkv)[a-z_]*_\d+)$",
    # keras.applications: block_4_expand, conv3_block2_1_conv, block2b_dwconv,
    # block1_conv1 (VGG, Xception), convnext_tiny_stage_1_block_0_...
    r"(.*?block_?\d+[a-z]?)(?:_|$)",
)
"""The block patterns `layerwise_decay` uses when `blocks=None`."""


@dataclass
class _Unit:
    """A layer holding trainable weights, at its lowest depth in the model."""

    name: str
    layer: keras.layers.Layer | None
    depth: int
    order: int
    variables: list = field(default_factory=list)


def _is_functional(model) -> bool:
    """A functional model (KerasHub backbones and tasks are): walk its graph.
    Others (`Sequential`, subclassed) are walked as a chain of `layers`."""
    return isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth")


class _Walker:
    def __init__(self):
        self.units: dict[int, _Unit] = {}

    def record(self, layer, depth: int) -> None:
        unit = self.units.get(id(layer))
        if unit is None:
            self.units[id(layer)] = _Unit(layer.name, layer, depth, len(self.units))
        elif depth < unit.depth:
            unit.depth = depth

    def step(self, layer, base: int) -> int:
        """Depth after `layer` (a layer, a model or an op such as `GetItem`)
        called on inputs at depth `base`."""
        if isinstance(layer, keras.Model):
            return self.walk(layer, base)
        if isinstance(layer, keras.layers.Layer) and layer.trainable_variables:
            self.record(layer, base + 1)
            return base + 1
        return base

    def walk(self, model, base: int) -> int:
        if _is_functional(model):
            out: dict[int, int] = {}
            top = base
            for depth in sorted(_compat.nodes_by_depth(model), reverse=True):
                for node in _compat.nodes_by_depth(model)[depth]:
                    parents = [out[id(p)] for p in node.parent_nodes if id(p) in out]
                    level = self.step(node.operation, max(parents, default=base))
                    out[id(node)] = level
                    top = max(top, level)
            return top
        level = base
        for layer in model.layers:
            level = self.step(layer, level)
        return level


def _block_of(blocks: Blocks) -> Callable[[_Unit], str | None]:
    if callable(blocks):
        def of_callable(unit: _Unit) -> str | None:
            if unit.layer is None:
                return None
            name = blocks(unit.layer)
            if name is not None and not isinstance(name, str):
                raise TypeError(
                    "`blocks` must return a block name (str) or None for each layer. "
                    f"Received: {name!r} of type {type(name).__name__} for layer {unit.name!r}."
                )
            return name

        return of_callable
    if blocks is None:
        blocks = DEFAULT_BLOCKS
    if isinstance(blocks, str):
        blocks = (blocks,)
    if not isinstance(blocks, Sequence) or not all(isinstance(b, str) for b in blocks):
        raise TypeError(
            "`blocks` must be None, a regex string, a sequence of regex strings or a "
            f"callable `layer -> block name or None`. Received: {blocks!r}."
        )
    patterns = []
    for b in blocks:
        try:
            patterns.append(re.compile(b))
        except re.error as e:
            raise ValueError(f"`blocks` pattern {b!r} is not a valid regex ({e}).") from None

    def of_patterns(unit: _Unit) -> str | None:
        for p in patterns:
            m = p.match(unit.name)
            if m:
                return m.group(1) if p.groups else m.group(0)
        return None

    return of_patterns


def _ranks(units: list[_Unit], block_of: Callable[[_Unit], str | None]) -> list[int]:
    """The group rank of each unit (0 = lowest), units sorted bottom-up."""
    names = [block_of(u) if u.layer is not None else None for u in units]
    if all(n is None for n in names):
        depths = sorted({u.depth for u in units})
        return [depths.index(u.depth) for u in units]
    last_block = max(i for i, n in enumerate(names) if n is not None)
    has_stem = names[0] is None
    rank_of: dict[str, int] = {}
    ranks, current = [], 0
    for i, name in enumerate(names):
        if name is not None:
            if name not in rank_of:
                rank_of[name] = len(rank_of) + int(has_stem)
            current = rank_of[name]
        elif i > last_block:  # the head
            current = len(rank_of) + int(has_stem)
        ranks.append(current)  # None below the first block: the stem (0)
    return ranks


def _check_fraction(value, *, name: str, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"`{name}` must be a float. Received: {value!r} of type {type(value).__name__}.")
    v = float(value)
    ok = math.isfinite(v) and (0 < v if low_open else 0 <= v) and v <= 1
    if not ok:
        interval = "0 < {} <= 1" if low_open else "0 <= {} <= 1"
        raise ValueError(
            f"`{name}` must be a finite number with {interval.format(name)}. Received: {name}={value!r}."
        )
    return v


def _key_for(unit: _Unit, variables: list) -> list[str]:
    """The shortest strings that select exactly `unit.variables` by the
    registry's rules: a layer name or path, else each exact path."""
    wanted = sorted(i for i, v in enumerate(variables) if any(v is w for w in unit.variables))
    dirs = [v.path.split("/")[:-1] for v in unit.variables]
    common = []
    for parts in zip(*dirs):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    for start in range(len(common) - 1, -1, -1):
        key = "/".join(common[start:])
        if sorted(match_key(key, variables, argument="multipliers")) == wanted:
            return [key]
    keys = []
    for v in unit.variables:
        hits = match_key(v.path, variables, argument="multipliers")
        if any(variables[i] is not v and not any(variables[i] is w for w in unit.variables) for i in hits):
            raise ValueError(
                f"layerwise_decay: variable path '{v.path}' is shared by variables of "
                "different layers, so no string key selects only one of them. Give "
                "the layers distinct names (or build the models under distinct names)."
            )
        keys.append(v.path)
    return list(dict.fromkeys(keys))


def layerwise_decay(
    model: keras.Model,
    decay: float,
    *,
    blocks: Blocks = None,
    min_multiplier: float = 0.0,
) -> dict[str, float]:
    """Layer-wise learning-rate decay multipliers: `{key: multiplier}`.

    The top group (the head) gets 1.0 and each group below `decay` times the
    group above: a `Sequential` of three `Dense` layers with `decay=0.5`
    gives 0.25, 0.5 and 1.0. Pass the result as
    `MaskedOptimizer(inner, multipliers=layerwise_decay(model, 0.8))`.

    Args:
        model: a built `keras.Model` (functional, `Sequential`, a KerasHub
            backbone or task, a `keras.applications` model).
        decay: the ratio between a group's multiplier and the one above it,
            `0 < decay <= 1` (1 gives every variable 1.0).
        blocks: how layers are grouped (see `Blocks`): `None` recognises
            KerasHub blocks (``transformer_layer_{i}``, ``decoder_block_{i}``,
            ...) and `keras.applications` block prefixes (``block_{i}_``,
            ``conv{s}_block{b}_``, ``block{n}{x}_``); layers below the first
            block share the lowest multiplier (embeddings, stem), layers
            above the last share 1.0 (head). A regex such as
            ``r"(stage\\d+)_"`` groups by your own names; `()` turns
            grouping off (one group per depth).
        min_multiplier: a floor for every multiplier, `0 <= min_multiplier
            <= 1`, e.g. `1e-3` so the lowest layers of a deep model still move.

    Returns:
        A dict from string keys to floats, ordered from the lowest group to
        the top. Each key is a layer name or path (or, where no layer path
        selects a layer's variables alone, exact variable paths), checked to
        select exactly that layer's trainable variables by the rules of
        `masks=` keys; together the keys cover each trainable variable once.

    Raises:
        ValueError: `decay` or `min_multiplier` out of range, a model with no
            trainable variables (not built yet), an invalid `blocks` regex.
        TypeError: a non-number `decay`, a `blocks` of the wrong type.
    """
    decay = _check_fraction(decay, name="decay", low_open=True)
    floor = _check_fraction(min_multiplier, name="min_multiplier", low_open=False)
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a `keras.Model`. "
            f"Received: {model!r} of type {type(model).__name__}."
        )
    block_of = _block_of(blocks)
    variables = list(model.trainable_variables)
    if not variables:
        raise ValueError(
            f"layerwise_decay: model {model.name!r} has no trainable variables. "
            "Build it first (call it on data, or give it a `keras.Input`)."
        )
    walker = _Walker()
    top = walker.walk(model, 0)
    units = sorted(walker.units.values(), key=lambda u: (u.depth, u.order))
    owned: set[int] = set()
    for unit in units:  # a variable shared by two layers goes to the lower one
        unit.variables = [
            v for v in unit.layer.trainable_variables
            if id(v) not in owned and any(v is w for w in variables)
        ]
        owned.update(id(v) for v in unit.variables)
    rest = [v for v in variables if id(v) not in owned]
    if rest:  # e.g. a subclassed model's own weights: the head
        units.append(_Unit(model.name, None, top + 1, len(units), rest))
    units = [u for u in units if u.variables]
    ranks = _ranks(units, block_of)
    highest = max(ranks)
    out: dict[str, float] = {}
    for unit, rank in zip(units, ranks):
        value = max(decay ** (highest - rank), floor)
        for key in _key_for(unit, variables):
            out[key] = value
    return out
