"""Where a model runs: one parser of device specs for the trainer, the CLI and from_pretrained."""
from __future__ import annotations

import os

import torch


def resolve_device(spec=None) -> torch.device:
    """torch.device for `spec`: None or "auto" -> CUDA when available (under torchrun, this process's
    LOCAL_RANK GPU), else CPU; "cpu", "cuda", "cuda:N", an int (a CUDA index) or a torch.device.
    Raises ValueError for a CUDA device that this machine does not have."""
    if spec is None or spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return torch.device("cpu")
    try:
        device = torch.device(spec)  # accepts "cuda:1", torch.device and an int (a CUDA index)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"invalid device {spec!r}: expected auto, cpu, cuda or cuda:N ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} was asked for, but CUDA is not available on this machine")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"device {spec!r}: sparse_t5 runs on cpu and cuda")
    return device


def placement(device=None, device_map=None, map_location=None) -> torch.device:
    """The one device a from_pretrained call places the whole model on, from HF's `device_map`
    ("auto", "cpu", "cuda:0", {"": ...}), torch's `map_location`, or `device`; CPU by default, as
    transformers does. A device_map that splits the model across devices is refused."""
    given = {name: v for name, v in (("device", device), ("device_map", device_map), ("map_location", map_location))
             if v is not None}
    specs = []
    for name, value in given.items():
        if isinstance(value, dict):
            if set(value) != {""}:
                raise ValueError(f"{name}={value!r} splits the model across devices; sparse_t5 places the whole "
                                 "model on one device: pass e.g. device_map='cuda:0' or {'': 'cuda:0'}")
            value = value[""]
        specs.append(resolve_device(value))
    if len(set(specs)) > 1:
        raise ValueError(f"conflicting placements: {given}")
    return specs[0] if specs else torch.device("cpu")
