"""Checkpoint I/O for SparseT5ForConditionalGeneration: reading any HF T5 checkpoint, compressed save
and load, and dense export. modeling_t5.py holds the architecture; its `from_pretrained`,
`save_pretrained` and `to_hf` call into this module. What a pruned weight keeps and the layer that
stores it come from sparsify.py, for prune-at-load as for `sparsify`.

One reader serves every load (`CheckpointReader`): safetensors (single or sharded) and
pytorch_model.bin (single or sharded), tensor by tensor. Loading streams the checkpoint into a
model skeleton built on the meta device: each tensor is read, converted, moved to the target
device and installed before the next is read, so a load never holds the checkpoint and the model
at once. With `sparsity=` / `format=` (prune-at-load), each targeted Linear weight is pruned and
compressed as it is read, so the dense model never exists, on the host or on the device; the result
is identical to loading dense and calling `sparsify` with the same arguments (same masks,
bit-identical values: pruning.py's selection is exact and streamable).

Memory (measured by benches/test_bench_memory.py and tests/test_checkpoint.py): a safetensors
file is read with plain reads into each tensor's own buffer, never memory-mapped. safetensors'
`safe_open(...).get_tensor` maps the whole file and every page it touches stays resident, so
iterating over an 805 MB file with it raised the peak RSS by 772 MB here. `.bin` checkpoints go
through `torch.load(mmap=True, weights_only=True)`, whose touched pages do stay resident: the
streaming bound holds for safetensors, which is what transformers writes.

No pickle on any load path: `.bin` files are read with `weights_only=True` (tensors and plain
containers only), and a file that needs more is refused with a ValueError, never loaded unsafely.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import tempfile

import torch
from torch import nn

from .configuration_t5 import as_saved
from .layers import SparseLinear
from .memory import release_freed_memory
from .pruning import select_targets
from .sparsify import LAYOUT_KEY, PrunePlan, layout_of, record_layout, replace_module, sparsify

WEIGHTS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
HASH_KEY = "sparse_t5_sha256"  # safetensors metadata: sha256 of the tensors (see content_hash)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U16": torch.uint16, "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---- reading ------------------------------------------------------------------------------------------
class _SafetensorsFile:
    """One .safetensors file: the header is parsed and checked up front; `read(name)` reads that
    tensor alone, with plain reads into a fresh tensor (see the module docstring for why not mmap)."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        self._file = open(path, "rb")
        try:
            (header_len,) = struct.unpack("<Q", self._file.read(8) or b"\0" * 8)
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(self._file.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            self._data_start = 8 + header_len
            data_size = size - self._data_start
            self.entries = {}
            for name, entry in header.items():
                dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
                if dtype is None:
                    raise ValueError(f"tensor '{name}' has unsupported dtype {entry.get('dtype')!r}")
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
                numel = 1
                for d in shape:
                    numel *= d
                if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
                    raise ValueError(f"tensor '{name}' has data offsets [{begin}, {end}) that do not fit its "
                                     f"shape {shape} or the file (truncated?)")
                self.entries[name] = (dtype, shape, begin)
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as err:
            self._file.close()
            raise ValueError(f"corrupt or truncated checkpoint {path}: {err}") from None

    def names(self):
        return sorted(self.entries)

    def shape(self, name):
        return self.entries[name][1]

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        self._file.seek(self._data_start + begin)
        if buffer.size and self._file.readinto(memoryview(buffer)) != buffer.size:
            raise ValueError(f"corrupt or truncated checkpoint {self.path}: tensor '{name}' is cut short")
        return tensor

    def close(self):
        self._file.close()


def load_weights_only(path: str, what: str, mmap: bool = False):
    """torch.load with weights_only=True (tensors and plain containers, never an unpickled object:
    a crafted file could otherwise run code), with a one-line ValueError that names the file and what
    to do instead of torch's many-line unpickling message. There is deliberately no fallback to a full
    unpickle. mmap: memory-map the file where its format allows (the legacy non-zip format does not)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle errors come in many types)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = (lines[0][:160] if lines else type(err).__name__).rstrip(".")
        raise ValueError(f"refusing to load {what} {path}: it is corrupt, or holds objects other than tensors and "
                         f"plain containers, which are never unpickled ({reason}); it is not a file sparse-t5 "
                         f"wrote: write it again with sparse-t5, or unpickle it yourself only if you trust its "
                         f"source") from None


class _BinFile:
    """One pytorch_model.bin, loaded with weights_only=True (memory-mapped where the file allows)."""

    metadata: dict = {}

    def __init__(self, path: str):
        self.path = path
        state = load_weights_only(path, "checkpoint file", mmap=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"corrupt checkpoint {path}: expected a dict of tensors")
        self._state = state

    def names(self):
        return sorted(self._state)

    def shape(self, name):
        return tuple(self._state[name].shape)

    def read(self, name: str) -> torch.Tensor:
        return self._state[name].clone()

    def close(self):
        self._state = {}


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: recorded by save_pretrained, checked on load."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_update(h, name, tensors[name])
    return h.hexdigest()


def _hash_update(h, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


class CheckpointReader:
    """The files of a checkpoint (local directory or hub name), read tensor by tensor.

    `shapes` maps every tensor name to its shape without reading data; `verify()` checks each file's
    recorded content hash (files written by save_pretrained), reading one tensor at a time;
    `stream()` yields (name, tensor) one at a time, file by file in name order; `read(name)` reads
    one tensor."""

    def __init__(self, path_or_name, hub: dict | None = None):
        self.source = str(path_or_name)
        hub = hub or {}
        self.files = []
        for path in _checkpoint_files(path_or_name, hub):
            if not os.path.isfile(path):
                raise ValueError(f"checkpoint shard missing in {path_or_name}: {path}")
            self.files.append(_BinFile(path) if path.endswith(".bin") else _SafetensorsFile(path))
        self.shapes, self._where = {}, {}
        for f in self.files:
            for name in f.names():
                self.shapes[name] = f.shape(name)
                self._where[name] = f

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def verify(self) -> None:
        """Integrity before use: a file whose tensors do not hash to its recorded sha256 raises."""
        for f in self.files:
            expected = f.metadata.get(HASH_KEY)
            if not expected:
                continue
            h = hashlib.sha256()
            for name in f.names():
                _hash_update(h, name, f.read(name))
            if h.hexdigest() != expected:
                raise ValueError(f"corrupt checkpoint {f.path}: tensor contents do not match their recorded sha256")

    def stream(self):
        for f in self.files:
            for name in f.names():
                yield name, f.read(name)

    def close(self):
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StateDictReader:
    """A state dict given to from_pretrained(state_dict=...), read through CheckpointReader's interface."""

    def __init__(self, state_dict: dict[str, torch.Tensor], source: str = "state_dict"):
        if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
            raise ValueError("state_dict must map names to tensors")
        self.source = source
        self._tensors = state_dict
        self.shapes = {name: tuple(t.shape) for name, t in state_dict.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def verify(self) -> None:
        pass  # in memory: no file to be corrupt

    def stream(self):
        yield from self._tensors.items()

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _resolve(path_or_name, filename, hub):
    if os.path.isdir(path_or_name):
        candidate = os.path.join(path_or_name, hub.get("subfolder") or "", filename)
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file

    return cached_file(path_or_name, filename, _raise_exceptions_for_missing_entries=False, **hub)


def _checkpoint_files(path_or_name, hub) -> list[str]:
    """model.safetensors, its sharded index, pytorch_model.bin or its sharded index, in that order."""
    path_or_name = str(path_or_name)
    for single, index in ((WEIGHTS_NAME, WEIGHTS_NAME + ".index.json"), (BIN_NAME, BIN_NAME + ".index.json")):
        found = _resolve(path_or_name, single, hub)
        if found is not None:
            return [found]
        index_file = _resolve(path_or_name, index, hub)
        if index_file is not None:
            try:
                with open(index_file) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"corrupt checkpoint index {index_file}: {err}") from None
            files = [_resolve(path_or_name, s, hub) for s in shards]
            if any(f is None for f in files):
                raise ValueError(f"checkpoint shard missing in {path_or_name}: the index names {shards}")
            return files
    raise ValueError(f"no model.safetensors, pytorch_model.bin or sharded index in {path_or_name}")


# ---- the sparsity layout (config key sparse_t5) --------------------------------------------------------
# ---- saving ------------------------------------------------------------------------------------------------
def tensors_to_save(model, state: dict | None = None) -> dict[str, torch.Tensor]:
    """What a checkpoint of `model` stores: its state_dict (or `state`, e.g. one gathered from shards)
    less the tied copies."""
    state = model.state_dict() if state is None else state
    # Tied copies are not stored (as HF): embed_tokens are `shared`, and so is a tied lm_head.
    drop = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if model.lm_head_shared:
        drop.add("lm_head.weight")
    return {k: v.detach().contiguous() for k, v in state.items() if k not in drop}


def atomic_dir(path: str, write) -> None:
    """write(tmp) into a fresh directory beside `path`, then swap it in for `path` (the old one is kept
    as path.old until the new one is in place): a crash leaves either the old or the new directory
    whole, never a half-written one (the DSI trainer's checkpoints)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    old = path + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str, write) -> None:
    """write(tmp) to a temporary name in the same directory, fsync, then rename over `path`: a crash
    never leaves a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the checkpoint private to its writer
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_sharded(save_directory: str, tensors, max_shard_bytes: int = 2 * 2**30) -> dict:
    """transformers' sharded safetensors layout (model-0000i-of-0000N.safetensors and
    model.safetensors.index.json), written from an iterator of (name, tensor) one shard at a time: only
    the shard being filled is held, so a checkpoint larger than memory (t5-11b: 45 GB in fp32) can be
    written. Each shard goes to a temporary name and is renamed once N is known; the index is written
    last, atomically, so an interrupted write leaves no index and is never mistaken for a checkpoint.
    Returns the index."""
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    shards, held, held_bytes, total = [], {}, 0, 0

    def flush():
        nonlocal held, held_bytes
        tmp = os.path.join(save_directory, f".tmp-shard-{len(shards):05d}.safetensors")
        atomic_write(tmp, lambda p: save_file(held, p, metadata={"format": "pt"}))  # renamed once N is known
        shards.append((tmp, list(held)))
        held, held_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if held and held_bytes + size > max_shard_bytes:
            flush()
        held[name] = tensor.detach().contiguous().cpu()
        held_bytes += size
        total += size
    if held or not shards:
        flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp, os.path.join(save_directory, final))
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write(os.path.join(save_directory, WEIGHTS_NAME + ".index.json"),
                 lambda p: open(p, "w").write(json.dumps(index, indent=2)))
    return index


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_pretrained(model, save_directory, state_dict: dict | None = None) -> None:
    """config.json (with the sparsity layout), generation_config.json and model.safetensors
    (compressed tensors for sparse layers, plus a content hash), each written atomically.
    `state_dict`: the tensors to write instead of the model's own (transformers' argument of that name:
    a sharded model's state gathered with sparse_t5.distributed.full_state_dict)."""
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    tensors = {k: v.cpu() for k, v in tensors_to_save(model, state_dict).items()}
    config = copy.deepcopy(model.config)
    layout = layout_of(model)
    as_saved(config, has_sparse_layers=bool(layout["layers"]))  # model_type: configuration_t5.py says why
    if layout["layers"]:
        config.__dict__[LAYOUT_KEY] = layout
        config.architectures = [type(model).__name__]
    else:
        config.__dict__.pop(LAYOUT_KEY, None)
        config.architectures = ["T5ForConditionalGeneration"]
    metadata = {"format": "pt", HASH_KEY: content_hash(tensors)}
    atomic_write(os.path.join(save_directory, WEIGHTS_NAME), lambda p: save_file(tensors, p, metadata=metadata))
    atomic_write(os.path.join(save_directory, "config.json"),
                 lambda p: open(p, "w").write(config.to_json_string(use_diff=False)))
    if model.generation_config is not None:
        atomic_write(os.path.join(save_directory, "generation_config.json"),
                     lambda p: open(p, "w").write(model.generation_config.to_json_string()))


