"""POPE's metrics (Li et al., 2023: yes/no object-existence questions): an answer's first words read as yes / no /
other, and accuracy, precision, recall, F1 and yes-ratio over labelled answers, "yes" being the positive class.

POPE's own script maps every answer that is not a "no" to "yes"; here an answer that is neither is kept apart as
"other" (a deployed model that starts answering "The car..." should show up, not count as a yes): it is wrong for
accuracy, a missed positive (FN) when the label is yes, and no prediction of yes when the label is no.
"""

from __future__ import annotations

import dataclasses
import re

ANSWERS = ("yes", "no", "other")
_NO_WORDS = {"no", "not", "none", "nope"}


def read_answer(text: str) -> str:
    """'yes', 'no' or 'other' from the first words of a generated answer (its first sentence; case, punctuation and
    leading spaces ignored)."""
    first = re.split(r"[.!?\n]", text.strip(), maxsplit=1)[0]
    words = re.findall(r"[a-z']+", first.lower())
    if not words:
        return "other"
    if words[0] in ("yes", "yeah", "yep"):
        return "yes"
    if words[0] in _NO_WORDS or (len(words) > 1 and words[0] in ("there", "it") and "not" in words[:4]):
        return "no"
    return "other"


@dataclasses.dataclass(frozen=True)
class PopeMetrics:
    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    other: int

    @classmethod
    def of(cls, answers: list[str], labels: list[str]) -> "PopeMetrics":
        if len(answers) != len(labels):
            raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
        bad = sorted({a for a in answers if a not in ANSWERS} | {lab for lab in labels if lab not in ("yes", "no")})
        if bad:
            raise ValueError(f"unknown answers or labels: {bad}")
        pairs = list(zip(answers, labels))
        tp = sum(a == "yes" and lab == "yes" for a, lab in pairs)
        fp = sum(a == "yes" and lab == "no" for a, lab in pairs)
        tn = sum(a == "no" and lab == "no" for a, lab in pairs)
        fn = sum(a != "yes" and lab == "yes" for a, lab in pairs)
        return cls(len(pairs), tp, fp, tn, fn, sum(a == "other" for a, _ in pairs))

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p == p and r == r and p + r else float("nan")

    @property
    def yes_ratio(self) -> float:
        return (self.tp + self.fp) / self.n if self.n else float("nan")

    def to_dict(self) -> dict:
        """Counts and rates; a rate with no denominator (no yes predicted: precision) is None, not NaN."""
        rates = {"accuracy": self.accuracy, "precision": self.precision, "recall": self.recall, "f1": self.f1,
                 "yes_ratio": self.yes_ratio}
        return {**dataclasses.asdict(self), **{k: (None if v != v else v) for k, v in rates.items()}}
