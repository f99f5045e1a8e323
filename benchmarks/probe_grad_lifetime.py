"""How much temporary memory the compiled JAX train step needs when element
masks are spread over every kernel (issue 25, item 2), read from XLA.

A stack of 8 `Dense(1024, use_bias=False)` layers on 512 tokens (the probe
of issue 25), Adam. Nothing is timed: XLA's memory analysis of the step the
JAX trainer compiles (`jax.jit(model.train_step)`), per variant:

- `lora`: Keras's own `Dense.enable_lora(8)` on every layer;
- `full`: every kernel trainable, the bare optimizer;
- `elements`: LoRA r=8's parameter count (2 x 8 x 1024 per kernel) as random
  element masks on every kernel, dense state; `elements+compact`: compact state;
- `rows+compact`: the same count as whole rows (16 of 1024 per kernel);
- `elements+side`, `rows+side`: those masks with `side_path=True` (each
  layer's backward step gathers its own elements; rows never form the
  kernel's weight gradient).

Where each kernel's dense gradient died at its gather, the element variants'
temporaries would be LoRA's plus one kernel gradient (4 MiB); where they all
live until the update, 8 kernels' more. Usage::

    KERAS_BACKEND=jax python benchmarks/probe_grad_lifetime.py
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

import keras  # noqa: E402

import harness  # noqa: E402
from masked_opt import MaskedOptimizer  # noqa: E402

LAYERS, WIDTH, TOKENS, RANK = 8, 1024, 512, 8
VARIANTS = ("lora", "full", "elements", "elements+compact", "rows+compact", "elements+side", "rows+side")


def build(variant: str):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((WIDTH,))] + [
        keras.layers.Dense(WIDTH, use_bias=False, name=f"d{i}") for i in range(LAYERS)])
    budget = 2 * RANK * WIDTH
    if variant == "lora":
        for layer in model.layers:
            layer.enable_lora(RANK)
        optimizer = keras.optimizers.Adam(1e-3)
    elif variant == "full":
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        rng = np.random.default_rng(0)
        masks = {}
        for layer in model.layers:
            if variant.startswith("rows"):
                mask = np.zeros((WIDTH, 1), bool)
                mask[rng.choice(WIDTH, budget // WIDTH, replace=False)] = True
            else:
                mask = np.zeros(WIDTH * WIDTH, bool)
                mask[rng.choice(WIDTH * WIDTH, budget, replace=False)] = True
                mask = mask.reshape(WIDTH, WIDTH)
            masks[layer.kernel.path] = mask
        optimizer = MaskedOptimizer(keras.optimizers.Adam(1e-3), masks=masks,
                                    compact_state=not variant.endswith("elements"), side_path=variant.endswith("side"))
    model.compile(optimizer=optimizer, loss="mse")
    if variant.endswith("side"):
        optimizer.build(model.trainable_variables)  # before the first step: its trace has the side path
    return model


def temporaries_mib(model) -> float:
    import jax

    rng = np.random.default_rng(1)
    x = rng.normal(size=(TOKENS, WIDTH)).astype("float32")
    y = rng.normal(size=(TOKENS, WIDTH)).astype("float32")
    model.train_on_batch(x, y)  # builds the optimizer
    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True)
    compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, (x, y)).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
    kernel = WIDTH * WIDTH * 4 / 2**20
    print(f"{LAYERS} x Dense({WIDTH}) on {TOKENS} tokens, Adam; one kernel's gradient = {kernel:.0f} MiB\n")
    print("\n".join(harness.table(["variant", "XLA temporaries MiB", "vs LoRA"], "lrr")))
    lora = None
    for variant in VARIANTS:
        mib = temporaries_mib(build(variant))
        lora = mib if variant == "lora" else lora
        print(f"| {variant} | {mib:.1f} | {mib - lora:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
