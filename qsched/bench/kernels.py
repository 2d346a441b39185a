"""Benchmark qsched's real int8 kernels against float and other quantization libraries (CPU, one run).

    nice -n 10 python -m qsched.bench.kernels --out benchmarks/kernels.json [--runs 3] [--smoke]
    nice -n 10 python -m qsched.bench.kernels --testbed-only --variants qsched-int8-w8a8 qsched-int8-w8a8-small \
        --baseline-ref GIT_REF --out benchmarks/kernels_testbed_speed.json   # before / after in one process

Variants: fp32, bf16, torchao W8A8 (int8 dynamic activations, Linear only, as torchao ships on CPU),
optimum-quanto W8A8 (qint8 weights and activations, calibrated on one forward), qsched simulated W4A8, qsched
real-kernel W8A8 and W4A8 (:func:`qsched.kernels.compile_quantized`). torchao / optimum-quanto rows are skipped
with the reason when they cannot be imported. Two workloads:

* the testbed pipeline (4 steps, a batch of held-out prompts): images/s, all threads and 1 thread, all variants
  in this process with runs interleaved (rotating order), medians;
* an SD1.5-sized UNet (the real config, random weights, 64x64 latent, batch 1): s/forward at 1 thread and all
  threads, each variant in its own worker process (so its resident memory is its own) with forwards interleaved
  across the workers, medians. At most four workers are alive at a time to bound memory, so the variants run in
  groups; every group holds fp32 and bf16, and ratios are taken within the group.

Bytes: ``file`` = the safetensors a user stores (fp32 / fp16 / qsched packed checkpoint; real-kernel variants are
compiled from the packed checkpoint at load); ``resident`` = RSS growth of the worker after loading and one
forward (SD1.5; it includes the allocator's and the forward's workspace: bf16's is ~1.1x its file) or parameter +
buffer bytes of the denoiser (testbed); ``weights`` (SD1.5) = those tensor bytes for the SD1.5 variants too
(parameters, buffers, oneDNN-packed weights; not measured for torchao / quanto tensor subclasses).
``run_testbed`` / ``run_sd15`` return dicts; ``main`` writes JSON and a Markdown table (``--out`` with ``.md``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qsched.bench.units import write_result

VARIANTS: tuple[str, ...] = ("fp32", "bf16", "torchao-w8a8", "quanto-w8a8", "qsched-sim-w4a8", "qsched-int8-w8a8",
                             "qsched-int8-w4a8")
# Not in the default run: W4A8 with a single int8 weight plane (W8A8's speed and size, not faithful to the group
# scales: ~5e-3 per-layer error). ``--variants`` selects it.
EXTRA_VARIANTS: tuple[str, ...] = ("qsched-int8-w4a8-1plane", "qsched-int8-w4a8-i8", "qsched-int8-w8a8-small",
                                    "qsched-int8-w4a8-small", "qsched-int8-w4a8-i8-small")
# qsched-int8-w4a8-i8: the w4a8-i8 checkpoint (group scales on an int8 grid): one exact int8 plane.
# *-small: compile_quantized(small_layers="auto"): small layers run the simulated computation where it is faster.
# ``--baseline-ref REF`` adds "<variant>@REF" rows: the same variant built by qsched/kernels.py as of git REF.
SD15_GROUPS: tuple[tuple[str, ...], ...] = (("fp32", "bf16", "qsched-int8-w8a8", "qsched-int8-w4a8"),
                                            ("fp32", "bf16", "qsched-sim-w4a8"),
                                            ("fp32", "bf16", "torchao-w8a8", "quanto-w8a8"))


def availability() -> dict[str, str | None]:
    """Variant -> None if it can run here, else the reason it is skipped."""
    out: dict[str, str | None] = {v: None for v in VARIANTS + EXTRA_VARIANTS}
    for variant, module in (("torchao-w8a8", "torchao.quantization"), ("quanto-w8a8", "optimum.quanto")):
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or a broken install
            out[variant] = f"{module} not importable ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    return out


# ------------------------------------------------------------------------------------------ variants


def make_variant(variant: str, fp32: Callable[[], nn.Module], packed: dict[str, Path],
                 calib: Callable[[nn.Module], None]) -> nn.Module:
    """The denoiser of ``variant``. ``fp32()`` builds the float model; ``packed[spec]`` is a qsched checkpoint
    directory; ``calib(model)`` runs one representative forward (quanto's activation calibration)."""
    from qsched.kernels import compile_quantized
    from qsched.checkpoint import load_quantized
    from qsched.quantization import quantize

    if variant == "fp32":
        return fp32()
    if variant == "bf16":
        return fp32().to(torch.bfloat16)
    if variant == "torchao-w8a8":
        m = fp32()
        quantize(m, "w8a8", backend="torchao")
        return m
    if variant == "quanto-w8a8":
        from optimum.quanto import Calibration, freeze, qint8
        from optimum.quanto import quantize as quanto_quantize

        m = fp32()
        quanto_quantize(m, weights=qint8, activations=qint8)
        with Calibration():
            calib(m)
        freeze(m)
        return m
    if variant == "qsched-sim-w4a8":
        return load_quantized(packed["w4a8"])
    name, _, ref = variant.partition("@")
    if name.startswith("qsched-int8-") and variant_spec(variant):
        m = load_quantized(packed[variant_spec(variant)], keep_packed=True)  # no float cache: only int8 planes stay
        kw: dict[str, Any] = {"backend": "int8", "planes": 1 if name.endswith("1plane") else 2}
        if name.endswith("-small"):
            kw["small_layers"] = "auto"
        (kernels_at(ref).compile_quantized if ref else compile_quantized)(m, **kw)
        return m
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS + EXTRA_VARIANTS)}")


