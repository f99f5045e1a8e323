"""Saving a `MaskedOptimizer`: `Saving` owns its config, its weights-file state and every load decision.

The config holds keys and storage shapes only (JSON, no arrays); mask and
multiplier values live in the optimizer's variables, which Keras saves by
position. Keras only *warns* when the saved variable count differs and
assigns by position when it matches, so the weights file also carries a
small JSON record of which masks and multipliers it holds, and loading
refuses a file whose masks differ. The functions here work on the
optimizer's table and registries, passed in: this module never imports the
optimizer.

The inner optimizer's config names public Keras classes only, so a file
saved under one backend rebuilds the loading backend's optimizer
(`inner_config` / `inner_from_config`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from masked_opt import _backend, _compat, _inner_optimizer
from masked_opt._variable_table import VariableTable
from masked_opt.keys import match_key
from masked_opt.registry import MASKS, MULTIPLIERS, Quantity, Registry

META_KEY = "masked_opt_meta"


def config_key(quantity: Quantity) -> str:
    """The config key of a quantity's entries ("mask_entries", "multiplier_entries")."""
    return f"{quantity.noun}_entries"


SPEC_KEYS = {"masks": "masked_opt_spec_{}", "multipliers": "masked_opt_multiplier_spec_{}"}
"""Arrays given before build, saved by an optimizer saved before it was built."""


@dataclass
class ConfigValue:
    """A mask or multiplier known from a config only; its values come from the
    saved weights."""

    shape: tuple[int, ...] | None
    index: int | None = None  # position among the trainable variables
    entry: int = 0  # position in the config's entries
    capacity: int | None = None  # compact_state: the saved capacity


# ------------------------------------------------------------- config


def saved_variables(table: VariableTable, variables: list) -> list:
    """The optimizer's variables but the bit-packed mask copies (derived, and
    backend-dependent): what its saved weights hold."""
    packed = {id(e.bits) for e in table.masked() if e.bits is not None}
    return [v for v in variables if id(v) not in packed]


def entries(table: VariableTable, registry: Registry, built: bool) -> list[dict]:
    """Config entries of one quantity: after build, one per variable (path,
    storage shape, position, compact capacity); before, one per key."""
    if not built:
        return _unbuilt_entries(registry)
    is_mask = registry.quantity is MASKS
    out = []
    for e in table.masked() if is_mask else table.multiplied():
        entry = {"key": e.path, "shape": list(e.mask_shape if is_mask else e.multiplier_shape), "index": e.position}
        if is_mask and e.compact is not None:
            entry["capacity"] = e.compact.capacity
        out.append(entry)
    return out


def _unbuilt_entries(registry: Registry) -> list[dict]:
    """A scalar by value, an array by shape (its values go in the weights
    file), a callable without a shape (not saved)."""
    scalar = bool if registry.quantity is MASKS else float
    out = []
    for key, value in registry.specs:
        key = key if isinstance(key, str) else key.path
        if isinstance(value, ConfigValue):
            entry = {"key": key, "shape": None if value.shape is None else list(value.shape)}
            if value.index is not None:
                entry["index"] = value.index
        elif isinstance(value, np.ndarray) and value.ndim == 0:
            entry = {"key": key, "value": scalar(value)}
        else:
            entry = {"key": key, "shape": None if callable(value) else list(value.shape)}
        out.append(entry)
    return out


def specs_from_config(entries: list[dict], quantity: Quantity) -> list[tuple[str, Any]]:
    specs = []
    for j, entry in enumerate(entries):
        if "value" in entry:
            specs.append((entry["key"], np.asarray(entry["value"], quantity.dtype)))
        else:
            shape = entry.get("shape")
            shape = None if shape is None else tuple(shape)
            specs.append((entry["key"], ConfigValue(shape, entry.get("index"), j, entry.get("capacity"))))
    return specs


def paths_compatible(a: str, b: str) -> bool:
    """Same variable path, up to a scope prefix (a reloaded Sequential drops its own)."""
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def bind_config_specs(
    registry: Registry, variables: Sequence[keras.Variable], key: Callable
) -> tuple[dict[int, list], dict[Any, int | None], list[str]]:
    """Binds specs rebuilt from a config to the variables at their saved
    positions (paths can lose a Sequential prefix across save/load) and holds
    them at zero (frozen) until the saved values are loaded (fail-safe).

    Returns ({config entry: [variable keys]}, {variable key: saved compact
    capacity}, [paths awaiting values])."""
    quantity = registry.quantity
    specs = list(registry.specs)
    targets, capacities, unset = {}, {}, []
    for j, (spec_key, value) in enumerate(specs):
        if not isinstance(value, ConfigValue):
            continue
        i = value.index
        if i is not None and i < len(variables) and paths_compatible(spec_key, variables[i].path):
            spec_key = variables[i]
        shape = value.shape
        specs[j] = (spec_key, lambda v, s=shape: np.zeros(v.shape if s is None else s, quantity.dtype))
        hits = match_key(spec_key, variables, argument=quantity.argument)
        unset.extend(variables[i].path for i in hits if variables[i].path not in unset)
        for i in hits:
            capacities[key(variables[i])] = value.capacity
        targets[value.entry] = [key(variables[i]) for i in hits]
    registry.bind_saved(specs)
    return targets, capacities, unset


