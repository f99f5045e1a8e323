"""Config and weights-file state of a `MaskedOptimizer`.

The config holds mask keys and shapes only (JSON, no arrays); mask values
live in the optimizer's bool variables, which Keras saves by position. Keras
only *warns* when the saved variable count differs and assigns by position
when it matches, so the weights file also carries a small JSON record of
which masks it holds, and loading refuses a file whose masks differ.

The inner optimizer's config names public Keras classes only, so a file
saved under one backend rebuilds the loading backend's optimizer
(`inner_config` / `inner_from_config`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from masked_opt import _backend

if TYPE_CHECKING:
    from masked_opt.optimizer import MaskedOptimizer

META_KEY = "masked_opt_meta"
_SPEC_KEY = "masked_opt_spec_{}"  # mask arrays of an optimizer saved before build
_MULT_SPEC_KEY = "masked_opt_multiplier_spec_{}"  # multiplier arrays, same


@dataclass
class ConfigMask:
    """A mask known from a config only; its values come from saved weights."""

    shape: tuple[int, ...] | None
    index: int | None = None  # position among the trainable variables
    entry: int = 0  # position in the config's mask entries
    capacity: int | None = None  # compact_state: the saved capacity


def paths_compatible(a: str, b: str) -> bool:
    """Same variable path, up to a scope prefix (a reloaded Sequential drops its own)."""
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def config_entries(opt: MaskedOptimizer) -> list[dict]:
    if opt.built:
        index = {opt._var_key(v): i for i, v in enumerate(opt._trainable_variables)}
        entries = []
        for slot in opt._slots.values():
            entry = {
                "key": slot.variable.path,
                "shape": list(slot.shape),
                "index": index[opt._var_key(slot.variable)],
            }
            if slot.compact is not None:
                entry["capacity"] = slot.compact.capacity
            entries.append(entry)
        return entries
    return _unbuilt_entries(opt._registry.specs, bool)


def _unbuilt_entries(specs: list, scalar: type) -> list[dict]:
    """Config entries of specs not resolved yet: a scalar by value (as
    `scalar`), an array by shape (its values go in the weights file), a
    callable without a shape (not saved)."""
    entries = []
    for key, value in specs:
        key = key if isinstance(key, str) else key.path
        if isinstance(value, ConfigMask):
            entry = {"key": key, "shape": None if value.shape is None else list(value.shape)}
            if value.index is not None:
                entry["index"] = value.index
        elif isinstance(value, np.ndarray) and value.ndim == 0:
            entry = {"key": key, "value": scalar(value)}
        else:
            entry = {"key": key, "shape": None if callable(value) else list(value.shape)}
        entries.append(entry)
    return entries


def multiplier_entries(opt: MaskedOptimizer) -> list[dict]:
    """Config entries of the update multipliers (keys, shapes, positions; a
    scalar given before build is stored by value)."""
    if opt.built:
        index = {opt._var_key(v): i for i, v in enumerate(opt._trainable_variables)}
        return [
            {"key": m.variable.path, "shape": list(m.shape), "index": index[opt._var_key(m.variable)]}
            for m in opt._mults.values()
        ]
    return _unbuilt_entries(opt._mult_registry.specs, float)


def specs_from_config(entries: list[dict], kind: str = "mask") -> list[tuple[str, Any]]:
    specs = []
    for j, entry in enumerate(entries):
        if "value" in entry:
            value = entry["value"]
            value = bool(value) if kind == "mask" else float(value)
            specs.append((entry["key"], np.asarray(value, bool if kind == "mask" else np.float32)))
        else:
            shape = entry.get("shape")
            shape = None if shape is None else tuple(shape)
            specs.append(
                (entry["key"], ConfigMask(shape, entry.get("index"), j, entry.get("capacity")))
            )
    return specs


# ------------------------------------------------------- inner optimizer

_BACKEND_MODULES = "keras.src.backend."


def inner_config(inner: keras.optimizers.Optimizer) -> dict:
    """The `keras.saving` config of the inner optimizer, with every built-in
    Keras optimizer in it (a MultiOptimizer's too) named by its public class.

    On torch, `keras.optimizers.AdamW(...)` returns a subclass from
    `keras.src.backend.torch.optimizers`, and `keras.saving` records that
    private module: loaded under another backend, the file would rebuild
    torch's optimizer there (torch being installed), which fails at the first
    step with a TypeError from `torch._foreach_*`. Named `keras.optimizers.AdamW`,
    it becomes the loading backend's own AdamW (torch's again on torch).
    """
    return _public_optimizer_classes(keras.saving.serialize_keras_object(inner))


def inner_from_config(config: dict, custom_objects: Any = None) -> keras.optimizers.Optimizer:
    """The inner optimizer rebuilt from `inner_config`'s output, or from a
    config that still names a backend's private class (a file saved on torch
    by an earlier version)."""
    return keras.saving.deserialize_keras_object(
        _public_optimizer_classes(config), custom_objects=custom_objects
    )


def _public_optimizer_classes(config: Any) -> Any:
    if isinstance(config, list):
        return [_public_optimizer_classes(c) for c in config]
    if not isinstance(config, dict):
        return config
    out = {k: _public_optimizer_classes(v) for k, v in config.items()}
    module, name = out.get("module"), out.get("class_name")
    if isinstance(module, str) and module.startswith(_BACKEND_MODULES) and isinstance(name, str):
        public = getattr(keras.optimizers, name, None)
        if isinstance(public, type) and issubclass(public, keras.optimizers.Optimizer):
            out["module"] = "keras.optimizers"
            out["registered_name"] = None
    return out


# ------------------------------------------------------------ weights file


def _meta(opt: MaskedOptimizer) -> dict:
    return {
        "built": bool(opt.built),
        "masks": [[slot.variable.path, list(slot.shape)] for slot in opt._slots.values()],
        "capacities": [
            None if slot.compact is None else slot.compact.capacity for slot in opt._slots.values()
        ],
        "num_variables": len(saved_variables(opt)),
        "multipliers": [[m.variable.path, list(m.shape)] for m in opt._mults.values()],
    }


def saved_variables(opt: MaskedOptimizer) -> list:
    """The optimizer variables a file holds: all but the bit-packed mask
    copies (derived from the masks, and backend-dependent), so that files move
    between backends."""
    bits = {id(slot.bits) for slot in opt._slots.values() if slot.bits is not None}
    return [v for v in opt.variables if id(v) not in bits]


def save_state(opt: MaskedOptimizer, store: Any) -> None:
    for i, variable in enumerate(saved_variables(opt)):
        store[str(i)] = variable.numpy()
    store[META_KEY] = np.frombuffer(json.dumps(_meta(opt)).encode(), dtype=np.uint8)
    if opt.built:
        return
    # Saved before build (compiled, not trained): keep the array masks here,
    # since the config holds no arrays.
    lost = [repr(k) for k, v in opt._registry.specs + opt._mult_registry.specs if callable(v)]
    lost += [f"{op.kind}({op.key!r})" for op in opt._registry.ops]
    lost += [f"set_multiplier({k!r})" for k, _ in opt._mult_registry.ops]
    for j, (_, value) in enumerate(opt._registry.specs):
        if isinstance(value, np.ndarray) and value.ndim > 0:
            store[_SPEC_KEY.format(j)] = value.astype(np.uint8)
    for j, (_, value) in enumerate(opt._mult_registry.specs):
        if isinstance(value, np.ndarray) and value.ndim > 0:
            store[_MULT_SPEC_KEY.format(j)] = value.astype(np.float32)
    if lost:
        warnings.warn(
            f"MaskedOptimizer '{opt.name}' is saved before it was built, so mask "
            f"callables and recorded calls ({', '.join(lost)}) are not saved. "
            "Build it first (`model.optimizer.build(model.trainable_variables)`) "
            "to save the resolved masks.",
            stacklevel=3,
        )


def _skip_next_load(inner: Any) -> None:
    """Keras walks into `inner_optimizer` after us and would load its state
    from the same file: make that one load a no-op."""

    def skip(store):
        del inner.load_own_variables

    inner.load_own_variables = skip


def load_state(opt: MaskedOptimizer, store: Any) -> None:
    keys = set(store.keys())
    if META_KEY not in keys:
        _skip_next_load(opt.inner_optimizer)
        raise ValueError(
            f"Optimizer '{opt.name}' is a MaskedOptimizer, but the saved optimizer "
            "state has no mask metadata (it was saved by another optimizer, or "
            "by a model compiled without one). "
            "Loading it would mix state; compile the model with the optimizer it "
            "was saved with."
        )
    saved = json.loads(bytes(np.asarray(store[META_KEY], dtype=np.uint8)).decode())
    if not saved.get("built", True):
        _load_unbuilt(opt, store)
        return
    if not opt.built:
        warnings.warn(
            f"Skipping the state of MaskedOptimizer '{opt.name}': it is not built "
            "yet. Call `model.optimizer.build(model.trainable_variables)` before "
            "`load_weights` to restore masks and optimizer state.",
            stacklevel=3,
        )
        _skip_next_load(opt.inner_optimizer)
        return
    own = _meta(opt)
    same = len(saved["masks"]) == len(own["masks"]) and all(
        paths_compatible(p1, p2) and s1 == s2
        for (p1, s1), (p2, s2) in zip(saved["masks"], own["masks"])
    )
    same = same and saved.get("capacities", own["capacities"]) == own["capacities"]
    saved_mults = saved.get("multipliers", [])
    same = same and len(saved_mults) == len(own["multipliers"]) and all(
        paths_compatible(p1, p2) and s1 == s2
        for (p1, s1), (p2, s2) in zip(saved_mults, own["multipliers"])
    )
    if not same or saved["num_variables"] != own["num_variables"]:
        _skip_next_load(opt.inner_optimizer)
        raise ValueError(_mismatch_message(opt, saved, own))
    for i, variable in enumerate(saved_variables(opt)):
        variable.assign(store[str(i)])
    for slot in opt._slots.values():  # the packed copies follow the loaded masks
        if slot.bits is not None:
            slot.bits.assign(_backend.pack_bits(slot.mask.numpy()))
    opt._unset_paths.clear()
    opt._refresh_frozen_flag()


def _load_unbuilt(opt: MaskedOptimizer, store: Any) -> None:
    """State saved before build: only mask arrays, bound to the config's keys."""
    _skip_next_load(opt.inner_optimizer)
    keys = set(store.keys())
    for entry, var_keys in opt._config_targets.items():
        name = _SPEC_KEY.format(entry)
        if name not in keys:
            continue
        value = np.asarray(store[name]).astype(bool)
        for var_key in var_keys:
            slot = opt._slots[var_key]
            opt.set_mask(slot.variable, value)
    for entry, var_keys in opt._mult_targets.items():
        name = _MULT_SPEC_KEY.format(entry)
        if name not in keys:
            continue
        value = np.asarray(store[name], np.float32)
        for var_key in var_keys:
            opt.set_multiplier(opt._mults[var_key].variable, value)


