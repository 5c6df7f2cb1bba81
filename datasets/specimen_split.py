"""Specimen-level train/val/test splits, stratified by class, balanced by the coefficient of variation.

All slices of one specimen go to one split: slice-level splits leak near-identical neighbouring slices
between train and test and can overstate accuracy by up to 55% (ForamDeepSlice, RECIPES.md section 2).

Stratification: each class's specimens are divided among the splits in the requested fractions (largest
remainder rounding; every split gets at least one specimen of a class that has as many specimens as there
are splits). `slack` lets each of those counts move by up to that many specimens.

Balance: the paper measures a split by the coefficient of variation of its class counts,
CV = std / mean * 100 (population std over the classes, counts weighted by `weights`, e.g. slices per
specimen), and brute-forced specimen assignments to minimise it. `search_split` minimises the mean of
the per-split CVs with seeded restarts of a best-improvement local search (swap two specimens of one
class between splits, or move one within the slack). It matched the brute-force optimum on 360 random
instances of 5 to 11 specimens (weights and slack 0 to 2; a few are in tests/test_volumes.py) and takes
about 10 s for adrenal3d's 1,286 specimens with slice weights on one core.

    labels = specimen_labels(read_volumes("../shared/data/adrenal3d"))       # datasets/volumes.py
    result = search_split(labels, parse_fractions("train=0.7,val=0.15,test=0.15"), seed=0)
    print(format_split_report(result))
"""

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from datasets.errors import UserError

BRUTE_FORCE_LIMIT = 600_000  # assignments: 12 specimens in 3 splits, a few hundred MB at most


@dataclass(frozen=True)
class SpecimenSplit:
    split_of: dict[str, str]  # specimen -> split name
    counts: dict[str, dict[str, float]]  # split -> class -> weighted count (slices, or specimens)
    specimens: dict[str, int]  # split -> number of specimens
    cv: dict[str, float]  # split -> CV of its class counts, in %
    mean_cv: float  # the objective: mean of the per-split CVs, in %


@dataclass(frozen=True)
class _Problem:
    specimens: list[str]  # sorted, so results do not depend on dict order
    classes: list[str]
    splits: list[str]
    cls: np.ndarray  # (n,) class index of each specimen
    weight: np.ndarray  # (n,) float weight of each specimen
    quota: np.ndarray  # (C, S) stratified number of specimens of class c in split s
    lo: np.ndarray  # (C, S) allowed range for that number, quota -+ slack
    hi: np.ndarray


