"""Hugging Face safetensors I/O for Qwen2.5-VL and Qwen3-VL (dense and MoE).

Name mapping (our parameter path -> hub key) is mechanical because the module tree mirrors the checkpoint:
``visual.blocks.3.attn.qkv.kernel`` -> ``visual.blocks.3.attn.qkv.weight``; ``model.embed_tokens.embedding`` ->
``model.embed_tokens.weight``; the merger's ``fc1``/``fc2`` are the hub's ``mlp.0``/``mlp.2``. Newer transformers
keep ``model.visual.*`` / ``model.language_model.*`` in memory; both spellings are accepted on load, and hub (on-disk)
names are written.

Qwen3-VL checkpoints are written with ``model.visual.*`` / ``model.language_model.*`` keys (``on_disk``), the
released files' spelling; its MoE experts keep the hub layout ``gate_up_proj [E, hidden, 2I]``,
``down_proj [E, I, hidden]``. transformers 5 keeps them as ``[E, out, in]`` and saves them so; which layout a
checkpoint holds is read from its ``config.json`` when the shape cannot tell (``experts_transposed``).

Layouts: ``nn.Linear.weight`` is ``(out, in)`` and our kernels are ``(in, out)``; the fused vision ``qkv`` kernel is
``(in, 3, out)`` so that the head axis can be sharded; the patch embedding ``Conv3d`` weight
``(hidden, C, T, P, P)`` is a ``(C*T*P*P, hidden)`` kernel.

Loading reads one tensor at a time (memory-mapped) and places it directly with its sharding: each device receives
only its shard and the whole model never sits in one host array.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from medix_jax.data.image import processor_config
from medix_jax.models.qwen_vl.config import ModelConfig, generation_config_to_hf
from medix_jax.models.qwen_vl.families import model_config_from_hf, model_config_to_hf
from medix_jax.models.qwen_vl.model import QwenVL, abstract_model

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files copied from the base checkpoint by save_hf: the tokenizer, its chat template and the processor's settings
# (``generation_config.json`` is always written anew, ``preprocessor_config.json`` when the run's settings are given).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja",
)
AUX_FILES = (*TOKENIZER_FILES, "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tokenizer transformers can load (its config and its vocabulary)."""
    d = Path(directory)
    return (d / "tokenizer_config.json").is_file() and any((d / f).is_file() for f in ("tokenizer.json", "vocab.json"))


# The stacked expert weights: hub layout [E, in, out] (the released files, vLLM); transformers 5 writes [E, out, in]
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not match the model: the message names every offending tensor."""


# config.json key our exports write for a mixture of experts: "in_out" (the hub layout [E, in, out]).
EXPERT_LAYOUT_KEY = "medix_expert_layout"


def experts_transposed(config: dict, key: str, stored: tuple[int, ...], want: tuple[int, ...]) -> bool | None:
    """Whether stacked expert tensor ``key``, stored with shape ``stored``, is ``[E, out, in]`` (transformers 5
    keeps and saves that layout) rather than the hub layout ``want`` ``[E, in, out]`` (Qwen's releases, written
    with transformers 4; our exports). None: neither shape. The shape decides where it can. A square tensor
    (``2 x moe_intermediate == hidden``) is read by what ``config`` says: our ``EXPERT_LAYOUT_KEY``, else the
    major version of its ``transformers_version``. Where it says neither, this raises ``CheckpointMismatch``.
    transformers itself decides by shape alone, so it reads a square hub-layout file transposed."""
    swapped = (want[0], want[2], want[1])
    if stored not in (want, swapped):
        return None
    if want != swapped:
        return stored == swapped
    if config.get(EXPERT_LAYOUT_KEY) in ("in_out", "out_in"):
        return config[EXPERT_LAYOUT_KEY] == "out_in"
    version = str(config.get("transformers_version") or "")
    if re.match(r"\d+\.", version):
        return int(version.split(".")[0]) >= 5
    raise CheckpointMismatch(
        f"tensor {key} is square {stored}: it could be [E, in, out] (the hub layout) or [E, out, in] (transformers "
        f"5's), and config.json says neither (no transformers_version, no {EXPERT_LAYOUT_KEY}). Add "
        f'"{EXPERT_LAYOUT_KEY}": "in_out" or "out_in" to config.json.')


# ----------------------------------------------------------------------------------------------------------------
# Names and layouts


def stacked_at(path: tuple) -> int | None:
    """Position of the layer-list name in a scanned (stacked) parameter's path, else None."""
    for i, part in enumerate(path[:-1]):
        if part in ("layers", "blocks") and not isinstance(path[i + 1], int):
            return i
    return None


