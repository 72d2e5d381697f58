"""Device mesh and the logical-axis sharding rules.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``vocab``, ``vision_embed``, ...);
``DEFAULT_RULES`` maps each to a mesh axis (``data``, ``fsdp``, ``tensor``), a tuple of them, or ``None``
(replicated). Changing parallelism means changing the mesh sizes or the rules in config, never model code.

A dimension whose size is not divisible by its mesh axes is replicated instead (e.g. 2 KV heads on tensor=4).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.experimental.mesh_utils
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # decoder
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    # vision tower
    "vision_patch": None,
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "vision_merge": "fsdp",
    # never sharded
    "norm": None,
    "layers": None,  # the stacked-layer axis of scanned models
    # activations
    "batch": ("data", "fsdp"),
}


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    """A ``Mesh`` with axes ``data, fsdp, tensor``; one size may be -1 (the rest of the devices)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)} (known: {MESH_AXES})")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))}: use positive sizes and at most one -1")
    if -1 in shape:
        rest = devices.size // math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = rest
    if math.prod(shape) != devices.size:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, have {devices.size}")
    device_grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=list(devices.flat))
    return Mesh(device_grid, MESH_AXES)


def logical_spec(axes, shape, mesh: Mesh, rules: Mapping | None = None) -> PartitionSpec:
    """PartitionSpec for a tensor with logical ``axes``; divisibility is checked per dimension."""
    rules = {**DEFAULT_RULES, **(rules or {})}
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        if name is not None and name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}")
        target = rules.get(name) if name is not None else None
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
        if targets and size % math.prod(mesh.shape[t] for t in targets) == 0:
            used.update(targets)
            spec.append(targets[0] if len(targets) == 1 else targets)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Mapping | None = None) -> dict[tuple, NamedSharding]:
    """``{parameter path: NamedSharding}`` from each variable's ``axes`` metadata."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("axes")
        if axes is None:
            raise ValueError(f"parameter {'.'.join(map(str, path))} has no logical axes")
        out[path] = NamedSharding(mesh, logical_spec(axes, var.shape, mesh, rules))
    return out


def init_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules: Mapping | None = None) -> nnx.Module:
    """Build ``make()`` with every parameter created directly in its sharding (one jit with ``out_shardings``):
    no device ever holds the whole model."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    flat = dict(nnx.to_flat_state(state))
    shardings = param_shardings(state, mesh, rules)
    names = {".".join(map(str, path)): path for path in flat}

    @functools.partial(jax.jit, out_shardings={name: shardings[path] for name, path in names.items()})
    def build():
        built = nnx.to_flat_state(nnx.state(make()))
        return {".".join(map(str, path)): var[...] for path, var in built}

    values = build()
    for name, path in names.items():
        flat[path].set_value(values[name])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def put(a, axes, mesh: Mesh | None):
    """``a`` placed on ``mesh`` by logical ``axes`` (as is without a mesh)."""
    if mesh is None:
        return a
    return jax.device_put(a, NamedSharding(mesh, logical_spec(axes, np.shape(a), mesh)))


def shard_prompts(prompts, mesh: Mesh | None):
    """Token-level prompt arrays split over the ``batch`` rule; the vision layout stays replicated."""
    return prompts._replace(
        input_ids=put(prompts.input_ids, ("batch", None), mesh),
        attention_mask=put(prompts.attention_mask, ("batch", None), mesh),
        positions=put(prompts.positions, (None, "batch", None), mesh),
        rope_delta=put(prompts.rope_delta, ("batch",), mesh),
    )
