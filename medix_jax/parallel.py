"""Device mesh and the logical-axis sharding rules.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``vocab``, ``vision_embed``, ...);
``DEFAULT_RULES`` maps each to a mesh axis (``data``, ``fsdp``, ``tensor``), a tuple of them, or ``None``
(replicated). Changing parallelism means changing the mesh sizes or the rules in config, never model code.

A parameter dimension whose size is not divisible by its mesh axes is replicated instead (e.g. 2 KV heads on
tensor=4), with a warning at start-up; a batch dimension that does not divide is an error.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import jax.experimental.mesh_utils
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # decoder
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "expert": "fsdp",  # mixture of experts: the stacked experts split over fsdp (expert parallelism)
    # vision tower
    "vision_patch": None,
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "vision_merge": "fsdp",
    # never sharded
    "norm": None,
    "layers": None,  # the stacked-layer axis of scanned models
    # activations (parallel.constrain): hidden states [batch, length, act_embed], heads and MLP over tensor
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    """A ``Mesh`` with axes ``data, fsdp, tensor``. ``sizes`` gives each axis's size within a slice (one may be -1:
    the rest of the devices) and, as ``dcn_data`` / ``dcn_fsdp`` / ``dcn_tensor``, its size across slices (TPU
    multislice, or GPU nodes: one process per node is one slice). The device order comes from JAX's mesh utilities
    (``create_hybrid_device_mesh`` across slices), so fast links carry the inner axes."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    known = set(MESH_AXES) | {f"dcn_{a}" for a in MESH_AXES}
    unknown = set(sizes) - known
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)} (known: {sorted(known)})")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    dcn = [int(sizes.get(f"dcn_{a}", 1)) for a in MESH_AXES]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape) or min(dcn) < 1:
        raise ValueError(f"mesh sizes {dict(sizes)}: use positive sizes and at most one -1 (dcn sizes >= 1)")
    per_slice = devices.size // math.prod(dcn)
    if -1 in shape:
        shape[shape.index(-1)] = per_slice // math.prod(s for s in shape if s != -1)
    total = [a * b for a, b in zip(shape, dcn, strict=True)]
    if math.prod(total) != devices.size:
        within, across = dict(zip(MESH_AXES, shape, strict=True)), dict(zip(MESH_AXES, dcn, strict=True))
        raise ValueError(f"mesh {within} x dcn {across} needs {math.prod(total)} devices, have {devices.size}")
    if math.prod(dcn) > 1:
        tpu = devices.flat[0].platform == "tpu"  # TPU: slices are the granules; elsewhere one process (node) is
        try:
            grid = _on_torus(functools.partial(jax.experimental.mesh_utils.create_hybrid_device_mesh, shape, dcn,
                                               devices=list(devices.flat), process_is_granule=not tpu), shape)
        except ValueError as e:
            raise ValueError(f"mesh dcn sizes {dcn} need {math.prod(dcn)} TPU slices (or, on GPUs, processes): "
                             f"{e}") from None
    else:
        grid = _on_torus(functools.partial(jax.experimental.mesh_utils.create_device_mesh, shape,
                                           devices=list(devices.flat)), shape)
    return Mesh(grid, MESH_AXES)


def _on_torus(create: Callable[..., np.ndarray], shape: list[int]) -> np.ndarray:
    """``create()`` (a ``mesh_utils`` call); where a TPU torus cannot give each mesh axis whole physical axes (fsdp
    16 x tensor 4 on v6e 8x8), again with physical axes split over mesh axes -- slower collectives on the split
    axes, but the mesh the config asks for. A ValueError naming the mesh and the topology when even that fails."""
    try:
        return create()
    except NotImplementedError as first:
        try:
            return create(allow_split_physical_axes=True)
        except (NotImplementedError, ValueError, AssertionError) as e:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape, strict=True))} cannot be laid out on this "
                             f"topology, not even with physical axes split ({e}; first: {first})") from None


def rollout_mesh(mesh: Mesh, sizes: Mapping[str, int] | None) -> Mesh:
    """The sampler's mesh (``rollout.mesh``): ``mesh``'s devices in ``mesh``'s order, regrouped into ``sizes``
    (``data`` / ``fsdp`` / ``tensor``, one of them -1: the rest). The same order keeps every program's device
    assignment one (a reshard between the two is a compiled program) and a tensor group on chips that are neighbours
    in the trainer's mesh. None: ``mesh`` itself."""
    if sizes is None:
        return mesh
    unknown = set(sizes) - set(MESH_AXES)
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    n = mesh.devices.size
    if unknown or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"rollout.mesh {dict(sizes)}: give data / fsdp / tensor sizes, positive, at most one -1")
    if -1 in shape:
        shape[shape.index(-1)] = n // math.prod(s for s in shape if s != -1)
    if math.prod(shape) != n:
        raise ValueError(f"rollout.mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} "
                         f"devices; the trainer's mesh has {n}")
    return Mesh(mesh.devices.reshape(shape), MESH_AXES)