def variant_spec(variant: str) -> str | None:
    """The qsched checkpoint spec a variant loads (None: not a qsched variant)."""
    name = variant.partition("@")[0]
    name = name[: -len("-small")] if name.endswith("-small") else name
    return {"qsched-sim-w4a8": "w4a8", "qsched-int8-w8a8": "w8a8", "qsched-int8-w4a8": "w4a8",
            "qsched-int8-w4a8-1plane": "w4a8", "qsched-int8-w4a8-i8": "w4a8-i8"}.get(name)


_KERNELS_AT: dict[str, Any] = {}


def kernels_at(ref: str) -> Any:
    """``qsched/kernels.py`` as of git ``ref`` (this checkout's history), imported as its own module: a before /
    after comparison in one process. Raises ``ValueError`` when git cannot show that file."""
    import importlib.util
    import subprocess

    if ref not in _KERNELS_AT:
        root = Path(__file__).resolve().parents[2]
        try:
            r = subprocess.run(["git", "-C", str(root), "show", f"{ref}:qsched/kernels.py"], capture_output=True,
                               text=True)
        except FileNotFoundError:
            raise ValueError(f"--baseline-ref {ref!r}: git cannot show qsched/kernels.py there (no git)") from None
        if r.returncode != 0:
            raise ValueError(f"--baseline-ref {ref!r}: git cannot show qsched/kernels.py there "
                             f"({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'no git'})")
        d = Path(tempfile.mkdtemp(prefix="qsched-kernels-at-"))
        path = d / "kernels.py"
        path.write_text(r.stdout)
        name = f"qsched_kernels_at_{len(_KERNELS_AT)}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
        _KERNELS_AT[ref] = mod
    return _KERNELS_AT[ref]


def file_bytes(variant: str, files: dict[str, int]) -> int | None:
    """Bytes a user stores for ``variant`` (None: that library's format was not measured)."""
    if variant in ("fp32", "bf16"):
        return files.get("fp32" if variant == "fp32" else "fp16")
    spec = variant_spec(variant)
    return files.get(spec) if spec else None


