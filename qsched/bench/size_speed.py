"""Section 3 of the benchmark, size and speed: denoiser bytes on disk and resident, process RSS, images/s and ms
per denoising step (interleaved repeats, medians), the QSchedScheduler wrapper's cost per step, the SD1.5-sized
UNet numbers (:mod:`qsched.bench.sd15`) and, where :mod:`qsched.bench.kernels` exists, its real-kernel numbers.
Every image generated here goes through :func:`qsched.runner.generate`."""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from qsched.bench.env import BenchEnv, Models
from qsched.bench.settings import BenchSettings
from qsched.bench.units import UnitStore
from qsched.runner import denoiser_of

__all__ = ["section_size_speed", "kernels_result"]


def _state_bytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (persistent or not), each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + [b for b in module.buffers() if b is not None]:
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _rss_kib() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split()[:2]
                    out[k.rstrip(":")] = int(v)
    except OSError:
        pass
    return out


def _denoiser_inputs(module: torch.nn.Module, batch: int) -> tuple[tuple, dict] | None:
    """Random inputs for a UNet2DConditionModel-like denoiser built from its config (None if unknown)."""
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "get") or cfg.get("cross_attention_dim") is None:
        return None
    g = torch.Generator().manual_seed(0)
    size = cfg.get("sample_size")
    size = size if isinstance(size, int) else 32
    x = torch.randn(batch, cfg.get("in_channels", 4), size, size, generator=g)
    ctx = torch.randn(batch, 16, int(cfg["cross_attention_dim"]), generator=g)
    kw: dict[str, Any] = {"encoder_hidden_states": ctx}
    if cfg.get("time_cond_proj_dim"):
        kw["timestep_cond"] = torch.randn(batch, int(cfg["time_cond_proj_dim"]), generator=g)
    return (x, torch.tensor([500])), kw


def _rss_worker(kind: str, path: str, batch: int, threads: int, conn: Any) -> None:
    """Subprocess: load one denoiser variant, run one forward, report RSS deltas (KiB)."""
    try:
        torch.set_num_threads(threads)
        import accelerate  # noqa: F401  (everything loading imports comes first: the deltas count the model)
        import safetensors.torch  # noqa: F401
        from diffusers import UNet2DConditionModel  # noqa: F401
        from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

        from qsched.checkpoint import load_quantized

        r0 = _rss_kib()
        if kind == "fp32":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_pretrained(path).eval()
        else:
            model = load_quantized(path, keep_packed=(kind == "w4a8 keep_packed"))
        r1 = _rss_kib()
        inp = _denoiser_inputs(model, batch)
        with torch.inference_mode():
            model(*inp[0], **inp[1])
        r2 = _rss_kib()
        conn.send({"load_kib": r1["VmRSS"] - r0["VmRSS"], "after_forward_kib": r2["VmRSS"] - r0["VmRSS"],
                   "peak_kib": r2["VmHWM"] - r0["VmRSS"], "resident_bytes": _state_bytes(model)})
    except Exception as e:  # reported, not raised: RSS is best effort
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _sizes(models: Models, s: BenchSettings, d: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    from qsched.checkpoint import WEIGHTS_FILE, load_quantized, save_quantized
    from qsched.quantization import quantize

    name, den = models.denoiser()
    out: dict[str, Any] = {"denoiser": type(den).__name__, "params": sum(p.numel() for p in den.parameters())}
    state = {k: v.detach().contiguous() for k, v in den.state_dict().items()}
    save_file({k: v.float() for k, v in state.items()}, str(d / "fp32.safetensors"))
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}, str(d / "fp16.safetensors"))
    files = {"fp32": (d / "fp32.safetensors").stat().st_size, "fp16": (d / "fp16.safetensors").stat().st_size}
    resident: dict[str, int] = {"fp32": _state_bytes(den)}
    summaries = {}
    for spec in ("w8a8", "w4a8"):
        q = copy.deepcopy(den)
        summ = quantize(q, spec)
        save_quantized(q, d / spec)
        files[f"packed {spec[:2]}"] = (d / spec / WEIGHTS_FILE).stat().st_size
        resident[f"{spec} simulated"] = _state_bytes(q)
        kp = load_quantized(d / spec, keep_packed=True)
        resident[f"{spec} keep_packed"] = _state_bytes(kp)
        summaries[spec] = {"quantized_layers": len(summ.quantized), "skipped_layers": len(summ.skipped),
                           "skipped": dict(summ.skipped)}
        del q, kp
    out.update(files=files, resident=resident, quantize=summaries)
    # resident bytes measured while generating (inside the denoiser's forward), for the three speed variants
    out["resident_while_generating"] = {}
    for label, pipe in _speed_pipes(models).items():
        _, m = denoiser_of(pipe)
        seen: list[int] = []
        h = m.register_forward_hook(lambda mod, a, o: seen.append(_state_bytes(mod)))
        try:
            _generate(models, pipe, _speed_prompts(2), s.speed_steps, seed=0)
        finally:
            h.remove()
        out["resident_while_generating"][label] = max(seen) if seen else None
    if s.rss:
        out["rss"] = _rss_all(models, s, d)
    return out


