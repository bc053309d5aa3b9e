"""Dataset-scale attribution: sharded across ``torchrun`` ranks, written atomically, resumable.

    >>> store = ax.distributed.attribute_dataset(ax.integrated_gradients, model_fn, params, dataset,
    ...                                          out="attr-store", batch_size=64)   # doctest: +SKIP
    >>> store.ids, store.attributions[store.ids.argsort()[:4]]                        # doctest: +SKIP

The dataset (indices ``0..N-1``) is cut into fixed shards of ``shard_size`` consecutive indices.
Shard ``k`` is one unit of work and of storage:

* ``shard-k.npy`` — the attributions of the shard's samples (numpy, memory-mappable);
* ``shard-k.json`` — its sample ids, targets, completeness gaps, the CRC-32 of the ``.npy``
  data and a CRC-32 of these fields and the manifest (``entry_crc32``). Written last, so a shard
  is *in the index* exactly when its json file exists.

Both files are written to a temporary name (``<name>.tmp-<host>-<pid>``) and renamed
(``os.replace`` is atomic on POSIX), so a reader or a killed run never sees a partial file under a
final name. ``manifest.json`` (written first by rank 0) fingerprints the model (a SHA-256 of every
parameter and buffer, and one of its structure: a module's ``repr``, submodule types, their plain attributes
and the code of user classes' forwards, a plain function's code, defaults, closure and named globals; or the
caller's ``model_id``), the dataset
(its length and a SHA-256 of a few evenly spaced items, or the caller's ``dataset_id``), the method and its options, and the shard
size; a rerun on the same ``out`` must match it (else a ``ValueError`` names what differs, with
both values) and then computes only the shards that are missing or fail their checks: a
truncated, corrupted, edited or swapped shard file is found by :func:`open_store` (which refuses
it, naming the file) and recomputed by a resume (with a warning naming it). Rank 0 holds an
exclusive ``flock`` on ``writer.lock`` for the whole run, so a second job on the same folder is
refused instead of racing the first; leftover temporary files are removed only when their writer
is dead (same host) or they are over an hour old. Shards are
dealt round-robin among the ranks (``torchrun`` sets ``RANK``/``WORLD_SIZE``); unlike
``DistributedSampler`` nothing is padded, so every sample is computed exactly once. A shard's
contents depend only on its indices (batches never cross shards and random methods get a
generator seeded by ``seed`` and the shard number), so the store is the same whatever the number
of processes and however often the run was interrupted. See ``notes/decisions.md`` for why numpy
files and not zarr.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
import time
import types
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .core import ModelFn, Params, check_positive_int

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no writer lock, temporary files are still per writer
    fcntl = None  # type: ignore[assignment]

__all__ = ["Store", "attribute_dataset", "open_store"]

FORMAT = "attrax-store/4"  # /2: model and dataset fingerprints, shard checksums; /3: model structure, entry checksums;
# /4: the structure covers submodules' plain attributes and the code of user classes' forwards
_STALE_TMP_S = 3600.0  # a temporary file this old is left over, whoever wrote it
_DATASET_PROBES = 8  # items hashed for the dataset fingerprint


# ----------------------------------------------------------------------------- the store


class _Rows:
    """Read-only, lazily concatenated view over the shards' memory-mapped ``.npy`` files."""

    def __init__(self, parts: list[np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._parts = parts
        self._starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self._starts[-1]), *shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<attrax store rows shape={self.shape} dtype={self.dtype} in {len(self._parts)} shards>"

    def _row(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        i %= len(self)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._parts[k][i - self._starts[k]]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return np.asarray(self._row(int(index)))
        if isinstance(index, tuple):
            return self[index[0]][(slice(None), *index[1:])]
        if isinstance(index, slice):
            rows = range(*index.indices(len(self)))
            if index.step in (None, 1):  # contiguous: copy only the overlapping pieces
                lo, hi = rows.start, rows.stop
                pieces = [p[max(lo - s, 0):max(min(hi - s, len(p)), 0)] for p, s in zip(self._parts, self._starts)]
                pieces = [q for q in pieces if len(q)]
                return np.concatenate(pieces) if pieces else np.empty((0, *self.shape[1:]), self.dtype)
            index = np.asarray(rows)
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        for j, i in enumerate(idx.tolist()):
            out[j] = self._row(i)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = self[0:len(self)]
        return full if dtype is None else full.astype(dtype)


@dataclass(frozen=True)
class Store:
    """What :func:`open_store` reads back.

    ``ids`` ``(n,)`` int64: the dataset indices held, each once, in shard order; row ``i`` of
    ``attributions`` (array-like over memory-mapped shard files, nothing loaded until indexed),
    ``targets`` and ``delta`` (completeness gaps, NaN where not computed) belongs to ``ids[i]``.
    ``complete`` says whether every sample of the dataset is held; ``missing`` lists the rest.
    """

    path: Path
    manifest: dict[str, Any]
    ids: np.ndarray
    targets: np.ndarray
    delta: np.ndarray
    attributions: _Rows
    missing: np.ndarray

    @property
    def complete(self) -> bool:
        return self.missing.size == 0

    def __len__(self) -> int:
        return len(self.ids)


def open_store(out: str | os.PathLike[str], *, verify: bool = True) -> Store:
    """Open the store that :func:`attribute_dataset` wrote (or is writing) at ``out``.

    Only shards whose index file exists are read, so a store being written or left by a killed
    run shows exactly its finished shards. Each of them is checked against its index entry: the
    entry's values and checksum, ids, file name, shape and dtype always, and with ``verify`` the
    CRC-32 of its data (one read of every shard, about 2 GB/s; ``verify=False`` opens without
    touching the data).

    Raises:
        ValueError: If ``out`` holds no attrax store or a corrupt ``manifest.json`` (named, with what
            to do), or a shard file is missing, empty, truncated, corrupted, edited or swapped (the
            message names the file; rerunning :func:`attribute_dataset` on ``out`` recomputes it).
    """
    path = Path(out)
    manifest = _read_manifest(path)
    if manifest is None:
        raise ValueError(f"out={str(out)!r} holds no attrax store (no manifest.json)")
    n, size = manifest["n"], manifest["shard_size"]
    ids, targets, delta, parts = [], [], [], []
    for k in range(_n_shards(n, size)):
        if not (path / _meta_name(k)).exists():
            continue
        try:
            info, rows = _load_shard(path, k, manifest, verify)
        except ValueError as e:
            raise ValueError(f"store {str(out)!r}: {e}; rerun attribute_dataset on it to recompute the shard") from None
        parts.append(rows)
        ids.append(np.asarray(info["ids"], dtype=np.int64))
        targets.append(np.asarray(info["targets"], dtype=np.int64))
        delta.append(np.asarray([np.nan if d is None else d for d in info["delta"]], dtype=np.float64))
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.empty(0, dt))
    held = cat(ids, np.int64)
    missing = np.setdiff1d(np.arange(n, dtype=np.int64), held)
    rows = _Rows(parts, tuple(manifest["shape"]), np.dtype(manifest["dtype"]))
    return Store(path, manifest, held, cat(targets, np.int64), cat(delta, np.float64), rows, missing)


# -------------------------------------------------------------------------- the writer


def attribute_dataset(
    attribute: Callable[..., Tensor],
    model_fn: ModelFn,
    params: Params,
    dataset: Any,
    *,
    out: str | os.PathLike[str],
    batch_size: int = 64,
    chunk_size: int | None = None,
    shard_size: int | None = None,
    seed: int | None = None,
    completeness: bool = True,
    progress: bool = True,
    model_id: str | None = None,
    dataset_id: str | None = None,
    **method_kwargs: Any,
) -> Store:
    """Attribute every sample of a map-style dataset and store the results on disk.

    Runs as one process, or as each rank of ``torchrun --nproc-per-node N`` (gloo on CPU, nccl
    when the params live on a GPU; a process group is created from the ``torchrun`` environment
    if none exists and destroyed again at the end). Rerunning the same call on the same ``out``
    resumes: finished shards are skipped.

    Args:
        attribute: An attrax method ``(model_fn, params, x, target, **kw) -> Tensor``.
        dataset: Map-style: ``len(dataset)`` and ``dataset[i] -> (x, target)``, ``x`` one
            sample without batch dim, ``target`` an int.
        out: Folder of the store (created).
        batch_size: Samples per call of ``attribute``.
        chunk_size: Passed to ``attribute`` when given.
        shard_size: Samples per shard file (the unit of resumption); ``8 * batch_size`` by default.
        seed: For methods that draw noise: each shard gets ``generator=Generator().manual_seed(seed + shard)``.
            Passing a ``generator`` instead is refused, because its state would depend on the
            order in which shards run.
        completeness: Also record :math:`\\sum a - (f(x) - f(x'))` per sample (``x'`` from
            ``baseline=`` or the mean over ``baselines=``), one extra batched forward each.
        progress: Rank 0 shows a tqdm bar (all ranks' finished samples, samples/s) if tqdm is installed.
        model_id: Names the model in the manifest instead of a SHA-256 of every tensor in
            ``params`` (which costs one read of the weights, about 1 GB/s) and of the model's
            structure (a module's ``repr`` and submodule types; a plain function's code, defaults,
            closure and named globals; the source of a module's ``forward`` is not covered).
        dataset_id: Names the dataset in the manifest instead of a SHA-256 of
            ``min(8, len(dataset))`` evenly spaced items (pass one for datasets whose items are
            random or costly to load; the fingerprint cannot see edits to items it does not read).
        **method_kwargs: Passed to ``attribute`` unchanged (and recorded in the manifest).

    Returns:
        :func:`open_store` of ``out`` once every rank is done.
    Raises:
        ValueError/TypeError: Bad arguments, a dataset item that is not ``(tensor, int)``, ranks
            with different models or data, an ``out`` that holds a store made with another model,
            dataset, method or options (the message names them, with both values), or an ``out``
            that another job is writing.
    """
    if not callable(attribute):
        raise TypeError(f"attribute must be an attrax method (callable), got {type(attribute).__name__}")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"dataset must be a map-style Dataset (len() and [i]), got {type(dataset).__name__}")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    shard_size = 8 * batch_size if shard_size is None else shard_size
    check_positive_int(shard_size, "shard_size")
    if "generator" in method_kwargs:
        raise ValueError("pass seed=<int> instead of generator=: each shard needs its own reproducible generator")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    for name, value in (("model_id", model_id), ("dataset_id", dataset_id)):
        if value is not None and not (isinstance(value, str) and value):
            raise TypeError(f"{name} must be a non-empty str or None, got {value!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    x0, t0 = _item(dataset, 0)
    if chunk_size is not None:
        method_kwargs = {**method_kwargs, "chunk_size": chunk_size}
    # one sample through the method first: bad options fail here, before anything is written
    probe = dict(method_kwargs, generator=torch.Generator().manual_seed(seed)) if seed is not None else method_kwargs
    _check_output(attribute(model_fn, params, x0[None].to(_device(params)), torch.tensor([t0], device=_device(params)), **probe),
                  (1, *x0.shape))

    path = Path(out)
    manifest = {
        "format": FORMAT,
        "model": {"id": model_id} if model_id is not None else {**_model_fingerprint(params),
                                                                 "structure": _model_structure(model_fn)},
        "dataset": {"id": dataset_id} if dataset_id is not None else _dataset_fingerprint(dataset, n),
        "method": f"{getattr(attribute, '__module__', '?')}.{getattr(attribute, '__qualname__', repr(attribute))}",
        "options": {k: _describe_option(v) for k, v in sorted(method_kwargs.items())},
        "seed": seed,
        "n": n,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "shape": list(x0.shape),
        "dtype": str(_np_dtype(x0.dtype)),
    }
    rank, world, group_made = _join_group(params)
    lock = None
    try:
        _check_ranks_agree(manifest, world)
        todo: list[int] | str = []
        if rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            lock, refusal = _lock(path)
            todo = refusal or _prepare_store(path, manifest)
        todo = _broadcast(todo, world)
        if isinstance(todo, str):  # rank 0 refused the folder: every rank stops with its message
            raise ValueError(todo)
        bar = _Bar(n, path, shard_size, world) if progress and rank == 0 else None
        try:
            for k in todo[rank::world]:
                _run_shard(attribute, model_fn, params, dataset, path, k, n, shard_size, batch_size, seed,
                           completeness, method_kwargs, bar, _store_key(manifest))
        finally:
            if bar is not None:
                bar.close()
        _barrier(world)
    finally:
        if lock is not None:
            lock.close()  # releases the flock
        if group_made:
            torch.distributed.destroy_process_group()
    return open_store(path)


def _prepare_store(path: Path, manifest: dict[str, Any]) -> list[int] | str:
    """Rank 0: create or check the store; the unfinished shards, or why the folder cannot be used."""
    try:
        old = _read_manifest(path)
    except ValueError as e:
        return str(e)
    if old is None:
        _atomic_write_text(path / "manifest.json", json.dumps(manifest, indent=1))
    elif old != manifest:
        diff = _differences(old, manifest, "in the store", "in this call")
        return (f"out={str(path)!r} holds a store made with different {diff}; use a new folder, or the same "
                "model, dataset, method and options to resume")
    _remove_leftovers(path)
    todo = []
    for k in range(_n_shards(manifest["n"], manifest["shard_size"])):
        if not (path / _meta_name(k)).exists():
            todo.append(k)
            continue
        try:
            _load_shard(path, k, manifest, verify=True)
        except ValueError as e:
            warnings.warn(f"store {str(path)!r}: {e}; recomputing shard {k}", RuntimeWarning, stacklevel=3)
            (path / _meta_name(k)).unlink(missing_ok=True)  # out of the index first
            (path / _array_name(k)).unlink(missing_ok=True)
            todo.append(k)
    return todo


def _differences(a: dict[str, Any], b: dict[str, Any], a_is: str, b_is: str) -> str:
    """``"model, options: model {...} <a_is> vs {...} <b_is>; options ..."`` over the keys where ``a`` and ``b`` differ."""
    keys = [k for k in {**b, **a} if a.get(k) != b.get(k)]

    def show(value: Any) -> str:
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 160 else text[:157] + "..."

    return ", ".join(keys) + ": " + "; ".join(f"{k} {show(a.get(k))} {a_is} vs {show(b.get(k))} {b_is}" for k in keys)


def _check_ranks_agree(manifest: dict[str, Any], world: int) -> None:
    """Every rank must attribute the same model, data and method (e.g. weights loaded on rank 0 only)."""
    if world <= 1:
        return
    everyone: list[Any] = [None] * world
    torch.distributed.all_gather_object(everyone, manifest)
    for r, other in enumerate(everyone):
        if other != everyone[0]:
            raise ValueError(f"the ranks disagree: different {_differences(everyone[0], other, 'on rank 0', f'on rank {r}')}")


def _run_shard(attribute: Callable[..., Tensor], model_fn: ModelFn, params: Params, dataset: Any, path: Path, k: int,
               n: int, shard_size: int, batch_size: int, seed: int | None, completeness: bool,
               method_kwargs: dict[str, Any], bar: _Bar | None, store_key: int) -> None:
    lo, hi = k * shard_size, min((k + 1) * shard_size, n)
    kwargs = dict(method_kwargs)
    if seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(seed + k)
    device = _device(params)
    rows: list[np.ndarray] = []
    targets: list[int] = []
    deltas: list[float | None] = []
    for start in range(lo, hi, batch_size):
        items = [_item(dataset, i) for i in range(start, min(start + batch_size, hi))]
        x = torch.stack([it[0] for it in items]).to(device)
        t = torch.tensor([it[1] for it in items], dtype=torch.long, device=device)
        attr = attribute(model_fn, params, x, t, **kwargs)
        _check_output(attr, tuple(x.shape))
        rows.append(attr.detach().cpu().numpy())
        targets.extend(int(v) for v in t.tolist())
        deltas.extend(_delta(model_fn, params, x, t, attr, method_kwargs) if completeness else [None] * len(items))
        if bar is not None:
            bar.advance(len(items))
    data = np.concatenate(rows).astype(_np_dtype(rows[0].dtype), copy=False)
    array_name = _array_name(k)
    _atomic_write(path / array_name, lambda f: np.save(f, data, allow_pickle=False))
    meta = {"shard": k, "file": array_name, "ids": list(range(lo, hi)), "targets": targets, "delta": deltas,
            "crc32": _crc32(data)}
    meta["entry_crc32"] = _entry_crc32(meta, store_key)
    _atomic_write_text(path / _meta_name(k), json.dumps(meta))  # the commit point of the shard
    if bar is not None:
        bar.shard_done()


def _check_output(attr: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(attr, Tensor) or tuple(attr.shape) != shape:
        raise TypeError(f"attribute must return a tensor shaped like its input {shape}, got "
                        f"{type(attr).__name__} {tuple(getattr(attr, 'shape', ()))}")


def _delta(model_fn: ModelFn, params: Params, x: Tensor, t: Tensor, attr: Tensor,
           method_kwargs: dict[str, Any]) -> list[float]:
    rows = torch.arange(len(x), device=x.device)
    with torch.no_grad():
        fx = model_fn(params, x)
        if "baselines" in method_kwargs and isinstance(method_kwargs["baselines"], Tensor):
            b = method_kwargs["baselines"].to(x.device, x.dtype)
            fb = model_fn(params, b).reshape(len(b), -1)[:, t].mean(0)
        else:
            b = method_kwargs.get("baseline")
            b = torch.zeros_like(x) if b is None else torch.as_tensor(b, dtype=x.dtype, device=x.device).expand_as(x)
            fb = model_fn(params, b).reshape(len(x), -1)[rows, t]
        span = fx.reshape(len(x), -1)[rows, t] - fb
        gap = attr.detach().reshape(len(x), -1).sum(1).to(span.dtype) - span
    return [float(v) for v in gap.tolist()]


# ------------------------------------------------------------------------------ helpers


def _item(dataset: Any, i: int) -> tuple[Tensor, int]:
    item = dataset[i]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(f"dataset[{i}] must be a pair (x, target), got {type(item).__name__}")
    x, t = item
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"dataset[{i}][0] must be a tensor (one sample, no batch dim), got {type(x).__name__}")
    if isinstance(t, Tensor) and t.numel() == 1 and not t.is_floating_point():
        t = int(t.item())
    if isinstance(t, np.integer):
        t = int(t)
    if isinstance(t, bool) or not isinstance(t, int):
        raise TypeError(f"dataset[{i}][1] (the target) must be an int, got {type(t).__name__}")
    return x, t


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).numpy().dtype
    return np.dtype(dtype)