# ------------------------------------------------------- inner optimizer


def inner_config(inner: keras.optimizers.Optimizer) -> dict:
    """The `keras.saving` config of the inner optimizer, with every built-in
    Keras optimizer in it (a MultiOptimizer's too) named by its public class.

    On torch, `keras.optimizers.AdamW(...)` returns a subclass from
    `keras.src.backend.torch.optimizers`, and `keras.saving` records that
    private module: loaded under another backend, the file would rebuild
    torch's optimizer there, which fails at the first step. Named
    `keras.optimizers.AdamW`, it becomes the loading backend's own AdamW.
    """
    return _public_optimizer_classes(keras.saving.serialize_keras_object(inner))


def inner_from_config(config: dict, custom_objects: Any = None) -> keras.optimizers.Optimizer:
    """The inner optimizer rebuilt from `inner_config`'s output, or from a
    config that still names a backend's private class."""
    return keras.saving.deserialize_keras_object(_public_optimizer_classes(config), custom_objects=custom_objects)


def _public_optimizer_classes(config: Any) -> Any:
    if isinstance(config, list):
        return [_public_optimizer_classes(c) for c in config]
    if not isinstance(config, dict):
        return config
    out = {k: _public_optimizer_classes(v) for k, v in config.items()}
    module, name = out.get("module"), out.get("class_name")
    if isinstance(module, str) and module.startswith(_compat.BACKEND_MODULE_PREFIX) and isinstance(name, str):
        public = getattr(keras.optimizers, name, None)
        if isinstance(public, type) and issubclass(public, keras.optimizers.Optimizer):
            out["module"] = "keras.optimizers"
            out["registered_name"] = None
    return out


# ------------------------------------------------------------ weights file


def meta(table: VariableTable, built: bool, num_variables: int) -> dict:
    """The JSON record a weights file carries (key order is part of the format)."""
    masked = table.masked()
    return {
        "built": bool(built),
        "masks": [[e.path, list(e.mask_shape)] for e in masked],
        "capacities": [None if e.compact is None else e.compact.capacity for e in masked],
        "num_variables": num_variables,
        "multipliers": [[e.path, list(e.multiplier_shape)] for e in table.multiplied()],
    }


def save_state(store: Any, variables: list, record: dict, registries: Sequence[Registry], name: str) -> None:
    """Writes the optimizer's variables by position, the record, and (saved
    before build) the arrays given to the registries."""
    for i, variable in enumerate(variables):
        store[str(i)] = _backend.to_numpy(variable)
    store[META_KEY] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    if record["built"]:
        return
    lost = []
    for registry in registries:
        argument = registry.quantity.argument
        lost += [repr(k) for k, v in registry.specs if callable(v)]
        lost += [f"{registry.quantity.methods[op.kind]}({op.key!r})" for op in registry.ops]
        for j, (_, value) in enumerate(registry.specs):
            if isinstance(value, np.ndarray) and value.ndim > 0:
                dtype = np.uint8 if registry.quantity is MASKS else np.float32
                store[SPEC_KEYS[argument].format(j)] = value.astype(dtype)
    if lost:
        warnings.warn(
            f"MaskedOptimizer '{name}' is saved before it was built, so mask "
            f"callables and recorded calls ({', '.join(lost)}) are not saved. "
            "Build it first (`model.optimizer.build(model.trainable_variables)`) "
            "to save the resolved masks.",
            stacklevel=3,
        )


def skip_next_load(inner: Any) -> None:
    """Keras walks into `inner_optimizer` after the wrapper and would load its
    state from the same file (the wrapper's record holds it already): make
    that one load a no-op."""

    def skip(store):
        del inner.load_own_variables

    inner.load_own_variables = skip


def warn_unbuilt(name: str) -> None:
    warnings.warn(
        f"Skipping the state of MaskedOptimizer '{name}': it is not built "
        "yet. Call `model.optimizer.build(model.trainable_variables)` before "
        "`load_weights` to restore masks and optimizer state.",
        stacklevel=4,
    )