def _write_files(model: nn.Module | None, d: Path, make: Callable[[], nn.Module],
                 specs: tuple[str, ...] = ("w8a8", "w4a8")) -> tuple[dict[str, int], dict[str, Path]]:
    """fp32 / fp16 safetensors and qsched checkpoints of ``specs``; their sizes and the checkpoint dirs.

    ``make()`` builds a fresh float copy (``model`` defaults to one; pass ``model`` to reuse one in memory)."""
    from safetensors.torch import save_file

    from qsched.checkpoint import WEIGHTS_FILE
    from qsched.checkpoint import save_quantized
    from qsched.quantization import quantize

    state = {k: v.detach().contiguous() for k, v in (model or make()).state_dict().items()}
    files: dict[str, int] = {}
    for name, dt in (("fp32", torch.float32), ("fp16", torch.float16)):
        p = d / f"{name}.safetensors"
        save_file({k: (v.to(dt) if v.is_floating_point() else v) for k, v in state.items()}, str(p))
        files[name] = p.stat().st_size
    del state
    packed: dict[str, Path] = {}
    for spec in specs:
        q = make()
        quantize(q, spec, keep_packed=True)  # same codes as the default; no float cache (memory)
        save_quantized(q, d / spec)
        files[spec] = (d / spec / WEIGHTS_FILE).stat().st_size
        packed[spec] = d / spec
        del q
        gc.collect()
    return files, packed


def _specs_of(variants: tuple[str, ...]) -> tuple[str, ...]:
    """The checkpoints the variants load (w8a8 and w4a8 always: their file sizes are reported)."""
    extra = [s for v in variants if (s := variant_spec(v)) and s not in ("w8a8", "w4a8")]
    return ("w8a8", "w4a8", *dict.fromkeys(extra))


def _ratios(rows: dict[str, dict[str, Any]], key: str, higher_is_better: bool) -> None:
    """Add speed-up ratios vs fp32 and bf16 (>1 = faster) for ``key`` in every row."""
    for base in ("fp32", "bf16"):
        b = rows.get(base, {}).get(key)
        for r in rows.values():
            v = r.get(key)
            if b and v:
                r[f"{key}_speedup_vs_{base}"] = (v / b) if higher_is_better else (b / v)


# ------------------------------------------------------------------------------------------- testbed


