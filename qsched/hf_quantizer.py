"""qsched as a diffusers quantization backend: ``QSchedConfig`` (a ``quantization_config``) and ``QSchedQuantizer``.

Like torchao and quanto, a qsched-quantized model records its recipe in ``config.json`` under
``quantization_config`` (``{"quant_method": "qsched", "spec": "w4a8", "modules": [...], ...}``) and stores its packed
integer weights (``qweight`` / ``weight_scale`` / ``weight_zero``) in its own ``diffusion_pytorch_model.safetensors``.
So ``model.save_pretrained`` / ``pipe.save_pretrained`` / ``push_to_hub`` write the standard layout, and
``from_pretrained`` rebuilds the :class:`~qsched.quantization.QuantLinear` / ``QuantConv2d`` layers before the
weights are loaded, which reproduces the saved model exactly. ``from_pretrained(..., quantization_config=
QSchedConfig("w4a8"))`` (or ``PipelineQuantizationConfig(quant_mapping={"unet": QSchedConfig("w4a8")})``)
quantizes a full-precision checkpoint at load time.

diffusers has no public registry for third-party quantizers: :func:`register` adds ``"qsched"`` to
``diffusers.quantizers.auto``'s two mappings (checked to exist; a clear error otherwise). ``import qsched`` arranges
for that to happen as soon as diffusers loads them, so a plain diffusers script needs nothing else.
"""

from __future__ import annotations

import copy
import json
import os
import types
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

from qsched.errors import QSchedError
from qsched.integrity import CheckpointError, digest_metadata, verify_safetensors
from qsched.quantization import (BACKEND_ATTR, SPEC_ATTR, QuantConv2d, QuantLinear, QuantSpec, _QuantBase,
                                 _set_submodule, quantize, quantized_layers, set_diffusers_marker)

__all__ = ["QSchedConfig", "QSchedQuantizer", "QUANT_METHOD", "register", "attach"]

QUANT_METHOD = "qsched"
CONFIG_FORMAT_VERSION = 1  # of the quantization_config fields below
_QUANT_BUFFERS = ("qweight", "weight_scale", "weight_zero")
_HOOKS = ("get_state_dict_and_metadata", "maybe_update_loaded_keys")  # diffusers>=0.39


class QSchedMethod(str, Enum):
    """``quant_method`` value (diffusers reads ``quant_method.value``, so it must be a str Enum like its own)."""

    QSCHED = QUANT_METHOD


