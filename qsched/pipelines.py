"""Model table and pipeline loading: aliases (``MODELS``), hub ids, local (and quantized) pipeline directories.

``load_pipeline("lcm-sd15")`` loads the real model from the Hugging Face hub (or its local cache) with the
scheduler used in the paper; ``load_pipeline("testbed")`` loads qsched's small offline testbed; a directory written
by ``pipe.save_pretrained`` or ``qsched.save_quantized`` loads back as it was saved.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from qsched.components import QSCHED_PIPELINES as _QSCHED_PIPELINES
from qsched.components import check_components as _check_components
from qsched.components import pipeline_class
from qsched.errors import QSchedError

__all__ = ["MODELS", "ModelSpec", "ModelNotFoundError", "load_pipeline", "resolve_model"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(ValueError):
    """A model (or LoRA) is neither cached locally nor downloadable (e.g. offline)."""


def _frozen(d: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class ModelSpec:
    """Defaults for one model alias (see ``MODELS``)."""

    alias: str
    hub_id: str | None
    pipeline_class: str
    scheduler_class: str
    steps: int
    guidance: float | None
    resolution: int | None  # square output size passed as height/width (None: the pipeline's fixed size)
    dtype: str  # dtype on an accelerator; on CPU pipelines load in float32 unless asked otherwise
    denoiser: str  # "unet" | "transformer"
    family: str  # qsched.testing.tiny_pipeline family with the same architecture and scheduler
    scheduler_kwargs: Mapping[str, Any] = field(default_factory=_frozen, hash=False)
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=_frozen, hash=False)
    call_kwargs: Mapping[str, Any] = field(default_factory=_frozen, hash=False)
    lora_repo: str | None = None
    lora_subfolder: str | None = None
    lora_weight_name: str | None = None
    loader: str | None = None  # "module:function" for non-hub models (imported lazily)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The table's dtype as a torch dtype."""
        return _DTYPES[self.dtype]

    @property
    def is_testbed(self) -> bool:
        """The embedded testbed (its own scorers, FD/accuracy evaluators and prompt sets)."""
        return self.family == "testbed"

    @property
    def jaq_preset(self) -> str:
        """The JAQ scorer preset after the paper: "testbed"; CLIPScore + CLIP-IQA ("sd15") for the SD1.5 family;
        CLIPScore + HPSv2-style ("sdxl") for SDXL and FLUX."""
        if self.is_testbed:
            return "testbed"
        return "sdxl" if self.family in ("sdxl-turbo", "flux") else "sd15"

    def call_defaults(self) -> dict[str, Any]:
        """Pipeline call defaults except the step count: guidance_scale, height/width, extras."""
        kw: dict[str, Any] = {}
        if self.guidance is not None:
            kw["guidance_scale"] = self.guidance
        if self.resolution is not None:
            kw["height"] = kw["width"] = self.resolution
        kw.update(self.call_kwargs)
        return kw


_SD15_NO_SAFETY = _frozen({"safety_checker": None, "requires_safety_checker": False})
# SD1.5 moved from runwayml/stable-diffusion-v1-5 (deleted) to this official mirror, same files.
_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _pcm(steps: int) -> ModelSpec:
    return ModelSpec(
        alias=f"pcm-sd15-{steps}step", hub_id=_SD15, pipeline_class="StableDiffusionPipeline",
        scheduler_class="TCDScheduler", scheduler_kwargs=_frozen({"timestep_spacing": "trailing"}), steps=steps,
        guidance=0.0, resolution=512, dtype="float16", denoiser="unet", family="pcm",
        pipeline_kwargs=_SD15_NO_SAFETY, lora_repo="wangfuyun/PCM_Weights", lora_subfolder="sd15",
        lora_weight_name=f"pcm_sd15_smallcfg_{steps}step_converted.safetensors",
    )