def rollout_shardings(params, mesh: Mesh):
    """The sampler's layout of ``params`` (an ``nnx.State`` of arrays or ``ShapeDtypeStruct``s in the trainer's
    shardings; their variables' ``axes`` metadata) on the rollout ``mesh`` (``rollout_mesh``), the same tree of
    ``NamedSharding``s. Each parameter keeps its PartitionSpec's axes except ``fsdp``, which on the rollout mesh
    splits only the ``expert`` dimension (expert parallelism: ``models/moe.py``'s dispatch); every other weight is
    whole over it, so that decoding gathers no weight. A dimension its axes no longer divide is left whole."""
    variables = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    shardings = [respec(v.get_value().sharding, v.shape, mesh, v.get_metadata().get("axes")) for v in variables]
    return jax.tree.unflatten(jax.tree.structure(params), shardings)


def respec(sharding: NamedSharding, shape: tuple[int, ...], mesh: Mesh, axes=None) -> NamedSharding:
    """``sharding``'s PartitionSpec on ``mesh`` (the same axis names, other sizes) for a parameter with logical
    ``axes``: ``fsdp`` dropped from every dimension but the ``expert`` one (``rollout_shardings``), and a dimension
    its axes no longer divide left whole."""
    spec = []
    names = axes or (None,) * len(shape)
    for entry, size, name in zip((*sharding.spec, *[None] * (len(shape) - len(sharding.spec))), shape, names,
                                 strict=True):
        split = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        split = tuple(a for a in split if mesh.shape[a] > 1 and (a != "fsdp" or name == "expert"))
        spec.append(None if not split or size % math.prod(mesh.shape[a] for a in split) else
                    split[0] if len(split) == 1 else split)
    return NamedSharding(mesh, PartitionSpec(*spec))


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Several processes (one per host / GPU node): ``jax.distributed.initialize`` before anything touches devices.

    On TPU pod slices and under SLURM nothing needs setting (JAX finds the cluster). Elsewhere give the
    coordinator (process 0's ``host:port``), the process count and this process's id, here or as
    ``MEDIX_COORDINATOR_ADDRESS`` / ``MEDIX_NUM_PROCESSES`` / ``MEDIX_PROCESS_ID``.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300  # give up (with a message) instead of hanging when processes or the coordinator are missing


def _cluster_detected() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize_distributed(cfg: DistributedConfig) -> bool:
    """Join the job's processes; False (nothing done) for a single process. Errors say what is wrong."""
    env = os.environ
    address = cfg.coordinator_address or env.get("MEDIX_COORDINATOR_ADDRESS")
    count = cfg.num_processes if cfg.num_processes is not None else _int_env("MEDIX_NUM_PROCESSES")
    index = cfg.process_id if cfg.process_id is not None else _int_env("MEDIX_PROCESS_ID")
    if address is None and count in (None, 1) and not _cluster_detected():
        return False
    if address is not None and (count is None or index is None):
        raise ValueError(f"distributed: coordinator {address} given without the process count and this process's "
                         "id (distributed.num_processes / process_id or MEDIX_NUM_PROCESSES / MEDIX_PROCESS_ID)")
    if count is not None and index is not None and not 0 <= index < count:
        raise ValueError(f"distributed: process id {index} is outside 0..{count - 1}")
    if address is not None and index != 0:
        _wait_for_coordinator(address, cfg.timeout_s)
    # JAX aborts the process (it does not raise) when the job is not complete in time: say first what we wait for.
    print(f"distributed: process {index if index is not None else 'auto'} of {count or 'auto'} joining "
          f"{address or 'the detected cluster'}; waiting up to {cfg.timeout_s}s for every process", flush=True)
    try:
        jax.distributed.initialize(address, count, index, initialization_timeout=cfg.timeout_s)
    except Exception as e:  # broad on purpose: re-raised with the facts a user needs
        raise RuntimeError(
            f"distributed: could not form the job within {cfg.timeout_s}s (coordinator {address or 'auto'}, process "
            f"{index} of {count}): {str(e).splitlines()[0][:300]}. Check that all {count} processes are started "
            f"with the same coordinator address, distinct ids 0..{(count or 1) - 1}, and that the port is reachable "
            "from every host.") from None
    return True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"distributed: coordinator {address} unreachable for {timeout_s}s ({e}); is "
                                   "process 0 running, and is its port open to this host?") from None
            time.sleep(0.5)


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


BATCH_AXES = ("batch",)  # logical axes of activations: never replicated when they do not divide


