"""Dense state (`DenseLayout`, the default layout): the inner optimizer keeps full-size state.

Each mask is a bool optimizer variable at its storage shape (plus a
bit-packed copy for large full-shape masks, read by compiled steps: XLA,
torch.compile).

Each step, for every handled variable: (1) zero the gradient where the mask
is False (NaN/inf there included), (2) snapshot the variable, (3) let the
inner optimizer apply every gradient as usual, (4) write the frozen elements
back from the snapshot, and blend multiplied updates. The inner update is
never behind a conditional (a `cond` around it would trace it twice on
TensorFlow, leak tracers on JAX and sync the host on torch): with an all-True
mask (a multiplier of 1) every step is exact (`where` with a True condition
returns its input), so the result is the bare optimizer's. Only the masking
itself may be skipped while nothing is frozen: eagerly by a host-side flag
(`VariableTable.handled`, and per variable on torch), in TensorFlow's graph
mode by a `cond` around the masking of frozen-only variables
(`_backend.frozen_guard`); under XLA it fuses into the update and always runs.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from masked_opt import _backend, _compat, _inner_optimizer, _restore
from masked_opt._state_layout import ELEMENTWISE, StateLayout, scoped_variable
from masked_opt._variable_table import Entry, VariableTable
from masked_opt.registry import MASKS


class DenseLayout(StateLayout):
    def __init__(self, inner, add_variable, owner):
        super().__init__(inner, add_variable, owner)
        # Wholly frozen at build: id(variable) -> (variable, the zero-size
        # stand-in the inner optimizer was built on: no state until it trains).
        self.stand_ins: dict[int, tuple[keras.Variable, keras.Variable]] = {}

    def inner_variables(self, variables: list, table: VariableTable) -> list:
        """The variables, but a zero-size stand-in for each wholly frozen one
        where the inner optimizer's state is per element and placed by no
        distribution (`holds_nothing_for_frozen`): its slots hold nothing."""
        if not (table.wholly_frozen and self.holds_nothing_for_frozen(variables)):
            return list(variables)
        out = []
        for v in variables:
            if table.key(v) in table.wholly_frozen:
                path = v.path.split("/")
                stand_in = scoped_variable(["masked_frozen", *path[:-1]], path[-1], (0,), v.dtype, None)
                self.stand_ins[id(v)] = (v, stand_in)
                v = stand_in
            out.append(v)
        return out

    def holds_nothing_for_frozen(self, variables: list) -> bool:
        """Only where the owner model's trainer builds the optimizer (`fit`,
        `train_on_batch`; not a custom loop, `load_model`): it retraces its step
        when a stand-in grows, which a custom loop's own compiled step would not
        (its masked path keeps the edits of any variable retrace-free)."""
        leaves = _inner_optimizer.leaf_optimizers(self.inner, variables)
        return (self.owner.drives_training and not self.inner.built and leaves == [self.inner] and type(self.inner).__name__ in ELEMENTWISE
                and not _inner_optimizer.uses_ema(self.inner) and not getattr(self.inner, "gradient_accumulation_steps", None)
                and not _backend.distributed(self.inner))

    def add_mask(self, entry: Entry, mask: np.ndarray, capacity: int | None) -> None:
        entry.mask_shape = tuple(mask.shape)
        entry.mask = self.add_state(entry.variable, np.array(mask, dtype=bool), "_mask")
        if _backend.packs_mask(tuple(entry.variable.shape), entry.mask_shape):
            packed = _backend.pack_bits(mask)
            entry.bits = self.add_state(entry.variable, packed, "_mask_bits", sharded=False)

    def after_inner_build(self, table: VariableTable) -> None:
        for entry in table.masked():
            entry.ema = _inner_optimizer.ema_owner(self.inner, entry.variable)[1]

    def after_load(self, table: VariableTable) -> None:
        for entry in table.masked():  # the packed copies follow the loaded masks
            if entry.bits is not None:
                entry.bits.assign(_backend.pack_bits(_backend.to_numpy(entry.mask)))

    def _mask_tensor(self, entry: Entry, grad) -> object:
        if entry.bits is not None and _backend.is_compiling(grad):
            return _backend.unpack_bits(entry.bits.value, entry.mask_shape)  # 1 bit per element read
        return entry.mask.value

    def step(self, grads: list, variables: list, handled: list[tuple[int, Entry]], identity: bool = False) -> None:
        if self.stand_ins:  # wholly frozen with no state: nothing to update, nothing to restore
            self._grow_outside_trainer(grads, variables)
            grads, variables, handled = self._without_stand_ins(grads, variables, handled)
            if not variables:  # every variable wholly frozen: the step still counts
                self.inner.iterations.assign_add(1)
                return
        masked_grads = list(grads)
        pending, frozen = [], []
        for i, entry in handled:
            variable = variables[i]
            if entry.mask is None:
                pending.append(_restore.multiplied_only(self.inner, variable, entry.multiplier))
                continue
            mask = self._mask_tensor(entry, grads[i])
            if entry.multiplier is None:
                frozen.append((i, entry, _backend.step_mask(mask, variable)))
                continue
            # A multiplier blends the whole value: no row-only snapshot.
            masked_grads[i] = _backend.mask_gradient(grads[i], mask, tuple(variable.shape))
            old = _backend.snapshot(variable)
            ema = _restore.ema_before(self.inner, variable)
            pending.append(
                lambda v=variable, m=mask, x=entry.multiplier, o=old, a=ema:
                _restore.multiplied_items(v, m, x.value, o, *a)
            )
        # A TF graph-mode step traced while nothing is frozen (all-True masks
        # registered for later edits) masks frozen-only variables only while
        # some element is frozen: a runtime `cond` around the masking, not
        # around the inner update, so all-True masks cost what the bare step
        # costs. A step traced with frozen elements has no `cond` (it would
        # slow the first step of a many-variable model by ~10 %).
        guard = None if not identity else _backend.frozen_guard(
            [m for _, _, m in frozen], [grads[i] for i, _, _ in frozen], [variables[i] for i, _, _ in frozen]
        )
        olds = self._mask_frozen(frozen, grads, variables, masked_grads, guard)
        self.inner.apply(masked_grads, variables)
        _write_back(frozen, olds, [item for items in pending for item in items()], guard)

    def _grow_outside_trainer(self, grads: list, variables: list) -> None:
        """A step that Keras's trainer does not run (a custom loop over every
        variable) gives every stand-in full-size state first, as if the loop
        had built the optimizer: its own compiled step would not see slots that
        an edit grows later, and its masked path keeps edits retrace-free."""
        given = [g for g, v in zip(grads, variables) if g is not None and id(v) in self.stand_ins]
        if not given or not _backend.can_inspect_frames(given[0]) or self.owner.in_train_step():
            return
        if _compat.in_stateless_scope() or not (_backend.runs_eagerly(given[0]) or _backend.in_traced_function()):
            frozen = sorted(v.path for v, _ in self.stand_ins.values())
            raise ValueError(
                f"This optimizer was built by the model's trainer (`fit`) with no optimizer state for the wholly "
                f"frozen variables {frozen} (they need none while frozen), and a step outside the trainer "
                "(`stateless_apply` in your own loop) cannot create it. Call "
                "`optimizer.build(model.trainable_variables)` once before reading `optimizer.variables` for "
                "your loop: it gives them their full-size state.")
        self.grow_all()

    def grow_all(self) -> None:
        """Full-size state, fresh, for every stand-in (eagerly, even during a
        TensorFlow trace); `optimizer.build` on a built optimizer calls it."""
        with _backend.state_scope():
            for variable, _ in list(self.stand_ins.values()):
                self._grow_fresh(variable)

    def _without_stand_ins(self, grads: list, variables: list, handled: list) -> tuple[list, list, list]:
        keep = [i for i, v in enumerate(variables) if id(v) not in self.stand_ins]
        if len(keep) == len(variables):
            return grads, variables, handled
        at = {i: j for j, i in enumerate(keep)}
        return [grads[i] for i in keep], [variables[i] for i in keep], [(at[i], e) for i, e in handled if i in at]

    def fresh_state(self, entry: Entry) -> None:
        """A variable that leaves the wholly frozen set: fresh state, in place,
        or, where it had none (a stand-in), in new full-size slots that take
        the stand-in's slots' places (saved positions unchanged)."""
        if id(entry.variable) not in self.stand_ins:
            return super().fresh_state(entry)
        self._grow_fresh(entry.variable)

    def _grow_fresh(self, variable: keras.Variable) -> None:
        weights = np.asarray(self.read(variable, variable.path))  # syncs JAX's trainer first
        self.grow(variable, _inner_optimizer.fresh_state(self.inner, variable, weights))

    def grow(self, variable: keras.Variable, values: dict[str, np.ndarray]) -> None:
        """Full-size slots for `variable` (holding `values`, by slot suffix) in
        place of its stand-in's zero-size ones; the inner optimizer updates
        `variable` from then on."""
        _, stand_in = self.stand_ins.pop(id(variable))
        for suffix, old in _inner_optimizer.slot_variables(self.inner.variables, stand_in).items():
            value = np.asarray(values[suffix], dtype=old.dtype)
            new = self.inner.add_variable_from_reference(variable, suffix, initializer=lambda shape, dtype=None, x=value: x)
            _compat.replace_state_variable(self.inner, old, new)
        _compat.replace_built_variable(self.inner, stand_in, variable)

    def load_deferred(self, deferred: list, table: VariableTable) -> None:
        """Saved slot values whose size differs from the slot here: a stand-in's
        zero-size slot given full-size values (a file saved while the variable
        trained, or by a version that kept state for it) grows if the loaded
        mask lets the variable train, else the values are not needed (fresh at
        unfreeze); a full-size slot given none (saved as a stand-in) keeps its
        values if the loaded mask freezes the variable wholly."""
        grown: dict[int, dict[str, np.ndarray]] = {}
        for slot, value in deferred:
            owner = next((v for v, s in self.stand_ins.values() if _holds(self.inner, s, slot)), None)
            if owner is not None and table.key(owner) not in table.wholly_frozen:
                suffix = slot.name[len(self.stand_ins[id(owner)][1].path.replace("/", "_")) + 1:]
                grown.setdefault(id(owner), {})[suffix] = value
            elif owner is None and not any(table.key(e.variable) in table.wholly_frozen and _holds(
                    self.inner, e.variable, slot) for e in table.masked()):
                raise ValueError(
                    f"The saved optimizer state holds no values for '{slot.path}' (its variable was wholly frozen "
                    "when saved), but the loaded masks let the variable train. Load into an optimizer built "
                    "with the same masks, or unfreeze it after loading (a fresh optimizer state).")
        for key, values in grown.items():
            variable = self.stand_ins[key][0]
            self.grow(variable, values)

    def _mask_frozen(self, frozen: list, grads: list, variables: list, masked_grads: list, guard) -> list:
        """Masks the gradients of the frozen-only variables `(i, entry, mask)`
        into `masked_grads` and returns their snapshots (behind `guard`, if any)."""

        def mask_and_snapshot() -> list:
            out = []
            for i, _, mask in frozen:  # a sparse gradient lets the snapshot keep only its rows
                g = _backend.mask_gradient(grads[i], mask, tuple(variables[i].shape))
                opt = _inner_optimizer.optimizer_for(self.inner, variables[i]) if _backend.is_sparse(g) else None
                out.append((g, _backend.snapshot(variables[i], g, opt, mask)))
            return out

        def untouched() -> list:
            return [(grads[i], _backend.no_snapshot(variables[i])) for i, _, _ in frozen]

        taken = mask_and_snapshot() if guard is None else _backend.if_frozen(guard, mask_and_snapshot, untouched)
        olds = []
        for (i, _, _), (g, old) in zip(frozen, taken):
            masked_grads[i] = g
            olds.append(old)
        return olds

    def finalize(self, var_list: list, table: VariableTable) -> None:
        restore = []
        for variable in var_list:
            entry = table.get(variable)
            if entry is not None and entry.mask is not None:
                old = _backend.snapshot(variable)
                restore.extend(_restore.frozen_items(variable, entry.ema, entry.mask.value, old))
        self.inner.finalize_variable_values(var_list)
        _backend.restore_frozen(restore)

    def read_mask(self, entry: Entry) -> np.ndarray:
        return np.array(self.read(entry.mask, entry.path), dtype=bool)

    def plan_mask(self, entry: Entry, new: np.ndarray, what: str) -> Callable[[], None]:
        stored = MASKS.to_storage(new, entry.mask_shape, entry.variable, what=what)

        def commit() -> None:
            entry.mask.assign(stored)
            if entry.bits is not None:
                entry.bits.assign(_backend.pack_bits(stored))

        return commit

    def detached(self, table: VariableTable) -> bool:
        return any(_backend.is_purged(e.mask) for e in table.masked())


def _holds(inner, reference: keras.Variable, slot: keras.Variable) -> bool:
    """Whether `slot` is one of the inner optimizer's slots made from `reference`."""
    return any(s is slot for s in _inner_optimizer.slot_variables(inner.variables, reference).values())


def _write_back(frozen: list, olds: list, multiplied: list, guard) -> None:
    """Writes back the frozen elements of `frozen` from `olds` (behind `guard`,
    if any) and the blended `multiplied` items."""

    def frozen_items() -> list:
        items = []
        for (_, entry, mask), old in zip(frozen, olds):
            items.extend(_restore.frozen_items(entry.variable, entry.ema, mask, old))
        return items

    if guard is None:  # one restore (one merge_call under tf.distribute)
        _backend.restore_frozen(multiplied + frozen_items())
    else:
        _backend.restore_frozen(multiplied)
        _backend.if_frozen(guard, lambda: _backend.restore_frozen(frozen_items()), lambda: None)
