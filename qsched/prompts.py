"""Prompt sets for calibration and evaluation.

``load_prompts(source, n=None, seed=0)`` reads prompts from

- ``"testbed-heldout"`` (default): held-out wording of the embedded Fashion-MNIST testbed, with class labels;
- ``"testbed-calib"``: calibration wording (new to the model like a user's own prompts: neither the training
  nor the held-out wording), one class per prompt (round robin), 120 distinct prompts;
- a plain text file (one prompt per line; blank lines and ``#`` comments skipped);
- a CSV file (column ``prompt`` or ``caption``, else the first column);
- the sDCI YAML of SVDQuant's ``mit-han-lab/svdquant-datasets`` (a mapping ``name -> prompt``; a list of
  strings or of ``{"prompt": ...}`` entries is accepted too). The Q-Sched calibration protocol takes the first
  ``n`` prompts in file order (``order="file"``, the default for sDCI);
- MJHQ-30K ``meta_data.json`` (``{id: {"prompt": ..., "category": ...}}``): the paper's protocol shuffles the
  keys with ``random.Random(0)`` and keeps 5,000 (``n=None`` means that 5k subset);
- COCO captions JSON (``{"annotations": [{"caption": ...}, ...]}``).

``order="shuffle"`` selects ``n`` entries by shuffling with ``random.Random(seed)`` and keeps them in file order
(as SVDQuant's DeepCompressor loaders do); ``order="file"`` keeps the first ``n``.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsched.errors import QSchedError

__all__ = ["PromptSet", "load_prompts", "MJHQ_PROTOCOL_SIZE", "BUILTIN_SOURCES"]

MJHQ_PROTOCOL_SIZE = 5000
BUILTIN_SOURCES = ("testbed-heldout", "testbed-calib")


@dataclass
class PromptSet:
    """A list of prompts with optional integer class labels (testbed) and per-prompt ids/categories."""

    prompts: list[str]
    labels: list[int] | None = None
    name: str = "prompts"
    ids: list[str] | None = None
    categories: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompts = [str(p) for p in self.prompts]
        for attr in ("labels", "ids", "categories"):
            v = getattr(self, attr)
            if v is not None and len(v) != len(self.prompts):
                raise QSchedError(f"PromptSet.{attr} has {len(v)} entries for {len(self.prompts)} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def take(self, n: int) -> PromptSet:
        """The first ``n`` prompts (all of them if fewer)."""
        if n < 1:
            raise QSchedError(f"n must be >= 1, got {n}")
        cut = lambda v: None if v is None else list(v[:n])  # noqa: E731
        return PromptSet(list(self.prompts[:n]), cut(self.labels), self.name, cut(self.ids), cut(self.categories),
                         dict(self.meta))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"name": self.name, "prompts": list(self.prompts), "labels": self.labels, "ids": self.ids,
                "categories": self.categories, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptSet:
        """Inverse of :meth:`to_dict`."""
        return cls(prompts=list(d["prompts"]), labels=d.get("labels"), name=d.get("name", "prompts"),
                   ids=d.get("ids"), categories=d.get("categories"), meta=dict(d.get("meta") or {}))


def _select(n_total: int, n: int | None, order: str, seed: int) -> list[int]:
    """Indices of the selected entries, in file order."""
    idx = list(range(n_total))
    if n is None or n >= n_total:
        return idx
    if order == "file":
        return idx[:n]
    if order == "shuffle":
        random.Random(seed).shuffle(idx)
        return sorted(idx[:n])
    raise QSchedError(f"order must be 'file' or 'shuffle', got {order!r}")


def _testbed_heldout(n: int | None, seed: int) -> PromptSet:
    from qsched.testbed import data

    if n is None:
        n = len(data.all_captions("heldout")[0])
    prompts, labels = data.heldout_prompts(n, seed)
    return PromptSet(list(prompts), [int(x) for x in labels], "testbed-heldout")


def _testbed_calib(n: int | None, seed: int) -> PromptSet:
    """Calibration-wording prompts (never trained on, never evaluated on), classes round robin."""
    from qsched.testbed import data

    avoid = set(data.all_captions("heldout")[0]) | set(data.all_captions("train")[0])
    n_cls = len(data.CLASS_NAMES)
    rng = random.Random(seed)
    per_class = []
    for c in range(n_cls):
        caps = [p for p in data.captions_for(c, "calib") if p not in avoid]
        rng.shuffle(caps)
        per_class.append(caps)
    if n is None:
        n = sum(len(c) for c in per_class)
    prompts, labels = [], []
    for i in range(n):
        c = i % n_cls
        caps = per_class[c]
        prompts.append(caps[(i // n_cls) % len(caps)])
        labels.append(c)
    return PromptSet(prompts, labels, "testbed-calib")


def _read_text(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if "\x00" in text:  # valid UTF-8, but no prompt file holds NUL bytes: a binary file
        raise UnicodeDecodeError("utf-8", b"\x00", text.index("\x00"), text.index("\x00") + 1, "NUL byte")
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(s)
    return out


def _read_csv(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    for key in ("prompt", "caption"):
        if key in header:
            col = header.index(key)
            body = rows[1:]
            break
    else:
        # No known column: use the first column; keep the first row unless it looks like a header name.
        col = 0
        body = rows[1:] if header and header[0] in ("text", "prompts", "captions") else rows
    return [r[col].strip() for r in body if len(r) > col and r[col].strip()]


def _entries_from_yaml(path: Path) -> tuple[list[str], list[str] | None]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if data is None:
        return [], None
    if isinstance(data, dict):
        # sDCI: {name: prompt}; tolerate {name: {"prompt": ...}} too.
        ids, prompts = [], []
        for k, v in data.items():
            p = v.get("prompt") if isinstance(v, dict) else v
            if isinstance(p, str) and p.strip():
                ids.append(str(k))
                prompts.append(p.strip())
        return prompts, ids
    if isinstance(data, list):
        return _list_prompts(data), None
    raise QSchedError(f"{path}: expected a YAML mapping name -> prompt (sDCI format) or a list, "
                      f"got {type(data).__name__}")


def _list_prompts(data: list) -> list[str]:
    """Prompts of a list of strings or of dicts with "prompt"/"caption" (blank entries dropped)."""
    prompts = []
    for v in data:
        p = v.get("prompt", v.get("caption")) if isinstance(v, dict) else v
        if isinstance(p, str) and p.strip():
            prompts.append(p.strip())
    return prompts


def _entries_from_json(path: Path) -> tuple[str, list[str], list[str] | None, list[str] | None]:
    """Returns (format, prompts, ids, categories) for MJHQ meta_data.json, COCO captions or a plain list."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "annotations" in data:
        anns = [a for a in data["annotations"] if isinstance(a, dict) and str(a.get("caption", "")).strip()]
        caps = [str(a["caption"]).strip() for a in anns]
        ids = [str(a.get("image_id", a.get("id", i))) for i, a in enumerate(anns)]
        return "coco", caps, ids, None
    if isinstance(data, dict):
        ids, prompts, cats = [], [], []
        for k, v in data.items():
            if isinstance(v, dict) and isinstance(v.get("prompt"), str):
                if v["prompt"].strip():
                    ids.append(str(k))
                    prompts.append(v["prompt"].strip())
                    cats.append(str(v.get("category", "")))
            elif isinstance(v, str):
                if v.strip():
                    ids.append(str(k))
                    prompts.append(v.strip())
                    cats.append("")
            else:
                raise QSchedError(f"{path}: entry {k!r} has no 'prompt' (expected MJHQ-30K meta_data.json: "
                                  "{id: {'prompt': ..., 'category': ...}})")
        return "mjhq", prompts, ids, (cats if any(cats) else None)
    if isinstance(data, list):
        return "list", _list_prompts(data), None, None
    raise QSchedError(f"{path}: unrecognised JSON prompt file (expected MJHQ meta_data.json, COCO captions or a list)")