class QSchedConfig(QuantizationConfigMixin):
    """Quantization config of a qsched-quantized diffusers model (see :class:`qsched.quantization.QuantSpec`).

    ``spec``: e.g. ``"w4a8"``; ``skip``: extra fnmatch patterns of layers kept in full precision;
    ``include_conv``: quantize Conv2d layers too; ``keep_packed``: dequantize in every forward instead of caching
    float weights. ``modules``: the quantized layers' names, filled in when a model is quantized (a saved config
    always has it; a config without it quantizes at load time).
    """

    def __init__(self, spec: str | QuantSpec = "w4a8", skip: list[str] | str | None = None, include_conv: bool = True,
                 keep_packed: bool = False, modules: list[str] | None = None,
                 format_version: int = CONFIG_FORMAT_VERSION, **kwargs: Any) -> None:
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if str(getattr(method, "value", method)) != QUANT_METHOD:
            raise CheckpointError(f"QSchedConfig got quant_method={method!r}; expected {QUANT_METHOD!r}")
        if kwargs:
            raise CheckpointError(f"unknown QSchedConfig field(s) {sorted(kwargs)}: written by a newer qsched? "
                                  "upgrade qsched")
        if int(format_version) > CONFIG_FORMAT_VERSION:
            raise CheckpointError(f"quantization_config format_version {format_version} is newer than this qsched "
                                  f"reads ({CONFIG_FORMAT_VERSION}): upgrade qsched")
        self.quant_method = QSchedMethod.QSCHED
        self.spec = QuantSpec.parse(spec).name
        self.skip = [skip] if isinstance(skip, str) else list(skip or [])
        self.include_conv = bool(include_conv)
        self.keep_packed = bool(keep_packed)
        if modules is not None and not (isinstance(modules, (list, tuple)) and all(isinstance(m, str) for m in modules)):
            raise CheckpointError(f"QSchedConfig.modules must be a list of layer names, got {modules!r}")
        self.modules = None if modules is None else list(modules)
        self.format_version = CONFIG_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (``quant_method`` as a plain string)."""
        d = copy.deepcopy(self.__dict__)
        d["quant_method"] = QUANT_METHOD
        return d

    def to_json_string(self, use_diff: bool = True) -> str:
        """All fields as JSON (``use_diff`` is accepted for diffusers' signature; every field is written)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _refuse_lora(*args: Any, **kwargs: Any) -> Any:
    raise QSchedError("LoRA cannot be loaded into a qsched-quantized model (its layers hold integer codes): load the "
                      "LoRA into the full-precision model, fuse_lora() and unload_lora_weights(), then quantize")


def _save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained``, then the written files made world-readable (safetensors writes them 0600)."""
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    root = Path(save_directory)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_file() and p.suffix in (".safetensors", ".json"):
                os.chmod(p, 0o644)
    return out


def attach(model: nn.Module, config: QSchedConfig) -> None:
    """Mark a qsched-quantized diffusers model as such: ``hf_quantizer`` + ``config.quantization_config`` (so that
    ``save_pretrained`` writes the standard quantized layout) and a clear refusal of ``load_lora_adapter``."""
    if not hasattr(model, "register_to_config"):
        return  # a plain nn.Module: nothing diffusers-specific to record
    model.hf_quantizer = QSchedQuantizer(config, pre_quantized=True)
    model.quantization_method = config.quant_method
    model.register_to_config(quantization_config=config)
    # Instance attributes (deep copies rebind them to the copy): peft cannot wrap QuantLinear / QuantConv2d, and
    # the saved files should be readable like any model file.
    if hasattr(model, "load_lora_adapter"):
        model.load_lora_adapter = _refuse_lora
    model.save_pretrained = types.MethodType(_save_pretrained, model)


class QSchedQuantizer(DiffusersQuantizer):
    """diffusers quantizer for qsched's packed W{b}A{a} layers (loads pre-quantized models exactly; quantizes
    full-precision ones after loading, with :func:`qsched.quantization.quantize`)."""

    requires_calibration = False
    required_packages = None

    def __init__(self, quantization_config: QSchedConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._torch_dtype: torch.dtype | None = None

    # -- loading ---------------------------------------------------------------------------------------------

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        self._torch_dtype = torch_dtype
        return torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        """Verify the per-tensor checksums of each checkpoint file before its weights are used."""
        if self.pre_quantized:
            for f in checkpoint_files or []:
                if str(f).endswith(".safetensors"):
                    verify_safetensors(f, require=True)
        return loaded_keys

    def check_if_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                                 state_dict: dict[str, Any], **kwargs: Any) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        return (self.pre_quantized and tensor_name in _QUANT_BUFFERS
                and isinstance(model.get_submodule(module_name), _QuantBase))

    def create_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                               target_device: Any, state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        # The value as stored: diffusers has already cast floating tensors to torch_dtype, which would round the
        # fp16 scales (e.g. to bfloat16).
        module_name, _, tensor_name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        raw = state_dict.get(param_name, param_value)
        module._buffers[tensor_name] = raw.to(device=target_device).clone()

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg = self.quantization_config
        if not self.pre_quantized:
            return model  # full-precision weights load as usual; quantized after loading
        if cfg.modules is None:
            raise CheckpointError("the model's quantization_config (qsched) has no 'modules' list, so its quantized "
                                  "layers cannot be rebuilt; re-save it with qsched")
        spec = QuantSpec.parse(cfg.spec)
        dtype = self._torch_dtype or torch.float32
        for name in cfg.modules:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"quantization_config names layer {name!r}, which "
                                      f"{type(model).__name__} does not have") from None
            if isinstance(layer, nn.Conv2d):
                qcls: type[_QuantBase] = QuantConv2d
            elif isinstance(layer, nn.Linear):
                qcls = QuantLinear
            else:
                raise CheckpointError(f"quantization_config names layer {name!r}, a {type(layer).__name__}; only "
                                      "Linear and Conv2d layers are quantized")
            _set_submodule(model, name, qcls.empty_like(layer, spec, dtype))
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg = self.quantization_config
        _realign(model)
        if not self.pre_quantized:
            summary = quantize(model, cfg.spec, skip=cfg.skip, include_conv=cfg.include_conv,
                               keep_packed=cfg.keep_packed)
            cfg = copy.deepcopy(cfg)  # the caller's config object stays a recipe
            cfg.modules = list(summary.quantized)
            self.quantization_config = cfg
            self.pre_quantized = True  # from now on this model's weights are the packed ones
        else:
            for m in quantized_layers(model).values():
                bias = m.bias
                m._dtype = bias.dtype if bias is not None else (self._torch_dtype or torch.float32)
                m.set_keep_packed(cfg.keep_packed)
            setattr(model, SPEC_ATTR, QuantSpec.parse(cfg.spec).name)
            setattr(model, BACKEND_ATTR, "qsched")
        attach(model, cfg)
        # diffusers forbids .to(dtype) on quantized models; qsched layers re-derive their float weights from the
        # integer codes on every cast (bit-exact with a model quantized in memory), so casting stays allowed.
        model.is_quantized = False
        return model

    # -- saving ----------------------------------------------------------------------------------------------

    def get_state_dict_and_metadata(self, state_dict: dict[str, Any],
                                    safe_serialization: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check that the state dict reloads exactly (else raise) and add per-tensor checksums to the metadata."""
        if not safe_serialization:
            raise CheckpointError("qsched-quantized models are saved as safetensors only (safe_serialization=True)")
        check_reloadable(state_dict, self.quantization_config)
        state_dict = _unshare(state_dict)
        return state_dict, digest_metadata(state_dict, self.quantization_config.spec)

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module) -> nn.Module:
        """Replace every quantized layer by a float Linear / Conv2d holding its dequantized weight."""
        for name, m in quantized_layers(model).items():
            dev = m.qweight.device
            if isinstance(m, QuantConv2d):
                new: nn.Module = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                           m.dilation, m.groups, m.bias is not None, m.padding_mode, device=dev,
                                           dtype=m.dtype)
            else:
                new = nn.Linear(m.in_features, m.out_features, m.bias is not None, device=dev, dtype=m.dtype)
            with torch.no_grad():
                new.weight.copy_(m.dequantize())
            new.bias = m.bias
            _set_submodule(model, name, new)
        for attr in (SPEC_ATTR, BACKEND_ATTR, "load_lora_adapter", "save_pretrained"):
            model.__dict__.pop(attr, None)
        if "quantization_config" in getattr(model, "config", {}):
            model.register_to_config(quantization_config=None)
        return model