def run_testbed(runs: int = 3, batch: int = 8, steps: int = 4, variants: tuple[str, ...] = VARIANTS,
                smoke: bool = False) -> dict[str, Any]:
    """Images/s of the testbed pipeline for each variant (interleaved, medians), resident and file bytes."""
    from qsched.kernels import _resident_bytes
    from qsched.testbed.pipeline import TestbedPipeline, load_testbed_pipeline, tiny_testbed_pipeline

    base = tiny_testbed_pipeline(seed=0) if smoke else load_testbed_pipeline()
    unet0 = base.unet
    prompts = _prompts(batch)
    avail = availability()
    res: dict[str, Any] = {"batch": batch, "steps": steps, "runs": runs, "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="qsched-kbench-") as tmp:
        files, packed = _write_files(unet0, Path(tmp), lambda: copy.deepcopy(unet0), _specs_of(variants))

        def calib(m: nn.Module) -> None:
            pipe = TestbedPipeline(m, copy.deepcopy(base.scheduler), base.text_encoder, base.tokenizer)
            pipe.set_progress_bar_config(disable=True)
            _generate(pipe, prompts[:2], steps)

        pipes: dict[str, Any] = {}
        for v in variants:
            if avail.get(v):
                res["skipped"][v] = avail[v]
                continue
            m = make_variant(v, lambda: copy.deepcopy(unet0), packed, calib).eval()
            pipe = TestbedPipeline(m, copy.deepcopy(base.scheduler), base.text_encoder, base.tokenizer)
            pipe.set_progress_bar_config(disable=True)
            pipes[v] = pipe
    rows: dict[str, dict[str, Any]] = {}
    all_threads = torch.get_num_threads()
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {v: [] for v in pipes}
        for v, pipe in pipes.items():
            _generate(pipe, prompts, steps)  # warm-up
        names = list(pipes)
        for r in range(runs):
            for v in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                _generate(pipes[v], prompts, steps)
                times[v].append(time.perf_counter() - t0)
        for v, ts in times.items():
            row = rows.setdefault(v, {})
            row[f"images_per_s_{threads}t"] = batch / statistics.median(ts)
            row[f"seconds_{threads}t"] = ts
    torch.set_num_threads(all_threads)
    for v, pipe in pipes.items():
        rows[v]["resident_bytes"] = _resident_bytes(pipe.unet) if not v.startswith(("torchao", "quanto")) else None
        rows[v]["file_bytes"] = file_bytes(v, files)
    for threads in sorted({1, all_threads}):
        _ratios(rows, f"images_per_s_{threads}t", higher_is_better=True)
    res.update(rows=rows, files=files, threads=sorted({1, all_threads}))
    return res


def _prompts(n: int) -> list[str]:
    from qsched.prompts import load_prompts

    return load_prompts("testbed-heldout", n=n, seed=1).prompts


def _generate(pipe: Any, prompts: list[str], steps: int) -> Any:
    from qsched.runner import generate

    return generate(pipe, prompts, steps)


# --------------------------------------------------------------------------------------------- SD1.5


def _sd15_config(smoke: bool) -> dict[str, Any]:
    from qsched.bench.sd15 import SD15_UNET_CONFIG, SMOKE_OVERRIDES

    return {**SD15_UNET_CONFIG, **(SMOKE_OVERRIDES if smoke else {})}


def _sd15_from_file(config: dict[str, Any], path: str) -> nn.Module:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    torch.manual_seed(0)
    from accelerate import init_empty_weights

    with init_empty_weights():
        m = UNet2DConditionModel(**config)
    m.load_state_dict(load_file(path), assign=True)
    return m.eval()


def _sd15_inputs(config: dict[str, Any]) -> tuple:
    g = torch.Generator().manual_seed(1)
    s = config["sample_size"]
    return (torch.randn(1, 4, s, s, generator=g), torch.tensor([500]),
            torch.randn(1, 77, config["cross_attention_dim"], generator=g))


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _sd15_worker(variant: str, config: dict[str, Any], fp32_path: str, packed: dict[str, str], conn: Any) -> None:
    """Hold one SD1.5-sized variant; answer ('run', threads) with seconds per forward, 'stop' to exit."""
    try:
        import accelerate  # noqa: F401  (imports first: the RSS delta counts the model)
        import diffusers  # noqa: F401
        import safetensors.torch  # noqa: F401

        import qsched.kernels  # noqa: F401
        import qsched.quantization  # noqa: F401

        x = _sd15_inputs(config)
        gc.collect()
        r0 = _rss_bytes()

        def run(m: nn.Module) -> Any:
            dt = next(m.parameters()).dtype if variant == "bf16" else torch.float32
            with torch.inference_mode():
                return m(x[0].to(dt), x[1], encoder_hidden_states=x[2].to(dt))

        m = make_variant(variant, lambda: _sd15_from_file(config, fp32_path), {k: Path(v) for k, v in packed.items()},
                         run)
        gc.collect()
        from qsched.quantization import _trim_heap

        _trim_heap()
        run(m)
        _trim_heap()
        from qsched.kernels import _resident_bytes

        # weight_bytes: the tensors the model holds (parameters, buffers, oneDNN-packed weights), without the
        # allocator's and the forward's workspace that RSS also counts; not for torchao / quanto tensor subclasses
        weights = None if variant.startswith(("torchao", "quanto")) else _resident_bytes(m)
        conn.send({"resident_bytes": _rss_bytes() - r0, "weight_bytes": weights})
        while (msg := conn.recv()) != "stop":
            torch.set_num_threads(msg[1])
            t0 = time.perf_counter()
            run(m)
            conn.send(time.perf_counter() - t0)
    except Exception as e:
        conn.send({"error": f"{type(e).__name__}: {str(e)[:300]}"})


def run_sd15(runs: int = 3, groups: tuple[tuple[str, ...], ...] = SD15_GROUPS, smoke: bool = False,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """s/forward of the SD1.5-sized UNet per variant (1 thread and all threads), resident and file bytes."""
    from diffusers import UNet2DConditionModel

    config = _sd15_config(smoke)
    avail = availability()
    all_threads = torch.get_num_threads()
    thread_list = sorted({1, all_threads})
    res: dict[str, Any] = {"config": "SD1.5 UNet2DConditionModel (random weights), 64x64 latent, batch 1, 77 tokens"
                           if not smoke else "smoke: SD1.5 block structure, tiny widths", "runs": runs,
                           "threads": thread_list, "skipped": {}, "groups": []}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="qsched-kbench-sd15-") as tmp:
        d = Path(tmp)
        torch.manual_seed(0)
        model = UNet2DConditionModel(**config).eval()
        res["params"] = sum(p.numel() for p in model.parameters())
        model_path = d / "fp32.safetensors"

        def make() -> nn.Module:
            return _sd15_from_file(config, str(model_path))

        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(model_path))
        del model
        gc.collect()
        files, packed = _write_files(None, d, make, _specs_of(tuple(v for g in groups for v in g)))
        res["files"] = files
        log(f"SD1.5-sized UNet: {res['params'] / 1e6:.0f} M params; files {files}")
        for group in groups:
            members = [v for v in group if not avail.get(v)]
            res["skipped"].update({v: avail[v] for v in group if avail.get(v)})
            workers: dict[str, tuple[Any, Any, dict[str, Any]]] = {}
            for v in members:  # one at a time: build peaks stay apart
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_sd15_worker, args=(v, config, str(model_path),
                                                              {k: str(p) for k, p in packed.items()}, child))
                proc.start()
                info = parent.recv()
                if "error" in info:
                    res["skipped"][v] = info["error"]
                    proc.join()
                    continue
                workers[v] = (proc, parent, info)
                log(f"  {v}: resident {info['resident_bytes'] / 2**20:.0f} MiB")
            rows: dict[str, dict[str, Any]] = {}
            for threads in thread_list:
                times: dict[str, list[float]] = {v: [] for v in workers}
                names = list(workers)
                for r in range(runs + 1):  # the first round is a warm-up at this thread count
                    for v in names[r % len(names):] + names[: r % len(names)]:
                        workers[v][1].send(("run", threads))
                        t = workers[v][1].recv()
                        if isinstance(t, dict):
                            raise RuntimeError(f"{v} failed: {t['error']}")
                        if r:
                            times[v].append(t)
                for v, ts in times.items():
                    rows.setdefault(v, {})[f"s_per_forward_{threads}t"] = statistics.median(ts)
                    rows[v][f"seconds_{threads}t"] = ts
                log(f"  {threads} thread(s): " + ", ".join(f"{v} {statistics.median(ts):.2f} s"
                                                           for v, ts in times.items()))
            for v, (proc, conn, info) in workers.items():
                conn.send("stop")
                proc.join()
                rows[v]["resident_bytes"] = info["resident_bytes"]
                rows[v]["weight_bytes"] = info.get("weight_bytes")
                rows[v]["file_bytes"] = file_bytes(v, files)
            for threads in thread_list:
                _ratios(rows, f"s_per_forward_{threads}t", higher_is_better=False)
            res["groups"].append(rows)
    return res


