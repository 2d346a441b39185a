"""Durable, reproducible coefficient search on an Optuna study (define-by-run, any Optuna storage).

What this module guarantees, so that a calibration can be trusted and shared:

- **Reproducible.** The sampler is rebuilt before every trial with a seed derived from the study seed and the
  trial's *logical index* (the number of completed or live trials before it). A run killed at any point (or
  stopped by a full disk) and restarted therefore asks exactly the points an uninterrupted run asks, and ends
  with its result: the interrupted trial is failed and redone with the same seed and the same history.
- **Several workers, no point twice.** Workers on one study get different logical indices (hence seeds); if two
  still ask the same point at the same instant, exactly one scores it and the other yields (failed as a duplicate, unscored)
  and asks again (a two-phase claim: announce, then read; see `_claim`). The grid is enumerated with the same
  guard.
- **Dead workers.** A RUNNING trial whose worker process on this host is gone is failed (and so redone) on the
  next start; trials of workers on other hosts are failed by Optuna's heartbeat once their grace period expires.
- **Safe first starts.** Creating a SQLite study is serialised with a file lock (two fresh starts raced on the
  schema table), and a storage URL is checked before any model loads (:func:`check_storage`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from qsched.errors import QSchedError
from qsched.interrupts import deferred_interrupts, interruptible
from qsched.schedule import MAX_COEFF, Schedule

__all__ = ["search_space", "grid_candidates", "auto_plan", "PARAMETRIZATIONS", "STRATEGIES", "SAMPLERS",
           "check_storage", "open_study", "per_trial_seed_sampler", "recover_dead_trials", "run_trials",
           "enumerate_grid", "DuplicatePoint", "Progress", "trial_record", "redact", "ROLE_IDENTITY"]

ROLE_IDENTITY = "identity"
PARAMETRIZATIONS = ("linear", "ramp", "per-step")
STRATEGIES = ("optuna", "grid")
SAMPLERS = ("tpe", "cmaes")
MAX_GRID = 1_000_000
_DRIVERS = {"postgresql": ("psycopg", "psycopg2"), "mysql": ("pymysql", "MySQLdb")}


class DuplicatePoint(Exception):
    """Raised inside a trial whose point another live or finished trial already holds."""


def redact(url: Any) -> str | None:
    """A storage URL without its password, for results and logs."""
    if url is None:
        return None
    s = str(url) if isinstance(url, str) else type(url).__name__
    if "@" in s and "://" in s:
        scheme, rest = s.split("://", 1)
        s = f"{scheme}://***@{rest.split('@', 1)[1]}"
    return s


def check_storage(storage: str | None) -> str | None:
    """Fail fast (ValueError, one line) on a storage URL Optuna cannot open here: an unknown scheme or a missing
    database driver. Call it before loading any model."""
    if storage is None or not isinstance(storage, str):
        return storage
    if storage.startswith("sqlite:///"):
        return storage
    scheme = storage.split("://", 1)[0] if "://" in storage else ""
    base = scheme.split("+", 1)[0]
    if base in _DRIVERS:
        from sqlalchemy.engine import make_url

        try:
            url = make_url(storage)
        except Exception:  # noqa: BLE001 - SQLAlchemy raises ArgumentError on malformed URLs
            raise QSchedError(f"--storage {redact(storage)!r} is not a valid database URL") from None
        driver = url.get_driver_name()
        wanted = {"psycopg": "psycopg", "psycopg2": "psycopg2", "pymysql": "pymysql", "mysqldb": "MySQLdb"}
        mod = wanted.get(driver, _DRIVERS[base][0])
        import importlib.util

        if importlib.util.find_spec(mod) is None:
            extra = "postgres" if base == "postgresql" else "mysql"
            raise QSchedError(f"--storage {redact(storage)!r} needs the {mod} driver: pip install 'qsched[{extra}]' "
                              f"(or name an installed driver, e.g. postgresql+psycopg2://...)")
        return storage
    if storage.endswith((".log", ".journal")) or scheme == "":
        raise QSchedError(f"--storage {redact(storage)!r} is not a storage URL: use sqlite:///PATH.db, "
                          "postgresql://USER@HOST/DB or mysql://... (default: SQLite in the output directory)")
    raise QSchedError(f"--storage {redact(storage)!r}: unknown database scheme {scheme!r}; use sqlite:///PATH.db, "
                      "postgresql://... or mysql://...")


def _rdb(url: str) -> Any:
    import optuna

    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; they fail dead workers' trials
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)


def open_study(name: str, storage: str | Any | None, out_dir: Path | None, config: dict[str, Any]) -> Any:
    """Create or load study ``name``; a stored study created with another ``config`` is refused (QSchedError
    naming the differing keys), so trials of other settings, weights or hardware are never mixed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's error reaches the caller; no second copy
    if storage is None and out_dir is not None:
        storage = f"sqlite:///{(out_dir / 'study.db').resolve()}"
    check_storage(storage if isinstance(storage, str) else None)
    def create(store: Any) -> Any:
        return optuna.create_study(study_name=name, storage=store, direction="maximize", load_if_exists=True)

    if storage is None:
        study = create(optuna.storages.InMemoryStorage())
    elif isinstance(storage, str) and storage.startswith("sqlite:///"):
        from filelock import FileLock

        with FileLock(storage[len("sqlite:///"):] + ".lock", timeout=120):  # schema creation is not race-free
            study = create(_rdb(storage))
    elif isinstance(storage, str):
        study = create(_rdb(storage))
    else:
        study = create(storage)
    old = study.user_attrs.get("qsched_config")
    if old is None:
        study.set_user_attr("qsched_config", config)
    elif old != config:
        diff = {k: (old.get(k), config.get(k)) for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)}
        raise QSchedError(f"study {name!r} in this storage was created with other settings {diff}; use another "
                          "study name or output directory")
    return study