def logical_spec(axes, shape, mesh: Mesh, rules: Mapping | None = None) -> PartitionSpec:
    """PartitionSpec for a tensor with logical ``axes``; divisibility is checked per dimension. A parameter
    dimension that its mesh axes do not divide is replicated; a ``batch`` dimension is an error (replicating the
    batch would multiply every device's compute and memory)."""
    spec, replicated = _resolve(axes, shape, mesh, rules)
    for name, size, split in replicated:
        if name in BATCH_AXES:
            raise ValueError(f"a {name} dimension of {size} does not divide over mesh axes {split} of mesh "
                             f"{dict(mesh.shape)}: make it a multiple of {math.prod(split.values())} (e.g. "
                             "data.batch_size, rollout.num_samples or train.micro_batches)")
    return spec


_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, Mapping | None] | None] = contextvars.ContextVar(
    "medix_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Mapping | None = None):
    """Inside this context (entered while tracing a jitted program whose ``mesh`` is a static argument),
    ``constrain`` pins activations to ``mesh`` by the logical-axis rules, and ``current_mesh`` names the mesh
    that kernels needing ``shard_map`` (splash attention) run over. Without it (or with ``mesh=None``) both are
    no-ops: the model stays runnable on one device with no mesh at all."""
    token = _ACTIVATIONS.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def current_mesh() -> tuple[Mesh, Mapping | None] | None:
    """(mesh, rules) of the enclosing ``activation_sharding`` context, or None."""
    return _ACTIVATIONS.get()


def constrain(x, axes):
    """``with_sharding_constraint`` of activation ``x`` by its logical ``axes`` (e.g. ``("batch", "length",
    "act_embed")``) under the enclosing ``activation_sharding`` context; ``x`` unchanged outside one. Without these
    pins XLA may keep the whole batch on every device after the embedding gather (issue 14's measurement: every
    chip computing every row)."""
    context = _ACTIVATIONS.get()
    if context is None:
        return x
    mesh, rules = context
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(axes, x.shape, mesh, rules)))


def _resolve(axes, shape, mesh: Mesh, rules: Mapping | None):
    """(PartitionSpec, [(logical name, size, {mesh axis: size}) of dimensions left whole because indivisible])."""
    rules = {**DEFAULT_RULES, **(rules or {})}
    used: set[str] = set()
    spec, replicated = [], []
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
            if targets:
                replicated.append((name, size, {t: mesh.shape[t] for t in targets}))
    return PartitionSpec(*spec), replicated


