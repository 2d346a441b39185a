"""Simulated raters: vote through the same HTTP API a browser uses, backed by an image scorer plus noise.

``ClassifierScorer`` scores an image by the testbed classifier's probability of the prompt's class, so a
rater built on it prefers the system whose images show the requested class (and ranks systems by class
accuracy). ``RandomScorer`` costs nothing (load tests). Every loop is bounded by ``max_votes``.
"""

from __future__ import annotations

import io
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import httpx


class Scorer(Protocol):
    def __call__(self, image: Any, prompt: str) -> float: ...


class RandomScorer:
    """A uniform random score (no preference at all)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def __call__(self, image: Any, prompt: str) -> float:
        return self.rng.random()


class ClassifierScorer:
    """Probability of the prompt's class under the testbed's Fashion-MNIST classifier (thread-safe)."""

    def __init__(self, labels_by_prompt: dict[str, int]):
        import torch

        from qsched.testbed.classifier import load_classifier

        self.labels = dict(labels_by_prompt)
        self.model = load_classifier()
        self.torch = torch
        self.lock = threading.Lock()

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "ClassifierScorer":
        """Labels from a testbed study's manifest."""
        labels = manifest.get("labels")
        if not labels:
            raise ValueError("the study manifest has no class labels (not a testbed prompt set)")
        return cls({p: int(c) for p, c in zip(manifest["prompts"], labels)})

    def __call__(self, image: Any, prompt: str) -> float:
        import numpy as np

        if prompt not in self.labels:
            raise ValueError(f"no class label for prompt {prompt!r}")
        g = image.convert("L").resize((32, 32))
        x = self.torch.from_numpy(np.asarray(g, dtype=np.float32) / 255.0)[None, None]
        with self.lock, self.torch.no_grad():
            p = self.model(x).softmax(-1)[0, self.labels[prompt]]
        return float(p)


@dataclass
class RaterStats:
    """What one simulated rater sent and got back."""

    sent: int = 0
    accepted: int = 0
    replays_sent: int = 0
    replays_rejected: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)
    done: bool = False


class SimulatedRater:
    """Votes for the image with the higher noisy score; ``tie_margin``: |difference| below it is a tie;
    ``bad_below``: both scores below it is "both bad". ``replay=True`` re-sends every accepted vote once (the
    server must refuse it)."""

    def __init__(self, base_url: str, token: str, scorer: Scorer, noise: float = 0.05, tie_margin: float = 0.0,
                 bad_below: float | None = None, seed: int = 0, replay: bool = False, timeout: float = 30.0):
        self.base_url, self.token, self.scorer = base_url.rstrip("/"), token, scorer
        self.noise, self.tie_margin, self.bad_below = noise, tie_margin, bad_below
        self.rng = random.Random(seed)
        self.replay = replay
        self.timeout = timeout

    def decide(self, s_left: float, s_right: float) -> str:
        """The answer for two (noise-free) scores."""
        l = s_left + self.rng.gauss(0.0, self.noise)
        r = s_right + self.rng.gauss(0.0, self.noise)
        if self.bad_below is not None and l < self.bad_below and r < self.bad_below:
            return "both_bad"
        if abs(l - r) <= self.tie_margin:
            return "tie"
        return "left" if l > r else "right"

    def run(self, max_votes: int) -> RaterStats:
        """Vote until ``max_votes`` are accepted or the server has no comparison left."""
        from PIL import Image

        st = RaterStats()
        hdr = {"X-Rater-Token": self.token}
        with httpx.Client(base_url=self.base_url, headers=hdr, timeout=self.timeout) as c:
            for _ in range(int(max_votes)):
                nxt = c.get("/api/next")
                nxt.raise_for_status()
                j = nxt.json()
                if j["done"]:
                    st.done = True
                    break
                imgs = {}
                for side in ("left", "right"):
                    r = c.get(j["images"][side])
                    r.raise_for_status()
                    imgs[side] = Image.open(io.BytesIO(r.content))
                ans = self.decide(self.scorer(imgs["left"], j["prompt"]), self.scorer(imgs["right"], j["prompt"]))
                body = {"pair_id": j["pair_id"], "answer": ans}
                st.sent += 1
                r = c.post("/api/vote", json=body)
                if r.status_code == 200:
                    st.accepted += 1
                    st.answers[ans] = st.answers.get(ans, 0) + 1
                else:
                    st.errors[r.status_code] = st.errors.get(r.status_code, 0) + 1
                if self.replay:
                    st.replays_sent += 1
                    if c.post("/api/vote", json=body).status_code == 409:
                        st.replays_rejected += 1
        return st


def add_raters(base_url: str, admin_token: str, n: int, timeout: float = 30.0) -> list[str]:
    """Register ``n`` raters through the admin API; returns their tokens."""
    with httpx.Client(base_url=base_url, headers={"X-Admin-Token": admin_token}, timeout=timeout) as c:
        out = []
        for _ in range(int(n)):
            r = c.post("/api/admin/raters")
            r.raise_for_status()
            out.append(r.json()["token"])
        return out


def run_raters(base_url: str, tokens: Sequence[str], make_scorer: Callable[[int], Scorer], votes_per_rater: int,
               noise: float = 0.05, concurrency: int | None = None, replay: bool = False,
               **rater_kw: Any) -> dict[str, Any]:
    """Run one simulated rater per token concurrently (threads); returns summed stats and the wall time."""
    raters = [SimulatedRater(base_url, t, make_scorer(i), noise=noise, seed=i, replay=replay, **rater_kw)
              for i, t in enumerate(tokens)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency or len(raters)) as ex:
        stats = list(ex.map(lambda r: r.run(votes_per_rater), raters))
    wall = time.perf_counter() - t0
    errors: dict[int, int] = {}
    for s in stats:
        for k, v in s.errors.items():
            errors[k] = errors.get(k, 0) + v
    return {"raters": len(raters), "sent": sum(s.sent for s in stats), "accepted": sum(s.accepted for s in stats),
            "replays_sent": sum(s.replays_sent for s in stats),
            "replays_rejected": sum(s.replays_rejected for s in stats), "errors": errors,
            "finished": sum(s.done for s in stats), "wall_s": wall}
