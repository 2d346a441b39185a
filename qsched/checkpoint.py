"""Quantized checkpoints: ``save_quantized`` / ``load_quantized`` in the diffusers layout, with integrity checks.

A folder written by :func:`save_quantized` is an ordinary ``save_pretrained`` folder (a pipeline, or a bare
denoiser): the quantized model's ``config.json`` carries its ``quantization_config`` (see
:mod:`qsched.hf_quantizer`) and its ``diffusion_pytorch_model.safetensors`` holds the packed integer weights, so
``DiffusionPipeline.from_pretrained(folder)`` reloads it after ``import qsched``. Beside it,
``qsched_quantization.json`` (the manifest) records the spec and a SHA-256 of every file written.

Integrity: every qsched safetensors file carries one checksum per tensor in its metadata (``qsched_blake2b``), checked
whenever diffusers loads it; :func:`load_quantized` also checks the manifest's per-file digests first, so a truncated
or corrupted file is a one-line :class:`CheckpointError` naming the file. The folder is written into a temporary
sibling and moved into place, every file mode 0644.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from qsched._util import package_versions
from qsched.integrity import CheckpointError, FORMAT_NAME, file_digest, verify_safetensors  # noqa: F401 (re-exported)

__all__ = ["CheckpointError", "save_quantized", "load_quantized", "verify_safetensors", "verify_folder",
           "is_quantized_folder", "MANIFEST_FILE", "WEIGHTS_FILE"]

FORMAT_VERSION = 2  # 1: qsched_quantized.safetensors beside config.json (qsched 0.1 before the diffusers layout)
MANIFEST_FILE = "qsched_quantization.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' own file name (SAFETENSORS_WEIGHTS_NAME)
_FILE_MODE, _DIR_MODE = 0o644, 0o755


def verify_folder(directory: str | os.PathLike) -> dict[str, Any]:
    """Check a :func:`save_quantized` folder against its manifest (format and per-file SHA-256); returns the
    manifest. Raises :class:`CheckpointError` naming the first missing, truncated or changed file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for rel, digest in manifest.get("files", {}).items():
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {directory / MANIFEST_FILE})")
        if file_digest(p) != digest:
            raise CheckpointError(f"{p}: checksum mismatch with {MANIFEST_FILE} (the file is truncated or corrupted)")
    return manifest


def is_quantized_folder(directory: str | os.PathLike) -> bool:
    """True if ``directory`` holds a qsched manifest (written by :func:`save_quantized`)."""
    return (Path(directory) / MANIFEST_FILE).is_file()


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a directory written by save_quantized")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version == 1:
        raise CheckpointError(f"{path}: format version 1 (qsched_quantized.safetensors), written before qsched "
                              "used the diffusers layout; quantize the full-precision model again and re-save it")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this qsched reads up to {FORMAT_VERSION}: "
                              "upgrade qsched")
    return manifest


# ------------------------------------------------------------------------------------------------ save


def _resolve(pipe_or_module: Any) -> tuple[str | None, torch.nn.Module]:
    from qsched.runner import denoiser_of

    return denoiser_of(pipe_or_module)


