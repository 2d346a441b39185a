"""``qsched study create``: every system's images for the same prompts and seeds, plus ``manifest.json``.

A system is ``[LABEL=]SPEC:SCHEDULE``: ``SPEC`` is ``fp32`` (full precision) or a quantization spec such as ``w4a8``;
``SCHEDULE`` is ``original`` (the model's own scheduler coefficients) or a calibration directory / schedules.json
(its schedule for ``SPEC`` is used); ``LABEL`` names the system in the results. Images live in ``DIR/images/<system id>/<prompt>_<seed>.png``; finished
images are skipped on a rerun, so an interrupted ``create`` resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from qsched.study.errors import StudyError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "qsched-study-1"
FP_NAMES = ("fp32", "fp", "none")
ORIGINAL = "original"


@dataclass(frozen=True)
class SystemSpec:
    """One system of the study: a precision and a schedule source."""

    name: str            # as the user wrote it, e.g. "w4a8:runs/calib"
    spec: str | None     # canonical quantization spec, None = full precision
    schedule: str | None  # path of a schedules file/dir, None = original

    @property
    def id(self) -> str:
        """A short directory-safe id, the same for the same (spec, schedule) however it is written."""
        slug = re.sub(r"[^a-z0-9]+", "-", f"{self.spec or 'fp32'}-{Path(self.schedule).name if self.schedule else ORIGINAL}".lower()).strip("-")
        key = f"{self.spec}|{Path(self.schedule).resolve() if self.schedule else ORIGINAL}"
        return f"{slug[:40]}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"


def parse_system(text: str) -> SystemSpec:
    """Parse ``[LABEL=]SPEC[:SCHEDULE]`` (``SCHEDULE`` defaults to ``original``; ``LABEL``, the name shown in the
    results, defaults to the text itself); raises StudyError naming the bad value."""
    from qsched.quantization import QuantSpec

    label, eq, body = str(text).strip().partition("=")
    if not eq:
        label, body = "", label
    label = label.strip()
    spec_s, _, sched_s = body.strip().partition(":")
    spec_s, sched_s = spec_s.strip(), (sched_s.strip() or ORIGINAL)
    if not spec_s:
        raise StudyError(f"system {text!r}: expected SPEC:SCHEDULE, e.g. fp32:original or w4a8:runs/calib")
    if spec_s.lower() in FP_NAMES:
        spec = None
    else:
        try:
            spec = QuantSpec.parse(spec_s).name
        except ValueError as e:
            raise StudyError(f"system {text!r}: {e}") from None
    schedule = None
    if sched_s.lower() != ORIGINAL:
        p = Path(sched_s).expanduser()
        if not p.exists():
            raise StudyError(f"system {text!r}: schedule {sched_s!r} is neither 'original' nor an existing "
                             "calibration directory / schedules.json")
        schedule = str(p)
    return SystemSpec(label or body.strip(), spec, schedule)


def generate_system_images(pipe: Any, prompts: Sequence[str], indices: Sequence[int], seed: int,
                           steps: int, **call_kw: Any) -> list[Any]:
    """One PIL image per prompt, drawn by :func:`qsched.runner.generate` as image ``indices[i]`` of base seed
    ``seed`` (the runner's one seed rule): the study shows exactly the images ``qsched evaluate`` and
    ``qsched calibrate`` draw for the same prompt index and seed."""
    from PIL import Image

    from qsched.images import to_uint8
    from qsched.runner import generate

    if len(prompts) != len(indices):
        raise StudyError(f"{len(prompts)} prompts but {len(indices)} image indices")
    out = []
    for prompt, index in zip(prompts, indices):
        a = to_uint8(generate(pipe, [prompt], steps, seed=seed, start=int(index), call_kwargs=call_kw))[0]
        out.append(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a))
    return out


def image_name(prompt_index: int, seed: int) -> str:
    """File name of one image inside a system's folder."""
    return f"{prompt_index:05d}_{seed}.png"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`qsched._util.write_atomic`), creating its directory."""
    from qsched._util import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(Path(path), json.dumps(obj, indent=2).encode())


def _png_bytes(img: Any) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _system_pipeline(base: Any, system: SystemSpec, steps: int) -> tuple[Any, Any]:
    """(pipeline, schedule or None) of a system: ``base`` itself or its quantized copy (the base stays untouched),
    and the schedule stored for the system's spec."""
    from qsched.quantization import quantized_copy
    from qsched.schedule import load_schedule

    pipe = quantized_copy(base, system.spec)[0] if system.spec is not None else base
    sched = None
    if system.schedule is not None:
        try:
            sched = load_schedule(system.schedule, spec=system.spec, steps=steps)
        except (ValueError, FileNotFoundError) as e:
            raise StudyError(f"system {system.name!r}: {e}") from None
    return pipe, sched