MODELS: dict[str, ModelSpec] = {
    "lcm-sd15": ModelSpec(
        alias="lcm-sd15", hub_id="SimianLuo/LCM_Dreamshaper_v7", pipeline_class="LatentConsistencyModelPipeline",
        scheduler_class="LCMScheduler", steps=4, guidance=8.0, resolution=512, dtype="float16", denoiser="unet",
        family="lcm", pipeline_kwargs=_SD15_NO_SAFETY,
    ),
    "pcm-sd15-2step": _pcm(2),
    "pcm-sd15-4step": _pcm(4),
    "pcm-sd15-8step": _pcm(8),
    "sdxl-turbo": ModelSpec(
        alias="sdxl-turbo", hub_id="stabilityai/sdxl-turbo", pipeline_class="StableDiffusionXLPipeline",
        scheduler_class="EulerAncestralDiscreteScheduler", scheduler_kwargs=_frozen({"timestep_spacing": "trailing"}),
        steps=4, guidance=0.0, resolution=512, dtype="float16", denoiser="unet", family="sdxl-turbo",
    ),
    "flux-schnell": ModelSpec(
        alias="flux-schnell", hub_id="black-forest-labs/FLUX.1-schnell", pipeline_class="FluxPipeline",
        scheduler_class="FlowMatchEulerDiscreteScheduler", steps=4, guidance=0.0, resolution=1024, dtype="bfloat16",
        denoiser="transformer", family="flux", call_kwargs=_frozen({"max_sequence_length": 256}),
    ),
    "testbed": ModelSpec(
        alias="testbed", hub_id=None, pipeline_class="TestbedPipeline", scheduler_class="LCMScheduler", steps=4,
        guidance=None, resolution=None, dtype="float32", denoiser="unet", family="testbed",
        loader="qsched.testbed.pipeline:load_testbed_pipeline",
    ),
}


def resolve_model(name_or_path: str | os.PathLike) -> ModelSpec:
    """The :class:`ModelSpec` of an alias, or one derived for a local directory or hub id (resolved once by
    every command and passed down; nothing else re-interprets a model name).

    A directory holding a saved testbed pipeline gets the testbed's defaults; any other directory or hub id
    gets 4 steps, the pipeline's own guidance and resolution, and the JAQ preset guessed from its name
    ("xl"/"flux": sdxl, else sd15).
    """
    name = os.fspath(name_or_path)
    if name in MODELS:
        return MODELS[name]
    path = Path(name).expanduser()
    class_name = None
    index = path / "model_index.json"
    if index.is_file():
        try:
            class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (ValueError, UnicodeDecodeError, AttributeError):
            class_name = None  # the loader reports a damaged folder with its own error
    if class_name in _QSCHED_PIPELINES:
        base = MODELS["testbed"]
        return ModelSpec(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, "alias": name,
                            "loader": None})
    low = name.lower()
    return ModelSpec(alias=name, hub_id=None if path.exists() else name, pipeline_class=class_name or
                     "DiffusionPipeline", scheduler_class="", steps=4, guidance=None, resolution=None,
                     dtype="float16", denoiser="transformer" if "flux" in low else "unet",
                     family="sdxl-turbo" if "xl" in low else ("flux" if "flux" in low else "unknown"))


def _not_found(what: str, err: BaseException) -> ModelNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    reason = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "it could not be downloaded"
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return ModelNotFoundError(
        f"{what} is not in the local Hugging Face cache and {reason}. Run once with network access (e.g. "
        f"`huggingface-cli download <repo>`) to cache it, or pass a local directory holding a saved pipeline. "
        f"[{type(err).__name__}: {first}]"
    )


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HFValidationError

    return (OSError, HFValidationError)