def read_record(store: Any, name: str) -> dict:
    if META_KEY not in set(store.keys()):
        raise ValueError(
            f"Optimizer '{name}' is a MaskedOptimizer, but the saved optimizer "
            "state has no mask metadata (it was saved by another optimizer, or "
            "by a model compiled without one). "
            "Loading it would mix state; compile the model with the optimizer it "
            "was saved with."
        )
    return json.loads(bytes(np.asarray(store[META_KEY], dtype=np.uint8)).decode())


def saved_arrays(store: Any, registry: Registry, entry: int) -> np.ndarray | None:
    """The array saved before build for `registry`'s config entry `entry`."""
    name = SPEC_KEYS[registry.quantity.argument].format(entry)
    if name not in set(store.keys()):
        return None
    return np.asarray(store[name]).astype(registry.quantity.dtype)


def load_variables(store: Any, variables: list, saved: dict, own: dict, all_paths: list[str], name: str,
                   flexible: set[int] = frozenset()) -> list[tuple[Any, np.ndarray]]:
    """Assigns the saved values by position after checking that the file holds
    the same masks, multipliers and variable shapes as this optimizer. Returns
    the (variable, value) pairs whose sizes differ where one side holds
    nothing for a wholly frozen variable (`flexible`: the ids of this side's
    zero-size slots; a zero-size saved value): the layout settles them once
    the masks are loaded."""
    problems = _differences(saved, own, all_paths)
    arrays = [np.asarray(store[str(i)]) for i in range(min(saved["num_variables"], len(variables)))]
    deferred = []
    if not problems:
        for i, (variable, value) in enumerate(zip(variables, arrays)):
            if tuple(value.shape) != tuple(variable.shape) and (id(variable) in flexible or value.size == 0):
                deferred.append((variable, value))
            elif tuple(value.shape) != tuple(variable.shape):
                problems.append(f"optimizer variable {i} ('{variable.path}') saved with shape "
                                f"{tuple(value.shape)}, here {tuple(variable.shape)}")
                break
    if problems:
        raise ValueError(
            f"Cannot load the state of MaskedOptimizer '{name}': the saved masks "
            "do not match this optimizer's, and Keras loads optimizer variables by "
            "position, so loading would silently mix state. Differences: "
            + "; ".join(problems)
            + ". Build the optimizer with the same masks and multipliers (keys and "
            "shapes) as the saved one."
        )
    skip = {id(v) for v, _ in deferred}
    for variable, value in zip(variables, arrays):
        if id(variable) not in skip:
            variable.assign(value)
    return deferred


_AUTO_NUMBER = re.compile(r"_\d+$")


def _renamed(saved: list[str], own: list[str], all_paths: list[str]) -> bool:
    """Whether `saved` paths are `own` paths of a model rebuilt in the same
    process, where Keras numbered the model and its unnamed layers anew
    ("sequential_1/dense_2/kernel" -> "sequential_2/dense_5/kernel"): same
    components up to a consistent renaming `x_i -> x_j` (or `x -> x_j`), and
    no old name still names a layer here."""
    if len(saved) != len(own):
        return False
    existing = {part for path in all_paths for part in path.split("/")}
    renaming: dict[str, str] = {}
    for a, b in zip(saved, own):
        pa, pb = a.split("/"), b.split("/")
        if len(pa) != len(pb) or pa[-1] != pb[-1]:
            return False
        for x, y in zip(pa[:-1], pb[:-1]):
            if x == y:
                continue
            if _AUTO_NUMBER.sub("", x) != _AUTO_NUMBER.sub("", y) or x in existing:
                return False
            if renaming.setdefault(x, y) != y:
                return False
    return len(set(renaming.values())) == len(renaming)


def _same_entries(saved: list, own: list, all_paths: list[str]) -> bool:
    if len(saved) != len(own) or any(list(s) != list(o) for (_, s), (_, o) in zip(saved, own)):
        return False
    if all(paths_compatible(p, q) for (p, _), (q, _) in zip(saved, own)):
        return True
    return _renamed([p for p, _ in saved], [q for q, _ in own], all_paths)


def _differences(saved: dict, own: dict, all_paths: list[str]) -> list[str]:
    lines = []
    saved_masks, saved_mults = saved["masks"], saved.get("multipliers", [])
    if not _same_entries(saved_masks + saved_mults, own["masks"] + own["multipliers"], all_paths):
        lines += _mask_differences(saved_masks, own["masks"])
        saved_x = [(p, tuple(sh)) for p, sh in saved_mults]
        own_x = [(p, tuple(sh)) for p, sh in own["multipliers"]]
        if not _same_entries(saved_mults, own["multipliers"], all_paths):
            lines.append(f"multipliers saved {saved_x or 'none'}, here {own_x or 'none'}")
        lines = lines or ["same masks in a different order"]
    if saved.get("capacities", own["capacities"]) != own["capacities"]:
        lines.append(f"compact_state capacities saved {saved.get('capacities')}, here {own['capacities']}")
    if saved["num_variables"] != own["num_variables"]:
        lines.append(
            f"{saved['num_variables']} optimizer variables saved, "
            f"{own['num_variables']} here (a different inner optimizer?)"
        )
    return lines