def _unreadable(path: Path, e: Exception) -> Exception:
    """The error to raise for a prompt file its reader failed on: a CorruptFileError naming the file for
    binary, truncated or malformed content; anything unexpected is re-raised as is (a bug)."""
    import yaml

    from qsched.errors import CorruptFileError, QSchedError

    if isinstance(e, UnicodeDecodeError):
        return CorruptFileError(f"prompt file {path} is not UTF-8 text (binary?)")
    if isinstance(e, json.JSONDecodeError):
        return CorruptFileError(f"prompt file {path} is not valid JSON ({e.msg} at line {e.lineno}; truncated?)")
    if isinstance(e, yaml.YAMLError):
        first = " ".join(str(e).split())[:200]
        return CorruptFileError(f"prompt file {path} is not valid YAML ({first})")
    if isinstance(e, csv.Error):
        return CorruptFileError(f"prompt file {path} is not valid CSV ({e})")
    if isinstance(e, (TypeError, AttributeError, KeyError)):
        return CorruptFileError(f"prompt file {path} has an unexpected structure ({type(e).__name__}: {e})")
    if isinstance(e, IsADirectoryError):
        return CorruptFileError(f"prompt file {path} is a directory")
    if isinstance(e, ValueError) and not isinstance(e, QSchedError):
        return CorruptFileError(str(e))
    return e