def _rss_all(models: Models, s: BenchSettings, d: Path) -> dict[str, Any]:
    import multiprocessing as mp

    from diffusers import UNet2DConditionModel

    _, den = models.denoiser()
    if not isinstance(den, UNet2DConditionModel) or _denoiser_inputs(den, 1) is None:
        return {"note": "RSS not measured: the denoiser is not a config-based UNet2DConditionModel"}
    den.save_pretrained(d / "fp32_model")
    ctx = mp.get_context("spawn")
    out = {}
    for kind, path in (("fp32", d / "fp32_model"), ("w4a8 simulated", d / "w4a8"), ("w4a8 keep_packed", d / "w4a8")):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_rss_worker, args=(kind, str(path), s.speed_batch, s.threads or 1, child))
        proc.start()
        try:
            out[kind] = parent.recv() if parent.poll(300) else {"error": "timeout"}
        except EOFError:
            out[kind] = {"error": "worker died"}
        proc.join(30)
    return out


def _speed_prompts(n: int) -> list[str]:
    from qsched.prompts import load_prompts

    return load_prompts("testbed-heldout", n=n, seed=1).prompts


def _generate(models: Models, pipe: Any, prompts: list[str], steps: int, seed: int) -> Any:
    """One pipeline call through the runner (image i of base ``seed``: ``qsched.runner.image_seed``)."""
    from qsched.runner import generate

    return generate(pipe, prompts, steps, seed=seed, call_kwargs=models.env.call_kwargs())


def _speed_pipes(models: Models) -> dict[str, Any]:
    """fp32, simulated w4a8 (cached float weights) and keep_packed w4a8 (dequantized in every forward)."""
    return {"fp32": models.fp, "w4a8 simulated": models.pipe("w4a8"),
            "w4a8 keep_packed": models.pipe("w4a8", keep_packed=True)}