# ---------------------------------------------------------------------------------------- faithfulness


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def faithfulness(make_fp32: Callable[[], nn.Module], run: Callable[[nn.Module], torch.Tensor],
                 specs: tuple[str, ...] = ("w8a8", "w4a8")) -> dict[str, Any]:
    """Real-kernel vs simulated output errors of one denoiser, and the simulated model's own noise floor.

    Per spec: ``layer_max`` = the largest relative error of a real-kernel layer fed the simulated model's own
    input at that layer (teacher-forced, every layer); ``forward_real_vs_sim`` = whole-forward relative error;
    ``sim_vs_fp32`` / ``real_vs_fp32``; ``sim_threads_1_vs_all`` = the simulated model against itself at 1 thread
    vs all threads, and ``sim_input_1e-7`` against itself on an input perturbed by 1e-7 relative: rounding flips
    of the per-token activation codes make the simulated model move by that much with no change to its math.
    """
    from qsched.kernels import Int8Conv2d, Int8Linear, compile_quantized
    from qsched.quantization import QuantConv2d, quantize, quantized_layers

    threads = torch.get_num_threads()
    m = make_fp32()
    with torch.inference_mode():
        ref = run(m)
    del m
    gc.collect()
    out: dict[str, Any] = {}
    for spec in specs:
        sim = make_fp32()
        quantize(sim, spec)
        twins = {n: (Int8Conv2d if isinstance(q, QuantConv2d) else Int8Linear).from_quant(q)
                 for n, q in quantized_layers(sim).items()}
        errs: dict[str, float] = {}
        hooks = [q.register_forward_hook(lambda mod, i, o, n=n: errs.__setitem__(n, _rel(twins[n](i[0]), o)))
                 for n, q in quantized_layers(sim).items()]
        with torch.inference_mode():
            o_sim = run(sim)
            for h in hooks:
                h.remove()
            torch.set_num_threads(1 if threads > 1 else 2)
            o_sim_t = run(sim)
            torch.set_num_threads(threads)
            o_sim_p = run(sim, 1e-7)
        twins.clear()
        compile_quantized(sim, backend="int8")
        with torch.inference_mode():
            o_real = run(sim)
        worst = max(errs, key=errs.get)
        out[spec] = {"layers": len(errs), "layer_max": errs[worst], "layer_max_name": worst,
                     "forward_real_vs_sim": _rel(o_real, o_sim), "sim_vs_fp32": _rel(o_sim, ref),
                     "real_vs_fp32": _rel(o_real, ref), "sim_threads_1_vs_all": _rel(o_sim_t, o_sim),
                     "sim_input_1e-7": _rel(o_sim_p, o_sim)}
        del sim
        gc.collect()
    return out