def _mismatch_message(opt: MaskedOptimizer, saved: dict, own: dict) -> str:
    saved_m = {p: tuple(s) for p, s in saved["masks"]}
    own_m = {p: tuple(s) for p, s in own["masks"]}
    lines = []
    for p in sorted(set(saved_m) | set(own_m)):
        mine = next((s for q, s in own_m.items() if paths_compatible(p, q)), None)
        theirs = next((s for q, s in saved_m.items() if paths_compatible(p, q)), None)
        if mine != theirs and not any(f"'{p}'" in line for line in lines):
            lines.append(
                f"'{p}': saved {'no mask' if theirs is None else theirs}, "
                f"this optimizer {'no mask' if mine is None else mine}"
            )
    if not lines and [p for p, _ in saved["masks"]] != [p for p, _ in own["masks"]]:
        lines.append("same masks in a different order")
    if saved.get("capacities", own["capacities"]) != own["capacities"]:
        lines.append(
            f"compact_state capacities saved {saved.get('capacities')}, here {own['capacities']}"
        )
    saved_x = [(p, tuple(sh)) for p, sh in saved.get("multipliers", [])]
    own_x = [(p, tuple(sh)) for p, sh in own["multipliers"]]
    if len(saved_x) != len(own_x) or not all(
        paths_compatible(p1, p2) and s1 == s2 for (p1, s1), (p2, s2) in zip(saved_x, own_x)
    ):
        lines.append(f"multipliers saved {saved_x or 'none'}, here {own_x or 'none'}")
    if saved["num_variables"] != own["num_variables"]:
        lines.append(
            f"{saved['num_variables']} optimizer variables saved, "
            f"{own['num_variables']} here (a different inner optimizer?)"
        )
    return (
        f"Cannot load the state of MaskedOptimizer '{opt.name}': the saved masks "
        "do not match this optimizer's, and Keras loads optimizer variables by "
        "position, so loading would silently mix state. Differences: "
        + "; ".join(lines)
        + ". Build the optimizer with the same masks and multipliers (keys and "
        "shapes) as the saved one."
    )