def _derive(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "little")


def _logical_index(study: Any, trial: Any) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
               if t.number != trial.number and not t.user_attrs.get("duplicate_of"))


def per_trial_seed_sampler(make: Callable[[int], Any], seed: int) -> Any:
    """An Optuna sampler that rebuilds ``make(seed_i)`` before each trial, ``seed_i`` derived from ``seed`` and
    the trial's logical index (see the module docstring); every other call goes to that inner sampler."""
    from optuna.samplers import BaseSampler

    class PerTrialSeedSampler(BaseSampler):
        def __init__(self) -> None:
            self._inner = make(_derive(seed, 0))

        def before_trial(self, study: Any, trial: Any) -> None:
            self._inner = make(_derive(seed, _logical_index(study, trial)))
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            return self._inner.sample_independent(study, trial, name, dist)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self._inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self._inner.reseed_rng()

    return PerTrialSeedSampler()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def recover_dead_trials(study: Any) -> list[int]:
    """Fail the RUNNING trials of dead worker processes on this host (and, through Optuna's heartbeat, stale
    ones elsewhere), so they are redone; returns the failed trial numbers."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = str(t.user_attrs.get("worker", ""))
        h, _, pid = w.rpartition(":")
        if h == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                failed.append(t.number)
    storage = study._storage
    if getattr(storage, "is_heartbeat_enabled", lambda: False)():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    return failed


def _key(params: dict[str, float]) -> tuple:
    return tuple(sorted((k, round(float(v), 12)) for k, v in params.items()))


def _claim(study: Any, trial: Any, params: dict[str, float], wait_s: float = 30.0) -> None:
    """Raise DuplicatePoint unless ``trial`` may score ``params`` (its params are already stored).

    Two phases, so that two workers asking the same point at the same instant never both score it: the trial
    first announces its claim (user attr ``claim``), then reads the others. Of two announced claims on one point
    at least one sees the other (each wrote before it read). A trial yields to a finished one, to a smaller
    announced one, and to a larger one that decided to go ahead without seeing it; when it sees a larger one that
    has not decided yet, it waits for that decision (the larger one yields to it, or proceeds, at once).
    """
    import time

    from optuna.trial import TrialState

    mine = _key(params)
    trial.set_user_attr("claim", True)

    def rivals() -> list[Any]:
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                if t.number != trial.number and not t.user_attrs.get("duplicate_of") and _key(t.params) == mine
                and (t.state == TrialState.COMPLETE or t.user_attrs.get("claim"))]

    def yield_to(t: Any) -> None:
        trial.set_user_attr("duplicate_of", t.number)
        raise DuplicatePoint(f"trial {trial.number} repeats trial {t.number}")

    deadline = time.monotonic() + wait_s
    while True:
        undecided = None
        for t in rivals():
            if t.state == TrialState.COMPLETE or t.number < trial.number or t.user_attrs.get("proceed"):
                yield_to(t)
            undecided = t
        if undecided is None:
            break
        if time.monotonic() > deadline:  # no decision from the other worker: yielding never scores a point twice
            yield_to(undecided)
        time.sleep(0.05)
    trial.set_user_attr("proceed", True)


def trial_record(t: Any) -> dict[str, Any]:
    """A trial as a JSON-able dict (params, JAQ and its parts, role, model evaluations)."""
    ua = t.user_attrs
    return {"number": t.number, "params": dict(t.params), "jaq": t.value, "tc": ua.get("tc"), "iq": ua.get("iq"),
            "n_invalid": ua.get("n_invalid"), "state": t.state.name, "role": ua.get("role", "search"),
            "model_evals": ua.get("model_evals"), "cache_hits": ua.get("cache_hits")}


def n_complete(study: Any) -> int:
    """Completed trials of ``study``."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _has_identity(study: Any) -> bool:
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    return any(t.user_attrs.get("role") == ROLE_IDENTITY for t in study.get_trials(deepcopy=False, states=live))