def run_faithfulness(smoke: bool = False) -> dict[str, Any]:
    """:func:`faithfulness` on the testbed student UNet (batch 4) and the SD1.5-sized UNet (batch 1)."""
    from qsched.testbed.pipeline import load_testbed_pipeline, tiny_testbed_pipeline

    res: dict[str, Any] = {}
    unet0 = (tiny_testbed_pipeline(seed=0) if smoke else load_testbed_pipeline()).unet
    cfg = unet0.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    kw: dict[str, Any] = {"encoder_hidden_states": torch.randn(4, 16, cfg.cross_attention_dim, generator=g)}
    if cfg.get("time_cond_proj_dim"):
        kw["timestep_cond"] = torch.randn(4, cfg.time_cond_proj_dim, generator=g)
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([999, 759, 499, 259])

    def run_tb(m: nn.Module, eps: float = 0.0) -> torch.Tensor:
        return m(x * (1 + eps * noise), t, **kw).sample

    res["testbed"] = faithfulness(lambda: copy.deepcopy(unet0), run_tb)
    config = _sd15_config(smoke)
    xs = _sd15_inputs(config)
    noise_s = torch.randn(xs[0].shape, generator=g)
    with tempfile.TemporaryDirectory(prefix="qsched-kbench-faith-") as tmp:
        from diffusers import UNet2DConditionModel
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = UNet2DConditionModel(**config).eval()
        path = Path(tmp) / "fp32.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        del model
        gc.collect()

        def run_sd(m: nn.Module, eps: float = 0.0) -> torch.Tensor:
            return m(xs[0] * (1 + eps * noise_s), xs[1], encoder_hidden_states=xs[2]).sample

        res["sd15"] = faithfulness(lambda: _sd15_from_file(config, str(path)), run_sd)
    res["threads"] = torch.get_num_threads()
    return res