def param_shardings(state: nnx.State, mesh: Mesh, rules: Mapping | None = None) -> dict[tuple, NamedSharding]:
    """``{parameter path: NamedSharding}`` from each variable's ``axes`` metadata; a one-line warning for each
    parameter with a dimension left whole because its mesh axes do not divide it."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("axes")
        name = ".".join(map(str, path))
        if axes is None:
            raise ValueError(f"parameter {name} has no logical axes")
        spec, replicated = _resolve(axes, var.shape, mesh, rules)
        for axis, size, split in replicated:
            print(f"sharding: {name} keeps its {axis} dimension ({size}) whole: mesh axes {split} do not divide "
                  "it", flush=True)
        out[path] = NamedSharding(mesh, spec)
    return out


ModuleT = TypeVar("ModuleT", bound=nnx.Module)


def init_sharded(make: Callable[[], ModuleT], mesh: Mesh, rules: Mapping | None = None) -> ModuleT:
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


# ----------------------------------------------------------------------------------------------------------------
# The batch across processes. Each process holds its own block of every batch's rows (its devices' share of the
# ``batch`` rule); in a single process that block is the whole batch and these functions reduce to plain placement.


def batch_split(mesh: Mesh | None) -> int:
    """Into how many shards the ``batch`` rule splits a batch dimension of ``mesh`` (1 without one)."""
    if mesh is None:
        return 1
    axes = DEFAULT_RULES["batch"]
    assert isinstance(axes, tuple)  # the batch rule names a tuple of mesh axes (a plain string would split by letter)
    return math.prod(mesh.shape[a] for a in axes)


def take_rows(a, rows, axis: int = 0):
    """``jnp.take(a, rows, axis)`` where ``rows`` index ``a`` within each batch shard: under an
    ``activation_sharding`` mesh ``a``'s ``axis`` and ``rows`` are both split over the batch rule, and shard d of
    ``rows`` picks from shard d of ``a`` only (``shard_map``), so no chip gathers another chip's rows. Without a
    mesh, plain indices."""
    context = current_mesh()
    if context is None:
        return jnp.take(a, rows, axis=axis)
    mesh, rules = context
    split = logical_spec(tuple("batch" if i == axis else None for i in range(a.ndim)), a.shape, mesh, rules)[axis]
    if logical_spec(("batch",), rows.shape, mesh, rules)[0] != split:
        raise ValueError(f"take_rows: {rows.shape[0]} rows and {a.shape[axis]} sources split differently over "
                         f"mesh {dict(mesh.shape)}")
    spec = PartitionSpec(*(split if i == axis else None for i in range(a.ndim)))
    return jax.shard_map(lambda x, r: jnp.take(x, r, axis=axis), mesh=mesh, in_specs=(spec, PartitionSpec(split)),
                         out_specs=spec)(a, rows)


def process_rows(mesh: Mesh | None, n: int) -> np.ndarray:
    """The rows of an ``n``-row batch that this process holds, ascending (all of them in a single process). On
    GPU nodes and CPUs a process's rows are one block; a TPU slice's device order may interleave its hosts."""
    if mesh is None:
        return np.arange(n)
    spans = _process_spans(NamedSharding(mesh, logical_spec(("batch",), (n,), mesh)), (n,), 0)
    return np.concatenate([np.arange(a, b) for a, b in spans])


@functools.lru_cache(maxsize=256)
def _process_spans(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> tuple[tuple[int, int], ...]:
    """This process's rows along ``axis`` as ascending, merged (start, stop) spans; an error unless every process
    holds rows of its own (an equal share)."""
    held = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        assert index is not None  # jax's annotation allows None, but an addressable device always holds an index
        held.add((index[axis].start or 0, shape[axis] if index[axis].stop is None else index[axis].stop))
    spans = sorted(held)
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    count = jax.process_count()
    if count > 1 and sum(b - a for a, b in merged) * count != shape[axis]:
        on = sharding.spec[axis] if axis < len(sharding.spec) else None
        split = math.prod(sharding.mesh.shape[a] for a in ((on,) if isinstance(on, str) else on or ()))
        raise ValueError(
            f"a batch of {shape[axis]} rows is split {split} ways ({on or 'not at all'}) on mesh "
            f"{dict(sharding.mesh.shape)}, which does not give each of the {count} processes its own rows: make "
            f"the batch a multiple of data x fsdp, and put data or fsdp (not tensor alone) across processes")
    return tuple(merged)


def batch_array(local, mesh: Mesh | None, axis: int = 0):
    """This process's rows of a batch (``axis``; the whole batch in a single process) -> the global array split
    over the ``batch`` rule (``jax.make_array_from_process_local_data``)."""
    if mesh is None:
        return local
    local = np.asarray(local)
    shape = list(local.shape)
    shape[axis] *= jax.process_count()
    axes = tuple("batch" if i == axis else None for i in range(local.ndim))
    sharding = NamedSharding(mesh, logical_spec(axes, shape, mesh))
    _process_spans(sharding, tuple(shape), axis)  # each process holds its own rows, or a clear error
    return jax.make_array_from_process_local_data(sharding, local, tuple(shape))


def local_rows(array, axis: int = 0) -> np.ndarray:
    """This process's rows of a global batch array as numpy, ascending (the whole array in a single process): the
    inverse of ``batch_array`` for arrays split over the batch rule only."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        return np.asarray(array)
    spans = _process_spans(array.sharding, array.shape, axis)
    offsets = np.cumsum([0] + [b - a for a, b in spans])  # where each span starts in the local array
    out = np.empty((*array.shape[:axis], offsets[-1], *array.shape[axis + 1:]), array.dtype)
    for shard in array.addressable_shards:
        if any(i != axis and s != slice(None) for i, s in enumerate(shard.index)):
            where = array.sharding.spec if isinstance(array.sharding, NamedSharding) else array.sharding
            raise ValueError(f"local_rows: {where} splits more than the batch axis {axis}")
        start = shard.index[axis].start or 0
        span = next(k for k, (a, b) in enumerate(spans) if a <= start < b)
        local = offsets[span] + start - spans[span][0]
        out[(slice(None),) * axis + (slice(local, local + shard.data.shape[axis]),)] = np.asarray(shard.data)
    return out


def shard_prompts(prompts, mesh: Mesh | None):
    """Prompt arrays (this process's rows, ``ModelInputs``) -> global arrays split over the ``batch`` rule, the
    per-prompt vision inputs included."""
    if mesh is None:
        return prompts
    rows = functools.partial(batch_array, mesh=mesh)
    vision = None if prompts.vision is None else jax.tree.map(rows, prompts.vision)  # absent fields stay None
    return prompts._replace(input_ids=rows(prompts.input_ids), attention_mask=rows(prompts.attention_mask),
                            positions=rows(prompts.positions, axis=1), rope_delta=rows(prompts.rope_delta),
                            vision=vision)


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def host_max(values) -> np.ndarray:
    """Elementwise maximum of ``values`` over all processes (a collective: every process must call it), e.g.
    shapes they must agree on or a flag any of them raised. ``values`` itself in a single process."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)


def host_gather(obj) -> list:
    """Every process's JSON-serialisable ``obj``, in process order (a collective); ``[obj]`` in a single process."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)])))[:, 0]
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths, strict=True)]