def _resolve_dtype(dtype: Any, device: str | torch.device, spec: ModelSpec | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise QSchedError(f"Unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}.")
        return _DTYPES[dtype]
    if dtype is not None or spec is None:
        return dtype
    return torch.float32 if torch.device(device).type == "cpu" else spec.torch_dtype


def _import_loader(path: str) -> Any:
    module, _, fn = path.partition(":")
    return getattr(importlib.import_module(module), fn)


def _load_hub_alias(spec: ModelSpec, device: str | torch.device, dtype: torch.dtype | None, **kw: Any) -> Any:
    import diffusers

    pipe_cls = getattr(diffusers, spec.pipeline_class)
    try:
        pipe = pipe_cls.from_pretrained(spec.hub_id, torch_dtype=dtype, **{**spec.pipeline_kwargs, **kw})
    except _hub_errors() as e:
        raise _not_found(f"Model {spec.hub_id!r} (alias {spec.alias!r})", e) from None
    sched_cls = getattr(diffusers, spec.scheduler_class)
    pipe.scheduler = sched_cls.from_config(pipe.scheduler.config, **spec.scheduler_kwargs)
    if spec.lora_repo:
        from diffusers.utils import is_peft_available

        if not is_peft_available():
            raise ImportError(f"Alias {spec.alias!r} needs a LoRA, which diffusers loads through `peft`: "
                              "pip install 'qsched[peft]' (or pip install peft).")
        try:
            pipe.load_lora_weights(spec.lora_repo, weight_name=spec.lora_weight_name, subfolder=spec.lora_subfolder)
        except _hub_errors() as e:
            what = f"LoRA {spec.lora_repo}/{spec.lora_subfolder}/{spec.lora_weight_name} (alias {spec.alias!r})"
            raise _not_found(what, e) from None
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers: plain Linear/Conv remain
    return pipe.to(device)


def _load_directory(path: Path, device: str | torch.device, dtype: torch.dtype | None, **kw: Any) -> Any:
    from qsched.checkpoint import MANIFEST_FILE, is_quantized_folder, load_quantized
    from qsched.errors import CorruptFileError, QSchedError, read_json

    if is_quantized_folder(path):
        if dtype is not None:
            kw["torch_dtype"] = dtype
        return load_quantized(str(path), device=device, **kw)
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path} is not a saved pipeline (no model_index.json or {MANIFEST_FILE}).")
    config = read_json(index, "pipeline index")
    if not isinstance(config, dict):
        raise CorruptFileError(f"pipeline index {index} is not a JSON object")
    _check_components(index, config)
    pipe_cls = pipeline_class(config.get("_class_name", "DiffusionPipeline"))
    try:
        pipe = pipe_cls.from_pretrained(str(path), torch_dtype=dtype, **kw)
    except (QSchedError, ModelNotFoundError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever diffusers/safetensors raise on a damaged folder is user input
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise CorruptFileError(f"cannot load the pipeline saved in {path} (damaged or incomplete: "
                               f"{type(e).__name__}: {first})") from None
    return pipe.to(device)


def load_pipeline(
    name_or_path: str | os.PathLike = "testbed", device: str | torch.device = "cpu", dtype: Any = None, **kw: Any
) -> Any:
    """Load a pipeline by alias (``MODELS``), local directory (saved or quantized pipeline) or hub id.

    ``dtype`` (torch dtype or "float16"/"bfloat16"/"float32") defaults to the table's dtype on an accelerator and
    float32 on CPU; quantized directories keep their saved dtypes. Extra ``kw`` go to the loader /
    ``from_pretrained``. Offline, a model missing from the cache raises :class:`ModelNotFoundError`.

    The pipeline's ``name_or_path`` is ``name_or_path`` as given (an alias stays the alias, not its hub id), the
    model identity the CLI records for ``--model`` too: a study or ``schedules.json`` written by one is the
    other's.
    """
    pipe = _load(os.fspath(name_or_path), device, dtype, **kw)
    if hasattr(pipe, "register_to_config"):
        pipe.register_to_config(_name_or_path=os.fspath(name_or_path))
    return pipe


def _load(name: str, device: str | torch.device, dtype: Any, **kw: Any) -> Any:
    if name in MODELS:
        spec = MODELS[name]
        torch_dtype = _resolve_dtype(dtype, device, spec)
        if spec.loader is not None:
            pipe = _import_loader(spec.loader)(device=device, **kw)
            return pipe.to(dtype=torch_dtype) if dtype is not None else pipe
        return _load_hub_alias(spec, device, torch_dtype, **kw)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_directory(path, device, _resolve_dtype(dtype, device, None), **kw)
    if path.exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"No saved pipeline directory at {name!r}.")
    if not _HUB_ID.match(name):
        raise QSchedError(f"Unknown model {name!r}: not an alias ({', '.join(MODELS)}), not a directory and not a "
                          "hub id of the form 'org/name'.")
    import diffusers

    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(name, torch_dtype=_resolve_dtype(dtype, device, None), **kw)
    except _hub_errors() as e:
        raise _not_found(f"Model {name!r} (no local directory of that name either)", e) from None
    return pipe.to(device)