def _schedule_record(system: SystemSpec, steps: int) -> dict[str, Any] | None:
    """The coefficients a system's schedule file holds for its spec (recorded in the manifest), or None."""
    if system.schedule is None:
        return None
    from qsched.schedule import load_schedule

    try:
        return load_schedule(system.schedule, spec=system.spec, steps=steps).to_dict()
    except (ValueError, FileNotFoundError) as e:
        raise StudyError(f"system {system.name!r}: {e}") from None


def load_manifest(study_dir: str | os.PathLike, allow_incomplete: bool = False) -> dict[str, Any]:
    """Read and check ``DIR/manifest.json`` (an unfinished ``create`` is refused unless ``allow_incomplete``)."""
    p = Path(study_dir) / MANIFEST
    if not p.exists():
        raise StudyError(f"{study_dir} is not a study directory (no {MANIFEST}; run `qsched study create` first)")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise StudyError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise StudyError(f"{p}: not a qsched study manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    if len(m.get("systems", [])) < 2:
        raise StudyError(f"{p}: a study needs at least two systems")
    if not m.get("complete", True) and not allow_incomplete:
        raise StudyError(f"{study_dir}: image generation did not finish; rerun the same `qsched study create` "
                         "command to resume it")
    return m


def create_study(study_dir: str | os.PathLike, systems: Sequence[str], prompts: Any = "testbed-heldout", *,
                 n_prompts: int | None = None, seeds: Sequence[int] = (0,), model: str = "testbed",
                 steps: int | None = None, device: str = "cpu", pipe: Any = None,
                 progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Generate the study's images (skipping finished ones) and write ``manifest.json``; returns the manifest.

    ``prompts``: anything :func:`qsched.prompts.load_prompts` reads (built-in name, text/CSV/JSON/YAML file).
    Every system renders every prompt with every seed. ``pipe`` overrides loading ``model`` (tests).
    ``progress(done, total, system_name)`` is called after each image.
    """
    from qsched.pipelines import resolve_model
    from qsched.prompts import load_prompts

    parsed = [parse_system(s) for s in systems]
    if len(parsed) < 2:
        raise StudyError(f"a study needs at least two systems, got {len(parsed)}")
    ids = [s.id for s in parsed]
    if len(set(ids)) != len(ids):
        raise StudyError(f"duplicate systems in {list(systems)}")
    if len({s.name for s in parsed}) != len(parsed):
        raise StudyError(f"two systems share a label in {list(systems)}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds must be distinct and non-empty, got {seeds}")
    try:
        ps = load_prompts(prompts, n_prompts)
    except FileNotFoundError as e:
        raise StudyError(str(e)) from None
    steps = int(steps or resolve_model(str(model)).steps)
    root = Path(study_dir)
    old = root / MANIFEST
    if old.exists():
        prev = load_manifest(root, allow_incomplete=True)
        if prev["prompts"] != ps.prompts or prev["seeds"] != seeds or prev["model"] != str(model) \
                or prev["steps"] != steps:
            raise StudyError(f"{root} already holds a study with other prompts/seeds/model/steps; "
                             "use a new directory (systems may be added to an existing one)")
    labels = ps.labels
    classes = None
    if labels is not None and str(model) == "testbed":
        from qsched.testbed.data import CLASS_NAMES

        classes = [CLASS_NAMES[int(c)] for c in labels]
    elif ps.categories is not None:
        classes = list(ps.categories)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "model": str(model), "steps": steps, "seeds": seeds,
        "prompts": ps.prompts, "labels": labels, "classes": classes, "prompt_source": str(prompts),
        "systems": [{"id": s.id, "name": s.name, "spec": s.spec, "schedule": s.schedule,
                     "coefficients": _schedule_record(s, steps)} for s in parsed],
        "images": {}, "complete": False,
    }
    jobs = [(pi, sd) for pi in range(len(ps)) for sd in seeds]
    for system in parsed:
        manifest["images"][system.id] = {f"{pi}:{sd}": f"images/{system.id}/{image_name(pi, sd)}" for pi, sd in jobs}
    write_json(old, manifest)  # first, so that a resumed run is checked against the same prompts and seeds
    total, done = len(jobs) * len(parsed), 0
    call_kw = resolve_model(str(model)).call_defaults()
    base = None
    for system in parsed:
        folder = root / "images" / system.id
        todo = [(pi, sd) for pi, sd in jobs if not (folder / image_name(pi, sd)).exists()]
        done += len(jobs) - len(todo)
        if todo:
            if base is None:
                import qsched

                base = pipe if pipe is not None else qsched.load_pipeline(model, device=device)
            from qsched.runner import using_schedule

            spipe, sched = _system_pipeline(base, system, steps)
            with using_schedule(spipe, sched):
                for pi, sd in todo:
                    img = generate_system_images(spipe, [ps.prompts[pi]], [pi], sd, steps, **call_kw)[0]
                    atomic_write(folder / image_name(pi, sd), _png_bytes(img))
                    done += 1
                    if progress:
                        progress(done, total, system.name)
            del spipe
        elif progress:
            progress(done, total, system.name)
    manifest["complete"] = True
    write_json(old, manifest)
    return manifest