def to_hf(model):
    """A plain transformers.T5ForConditionalGeneration with the same weights (dense), for export."""
    from transformers import T5ForConditionalGeneration

    dense = copy.deepcopy(model).densify()
    config = as_saved(copy.deepcopy(dense.config), has_sparse_layers=False)
    config.architectures = ["T5ForConditionalGeneration"]
    hf = T5ForConditionalGeneration(config).to(dense.shared.weight.dtype)
    if not dense.lm_head_shared:
        hf.lm_head.weight = nn.Parameter(torch.empty_like(hf.shared.weight))  # untie
    missing, unexpected = hf.load_state_dict(dense.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("embed_tokens.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export to HF failed: missing {missing}, unexpected {unexpected}")
    return hf


# ---- loading -------------------------------------------------------------------------------------------------
_EMBEDDING_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _model_keys(names, model) -> dict[str, str | None]:
    """checkpoint name -> our state key (None: ignored), as HF maps a T5 state dict: tied aliases of
    `shared` and a stray cross-attention relative bias of old checkpoints are dropped."""
    mapping = {name: name for name in names}
    # Some old checkpoints store a relative bias for the decoder's cross-attention; HF ignores it.
    mapping.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)
    if "shared.weight" not in names:
        alias = next((a for a in _EMBEDDING_ALIASES if a in names), None)
        if alias is not None:
            mapping[alias] = "shared.weight"
    for alias in _EMBEDDING_ALIASES:
        if mapping.get(alias) == alias:
            mapping[alias] = None
    if model.lm_head_shared and "lm_head.weight" in mapping:
        mapping["lm_head.weight"] = None
    return mapping