def _device(params: Params) -> torch.device:
    for v in (params.values() if isinstance(params, dict) else ()):
        if isinstance(v, Tensor):
            return v.device
    return torch.device("cpu")


def _describe_option(value: Any) -> Any:
    """A JSON-able fingerprint of a method option: tensors by shape, dtype and content hash."""
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()[:16]
        return {"tensor": list(value.shape), "dtype": str(value.dtype), "sha256": digest}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_describe_option(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe_option(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return repr(value) if type(value).__repr__ is not object.__repr__ else type(value).__qualname__


def _n_shards(n: int, size: int) -> int:
    return -(-n // size)


def _meta_name(k: int) -> str:
    return f"shard-{k:05d}.json"


def _array_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


def _crc32(rows: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))


_ENTRY_KEYS = ("shard", "file", "ids", "targets", "delta", "crc32")  # what entry_crc32 covers


def _store_key(manifest: dict[str, Any]) -> int:
    """CRC-32 of the manifest's canonical JSON: mixed into every entry checksum, so a shard copied from
    another store (other model, data or options, same shapes) fails its checksum here."""
    canonical = json.dumps(json.loads(json.dumps(manifest)), sort_keys=True, separators=(",", ":"))
    return zlib.crc32(canonical.encode())


def _entry_crc32(info: dict[str, Any], store_key: int) -> int:
    """CRC-32 of a shard's index entry (its ``_ENTRY_KEYS`` as JSON, which reads back to the same text) and the store."""
    text = json.dumps([store_key, *(info[k] for k in _ENTRY_KEYS)], separators=(",", ":"))
    return zlib.crc32(text.encode())


def _bad_entry_value(info: dict[str, Any]) -> str:
    """The first value of an index entry of the wrong kind (``"delta[0] = 'abc' is not a number or null"``), or ""."""
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63

    def number(v: Any) -> bool:
        return v is None or integer(v) or isinstance(v, float)

    def show(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    for key in ("shard", "crc32", "entry_crc32"):
        if not integer(info[key]):
            return f"{key} = {show(info[key])} is not an integer"
    if not isinstance(info["file"], str):
        return f"file = {show(info['file'])} is not a file name"
    for key, ok, kind in (("ids", integer, "an integer"), ("targets", integer, "an integer"),
                          ("delta", number, "a number or null")):
        values = info[key]
        if not isinstance(values, list):
            return f"{key} = {show(values)} is not a list"
        for i, v in enumerate(values):
            if not ok(v):
                return f"{key}[{i}] = {show(v)} is not {kind}"
    return ""


def _load_shard(path: Path, k: int, manifest: dict[str, Any], verify: bool) -> tuple[dict[str, Any], np.ndarray]:
    """Shard ``k``'s index entry and memory-mapped rows; ValueError naming the file if they are not shard ``k``'s."""
    meta, array = _meta_name(k), _array_name(k)
    n, size = manifest["n"], manifest["shard_size"]
    lo, hi = k * size, min((k + 1) * size, n)
    try:
        info = json.loads((path / meta).read_text())
    except ValueError:
        raise ValueError(f"{meta} is corrupt (not JSON)") from None
    keys = (*_ENTRY_KEYS, "entry_crc32")
    if not isinstance(info, dict) or any(key not in info for key in keys):
        raise ValueError(f"{meta} is corrupt (it lacks one of {', '.join(keys)})")
    bad = _bad_entry_value(info)
    if bad:
        raise ValueError(f"{meta} holds a bad value: {bad}")
    if _entry_crc32(info, _store_key(manifest)) != info["entry_crc32"]:
        raise ValueError(f"{meta} fails its checksum (entry_crc32): its index entry was edited or corrupted, "
                         "or it comes from another store")
    if info["shard"] != k or info["file"] != array or info["ids"] != list(range(lo, hi)) \
            or len(info["targets"]) != hi - lo or len(info["delta"]) != hi - lo:
        raise ValueError(f"{meta} does not describe shard {k} (ids {lo}..{hi - 1} in {array}): swapped or edited")
    try:
        rows = np.load(path / array, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{array} is missing") from None
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty (0-byte) file
        raise ValueError(f"{array} is truncated or corrupt ({type(e).__name__}: {e})") from None
    expect = (hi - lo, *manifest["shape"])
    if rows.shape != expect or str(rows.dtype) != manifest["dtype"]:
        raise ValueError(f"{array} holds {rows.dtype} {rows.shape}, expected {manifest['dtype']} {expect}: swapped or corrupt")
    crc = _crc32(rows) if verify else info["crc32"]
    if crc != info["crc32"]:
        raise ValueError(f"{array} fails its checksum (crc32 {crc}, index says {info['crc32']}): corrupted or swapped")
    return info, rows


def _read_manifest(path: Path) -> dict[str, Any] | None:
    file = path / "manifest.json"
    todo = (f"without it the shards cannot be checked: use a new folder, or delete {str(path)!r} and rerun "
            "attribute_dataset to recompute the store")
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:  # JSONDecodeError (truncated, edited), UnicodeDecodeError
        raise ValueError(f"{str(file)!r} is corrupt (not JSON: {e}); {todo}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{str(path)!r} holds manifest.json that is not an {FORMAT} store")
    if manifest.get("format") != FORMAT:
        if str(manifest.get("format", "")).startswith("attrax-store/"):
            raise ValueError(f"{str(path)!r} holds an {manifest['format']} store from another attrax version, "
                             f"not an {FORMAT} store; use a new folder")
        raise ValueError(f"{str(path)!r} holds manifest.json that is not an {FORMAT} store")
    bad = _bad_manifest_value(manifest)
    if bad:
        raise ValueError(f"{str(file)!r} is corrupt ({bad}); {todo}")
    return manifest


def _bad_manifest_value(manifest: dict[str, Any]) -> str:
    """The first missing or malformed field that reading the store relies on, or ""."""
    def count(v: Any, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    for key, ok, kind in (("n", lambda v: count(v, 1), "a positive integer"),
                          ("shard_size", lambda v: count(v, 1), "a positive integer"),
                          ("shape", lambda v: isinstance(v, list) and all(count(d, 0) for d in v), "a list of sizes"),
                          ("dtype", lambda v: isinstance(v, str), "a dtype name")):
        if key not in manifest:
            return f"it lacks {key}"
        if not ok(manifest[key]):
            return f"{key} = {manifest[key]!r:.40} is not {kind}"
    try:
        np.dtype(manifest["dtype"])
    except TypeError:
        return f"dtype = {manifest['dtype']!r:.40} is not a dtype name"
    return ""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _atomic_write(target: Path, write: Callable[[Any], None]) -> None:
    tmp = target.with_name(f"{target.name}.tmp-{_host()}-{os.getpid()}")  # per writer: see _remove_leftovers
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_text(target: Path, text: str) -> None:
    _atomic_write(target, lambda f: f.write(text.encode()))


def _remove_leftovers(path: Path) -> None:
    """Delete temporary files of dead writers: same host and no such pid, or untouched for an hour.

    A live writer's files are left alone even when no lock protects the folder (a filesystem
    without ``flock``), so two writers never delete each other's files in flight.
    """
    host, now = _host(), time.time()
    for tmp in path.glob("*.tmp-*"):
        owner, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
        try:
            stale = now - tmp.stat().st_mtime > _STALE_TMP_S
        except FileNotFoundError:  # its writer just renamed it
            continue
        if stale or (owner in (host, "") and pid.isdigit() and not _alive(int(pid))):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # PermissionError: someone else's live process
    return True


def _lock(path: Path) -> tuple[Any, str]:
    """Rank 0's exclusive ``flock`` on ``out/writer.lock``: (the open file holding it, or None; why the folder is refused, or "").

    The kernel drops the lock when its holder dies, so a killed run never leaves a stale lock.
    Without ``fcntl`` or on a filesystem that refuses ``flock`` the run goes on unlocked.
    """
    if fcntl is None:
        return None, ""
    f = open(path / "writer.lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        return None, (f"out={str(path)!r} is being written by another attribute_dataset ({owner}); "
                      "wait for it to finish, or use another folder")
    except OSError:  # e.g. ENOLCK/ENOSYS on some network filesystems
        f.close()
        return None, ""
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f, ""


def _model_fingerprint(params: Params) -> dict[str, Any]:
    """SHA-256 over the names, dtypes, shapes and bytes of every tensor in ``params`` (parameters and buffers)."""
    h = hashlib.sha256()
    count = 0
    for name, value in sorted(_leaves(params, ""), key=lambda kv: kv[0]):
        if isinstance(value, Tensor):
            h.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
            h.update(_tensor_bytes(value))
            count += 1
        else:
            h.update(f"{name}={value!r};".encode())
    return {"sha256": h.hexdigest()[:32], "tensors": count}


def _model_structure(model_fn: Any) -> str:
    """SHA-256 (32 hex digits) of a description of what ``model_fn`` computes besides ``params``.

    The same in every process (no ids, addresses or hash-seed orders), so runs and ranks compare it.
    A module (``model_fn.module``): its ``repr()`` (types and hyperparameters such as slopes), the
    name, type and training flag of every submodule, and the wrapper's ``output``/``embedding``.
    A plain function (``model_fn.fn`` as wrapped by :func:`attrax.functionalize`, or ``model_fn``
    itself): its code (bytecode, constants, names), defaults, and the contents of its closure cells
    and of the globals it names (tensors and arrays by a SHA-256 of their bytes, modules by
    description and tensors, functions recursively), followed ``_STRUCTURE_DEPTH`` levels deep.
    A module's structure also holds every submodule's plain attributes (numbers, flags, strings, tensors and
    containers of them) and the code of the ``forward`` of each class not from torch. Not covered: objects
    beyond that depth (by type only) and what a module's forward reads outside its module tree.
    """
    text = json.dumps(_describe_model(model_fn, _STRUCTURE_DEPTH, set()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_STRUCTURE_DEPTH = 4  # levels of nested functions, containers and objects followed from a model function
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def _describe_model(model_fn: Any, depth: int, path: set[int]) -> Any:
    module = getattr(model_fn, "module", None)
    if isinstance(module, torch.nn.Module):
        extra = [_describe_value(getattr(model_fn, k, None), depth, path) for k in ("output", "embedding")]
        return ["model", _describe_module(module), extra]
    inner = getattr(model_fn, "inner", None)  # a BoundModel: the wrapped model and its bound arguments
    if inner is not None and hasattr(model_fn, "args"):
        return ["bound", _describe_model(inner, depth, path), _describe_value(model_fn.args, depth, path)]
    fn = getattr(model_fn, "fn", None)
    return _describe_value(fn if callable(fn) else model_fn, depth, path)


def _describe_module(module: torch.nn.Module) -> list[Any]:
    subs = [f"{name}:{_qualname(type(m))}:{'train' if m.training else 'eval'}"
            for name, m in module.named_modules(remove_duplicate=False)]
    # what repr() leaves out: every submodule's plain attributes (a flag its forward reads, ``use_residual``; a
    # resumed store kept the other setting's attributions) and the code of the forwards of the user's classes
    extra: list[Any] = []
    codes: dict[str, Any] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        attrs = [[k, _describe_value(v, 2, set())] for k, v in sorted(vars(m).items())
                 if not k.startswith("_") and k != "training" and _plain_setting(v)]
        if attrs:
            extra.append([name, attrs])
        cls = type(m)
        forward = getattr(cls, "forward", None)
        code = getattr(forward, "__code__", None)
        if code is not None and not (getattr(forward, "__module__", None) or "").startswith("torch.") \
                and _qualname(cls) not in codes:
            codes[_qualname(cls)] = _describe_value(code, 2, set())
    return [_ADDRESS.sub("0x?", repr(module)), *subs, extra, sorted(codes.items())]


def _plain_setting(v: Any) -> bool:
    """A value a module keeps besides its parameters, buffers and children that can change what it computes: a
    number, string or flag, a plain tensor or array, or a container of those (not an object, a hook, a callable)."""
    if v is None or isinstance(v, (bool, int, float, complex, str, Tensor, np.ndarray)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_plain_setting(e) for e in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain_setting(e) for k, e in v.items())
    return False


def _qualname(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', getattr(cls, '__name__', '?'))}"


def _describe_value(v: Any, depth: int, path: set[int]) -> Any:
    """JSON-able, process-independent description of a value a model function can read."""
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return [type(v).__name__, repr(v)]
    if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return ["torch", str(v)]
    if isinstance(v, Tensor):
        return ["tensor", str(v.dtype), list(v.shape), hashlib.sha256(_tensor_bytes(v)).hexdigest()]
    if isinstance(v, (np.ndarray, np.generic)):
        a = np.asarray(v)
        if a.dtype.hasobject:
            return ["array", str(a.dtype), list(a.shape), _describe_value(a.tolist(), depth, path)]
        return ["array", str(a.dtype), list(a.shape), hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()]
    if isinstance(v, types.ModuleType):
        return ["module", v.__name__]
    if isinstance(v, type):
        return ["class", _qualname(v)]
    if isinstance(v, torch.nn.Module):  # a module the function calls: its structure and its own tensors
        state = sorted(_leaves(dict(v.state_dict(keep_vars=True)), ""), key=lambda kv: kv[0])
        return ["nn.Module", _describe_module(v), [[k, _describe_value(t, 1, path)] for k, t in state]]
    if id(v) in path:
        return ["cycle"]
    if depth <= 0:
        return ["beyond", _qualname(type(v))]
    path = path | {id(v)}
    d = depth - 1
    if isinstance(v, types.CodeType):
        return ["code", v.co_code.hex(), [_describe_value(c, d + 1, path) for c in v.co_consts], list(v.co_names)]
    if isinstance(v, types.MethodType):
        return ["method", _describe_value(v.__func__, depth, path), _describe_value(v.__self__, d, path)]
    if isinstance(v, types.FunctionType):
        code = v.__code__
        cells = []
        for c in v.__closure__ or ():
            try:
                cells.append(_describe_value(c.cell_contents, d, path))
            except ValueError:  # an empty cell
                cells.append(["empty"])
        names = sorted(_code_names(code) & v.__globals__.keys())
        return ["function", _describe_value(code, depth, path), _describe_value(v.__defaults__, d, path),
                _describe_value(v.__kwdefaults__, d, path), cells,
                [[n, _describe_value(v.__globals__[n], d, path)] for n in names]]
    if isinstance(v, functools.partial):
        return ["partial", _describe_value(v.func, d, path), _describe_value(v.args, d, path),
                _describe_value(v.keywords, d, path)]
    if hasattr(v, "fingerprint") and (hasattr(v, "module") or hasattr(v, "fn")):  # an attrax model function
        return ["attrax model", _describe_model(v, d, path)]
    if isinstance(v, (tuple, list)):
        return [type(v).__name__, [_describe_value(e, d, path) for e in v]]
    if isinstance(v, (set, frozenset)):
        items = [_describe_value(e, d, path) for e in v]
        return [type(v).__name__, sorted(items, key=lambda e: json.dumps(e))]
    if isinstance(v, dict):
        items = [[_describe_value(k, d, path), _describe_value(e, d, path)] for k, e in v.items()]
        return [type(v).__name__, sorted(items, key=lambda e: json.dumps(e[0]))]
    if isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType)) or not hasattr(v, "__dict__"):
        owner = getattr(v, "__self__", None)  # a builtin method: its object's type (torch ops: the torch module)
        name = getattr(v, "__qualname__", getattr(v, "__name__", None))
        where = getattr(v, "__module__", None) or (
            owner.__name__ if isinstance(owner, types.ModuleType) else _qualname(type(owner)))
        return ["object", _qualname(type(v)), f"{where}.{name}" if name else ""]
    attrs = [[k, _describe_value(e, d, path)] for k, e in sorted(vars(v).items())]
    call = getattr(type(v), "__call__", None)
    code = _describe_value(call, d, path) if isinstance(call, types.FunctionType) else None
    return ["object", _qualname(type(v)), attrs, code]


def _code_names(code: Any) -> set[str]:
    """The module-level names a code object and the code nested in it (lambdas, inner functions) read."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def _dataset_fingerprint(dataset: Any, n: int) -> dict[str, Any]:
    """SHA-256 of ``min(8, n)`` evenly spaced items (sample bytes, dtype, shape and target); ``n`` is recorded beside it."""
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, _DATASET_PROBES)).round()})
    h = hashlib.sha256()
    for i in picks:
        x, t = _item(dataset, i)
        h.update(f"{i}:{x.dtype}:{tuple(x.shape)}:{t};".encode())
        h.update(_tensor_bytes(x))
    return {"sha256": h.hexdigest()[:32], "items": len(picks)}


def _leaves(value: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    if isinstance(value, (list, tuple)):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), value)]


def _tensor_bytes(t: Tensor) -> np.ndarray:
    t = t.detach().resolve_conj().resolve_neg()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _join_group(params: Params) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if _device(params).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), True


def _broadcast(value: Any, world: int) -> Any:
    if world <= 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


class _Bar:
    """Rank 0's progress bar: samples in committed shards (all ranks, read from the index) plus its own
    samples of the shard in flight; tqdm's rate is then the whole job's samples/s."""

    def __init__(self, n: int, path: Path, shard_size: int, world: int) -> None:
        self._path, self._size, self._n, self._world = path, shard_size, n, world
        self._inflight = 0
        self._polled = time.monotonic()
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._bar = None
            return
        self._committed = self._count()
        self._bar = tqdm(total=n, initial=self._committed, desc="attribute_dataset", unit="sample", dynamic_ncols=True)

    def _count(self) -> int:
        total = 0
        for meta in self._path.glob("shard-*.json"):
            k = int(meta.stem.split("-")[1])
            total += min((k + 1) * self._size, self._n) - k * self._size
        return total

    def _show(self) -> None:
        assert self._bar is not None
        value = min(self._committed + self._inflight, self._n)
        if value > self._bar.n:
            self._bar.update(value - self._bar.n)

    def advance(self, count: int) -> None:
        if self._bar is None:
            return
        self._inflight += count
        if self._world > 1 and time.monotonic() - self._polled > 0.5:  # other ranks' shards
            self._polled = time.monotonic()
            self._committed = self._count()
        self._show()

    def shard_done(self) -> None:
        if self._bar is None:
            return
        self._inflight = 0
        self._committed = self._count()
        self._show()

    def close(self) -> None:
        if self._bar is not None:
            self._committed, self._inflight = self._count(), 0
            self._show()
            self._bar.close()