def load_prompts(source: str | Path = "testbed-heldout", n: int | None = None, seed: int = 0,
                 order: str | None = None) -> PromptSet:
    """Load a prompt set (see the module docstring for the sources and their selection rules).

    ``n=None`` keeps every prompt (MJHQ: the 5k protocol subset). ``order`` overrides the per-format default
    ("file" everywhere except MJHQ, which uses "shuffle"). Raises FileNotFoundError for a missing file and
    ValueError for an empty set or an unknown format.
    """
    if n is not None and (not isinstance(n, int) or n < 1):
        raise QSchedError(f"n must be a positive integer or None, got {n!r}")
    if isinstance(source, PromptSet):
        return source if n is None else source.take(n)
    src = str(source)
    if src == "testbed-heldout":
        ps = _testbed_heldout(n, seed)
    elif src == "testbed-calib":
        ps = _testbed_calib(n, seed)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"prompt file not found: {path} (or use one of the built-in sets {', '.join(BUILTIN_SOURCES)})")
        if path.is_dir():
            for cand in ("meta_data.json", "sDCI.yaml"):
                if (path / cand).exists():
                    path = path / cand
                    break
            else:
                raise FileNotFoundError(f"{path} is a directory without meta_data.json or sDCI.yaml")
        suffix = path.suffix.lower()
        ids = cats = None
        default_order = "file"
        fmt = suffix.lstrip(".") or "txt"
        try:
            if suffix == ".csv":
                prompts = _read_csv(path)
            elif suffix in (".yaml", ".yml"):
                prompts, ids = _entries_from_yaml(path)
                fmt = "sdci"
            elif suffix == ".json":
                fmt, prompts, ids, cats = _entries_from_json(path)
                if fmt == "mjhq":
                    default_order = "shuffle"
                    if n is None:
                        n = MJHQ_PROTOCOL_SIZE
            else:
                prompts = _read_text(path)
        except Exception as e:  # noqa: BLE001 - narrowed below; the readers' own ValueErrors already name the file
            raise _unreadable(path, e) from None
        sel = _select(len(prompts), n, order or default_order, seed)
        pick = lambda v: None if v is None else [v[i] for i in sel]  # noqa: E731
        ps = PromptSet([prompts[i] for i in sel], None, path.stem, pick(ids), pick(cats),
                       {"source": str(path), "format": fmt, "order": order or default_order, "seed": seed})
    if len(ps) == 0:
        raise QSchedError(f"no prompts in {src}")
    return ps
