"""The sentences of a report that name a winner: which arm needs the fewest wire bytes to a goal, and
which accuracy differences are within noise. A run over several seeds names an arm only by
:data:`WINNER_RULE`; a run of one seed says that it is one seed.

Per-seed values are lists in the seeds' order, ``None`` where an arm did not reach the goal (or did
not run) in that seed.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedcsg.runs.summary import Spread

WINNER_RULE = (
    "An arm is named as needing the fewest wire bytes to a goal only if it reaches the goal in every seed and "
    "needs fewer bytes than every other arm in every seed (an arm that misses the goal in a seed counts as "
    "needing more bytes there than any arm that reaches it, so it is never named over one that reaches it in "
    "every seed); otherwise the report says which arms it is not separated from. Accuracy is compared seed by "
    "seed, because every arm of a seed shares its partitions, initial model and sampling: a difference is "
    "within noise when its mean over the seeds is smaller than two standard deviations of its per-seed values."
)
ONE_SEED = "One seed: no noise estimate separates any two arms (`--seeds 0,1,2` gives one)."
NOISE_SDS = 2.0  # a mean difference smaller than this many standard deviations of its per-seed values is noise


def _mb(value: float) -> str:
    return f"{value / 1e6:.3f} MB"


def fewest_bytes_sentence(bytes_by_arm: dict[str, float | None], goal: str) -> str:
    """One sentence naming the arm with the fewest wire bytes to ``goal`` (``None``: not reached),
    how it compares with fedavg and with the next arm, and which arms never got there."""
    reached = {arm: value for arm, value in bytes_by_arm.items() if value is not None}
    missed = [arm for arm, value in bytes_by_arm.items() if value is None]
    if not reached:
        return f"No arm reached {goal}."
    ranked = sorted(reached, key=lambda arm: reached[arm])
    best = ranked[0]
    text = f"Fewest wire bytes to {goal}: **{best}**, {reached[best] / 1e6:.3f} MB"
    if best != "fedavg" and "fedavg" in reached:
        text += f" ({reached['fedavg'] / reached[best]:.2f}x fewer than fedavg)"
    if len(ranked) > 1:
        text += (
            f"; next {ranked[1]}, {reached[ranked[1]] / 1e6:.3f} MB ({reached[ranked[1]] / reached[best]:.2f}x more)"
        )
    if missed:
        text += f"; not reached by {', '.join(missed)}"
    return text + "."


def one_seed_bytes_sentence(bytes_by_arm: dict[str, float | None], goal: str) -> str:
    """:func:`fewest_bytes_sentence` of a one-seed run, followed by :data:`ONE_SEED`."""
    return f"{fewest_bytes_sentence(bytes_by_arm, goal)} {ONE_SEED}"


def seeds_won(leader: Sequence[float | None], other: Sequence[float | None]) -> int:
    """In how many seeds ``leader`` needs fewer bytes than ``other`` (a miss: more than any reach)."""
    return sum(a is not None and (b is None or a < b) for a, b in zip(leader, other, strict=True))


def fewest_bytes_over_seeds(per_seed: dict[str, Sequence[float | None]], goal: str) -> str:
    """The fewest-bytes sentence of a run over several seeds, by :data:`WINNER_RULE`.

    The leader is the arm with the lowest mean among the arms that reach ``goal`` in every seed. It
    is named (in bold) when it needs fewer bytes than every other arm in every seed; otherwise the
    sentence says which arms it is not separated from, and in how many seeds it needs fewer bytes.
    """
    seeds = len(next(iter(per_seed.values())))
    complete = {arm: [float(v) for v in values] for arm, values in per_seed.items() if None not in values}
    partial = {arm: sum(v is not None for v in values) for arm, values in per_seed.items() if arm not in complete}
    partial_text = ", ".join(f"{arm} ({n} of {seeds})" for arm, n in partial.items() if n)
    never = [arm for arm, n in partial.items() if not n]
    if not complete:
        return f"No arm reached {goal} in every one of the {seeds} seeds" + (
            f"; reached in some seeds by {partial_text}." if partial_text else "."
        )
    stats = {arm: Spread.of(values) for arm, values in complete.items()}
    ranked = sorted(complete, key=lambda arm: stats[arm].mean)
    leader = ranked[0]
    best = stats[leader]
    beaten_in = {arm: seeds_won(per_seed[leader], per_seed[arm]) for arm in per_seed if arm != leader}
    unseparated = [arm for arm, won in beaten_in.items() if won < seeds]
    stated = f"{_mb(best.mean)} ± {_mb(best.std)}"
    tail = ""
    if partial_text:
        tail += f"; reached in some seeds only by {partial_text}"
    if never:
        tail += f"; not reached by {', '.join(never)}"
    if unseparated:
        against = ", ".join(f"{arm} (fewer in {beaten_in[arm]} of {seeds})" for arm in unseparated)
        return (
            f"Fewest wire bytes to {goal}: not separated over the {seeds} seeds: {leader} has the lowest mean "
            f"({stated}) but does not need fewer bytes in every seed than {against}{tail}."
        )
    text = (
        f"Fewest wire bytes to {goal}: **{leader}**, {stated}, fewer than every other arm in each of the {seeds} seeds"
    )
    if leader != "fedavg" and "fedavg" in complete:
        text += f" ({stats['fedavg'].mean / best.mean:.2f}x fewer than fedavg on average)"
    if len(ranked) > 1:
        runner = stats[ranked[1]]
        text += f"; next {ranked[1]}, {_mb(runner.mean)} ± {_mb(runner.std)} ({runner.mean / best.mean:.2f}x more)"
    return text + tail + "."


def paired_difference(values: Sequence[float | None], reference: Sequence[float | None]) -> Spread:
    """The per-seed differences ``values - reference`` (the seeds where both have a value), their mean and
    sample standard deviation."""
    return Spread.of(a - b for a, b in zip(values, reference, strict=True) if a is not None and b is not None)


def accuracy_noise_sentence(spreads: dict[str, Spread], figure: str) -> str:
    """One sentence comparing every arm's mean ``figure`` (e.g. "final accuracy") with fedavg's (else
    the best arm's) over the seeds, seed by seed (:func:`paired_difference`), saying of each difference
    whether it is within noise: a mean smaller than :data:`NOISE_SDS` standard deviations of the
    per-seed differences (or fewer than two seeds in common).

    ``spreads`` maps arm to its :class:`~fedcsg.runs.summary.Spread` over the seeds; arms without a mean
    are left out.
    """
    present = {arm: s for arm, s in spreads.items() if s.mean is not None}
    if len(present) < 2:
        return ""
    base = "fedavg" if "fedavg" in present else max(present, key=lambda arm: present[arm].mean)
    ref = present[base]
    parts = []
    for arm, s in present.items():
        if arm == base:
            continue
        paired = paired_difference(s.values, ref.values)
        diff = paired.mean * 100
        bound = NOISE_SDS * paired.std * 100
        per_seed = ", ".join(f"{v * 100:+.1f}" for v in paired.values)
        if paired.n < 2:
            parts.append(f"{arm} {diff:+.2f} points ({per_seed}), one seed in common: no noise estimate")
            continue
        verdict = "beyond noise" if abs(diff) > bound else "within noise"
        parts.append(f"{arm} {diff:+.2f} points ({per_seed}), {verdict} (2 std = {bound:.2f} points)")
    return (
        f"Mean {figure} against {base} ({ref.mean:.4f} ± {ref.std:.4f}), seed by seed (per seed in "
        "points): " + "; ".join(parts) + "."
    )