def run_trials(study: Any, names: Sequence[str], bounds: tuple[float, float],
               score: Callable[[dict[str, float]], tuple[float, dict[str, Any]]], n_trials: int,
               progress: Any = None) -> None:
    """Run the study until it holds ``n_trials`` completed trials (the identity point first), with the
    duplicate guard and worker bookkeeping of this module. ``score(params) -> (jaq, user_attrs)``."""
    import optuna

    lo, hi = bounds
    recover_dead_trials(study)
    if not _has_identity(study):
        study.enqueue_trial({n: 1.0 for n in names}, user_attrs={"role": ROLE_IDENTITY})

    def objective(trial: Any) -> float:
        trial.set_user_attr("worker", _worker())
        params = {n: trial.suggest_float(n, lo, hi) for n in names}
        _claim(study, trial, params)
        with interruptible():  # Ctrl-C stops a trial while it scores, never while Optuna stores it
            value, attrs = score(params)
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        return value

    callbacks: list[Any] = [optuna.study.MaxTrialsCallback(n_trials, states=(optuna.trial.TrialState.COMPLETE,))]
    if progress is not None:
        callbacks.append(progress)
    while n_complete(study) < n_trials:
        remaining = n_trials - n_complete(study)
        with storage_failures(study), deferred_interrupts():
            study.optimize(objective, n_trials=remaining, callbacks=callbacks, catch=(DuplicatePoint,))