def parse_fractions(text: str) -> dict[str, float]:
    """ "train=0.7,val=0.15,test=0.15" -> {"train": 0.7, "val": 0.15, "test": 0.15}."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise UserError(
                f"split {text!r}: expected name=fraction pairs such as train=0.7,val=0.15,test=0.15"
            )
    return out


def class_cv(counts: Sequence[float] | np.ndarray) -> float:
    """Coefficient of variation of class counts in %: population std / mean * 100 (inf if all zero)."""
    return float(_cv_rows(np.asarray(counts, dtype=np.float64)[None, :])[0])


def _cv_rows(counts: np.ndarray) -> np.ndarray:
    """CV in % of each row of a (..., C) array; rows summing to zero get inf (an empty split)."""
    mean = counts.mean(axis=-1)
    std = counts.std(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, std / np.where(mean > 0, mean, 1) * 100, np.inf)


def stratified_quotas(n: int, fractions: Sequence[float]) -> list[int]:
    """Split n items by fractions, largest remainder first; each part >= 1 when n >= parts."""
    raw = np.asarray(fractions, dtype=np.float64) * n
    quota = np.floor(raw).astype(int)
    order = sorted(range(len(raw)), key=lambda s: (-(raw[s] - quota[s]), s))
    for s in order[: n - quota.sum()]:
        quota[s] += 1
    if n >= len(quota):  # a split without a class cannot measure that class
        for s in range(len(quota)):
            if quota[s] == 0:
                quota[int(np.argmax(quota))] -= 1
                quota[s] = 1
    return quota.tolist()


def _problem(
    labels: Mapping[str, str], fractions: Mapping[str, float], weights: Mapping[str, float] | None, slack: int
) -> _Problem:
    if not labels:
        raise UserError("no specimens to split (empty dataset)")
    if not fractions or any(f <= 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise UserError(f"split fractions {dict(fractions)}: expected positive fractions that sum to 1")
    if slack < 0:
        raise UserError(f"slack {slack}: expected a number of specimens >= 0")
    specimens = sorted(labels)
    classes = sorted(set(labels.values()))
    splits = list(fractions)
    if weights is not None:
        missing = [s for s in specimens if s not in weights]
        if missing:
            raise UserError(f"no weight (slice count) for specimen(s) {', '.join(missing[:5])}")
        bad = [s for s in specimens if not weights[s] > 0]
        if bad:
            raise UserError(f"specimen(s) {', '.join(bad[:5])} have no slices (weight <= 0)")
    cls = np.array([classes.index(labels[s]) for s in specimens])
    weight = np.array([float(weights[s]) if weights is not None else 1.0 for s in specimens])
    per_class = np.bincount(cls, minlength=len(classes))
    quota = np.array([stratified_quotas(int(n), list(fractions.values())) for n in per_class])
    floor = np.where(per_class >= len(splits), 1, 0)[:, None]
    lo = np.maximum(quota - slack, floor)
    hi = np.minimum(quota + slack, per_class[:, None])
    return _Problem(specimens, classes, splits, cls, weight, quota, lo, hi)


def _counts(p: _Problem, assign: np.ndarray) -> np.ndarray:
    counts = np.zeros((len(p.splits), len(p.classes)))
    np.add.at(counts, (assign, p.cls), p.weight)
    return counts


def _result(p: _Problem, assign: np.ndarray) -> SpecimenSplit:
    counts = _counts(p, assign)
    cv = _cv_rows(counts)
    return SpecimenSplit(
        split_of={sp: p.splits[a] for sp, a in zip(p.specimens, assign, strict=True)},
        counts={s: {c: float(counts[i, j]) for j, c in enumerate(p.classes)} for i, s in enumerate(p.splits)},
        specimens={s: int((assign == i).sum()) for i, s in enumerate(p.splits)},
        cv={s: float(cv[i]) for i, s in enumerate(p.splits)},
        mean_cv=float(cv.mean()),
    )


def evaluate_split(
    labels: Mapping[str, str],
    split_of: Mapping[str, str],
    fractions: Mapping[str, float],
    weights: Mapping[str, float] | None = None,
) -> SpecimenSplit:
    """Counts and CVs of a given assignment (for example one read back from an index CSV)."""
    p = _problem(labels, fractions, weights, slack=0)
    unknown = sorted({split_of[s] for s in p.specimens if s in split_of} - set(p.splits))
    if unknown or any(s not in split_of for s in p.specimens):
        raise UserError(f"split assignment: every specimen needs one of the splits {', '.join(p.splits)}")
    return _result(p, np.array([p.splits.index(split_of[s]) for s in p.specimens]))


def _random_assignment(p: _Problem, rng: np.random.Generator) -> np.ndarray:
    assign = np.empty(len(p.specimens), dtype=int)
    for c in range(len(p.classes)):
        members = rng.permutation(np.flatnonzero(p.cls == c))
        assign[members] = np.repeat(np.arange(len(p.splits)), p.quota[c])
    return assign


def _local_search(p: _Problem, assign: np.ndarray) -> np.ndarray:
    """Best-improvement descent over swaps and (within the slack) single moves.

    A move of class c between splits s and t only changes counts[s, c] by -d and counts[t, c] by +d, so
    each candidate is scored from d alone, vectorised over every distinct d the two groups offer.
    """
    assign = assign.copy()
    counts = _counts(p, assign)
    cv = _cv_rows(counts)
    n_cls = np.zeros((len(p.classes), len(p.splits)), dtype=int)
    np.add.at(n_cls, (p.cls, assign), 1)
    pairs = [(s, t) for s in range(len(p.splits)) for t in range(len(p.splits)) if s != t]
    while True:
        best = (-1e-9, None)  # only strict improvements, so the descent ends
        for c in range(len(p.classes)):
            for s, t in pairs:
                ws = np.unique(p.weight[(p.cls == c) & (assign == s)])
                wt = np.unique(p.weight[(p.cls == c) & (assign == t)])
                if not len(ws):
                    continue
                cands = []  # (d, weight leaving s, weight leaving t or None)
                if s < t and len(wt):  # a swap seen from (s, t) equals the one from (t, s)
                    grid_s, grid_t = np.meshgrid(ws, wt, indexing="ij")
                    cands.append((grid_s - grid_t, grid_s, grid_t))
                if n_cls[c, s] - 1 >= p.lo[c, s] and n_cls[c, t] + 1 <= p.hi[c, t]:
                    cands.append((ws, ws, None))
                for d, w_out, w_in in cands:
                    d, w_out = d.ravel(), w_out.ravel()
                    new_s = counts[s][None, :].repeat(len(d), 0)
                    new_t = counts[t][None, :].repeat(len(d), 0)
                    new_s[:, c] -= d
                    new_t[:, c] += d
                    with np.errstate(invalid="ignore"):  # inf - inf: an empty split stays empty
                        gain = (_cv_rows(new_s) + _cv_rows(new_t) - cv[s] - cv[t]) / len(p.splits)
                    gain = np.nan_to_num(gain, nan=0.0, posinf=np.inf, neginf=-np.inf)
                    k = int(np.argmin(gain))
                    if gain[k] < best[0]:
                        best = (gain[k], (c, s, t, w_out[k], None if w_in is None else w_in.ravel()[k]))
        if best[1] is None:
            return assign
        c, s, t, w_out, w_in = best[1]
        a = np.flatnonzero((p.cls == c) & (assign == s) & (p.weight == w_out))[0]
        assign[a] = t
        n_cls[c, s] -= 1
        n_cls[c, t] += 1
        if w_in is not None:
            b = np.flatnonzero(
                (p.cls == c) & (assign == t) & (p.weight == w_in) & (np.arange(len(assign)) != a)
            )[0]
            assign[b] = s
            n_cls[c, t] -= 1
            n_cls[c, s] += 1
        counts = _counts(p, assign)
        cv = _cv_rows(counts)


def _kick(p: _Problem, assign: np.ndarray, rng: np.random.Generator, moves: int) -> np.ndarray:
    """Random same-class swaps, or single moves where the slack allows: leaves the local optimum."""
    assign = assign.copy()
    n_cls = np.zeros((len(p.classes), len(p.splits)), dtype=int)
    np.add.at(n_cls, (p.cls, assign), 1)
    for _ in range(moves):
        a = int(rng.integers(len(assign)))
        c, s = p.cls[a], assign[a]
        t = int(rng.integers(len(p.splits)))
        if t == s:
            continue
        if rng.random() < 0.5 and n_cls[c, s] - 1 >= p.lo[c, s] and n_cls[c, t] + 1 <= p.hi[c, t]:
            assign[a] = t
            n_cls[c, s] -= 1
            n_cls[c, t] += 1
            continue
        others = np.flatnonzero((p.cls == c) & (assign == t))
        if len(others):
            b = int(rng.choice(others))
            assign[a], assign[b] = t, s
    return assign


def search_split(
    labels: Mapping[str, str],
    fractions: Mapping[str, float],
    *,
    weights: Mapping[str, float] | None = None,
    slack: int = 0,
    seed: int = 0,
    restarts: int = 8,
    kicks: int = 20,
) -> SpecimenSplit:
    """Specimen-level stratified split minimising the mean per-split CV of class counts.

    labels: specimen -> class. fractions: split name -> fraction of each class's specimens (sums to 1).
    weights: specimen -> weight of its class count (slices per specimen; default 1, one specimen).
    slack: how far each class's specimen count per split may move from the stratified quota.
    Deterministic for a given seed: `restarts` random stratified starts, each followed by `kicks` rounds
    of random swaps plus local search, keeping the best (iterated local search).
    """
    p = _problem(labels, fractions, weights, slack)
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max(restarts, 1)):
        current = _local_search(p, _random_assignment(p, rng))
        current_cv = _cv_rows(_counts(p, current)).mean()
        for _ in range(kicks):
            # small kicks: a few moves leave the basin, and repairing them costs a few descent steps
            candidate = _local_search(p, _kick(p, current, rng, int(rng.integers(1, 4))))
            candidate_cv = _cv_rows(_counts(p, candidate)).mean()
            if candidate_cv < current_cv - 1e-12:
                current, current_cv = candidate, candidate_cv
        if best is None or current_cv < best[1] - 1e-12:
            best = (current, current_cv)
    return _result(p, best[0])


def brute_force_split(
    labels: Mapping[str, str],
    fractions: Mapping[str, float],
    *,
    weights: Mapping[str, float] | None = None,
    slack: int = 0,
) -> SpecimenSplit:
    """The paper's method: every assignment of specimens to splits that meets the stratification, the one
    with the lowest mean CV (first in enumeration order on ties). Small inputs only (BRUTE_FORCE_LIMIT)."""
    p = _problem(labels, fractions, weights, slack)
    n, n_splits = len(p.specimens), len(p.splits)
    if n_splits**n > BRUTE_FORCE_LIMIT:
        raise UserError(
            f"brute force over {n} specimens in {n_splits} splits is {n_splits**n:,} assignments "
            f"(limit {BRUTE_FORCE_LIMIT:,}); use search_split"
        )
    assign = np.array(list(itertools.product(range(n_splits), repeat=n)), dtype=np.int8).reshape(-1, n)
    ok = np.ones(len(assign), dtype=bool)
    counts = np.zeros((len(assign), n_splits, len(p.classes)))
    for c in range(len(p.classes)):
        in_c = p.cls == c
        for s in range(n_splits):
            member = assign[:, in_c] == s  # (M, specimens of class c)
            n_cs = member.sum(axis=1)
            ok &= (n_cs >= p.lo[c, s]) & (n_cs <= p.hi[c, s])
            counts[:, s, c] = member @ p.weight[in_c]
    objective = np.where(ok, _cv_rows(counts).mean(axis=1), np.inf)
    return _result(p, assign[int(np.argmin(objective))].astype(int))


def format_split_report(result: SpecimenSplit) -> str:
    """A small table: specimens, weighted class counts and CV per split, as the paper reports them."""
    classes = list(next(iter(result.counts.values())))
    header = ["split", "specimens", *classes, "CV %"]
    rows = [
        [s, str(result.specimens[s]), *(f"{result.counts[s][c]:g}" for c in classes), f"{result.cv[s]:.2f}"]
        for s in result.counts
    ]
    rows.append(["mean", "", *([""] * len(classes)), f"{result.mean_cv:.2f}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in [header, *rows])