def hub_names(path: tuple, num_layers: int) -> list[str]:
    """Hub keys of a parameter: one, or one per layer for a stacked parameter (leading axis = layer)."""
    i = stacked_at(path)
    if i is None:
        return [hub_name(path)]
    return [hub_name(path[: i + 1] + (layer,) + path[i + 1 :]) for layer in range(num_layers)]


def hub_name(path: tuple) -> str:
    """Our parameter path -> on-disk hub key."""
    name = ".".join(str(p) for p in path)
    name = re.sub(r"\.(kernel|embedding)$", ".weight", name)
    return name.replace("merger.fc1.", "merger.mlp.0.").replace("merger.fc2.", "merger.mlp.2.")


def on_disk(key: str, family: str) -> str:
    """The key as a checkpoint of ``family`` stores it: Qwen3-VL hub files spell the in-memory layout of newer
    transformers (``model.visual.*``, ``model.language_model.*``); Qwen2.5-VL ones ``visual.*``, ``model.*``."""
    if family == "qwen2_5_vl" or key.startswith("lm_head."):
        return key
    return "model." + key if key.startswith("visual.") else "model.language_model." + key[len("model."):]


def normalise_hub_key(key: str) -> str:
    """Accept the in-memory names of newer transformers (``model.visual.``, ``model.language_model.``)."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def _layout(key: str) -> str:
    if key.endswith("patch_embed.proj.weight"):
        return "conv"
    if key.endswith("attn.qkv.weight"):
        return "qkv"
    if key.endswith("attn.qkv.bias"):
        return "qkv_bias"
    if key.endswith(".weight") and not key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight",
                                                     "layernorm.weight", "embed_tokens.weight", "pos_embed.weight")):
        return "linear"
    return "same"


def hub_to_ours(key: str, w: np.ndarray) -> np.ndarray:
    kind = _layout(key)
    if kind == "linear":
        return w.T
    if kind == "conv":
        return w.reshape(w.shape[0], -1).T
    if kind == "qkv":  # (3*out, in) -> (in, 3, out)
        return w.reshape(3, -1, w.shape[1]).transpose(2, 0, 1)
    if kind == "qkv_bias":
        return w.reshape(3, -1)
    return w


def ours_to_hub(key: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    kind = _layout(key)
    if kind == "linear":
        return w.T
    if kind == "conv":
        v = cfg.vision
        return w.T.reshape(-1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if kind == "qkv":
        return w.transpose(1, 2, 0).reshape(-1, w.shape[0])
    if kind == "qkv_bias":
        return w.reshape(-1)
    return w


# ----------------------------------------------------------------------------------------------------------------
# Loading


class SafetensorsDir:
    """Tensors of a checkpoint directory (one ``model.safetensors`` or shards with an index), by normalised name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors (or {SAFETENSORS_INDEX}) in {self.path}")
            weight_map = {}
            for file in files:
                with safe_open(file, "np") as f:
                    weight_map.update({k: file.name for k in f.keys()})
        self.files: dict[str, tuple[str, str]] = {}  # normalised name -> (file, stored key)
        for key, file in weight_map.items():
            name = normalise_hub_key(key)
            if name in self.files:
                raise CheckpointMismatch(f"tensor {name} appears twice in {self.path} (as {key})")
            self.files[name] = (file, key)

    def get(self, name: str) -> np.ndarray:
        file, key = self.files[name]
        with safe_open(self.path / file, "np") as f:
            return f.get_tensor(key)

    def shape(self, name: str) -> tuple[int, ...]:
        file, key = self.files[name]
        with safe_open(self.path / file, "np") as f:
            return tuple(f.get_slice(key).get_shape())