# --------------------------------------------------------------------------------------------- report


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(res: dict[str, Any]) -> str:
    """Markdown tables of a :func:`main` result."""
    mib = 2**20
    L = [f"Command: `{res['command']}` ({res['date']}, {res['machine']})", ""]
    tb = res.get("testbed")
    if tb:
        fp16 = tb["files"]["fp16"]
        L += [f"**Testbed pipeline** ({tb['steps']} steps, batch {tb['batch']}, medians of {tb['runs']} interleaved "
              "runs)", "",
              "| variant | " + " | ".join(f"images/s {t}t | x fp32 | x bf16" for t in tb["threads"]) +
              " | resident MiB | file MiB | file x fp16 |",
              "|---|" + "---|---|---|" * len(tb["threads"]) + "---|---|---|"]
        for v, r in tb["rows"].items():
            cells = []
            for t in tb["threads"]:
                k = f"images_per_s_{t}t"
                cells += [_fmt(r.get(k), 1), _fmt(r.get(f"{k}_speedup_vs_fp32")), _fmt(r.get(f"{k}_speedup_vs_bf16"))]
            fb, rb = r.get("file_bytes"), r.get("resident_bytes")
            L.append(f"| {v} | " + " | ".join(cells) + f" | {_fmt(rb / mib if rb else None)} | "
                     f"{_fmt(fb / mib if fb else None)} | {_fmt(fb / fp16 if fb else None, 3)} |")
        L += [f"Skipped: {v}: {why}" for v, why in tb.get("skipped", {}).items()]
        L.append("")
    sd = res.get("sd15")
    if sd:
        fp16 = sd["files"]["fp16"]
        L += [f"**{sd['config']}** ({sd['params'] / 1e6:.0f} M params), s/forward, medians of {sd['runs']} "
              "interleaved runs; each block is one group of concurrent workers, ratios within the group "
              "(speed-up: >1 is faster)", "",
              "| group | variant | " + " | ".join(f"s {t}t | x fp32 | x bf16" for t in sd["threads"]) +
              " | resident MiB | resident x fp16 file | weights MiB | weights x fp16 file | file MiB | file x fp16 |",
              "|---|---|" + "---|---|---|" * len(sd["threads"]) + "---|---|---|---|---|---|"]
        for gi, rows in enumerate(sd["groups"]):
            for v, r in rows.items():
                cells = []
                for t in sd["threads"]:
                    k = f"s_per_forward_{t}t"
                    cells += [_fmt(r.get(k)), _fmt(r.get(f"{k}_speedup_vs_fp32")),
                              _fmt(r.get(f"{k}_speedup_vs_bf16"))]
                fb, rb, wb = r.get("file_bytes"), r.get("resident_bytes"), r.get("weight_bytes")
                L.append(f"| {gi + 1} | {v} | " + " | ".join(cells) + f" | {_fmt(rb / mib if rb else None, 0)} | "
                         f"{_fmt(rb / fp16 if rb else None, 3)} | {_fmt(wb / mib if wb else None, 0)} | "
                         f"{_fmt(wb / fp16 if wb else None, 3)} | {_fmt(fb / mib if fb else None, 0)} | "
                         f"{_fmt(fb / fp16 if fb else None, 3)} |")
        L += [f"Skipped: {v}: {why}" for v, why in sd.get("skipped", {}).items()]
    fa = res.get("faithfulness")
    if fa:
        L += ["", f"Faithfulness command: `{res.get('faithfulness_command', '')}` ({res.get('faithfulness_date', '')})",
              "", "**Faithfulness** (relative L2 errors of the denoiser output; `layer max`: worst real-kernel layer "
              "fed the simulated model's own input at that layer; the last two columns are the simulated model "
              "against itself: 1 thread vs all, and a 1e-7 input perturbation)", "",
              "| model | spec | layer max | real vs sim | sim vs fp32 | real vs fp32 | sim 1t vs all | "
              "sim 1e-7 input |",
              "|---|---|---|---|---|---|---|---|"]
        for model in ("testbed", "sd15"):
            for spec, r in fa.get(model, {}).items():
                L.append(f"| {model} | {spec} | {r['layer_max']:.1e} | {r['forward_real_vs_sim']:.1e} | "
                         f"{r['sim_vs_fp32']:.1e} | {r['real_vs_fp32']:.1e} | {r['sim_threads_1_vs_all']:.1e} | "
                         f"{r['sim_input_1e-7']:.1e} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/kernels.json"), help="JSON result (a .md beside it)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved timed runs per variant and thread count")
    ap.add_argument("--batch", type=int, default=8, help="testbed prompts per pipeline call")
    ap.add_argument("--skip-testbed", action="store_true")
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--testbed-only", action="store_true", help="only the testbed pipeline (same as --skip-sd15)")
    ap.add_argument("--baseline-ref", default=None, metavar="GIT_REF",
                    help="also run each selected qsched-int8 variant built by qsched/kernels.py as of GIT_REF "
                         "(rows '<variant>@GIT_REF'; testbed only)")
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS + EXTRA_VARIANTS,
                    help="run only these (fp32 and bf16 are always added; SD1.5: one group)")
    ap.add_argument("--faithfulness", action="store_true",
                    help="only measure real-kernel vs simulated errors (testbed + SD1.5-sized), merged into --out")
    ap.add_argument("--smoke", action="store_true", help="tiny models: checks the benchmark itself in seconds")
    args = ap.parse_args(argv)
    if args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    from qsched._util import package_versions
    from qsched.kernels import why_int8_is_slow

    res: dict[str, Any] = {"command": "python -m qsched.bench.kernels " + shlex.join(argv if argv is not None
                                                                                     else sys.argv[1:]),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                                      f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
                                      f"fast int8 GEMM: {'no' if why_int8_is_slow('cpu') else 'yes'}",
                           "versions": package_versions(),
                           "availability": availability()}
    if args.faithfulness:
        old = json.loads(args.out.read_text()) if args.out.is_file() else {}
        res = {**res, **old, "faithfulness": run_faithfulness(smoke=args.smoke),
               "faithfulness_command": res["command"], "faithfulness_date": res["date"]}
        print(write_result(args.out, res, markdown))
        return res
    chosen = None if args.variants is None else ("fp32", "bf16", *[v for v in args.variants
                                                                    if v not in ("fp32", "bf16")])
    if args.testbed_only:
        args.skip_sd15 = True
    if args.baseline_ref:
        kernels_at(args.baseline_ref)  # a bad ref fails here, before any measuring
        base = chosen or VARIANTS
        chosen = (*base, *[f"{v}@{args.baseline_ref}" for v in base
                           if v.startswith("qsched-int8-") and not v.endswith("-small")])
        if not args.skip_sd15:
            raise ValueError("--baseline-ref measures the testbed only: add --testbed-only")
    if not args.skip_testbed:
        res["testbed"] = run_testbed(runs=args.runs, batch=args.batch, smoke=args.smoke,
                                     **({"variants": chosen} if chosen else {}))
        write_result(args.out, res)
    if not args.skip_sd15:
        res["sd15"] = run_sd15(runs=args.runs, smoke=args.smoke, **({"groups": (chosen,)} if chosen else {}))
    print(write_result(args.out, res, markdown))
    return res


if __name__ == "__main__":
    main()
