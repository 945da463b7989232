"""What a preflight run produces: one ``CheckItem`` per check, the ``PreflightReport`` that holds them, its table
for a person and its JSON for the record."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.core import io, text


@dataclass
class CheckItem:
    name: str
    status: str  # "pass" | "fail" | "skip"
    evidence: dict
    what_to_do: str


@dataclass
class PreflightReport:
    stage: str
    model: str
    device: str
    precision: str
    train_items: int
    num_classes: int
    seed: int
    items: list[CheckItem] = field(default_factory=list)
    # item name -> checklist number, shown in the table; empty for the train-stage checks, which are unnumbered.
    # Not part of the JSON: the numbers are fixed by the checklist, not by a run.
    numbers: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def passed(self) -> bool:
        return all(i.status != "fail" for i in self.items)

    def item(self, name: str) -> CheckItem:
        return next(i for i in self.items if i.name == name)

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k not in ("items", "numbers")}, "passed": self.passed,
                "items": [asdict(i) for i in self.items]}


def format_table(report: PreflightReport) -> str:
    """A readable table: item, status, evidence, and under each item what to do."""
    head = (f"preflight ({report.stage}): {report.model} on {report.device} ({report.precision}), "
            f"{report.train_items} train items, {report.num_classes} classes, seed {report.seed}")
    rows = [("item", "status", "evidence"), ("", "", "what to do")]
    for it in report.items:
        # the overfit trajectory is a curve, not a cell: it stays in the JSON only
        ev = ", ".join(f"{k}={text.fmt(v, '.4g')}" for k, v in it.evidence.items() if k != "trajectory")
        num = report.numbers.get(it.name)
        rows.append((f"{num}. {it.name}" if num else it.name, it.status.upper(), ev))
        rows.append(("", "", f"-> {it.what_to_do}"))
    return "\n".join([head, *text.table(rows)])


def publish(report: PreflightReport, out: Path) -> None:
    """Write the report's JSON atomically to ``out``, then print the table and the verdict."""
    io.write_json(out, report.to_json())
    print(format_table(report))
    print(f"preflight: {'PASSED' if report.passed else 'FAILED'}; report {out}")
