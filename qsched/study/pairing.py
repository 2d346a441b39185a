"""Pair scheduling: which comparison a rater sees next.

A comparison is (prompt, seed, unordered system pair). For each request the scheduler

1. re-issues the rater's unanswered pair, if there is one (a page reload never skips or duplicates work);
2. else takes the system pairs the rater still has unseen comparisons for that were issued least often overall;
3. and among their unseen comparisons (system pair, item), where an item is a (prompt, seed), one issued least
   often overall, then one whose item was issued least often overall, ties broken at random;
4. randomises which system is on the left.

So system pairs and prompts stay balanced across raters, and a rater never sees the same comparison twice.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from qsched.study.store import Store


@dataclass(frozen=True)
class IssuedPair:
    """A pair shown to a rater."""

    id: str
    prompt: int
    seed: int
    left: str
    right: str


def _row_pair(r: Any) -> IssuedPair:
    return IssuedPair(r["id"], int(r["prompt"]), int(r["seed"]), r["left_sys"], r["right_sys"])


class PairScheduler:
    """Issues pairs for one study (systems and (prompt, seed) items from its manifest)."""

    def __init__(self, store: Store, systems: list[str], items: list[tuple[int, int]], seed: int | None = None):
        if len(systems) < 2:
            raise ValueError(f"need at least two systems, got {systems}")
        self.store = store
        self.system_pairs = [tuple(sorted(p)) for p in itertools.combinations(systems, 2)]
        self.items = list(items)
        self._item_set = set(self.items)
        self.rng = random.Random(seed)

    @property
    def comparisons_per_rater(self) -> int:
        """How many distinct comparisons one rater can be shown."""
        return len(self.system_pairs) * len(self.items)

    def next_pair(self, rater: str) -> IssuedPair | None:
        """The rater's next pair, or None once they have seen every comparison."""
        with self.store.tx() as c:
            pending = c.execute("SELECT p.* FROM pairs p LEFT JOIN votes v ON v.pair_id = p.id "
                                "WHERE p.rater=? AND v.id IS NULL ORDER BY p.issued_at LIMIT 1", (rater,)).fetchone()
            if pending is not None:
                return _row_pair(pending)
            pair_n = Counter({(r[0], r[1]): r[2] for r in c.execute(
                "SELECT sys_a, sys_b, COUNT(*) FROM pairs GROUP BY sys_a, sys_b")})
            mine: dict[tuple[str, str], set[tuple[int, int]]] = {p: set() for p in self.system_pairs}
            for r in c.execute("SELECT prompt, seed, sys_a, sys_b FROM pairs WHERE rater=?", (rater,)):
                it = (int(r[0]), int(r[1]))
                if (r[2], r[3]) in mine and it in self._item_set:
                    mine[(r[2], r[3])].add(it)
            open_pairs = [p for p in self.system_pairs if len(mine[p]) < len(self.items)]
            if not open_pairs:
                return None
            lo = min(pair_n[p] for p in open_pairs)
            tied = [p for p in open_pairs if pair_n[p] == lo]
            item_n = Counter({(int(r[0]), int(r[1])): r[2] for r in c.execute(
                "SELECT prompt, seed, COUNT(*) FROM pairs GROUP BY prompt, seed")})
            comp_n = Counter({(r[0], r[1], int(r[2]), int(r[3])): r[4] for r in c.execute(
                "SELECT sys_a, sys_b, prompt, seed, COUNT(*) FROM pairs GROUP BY sys_a, sys_b, prompt, seed")})
            cands = [(sp, it) for sp in tied for it in self.items if it not in mine[sp]]
            key = lambda x: (comp_n[(*x[0], *x[1])], item_n[x[1]])  # noqa: E731
            best = min(key(x) for x in cands)
            sp, item = self.rng.choice([x for x in cands if key(x) == best])
            left, right = sp if self.rng.random() < 0.5 else (sp[1], sp[0])
            pid = self.store.issue_pair(c, rater, item[0], item[1], left, right)
            return IssuedPair(pid, item[0], item[1], left, right)
