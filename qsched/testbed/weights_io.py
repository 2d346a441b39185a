"""Save / load a small testbed network as ``<stem>.safetensors`` (weights) + ``<stem>.json`` (its constructor
config plus training facts). Used by the classifier and the tiny CLIP; never pickle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def file_digest(path: str | Path, n: int = 10) -> str:
    """First ``n`` hex digits of the sha1 of a file's bytes: what keys cached results to the weights behind them."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:n]
M = TypeVar("M", bound=torch.nn.Module)


def save_net(model: torch.nn.Module, out_dir: str | Path, stem: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` ({"config": model.config, **extra})."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / f"{stem}.safetensors"))
    (out / f"{stem}.json").write_text(json.dumps({"config": model.config, **(extra or {})}, indent=2) + "\n")
    return out / f"{stem}.safetensors"


def load_net(cls: type[M], stem: str, weights_dir: str | Path | None, train_cmd: str,
             device: str | torch.device = "cpu") -> M:
    """Build ``cls(**config)`` from ``<stem>.json``, load ``<stem>.safetensors``; eval mode, no gradients."""
    from safetensors.torch import load_file

    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    wf, cf = d / f"{stem}.safetensors", d / f"{stem}.json"
    if not wf.exists() or not cf.exists():
        raise FileNotFoundError(f"{stem} weights not found in {d} (need {wf.name} and {cf.name}); train them with "
                                f"`{train_cmd} --out {d}`")
    model = cls(**json.loads(cf.read_text())["config"])
    model.load_state_dict(load_file(str(wf)))
    return model.requires_grad_(False).to(device).eval()
