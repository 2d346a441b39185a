"""Checksums of qsched checkpoint files: one BLAKE2b per tensor in the safetensors metadata, one SHA-256 per file.

Shared by :mod:`qsched.checkpoint` (writes and checks whole folders) and :mod:`qsched.hf_quantizer` (checks every
file diffusers loads), so neither needs the other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch

__all__ = ["CheckpointError", "tensor_digest", "digest_metadata", "verify_safetensors", "file_digest",
           "FORMAT_NAME", "DIGEST_KEY"]

FORMAT_NAME = "qsched-quantized"
DIGEST_KEY = "qsched_blake2b"  # safetensors metadata: JSON {tensor name: 128-bit BLAKE2b of its bytes}
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read back exactly (corrupted, truncated, wrong format or unsupported)."""


def tensor_digest(t: torch.Tensor) -> str:
    """128-bit BLAKE2b of a tensor's bytes (C order, any dtype): 32 hex digits, short enough for the header."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().data if flat.numel() else b""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def digest_metadata(state_dict: Mapping[str, torch.Tensor], spec: str) -> dict[str, str]:
    """safetensors metadata entries of a qsched checkpoint: format, spec and the per-tensor digests."""
    digests = {k: tensor_digest(t) for k, t in state_dict.items()}
    return {"qsched_format": FORMAT_NAME, "qsched_spec": spec, DIGEST_KEY: json.dumps(digests, sort_keys=True)}


def verify_safetensors(path: str | os.PathLike, require: bool = False) -> bool:
    """Check every tensor of a safetensors file against the digests in its metadata.

    Returns False for a file without qsched digests (raises instead when ``require``); raises
    :class:`CheckpointError` naming the file if it is truncated, unreadable, or a tensor's bytes changed.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if DIGEST_KEY not in meta:
                if require:
                    raise CheckpointError(f"{path}: no qsched checksums ({DIGEST_KEY}) in the metadata of a "
                                          "qsched-quantized checkpoint")
                return False
            digests = json.loads(meta[DIGEST_KEY])
            keys = list(f.keys())
            for k in keys:
                if k not in digests:
                    raise CheckpointError(f"{path}: tensor {k!r} has no checksum")
                if tensor_digest(f.get_tensor(k)) != digests[k]:
                    raise CheckpointError(f"{path}: checksum mismatch for tensor {k!r} (the file is corrupted)")
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own errors for truncated / garbled files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupted): {first}") from None
    return True


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()