def _storage_error(e: BaseException | None) -> BaseException | None:
    """The database error behind ``e`` (or one it was raised while handling), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__module__.startswith("sqlalchemy") and type(e).__name__ == "OperationalError":
            return e
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def storage_failures(study: Any) -> Iterator[None]:
    """Turn a failed write to the study's storage (full disk, read-only or locked database) into one
    OutputError line; Optuna reports it as "AssertionError: Should not reach." after a failed tell. Completed
    trials stay stored; the trial in flight is redone on the next start."""
    try:
        yield
    except (AssertionError, Exception) as e:  # noqa: B014 - AssertionError named: Optuna raises it here
        db = _storage_error(e)
        if db is None:
            raise
        from qsched.errors import OutputError

        orig = getattr(db, "orig", None) or db
        url = getattr(study._storage, "url", None)
        where = f"the study storage {redact(url)}" if url else "the study storage"
        raise OutputError(f"cannot write {where}: {' '.join(str(orig).split())[:200]}; completed trials are "
                          "kept, rerun the same command to continue") from None


def enumerate_grid(study: Any, candidates: list[dict[str, float]],
                   score: Callable[[dict[str, float]], tuple[float, dict[str, Any]]], budget: int,
                   bounds: tuple[float, float], seed: int, progress: Any = None) -> None:
    """Evaluate grid candidates not yet in ``study`` (the identity first), in a seeded random order.

    The grid is an enumeration, not a search: Optuna's GridSampler re-reads every trial before each new one
    (quadratic; ~1 s per trial at 600 trials), so each point is claimed as a trial (``ask`` with the point
    fixed), guarded against a concurrent worker holding it, scored and told (constant cost, durable, resumable).
    """
    import numpy as np
    import optuna

    recover_dead_trials(study)
    names = list(candidates[0]) if candidates else []
    dists = {n: optuna.distributions.FloatDistribution(*bounds) for n in names}
    order = [candidates[i] for i in np.random.default_rng(seed).permutation(len(candidates))]
    todo = [({n: 1.0 for n in names}, {"role": ROLE_IDENTITY})] + [(c, {}) for c in order]
    done = 0
    for params, extra in todo:
        if done >= budget:
            break
        with storage_failures(study), deferred_interrupts():  # Ctrl-C only while scoring, never mid-write
            held = {_key(t.params) for t in study.get_trials(deepcopy=False)
                    if t.state.name in ("COMPLETE", "RUNNING") and not t.user_attrs.get("duplicate_of")}
            if _key(params) in held:
                continue
            trial = study.ask()
            trial.set_user_attr("worker", _worker())
            for key, v in extra.items():
                trial.set_user_attr(key, v)
            for n in names:  # record the point before scoring, so that other workers see it taken
                study._storage.set_trial_param(trial._trial_id, n, dists[n].to_internal_repr(params[n]), dists[n])
            try:
                _claim(study, trial, params)
            except DuplicatePoint:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            try:
                with interruptible():
                    value, attrs = score(params)
            except KeyboardInterrupt:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)  # redone on the next start
                raise
            for key, v in attrs.items():
                trial.set_user_attr(key, v)
            study.tell(trial, value)
        done += 1
        if progress is not None:
            progress(study, None)


class Progress:
    """A rich progress bar over trials showing the best JAQ so far (an Optuna callback)."""

    def __init__(self, total: int, done: int, study: Any, label: str = "calibrate"):
        self.total, self.done, self.study, self.label = total, done, study, label

    def __enter__(self) -> "Progress":
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn(f"[bold]{self.label:>9}[/]"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.description}"), TimeElapsedColumn())
        self.bar.start()
        self.task = self.bar.add_task(self._desc(), total=self.total, completed=self.done)
        return self

    def _desc(self) -> str:
        try:
            return f"best JAQ {self.study.best_value:.4f}"
        except ValueError:
            return "best JAQ -"

    def __call__(self, study: Any, trial: Any) -> None:
        self.bar.update(self.task, completed=min(self.total, n_complete(study)), description=self._desc())

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()


# ============================================================================================== search space


def _check_parametrization(p: str) -> str:
    p = {"per_step": "per-step", "perstep": "per-step"}.get(p, p)
    if p not in PARAMETRIZATIONS:
        raise QSchedError(f"unknown parametrization {p!r}; choose one of {', '.join(PARAMETRIZATIONS)} (calibrate "
                          "also takes auto: all of them, chosen by validation)")
    return p


def _check_range(grid_range: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in grid_range)
    except (TypeError, ValueError):
        raise QSchedError(f"grid_range must be two numbers (low, high), got {grid_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi <= MAX_COEFF):
        raise QSchedError(f"grid_range must satisfy 0 < low < high <= {MAX_COEFF:g} (finite coefficients), got "
                          f"{grid_range!r}")
    return lo, hi


def search_space(parametrization: str, steps: int, grid_range: Sequence[float] = (0.8, 1.2),
                 grid_points: int = 10) -> dict[str, list[float]]:
    """Grid values per parameter: ``np.linspace(low, high, grid_points)`` on every axis."""
    kind = _check_parametrization(parametrization)
    lo, hi = _check_range(grid_range)
    if int(grid_points) < 1:
        raise QSchedError(f"grid_points must be >= 1, got {grid_points}")
    axis = [float(v) for v in np.linspace(lo, hi, int(grid_points))]
    return {name: list(axis) for name in Schedule.param_names(kind, steps)}


def grid_candidates(parametrization: str, steps: int, grid_range: Sequence[float] = (0.8, 1.2),
                    grid_points: int = 10) -> list[dict[str, float]]:
    """Every grid candidate (the Cartesian product of :func:`search_space`), in a fixed order."""
    space = search_space(parametrization, steps, grid_range, grid_points)
    names = list(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*(space[n] for n in names))]


AUTO_MIN_TRIALS = 5  # per parametrization "auto" searches: the identity trial and 4 searched points


def auto_plan(steps: int, n_trials: int) -> list[tuple[str, int]]:
    """The parametrizations ``"auto"`` searches for ``steps`` and how many trials each gets out of ``n_trials``
    (spaces that coincide at small T are searched once: T = 1 all are linear; T = 2 ramp = per-step).

    The shares add up to ``n_trials`` exactly. Each parametrization searched gets at least ``AUTO_MIN_TRIALS``
    (its identity trial and 4 searched points): a small budget spread thinner finds nothing (6 trials over three
    parametrizations, one searched point each, kept the original where 3 on linear alone gained), so with fewer
    the last ones (per-step, then ramp) are left out: up to 9 trials search linear only, 10 to 14 linear and ramp
    (at T >= 3)."""
    kinds = ["linear"] if steps == 1 else (["linear", "per-step"] if steps == 2 else ["linear", "ramp", "per-step"])
    kinds = kinds[:max(1, int(n_trials) // AUTO_MIN_TRIALS)]
    if len(kinds) == 1:
        return [(kinds[0], int(n_trials))]
    weights = {"linear": 0.3, "ramp": 0.3, "per-step": 0.4}
    total = sum(weights[k] for k in kinds)
    shares = [max(AUTO_MIN_TRIALS, int(round(n_trials * weights[k] / total))) for k in kinds]
    shares[-1] = n_trials - sum(shares[:-1])
    return list(zip(kinds, shares))


def _shrunk(s: Schedule, lam: float) -> Schedule:
    """``s`` moved a fraction ``lam`` of the way from the identity (lam = 1: s itself)."""
    return Schedule.per_step([1 + lam * (c - 1) for c in s.model_coeff], [1 + lam * (c - 1) for c in s.sample_coeff])


def _sampler_factory(sampler: str) -> Callable[[int], Any]:
    import optuna

    if sampler == "tpe":
        return lambda seed: optuna.samplers.TPESampler(seed=seed)
    if sampler == "cmaes":
        try:
            import cmaes  # noqa: F401 - only checks that the optional package is there
        except ImportError as e:
            raise ImportError("the CMA-ES sampler needs the cmaes package: pip install cmaes") from e
        return lambda seed: optuna.samplers.CmaEsSampler(sigma0=0.1, seed=seed, warn_independent_sampling=False)
    raise QSchedError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