def _place(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_hf(
    path: str | Path,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: dict | None = None,
    **overrides,
) -> QwenVL:
    """Load a Hugging Face Qwen2.5-VL checkpoint directory into our model.

    ``dtype`` is the compute dtype and (unless ``param_dtype`` is given) the parameter dtype. With a ``mesh``,
    every parameter is placed directly with the sharding its logical axes get from ``rules`` (see
    ``medix_jax.parallel``). ``overrides`` are further ``ModelConfig`` fields (``remat``, ``scan_layers``).
    Missing, unexpected or mis-shaped tensors raise ``CheckpointMismatch`` naming them. A scanned model's stacked
    parameters are assembled on the host one parameter at a time (all layers of that parameter).
    """
    from medix_jax import parallel

    path = Path(path)
    cfg = model_config_from_hf(path, dtype=dtype, param_dtype=param_dtype or dtype, **overrides)
    graphdef, state = nnx.split(abstract_model(cfg))
    shardings = parallel.param_shardings(state, mesh, rules) if mesh is not None else None
    source = SafetensorsDir(path)

    abstract = dict(nnx.to_flat_state(state))
    keys_of = {p: hub_names(p, var.shape[0]) for p, var in abstract.items()}
    wanted = {key: p for p, keys in keys_of.items() for key in keys}
    present = set(source.files)
    ignored = {"lm_head.weight"} & present if cfg.text.tie_word_embeddings else set()
    if ignored:
        log.info("tied embeddings: ignoring lm_head.weight in %s", path)
    missing, unexpected = sorted(set(wanted) - present), sorted(present - set(wanted) - ignored)
    problems = [f"missing tensor {k}" for k in missing] + [f"unexpected tensor {k}" for k in unexpected]
    swapped = set()  # experts saved by transformers 5 (its in-memory layout [E, out, in])
    config = json.loads((path / "config.json").read_text())
    for key, p in wanted.items():
        if key in present:
            shape = abstract[p].shape[1:] if stacked_at(p) is not None else abstract[p].shape
            want = _hub_shape(key, shape, cfg)
            stored = source.shape(key)
            transposed = experts_transposed(config, key, stored, want) if key.endswith(EXPERTS) else None
            if transposed:
                swapped.add(key)
            elif stored != want:
                problems.append(f"tensor {key} has shape {stored}, expected {want}")
    if problems:
        raise CheckpointMismatch(f"{path} does not match the model:\n  " + "\n  ".join(problems))

    pdtype = jnp.dtype(cfg.param_dtype)
    for p, keys in keys_of.items():
        arrays = [hub_to_ours(key, source.get(key).swapaxes(1, 2) if key in swapped else source.get(key))
                  .astype(pdtype) for key in keys]
        array = np.stack(arrays) if stacked_at(p) is not None else arrays[0]
        abstract[p].set_value(_place(np.ascontiguousarray(array), shardings[p] if shardings else None))
    return nnx.merge(graphdef, nnx.from_flat_state(abstract))


def _hub_shape(key: str, ours: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """Hub-layout shape of a parameter, computed on a zero-stride view (no memory)."""
    return tuple(ours_to_hub(key, np.broadcast_to(np.zeros((), np.uint8), ours), cfg).shape)


# ----------------------------------------------------------------------------------------------------------------
# Saving


def hub_tensors(model: QwenVL, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(hub key, host array) for every parameter, one at a time, in hub layout. A parameter split across
    processes is gathered (``process_allgather``: every process must iterate in step)."""
    from jax.experimental import multihost_utils

    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var[...]
        split = isinstance(value, jax.Array) and not value.is_fully_addressable
        array = np.asarray(multihost_utils.process_allgather(value, tiled=True) if split else jax.device_get(value))
        if dtype is not None:
            array = array.astype(jnp.dtype(dtype))
        keys = hub_names(p, array.shape[0])
        layers = array if stacked_at(p) is not None else [array]
        for key, layer in zip(keys, layers, strict=True):
            yield on_disk(key, model.config.family), np.ascontiguousarray(ours_to_hub(key, layer, model.config))


def save_hf(
    model: QwenVL,
    out_dir: str | Path,
    base_dir: str | Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    image_processor: dict | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory that ``AutoProcessor``, ``AutoModelForImageTextToText``
    and vLLM load.

    Safetensors shards of at most ``max_shard_bytes`` (a single ``model.safetensors`` when one suffices, otherwise
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``), a hub-style ``config.json``,
    ``generation_config.json`` (every end token, pad and bos, the reference sampling defaults),
    ``preprocessor_config.json`` (``image_processor``, the image settings the run used, e.g.
    ``data.image.processor_config(min_pixels, max_pixels)``; default: ``base_dir``'s, else transformers' defaults),
    and the tokenizer, chat template and processor files of ``base_dir`` when given -- a ``base_dir`` without a
    tokenizer is a ``FileNotFoundError``. Files are readable by everyone (0644). ``dtype`` casts the weights
    (default: as stored). In a job of several processes every process calls it (the parameters are gathered one at
    a time) and process 0 writes.

    Everything is written to a hidden ``.<name>.tmp-<pid>`` next to ``out_dir`` which then replaces it, so a crash
    mid-export leaves the previous export intact (leftovers of such a crash are cleared by the next save). Other
    files of a previous export (not its weights) are carried over; one holding subdirectories is not replaced.
    """
    out = Path(out_dir)
    if base_dir is not None and not has_tokenizer(base_dir):
        raise FileNotFoundError(f"no tokenizer in {base_dir} (tokenizer_config.json and tokenizer.json or vocab.json): "
                                "name an HF directory that has one (python -m medix_jax.export --base HF_DIR)")
    if jax.process_index() != 0:
        for _ in hub_tensors(model, dtype):
            pass
        return out
    final = out.resolve()  # a symlink is followed: its target is replaced
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix, old_prefix = f".{final.name}.tmp-", f".{final.name}.old-"
    _clear_leftovers(final, (tmp_prefix, old_prefix))
    carried = _files_to_carry(final)
    work = final.parent / f"{tmp_prefix}{os.getpid()}"
    work.mkdir()
    try:
        _write_weights(work, model, dtype, max_shard_bytes)
        _write_configs(work, model, dtype, base_dir, carried, image_processor)
        work.chmod(0o755)
        for p in work.iterdir():
            p.chmod(0o644)  # safetensors writes 0600: an export is for others to serve
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _replace_dir(final, work, final.parent / f"{old_prefix}{os.getpid()}")
    return out


def _clear_leftovers(final: Path, prefixes: tuple[str, str]) -> None:
    """Remove the temporary directories of an earlier save_hf of ``final`` that crashed (``prefixes``: those of its
    work and old directories); an old directory whose rename back never happened is restored as ``final``."""
    old_prefix = prefixes[1]
    for left in sorted(p for p in final.parent.iterdir() if p.name.startswith(prefixes)):
        if left.name.startswith(old_prefix) and not final.exists():  # killed between the two renames of _replace_dir
            left.rename(final)
        else:
            shutil.rmtree(left)


def _files_to_carry(final: Path) -> list[Path]:
    """Files of a previous export at ``final`` other than its weights; an error when ``final`` is not a directory or
    holds directories (no export of ours)."""
    carried = [p for p in final.iterdir() if p.name != SAFETENSORS_INDEX and not p.match("model*.safetensors")
               ] if final.is_dir() else []
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a directory")
    if dirs := [p.name for p in carried if p.is_dir()]:
        raise ValueError(f"{final} holds directories {dirs}, so it is no export of ours: not replacing it")
    return carried


def _write_weights(work: Path, model: QwenVL, dtype: str | None, max_shard_bytes: int) -> None:
    """The safetensors shards of ``model`` in ``work``: ``model.safetensors`` when one suffices, else numbered shards
    and ``model.safetensors.index.json``."""
    shard: dict[str, np.ndarray] = {}
    written: list[tuple[str, list[str]]] = []  # (temporary file name, keys), renamed once the count is known
    total = 0

    def flush():
        name = f"part-{len(written):05d}.safetensors"
        save_file(shard, str(work / name), metadata={"format": "pt"})
        written.append((name, list(shard)))
        shard.clear()

    for key, array in hub_tensors(model, dtype):
        if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_bytes:
            flush()
        shard[key] = array
        total += array.nbytes
    flush()

    if len(written) == 1:
        (work / written[0][0]).rename(work / "model.safetensors")
        return
    weight_map = {}
    for i, (name, keys) in enumerate(written):
        file = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        (work / name).rename(work / file)
        weight_map.update({k: file for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (work / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write_configs(work: Path, model: QwenVL, dtype: str | None, base_dir: str | Path | None, carried: list[Path],
                   image_processor: dict | None) -> None:
    """``config.json``, the auxiliary files of ``base_dir`` and the ``carried`` files of the previous export,
    ``generation_config.json`` and, when given or missing, ``preprocessor_config.json``, in ``work``."""
    stored = str(jnp.dtype(dtype or model.config.param_dtype))
    config = model_config_to_hf(model.config, torch_dtype=stored)
    if model.config.text.num_experts:
        config[EXPERT_LAYOUT_KEY] = "in_out"  # what hub_tensors writes; a square shape cannot say it
    (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if base_dir is not None:
        for name in AUX_FILES:
            if (Path(base_dir) / name).is_file():
                shutil.copy2(Path(base_dir) / name, work / name)
    for p in carried:
        if not (work / p.name).exists():
            shutil.copy2(p, work / p.name)
    # where generation stops and how it samples (vLLM, transformers, load_hf)
    text = json.dumps(generation_config_to_hf(model.config), indent=2)
    (work / "generation_config.json").write_text(text + "\n")
    if image_processor is not None or not (work / "preprocessor_config.json").exists():
        v = model.config.vision
        settings = image_processor or processor_config(56 * 56, 14 * 14 * 4 * 1280, family=model.config.family)
        settings = {**settings, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                    "merge_size": v.spatial_merge_size}
        (work / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def _replace_dir(final: Path, work: Path, old: Path) -> None:
    """Move the finished ``work`` to ``final``, the previous ``final`` (if any) out of the way through ``old``."""
    if final.exists():
        final.rename(old)
        work.rename(final)
        shutil.rmtree(old)
    else:
        work.rename(final)