def _tree_files(root: Path) -> Iterable[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _finalize_modes(root: Path) -> None:
    os.chmod(root, _DIR_MODE)
    for p in root.rglob("*"):
        os.chmod(p, _DIR_MODE if p.is_dir() else _FILE_MODE)


def _replace_dir(tmp: Path, directory: Path) -> None:
    """Move ``tmp`` to ``directory``; an existing qsched checkpoint there is replaced, anything else refused."""
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    if directory.exists() and any(directory.iterdir()):
        if not is_quantized_folder(directory):
            raise CheckpointError(f"{directory} exists, is not empty and is not a qsched checkpoint: refusing to "
                                  "replace it (choose an empty or new directory)")
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.replace(directory, old / directory.name)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if directory.exists():
            directory.rmdir()
        os.replace(tmp, directory)


def save_quantized(pipe_or_module: Any, directory: str | os.PathLike) -> Path:
    """Save a qsched-quantized pipeline (or bare diffusers denoiser) in the diffusers layout. Returns the directory.

    Writes what ``save_pretrained`` writes (the denoiser's packed integer weights in its own
    ``diffusion_pytorch_model.safetensors``, with per-tensor checksums; its ``config.json`` with the
    ``quantization_config``) plus ``qsched_quantization.json`` (spec, denoiser, per-file SHA-256, versions).
    Raises :class:`CheckpointError` if the model could not be reloaded exactly (e.g. LoRA layers, mixed dtypes).
    """
    from qsched.quantization import BACKEND_ATTR, SPEC_ATTR

    directory = Path(directory)
    name, denoiser = _resolve(pipe_or_module)
    spec = getattr(denoiser, SPEC_ATTR, None)
    if spec is None:
        raise CheckpointError("save_quantized needs a quantized denoiser: call qsched.quantize(...) first")
    if getattr(denoiser, BACKEND_ATTR, "qsched") != "qsched":
        raise CheckpointError("save_quantized supports backend='qsched' only; torchao-quantized models are not saved")
    if not hasattr(denoiser, "save_pretrained") or getattr(denoiser, "hf_quantizer", None) is None:
        raise CheckpointError(f"save_quantized needs a diffusers model (ModelMixin) as denoiser so it can be rebuilt "
                              f"from its config; got {type(denoiser).__name__}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        target = pipe_or_module if name is not None else denoiser
        target.save_pretrained(str(tmp), safe_serialization=True)
        files = {p.relative_to(tmp).as_posix(): file_digest(p) for p in _tree_files(tmp)}
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "spec": spec,
            "denoiser": name,
            "pipeline_class": None if name is None else type(pipe_or_module).__name__,
            "files": files,
            "versions": package_versions(),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _finalize_modes(tmp)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ------------------------------------------------------------------------------------------------ load


def _model_class(directory: Path) -> type:
    """The diffusers ModelMixin class named by a bare model folder's config.json (diffusers classes only)."""
    import diffusers
    from diffusers import ModelMixin

    config = json.loads((directory / "config.json").read_text())
    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise CheckpointError(f"{directory / 'config.json'}: _class_name {name!r} is not a diffusers model class")
    return cls


def load_quantized(directory: str | os.PathLike, keep_packed: bool = False, device: str | torch.device = "cpu",
                   **kwargs: Any) -> Any:
    """Load what :func:`save_quantized` wrote: the pipeline (or bare denoiser), in eval mode, checked file by file.

    Outputs equal the in-memory quantized model's exactly. ``keep_packed=True`` keeps only the integer codes and
    scales in memory and dequantizes during each forward (identical outputs, smaller, slower). Extra ``kwargs`` go
    to ``from_pretrained``.
    """
    from qsched.hf_quantizer import _realign  # importing it registers the quantizer with diffusers
    from qsched.quantization import quantized_layers

    directory = Path(directory)
    manifest = verify_folder(directory)
    name = manifest.get("denoiser")
    if name is None:
        model = _model_class(directory).from_pretrained(str(directory), **kwargs)
        denoiser, out = model, model
    else:
        from qsched.components import pipeline_class

        index = json.loads((directory / "model_index.json").read_text())
        pipe = pipeline_class(manifest.get("pipeline_class") or index.get("_class_name")).from_pretrained(
            str(directory), **kwargs)
        for comp in pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                _realign(comp)
        denoiser, out = getattr(pipe, name), pipe
    layers = quantized_layers(denoiser)
    if not layers:
        raise CheckpointError(f"{directory}: the reloaded {name or 'model'} has no quantized layers (its "
                              "config.json lost its quantization_config?)")
    for m in layers.values():
        m.set_keep_packed(keep_packed)
    out.to(device)
    return out