def _mask_differences(saved: list, own: list) -> list[str]:
    saved_m = {p: tuple(s) for p, s in saved}
    own_m = {p: tuple(s) for p, s in own}
    lines = []
    for p in sorted(set(saved_m) | set(own_m)):
        mine = next((s for q, s in own_m.items() if paths_compatible(p, q)), None)
        theirs = next((s for q, s in saved_m.items() if paths_compatible(p, q)), None)
        if mine != theirs and not any(f"'{p}'" in line for line in lines):
            lines.append(
                f"'{p}': saved {'no mask' if theirs is None else theirs}, "
                f"this optimizer {'no mask' if mine is None else mine}"
            )
    return lines


# ------------------------------------------------------------ the owner


class Saving:
    """What one `MaskedOptimizer` saves and loads: its config (entries of
    masks and multipliers, rebuilt into its registries), its weights-file
    state (saved by position with the record) and the decisions of a load.
    Entries rebuilt from a config are bound to variables at build by
    `bind_config_specs`; only the registries write their specs."""

    def __init__(self, table: VariableTable, mask_store: Any, layout: Any, inner: Any):
        self.table, self.mask_store, self.layout, self.inner = table, mask_store, layout, inner

    @staticmethod
    def pop_config_entries(kwargs: dict) -> dict[Quantity, list]:
        """The specs of a saved config's entries, taken out of the
        constructor's `kwargs`, by quantity (their values come with the weights)."""
        return {q: specs_from_config(kwargs.pop(config_key(q), None) or [], q) for q in (MASKS, MULTIPLIERS)}

    def config(self, name: str, jit_compile: Any, compact_state: bool, compact_capacity: Any, built: bool,
               side_path: bool = False) -> dict:
        masks, multipliers = (self.mask_store.registry(q) for q in (MASKS, MULTIPLIERS))
        config = {
            "name": name,
            "inner_optimizer": inner_config(self.inner),
            config_key(MASKS): entries(self.table, masks, built),
            "jit_compile": jit_compile,
        }
        multiplier_entries = entries(self.table, multipliers, built)
        if multiplier_entries:
            config[config_key(MULTIPLIERS)] = multiplier_entries
        if compact_state:
            config["compact_state"] = True
            config["compact_capacity"] = compact_capacity
        if side_path:
            config["side_path"] = True
        return config

    @staticmethod
    def constructor_arguments(config: dict, custom_objects: Any) -> tuple[Any, dict]:
        """(inner optimizer, keyword arguments) that rebuild a saved optimizer."""
        config = dict(config)
        if "jit_compile" in config:
            config["jit_compile"] = _backend.jit_compile_from_config(config["jit_compile"], config.get("name"))
        return inner_from_config(config.pop("inner_optimizer"), custom_objects), config

    def save(self, store: Any, variables: list, built: bool, name: str) -> None:
        variables = saved_variables(self.table, variables)
        record = meta(self.table, built, len(variables))
        save_state(store, variables, record, list(self.mask_store.registries.values()), name)

    def load(self, store: Any, variables: list, built: bool, built_paths: list[str], name: str) -> None:
        """Loads a file saved by `save`: refuses one whose masks differ, warns
        and skips where an unbuilt optimizer meets a built file, binds the
        arrays of a file saved before build."""
        try:
            record = read_record(store, name)
            if not (record.get("built", True) and built):
                skip_next_load(self.inner)
                if record.get("built", True):  # a built file cannot fill an unbuilt optimizer
                    return warn_unbuilt(name)
                return self.mask_store.load_unbuilt(store)  # arrays given before build, by config entry
            variables = saved_variables(self.table, variables)
            own = meta(self.table, built, len(variables))
            flexible = {id(s) for _, stand_in in self.layout.stand_ins.values()
                        for s in _inner_optimizer.slot_variables(self.inner.variables, stand_in).values()}
            deferred = load_variables(store, variables, record, own, built_paths, name, flexible)
            if flexible or deferred:  # the inner's own copy of these values would not fit its slots
                skip_next_load(self.inner)
        except ValueError:
            skip_next_load(self.inner)
            raise
        self.layout.after_load(self.table)
        self.table.unset = []
        self.mask_store.refresh_identity()
        self.layout.load_deferred(deferred, self.table)