def _install(model, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the (meta) parameter or buffer `key`."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor


def _check_keys_and_layout(model, reader, keys: dict, config, path_or_name) -> dict[str, str]:
    """Raise ValueError unless the checkpoint holds exactly the tensors `model` stores, and every
    sparse layer of the layout the nnz it says. Returns our key -> checkpoint name."""
    expected = set(tensors_to_save(model))
    present = {v for v in keys.values() if v is not None}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path_or_name} does not match the T5 config: "
                         f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    by_key = {v: k for k, v in keys.items() if v is not None}
    for name, spec in (getattr(config, LAYOUT_KEY, None) or {}).get("layers", {}).items():
        stored = reader.shapes[by_key[name + ".values"]]
        if int(torch.Size(stored).numel()) != int(spec["nnz"]):
            raise ValueError(f"corrupt checkpoint: layer '{name}' layout says nnz={spec['nnz']} but the "
                             f"stored values have {int(torch.Size(stored).numel())}")
    return by_key


def _stream_into(model, reader, keys: dict, plan: PrunePlan | None, cast, device, path_or_name) -> None:
    """Every checkpoint tensor into the meta-built `model`, one at a time: a prune target is
    compressed as it is read (plan), a sparse layer adopts its values and structure together, the
    rest is installed in place of its meta tensor. Raises ValueError if anything stays unloaded."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for source, tensor in reader.stream():
        key = keys.get(source)
        if key is None:
            continue
        module_name, _, attr = key.rpartition(".")
        if plan is not None and key in plan.weight_keys:
            linear = model.get_submodule(module_name)
            sparse = plan.compress(module_name, cast(tensor, linear.weight, key))
            replace_module(model, module_name, sparse.to(device))
            del tensor, sparse
            release_freed_memory()
            continue
        module = model.get_submodule(module_name)
        if isinstance(module, SparseLinear):  # gather values + structure, then adopt them together
            parts = pending.setdefault(module_name, {})
            parts[attr] = tensor
            if len(parts) == 1 + len(module._structure_keys()):
                values = cast(parts.pop("values"), module.values, key)
                state = {"values": values.to(device), **{k: v.to(device) for k, v in parts.items()}}
                try:
                    module.load_state_dict(state, strict=True, assign=True)
                except ValueError as err:
                    raise ValueError(f"corrupt sparse weight at '{module_name}': {err.__cause__ or err}") from None
                del pending[module_name]
            continue
        current = getattr(module, attr)
        _install(model, key, cast(tensor, current, key).to(device))
    model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover or pending:
        raise ValueError(f"checkpoint {path_or_name} left tensors unloaded: {(leftover or list(pending))[:10]}")


def load_pretrained(cls, path_or_name, config, hub: dict, device: torch.device, dtype=None, sparsity=None,
                    format=None, scope="layer", include=None, exclude=None, state_dict=None):
    """The body of SparseT5ForConditionalGeneration.from_pretrained (see its docstring)."""
    prune = sparsity is not None or format is not None
    if state_dict is None and path_or_name is None:
        raise ValueError("from_pretrained(None, ...) needs state_dict= (and config=)")
    reader = StateDictReader(state_dict) if state_dict is not None else CheckpointReader(path_or_name, hub)
    path_or_name = path_or_name if path_or_name is not None else "state_dict"
    with reader:
        reader.verify()
        with torch.device("meta"):
            model = cls(config)  # builds the sparse layout of config.sparse_t5 too
        model.tie_weights()
        keys = _model_keys(reader.shapes, model)
        if not model.lm_head_shared and "lm_head.weight" not in keys:
            # As transformers does: with no lm_head.weight stored, lm_head shares the embeddings
            # (what an untied T5Config built by transformers >= 5 saves).
            model.lm_head_shared = True
            model.tie_weights()
            keys = _model_keys(reader.shapes, model)
        by_key = _check_keys_and_layout(model, reader, keys, config, path_or_name)

        keep_fp32 = set(getattr(cls, "_keep_in_fp32_modules", None) or ())

        def cast(tensor, like=None, key=""):
            if dtype == "auto":  # as transformers: the dtype stored (a bf16 checkpoint loads in bf16)
                target = tensor.dtype
            else:
                target = dtype if dtype is not None else (like.dtype if like is not None else tensor.dtype)
            if target == torch.float16 and keep_fp32 & set(key.split(".")):
                target = torch.float32  # as transformers: T5's wo overflows in fp16
            return tensor.to(target) if tensor.is_floating_point() else tensor

        already_sparse = bool(model.sparse_layers())
        plan = None
        if prune and not already_sparse:
            first_target = select_targets(model, include, exclude)
            like = next(iter(first_target.values())).weight if first_target else None
            plan = PrunePlan(model, by_key, lambda source: cast(reader.read(source), like), sparsity,
                             format or "csr", scope, include, exclude)
        _stream_into(model, reader, keys, plan, cast, device, path_or_name)
    if plan is not None:
        record_layout(model)
    elif prune:  # a checkpoint that is sparse already: prune it further, in place
        sparsify(model, sparsity, format=format or "csr", scope=scope, include=include, exclude=exclude)
    model.eval()
    if state_dict is None:
        try:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(path_or_name, **hub)
        except (OSError, ValueError):
            pass
    return model