def _speed(models: Models, s: BenchSettings) -> dict[str, Any]:
    pipes = _speed_pipes(models)
    prompts = _speed_prompts(s.speed_batch)
    totals: dict[str, list[float]] = {k: [] for k in pipes}
    fwd: dict[str, list[float]] = {k: [] for k in pipes}
    for label, pipe in pipes.items():  # warm-up
        _generate(models, pipe, prompts, s.speed_steps, seed=0)
    names = list(pipes)
    for r in range(s.speed_repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: interleaved, no fixed position
        for label in order:
            pipe = pipes[label]
            _, m = denoiser_of(pipe)
            stamps: list[float] = []
            h1 = m.register_forward_pre_hook(lambda *a: stamps.append(time.perf_counter()))
            h2 = m.register_forward_hook(lambda *a: stamps.append(time.perf_counter()))
            try:
                t0 = time.perf_counter()
                _generate(models, pipe, prompts, s.speed_steps, seed=r)
                totals[label].append(time.perf_counter() - t0)
            finally:
                h1.remove()
                h2.remove()
            fwd[label] += [b - a for a, b in zip(stamps[::2], stamps[1::2])]
    out = {}
    for label in names:
        med = statistics.median(totals[label])
        out[label] = {"images_per_s": s.speed_batch / med, "median_call_s": med,
                      "ms_per_step": 1e3 * statistics.median(fwd[label]),
                      "call_seconds": totals[label], "repeats": s.speed_repeats}
    return {"batch": s.speed_batch, "steps": s.speed_steps, "variants": out, "threads": torch.get_num_threads()}


def _overhead(models: Models, s: BenchSettings, ms_per_step: float | None) -> dict[str, Any]:
    """The wrapper's cost: scheduler.step alone, plain vs QSchedScheduler (coefficients != 1), interleaved
    blocks on the pipeline's sample shape, medians (the method of scripts/measure_overhead.py)."""
    from qsched.schedule import Schedule
    from qsched.scheduler import QSchedScheduler

    base = models.fp.scheduler
    if isinstance(base, QSchedScheduler):
        base = base.base_scheduler
    T = s.speed_steps
    _, den = models.denoiser()
    cfg = den.config
    shape = (s.speed_batch, cfg.get("in_channels", 4), cfg.get("sample_size", 32), cfg.get("sample_size", 32))
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    schedule = Schedule.per_step([0.95] * T, [1.05] * T)

    def step_time(sched: Any, calls: int) -> float:
        times = []
        for _ in range(max(1, calls // T)):
            sched.set_timesteps(T)
            sample = x
            for t in sched.timesteps:
                sched.scale_model_input(sample, t)
                t0 = time.perf_counter()
                sample = sched.step(eps, t, sample, return_dict=False)[0]
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    plain, wrapped = [], []
    for _ in range(5):
        plain.append(step_time(type(base).from_config(base.config), s.overhead_calls // 5))
        wrapped.append(step_time(QSchedScheduler.from_scheduler(type(base).from_config(base.config), schedule),
                                 s.overhead_calls // 5))
    sp, sw = statistics.median(plain), statistics.median(wrapped)
    return {"scheduler": type(base).__name__, "shape": list(shape), "plain_us": sp * 1e6, "wrapped_us": sw * 1e6,
            "overhead_us": (sw - sp) * 1e6,
            "overhead_pct_of_step": None if not ms_per_step else 100 * (sw - sp) / (ms_per_step / 1e3),
            "calls": s.overhead_calls}


def _sd15(s: BenchSettings, units: UnitStore) -> dict[str, Any]:
    """The SD1.5-sized UNet numbers: from ``--sd15-json``, measured in-process (``sd15="run"``, one unit), read from
    an earlier run's unit (``"read"``) or skipped."""
    if s.sd15_json:
        p = Path(s.sd15_json)
        if not p.exists():
            raise FileNotFoundError(f"--sd15-json {p} not found")
        return {"source": str(p), "data": json.loads(p.read_text()), "ran": False}
    if s.sd15 == "run":
        runs, threads = 3, s.threads or 1

        def compute(d: Path) -> dict[str, Any]:
            from qsched.bench import sd15

            lines: list[str] = []
            data = sd15.measure(runs=runs, threads=threads, log=lines.append)
            return {"source": f"python -m qsched.bench.sd15 --runs {runs} --threads {threads}", "data": data,
                    "ran": True, "log_tail": "\n".join(lines)[-3000:]}

        return units.run("sd15", "measure_quant", {"kind": "sd15", "runs": runs}, compute,
                         label="qsched.bench.sd15 (SD1.5-sized UNet, several GB, minutes)")
    if s.sd15 == "read":
        found = sorted(units.root.glob("sd15/*/result.json"), key=lambda p: p.stat().st_mtime)
        if found:
            r = json.loads(found[-1].read_text())["result"]
            return {**r, "source": r.get("source"), "reused": str(found[-1])}
        return {"note": "not run in --quick (several GB, minutes); the full run measures it "
                        "(`python -m qsched.bench.sd15`), or pass `--sd15-json` with an earlier result"}
    return {"note": "skipped"}


# ---------------------------------------------------------------------------------------------- kernels hook
#: Where the real-kernel benchmark lives once merged: ``module:function``, the function returning a JSON-able dict.
def kernels_result(s: BenchSettings) -> dict[str, Any] | None:
    """The real-kernel numbers (:mod:`qsched.bench.kernels`): minutes and several GB for the SD1.5-sized UNet, so
    they are measured on their own (``python -m qsched.bench.kernels --out benchmarks/kernels.json``) and read
    here from ``s.kernels_json``, like the SD1.5 numbers; None when not given."""
    if not s.kernels_json:
        return None
    p = Path(s.kernels_json)
    if not p.exists():
        raise FileNotFoundError(f"--kernels-json {p} does not exist (write it with python -m qsched.bench.kernels)")
    return json.loads(p.read_text(encoding="utf-8"))


def section_size_speed(s: BenchSettings, env: BenchEnv, models: Models, units: UnitStore, R: dict[str, Any],
                       write: Callable[[], None]) -> None:
    """Run (or reuse) section 3's units into ``R`` (``sizes``, ``speed``, ``sd15``, ``kernels``). Run it while no
    other benchmark process is busy: its timings are only meaningful on an otherwise idle machine."""
    units.console.rule("[bold]3. Size and speed")
    base = {"env": env.name, "threads": torch.get_num_threads(), "batch": s.speed_batch, "steps": s.speed_steps}

    def sizes(d: Path) -> dict[str, Any]:
        return _sizes(models, s, d)

    R["sizes"] = units.run("size", "sizes", {**base, "kind": "sizes", "rss": s.rss}, sizes,
                           label="sizes (disk, resident, RSS)")

    def speed(d: Path) -> dict[str, Any]:
        sp = _speed(models, s)
        sp["overhead"] = _overhead(models, s, sp["variants"]["fp32"]["ms_per_step"])
        return sp

    R["speed"] = units.run("speed", "speed", {**base, "kind": "speed", "repeats": s.speed_repeats,
                                              "overhead_calls": s.overhead_calls, "seed_rule": "qsched.runner"},
                           speed, label=f"speed ({s.speed_repeats} interleaved repeats x 3 variants)")
    try:
        R["sd15"] = _sd15(s, units)
    except (RuntimeError, OSError, EOFError) as e:  # e.g. out of memory: report it, keep the rest (a rerun retries)
        units.console.print(f"  [red]SD1.5 measurement failed[/]: {e}")
        R["sd15"] = {"note": f"the SD1.5-sized UNet measurement failed on this run: {str(e)[:500]}"}
    kernels = kernels_result(s)
    if kernels is not None:
        R["kernels"] = kernels
    write()