def check_reloadable(state_dict: dict[str, torch.Tensor], config: QSchedConfig) -> None:
    """Raise (at save time) unless ``state_dict`` is exactly what ``from_pretrained`` can rebuild from ``config``."""
    lora = sorted({k.split(".lora_")[0] for k in state_dict if ".lora_" in k or ".base_layer." in k})
    if lora:
        raise CheckpointError(f"cannot save: the model holds adapter (LoRA) layers, e.g. {lora[0]!r}, which "
                              "a quantized checkpoint cannot reload; fuse and unload them before quantizing")
    listed = set(config.modules or [])
    packed = {k.rsplit(".", 1)[0] for k in state_dict if k.endswith(".qweight")}
    if packed != listed:
        extra, missing = sorted(packed - listed), sorted(listed - packed)
        raise CheckpointError(f"cannot save: the quantized layers do not match quantization_config.modules "
                              f"(unlisted {extra[:3]}, missing {missing[:3]}); quantize the model with qsched.quantize")
    dtypes = {t.dtype for k, t in state_dict.items() if t.is_floating_point() and not k.endswith(".weight_scale")}
    if len(dtypes) > 1:
        names = sorted(str(d).replace("torch.", "") for d in dtypes)
        raise CheckpointError(f"cannot save: the model mixes float dtypes ({', '.join(names)}), which from_pretrained "
                              "would load as one torch_dtype; cast it to one dtype first")


def _unshare(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors that share memory with an earlier entry (safetensors refuses shared tensors)."""
    out, seen = {}, set()
    for k, t in state_dict.items():
        key = (t.data_ptr(), t.numel())
        out[k] = t.clone() if t.numel() and key in seen else t
        seen.add(key)
    return out


def _realign(module: nn.Module, alignment: int = 64) -> None:
    """Copy tensors whose memory is not ``alignment``-byte aligned (as loaded from a file) into fresh allocations:
    CPU kernels round differently on misaligned memory, which would break bit-exact reproduction."""
    with torch.no_grad():
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for k, t in store.items():
                    if t is not None and t.numel() and t.data_ptr() % alignment:
                        if isinstance(t, nn.Parameter):
                            t.data = t.data.clone()
                        else:
                            store[k] = t.clone()


def register() -> None:
    """Add ``"qsched"`` to diffusers' quantizer mappings (idempotent). Raises ImportError saying what is missing if
    this diffusers has no such mappings, or lacks the save/load hooks qsched's checksums rely on (diffusers<0.39)."""
    from diffusers.quantizers import auto

    q_map = getattr(auto, "AUTO_QUANTIZER_MAPPING", None)
    c_map = getattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING", None)
    if not isinstance(q_map, dict) or not isinstance(c_map, dict):
        raise ImportError("diffusers.quantizers.auto has no AUTO_QUANTIZER_MAPPING / AUTO_QUANTIZATION_CONFIG_MAPPING "
                          "dicts in this diffusers version; qsched cannot register its quantizer")
    missing = [h for h in _HOOKS if not callable(getattr(DiffusersQuantizer, h, None))]
    if missing:
        raise ImportError(f"this diffusers' DiffusersQuantizer has no {', '.join(missing)} (added in diffusers 0.39): "
                          "qsched's quantized checkpoints need diffusers>=0.39")
    q_map[QUANT_METHOD] = QSchedQuantizer
    c_map[QUANT_METHOD] = QSchedConfig
    set_diffusers_marker(_mark)


def _mark(model: nn.Module, spec: QuantSpec, skip: list[str], include_conv: bool, keep_packed: bool,
          modules: list[str]) -> None:
    """quantize()'s hook for diffusers models (see :func:`qsched.quantization.set_diffusers_marker`)."""
    attach(model, QSchedConfig(spec, skip=skip, include_conv=include_conv, keep_packed=keep_packed, modules=modules))


register()
