"""A sweep's progress as it runs: one fixed-width row per finished run, with runs done of all, time
elapsed and time left. Torch-free, like `st.report`, whose formatter it uses."""

from __future__ import annotations

import time

from rich.markup import escape

from st.select import fmt_value


class RunPrinter:
    """Prints one row per finished run, as runs finish: a table that grows down the terminal, in
    fixed-width columns so that rows printed minutes apart line up."""

    COLUMNS = (
        ("seed", 4),
        ("kind", 7),
        ("r", 4),
        ("% weights", 9),
        ("selection", 9),
        ("report", 7),
        ("epoch", 5),
        ("seconds", 7),
    )

    def __init__(self, console, metric: str, ratios: list[float] | None = None, clock=time.monotonic):
        """`ratios`: every run the sweep plans, by its ratio (0 for the full model), to tell the time left."""
        self.console, self.metric, self.clock = console, metric, clock
        self.total = None if ratios is None else len(ratios)
        self.work_left = sum(map(run_cost, ratios or []))
        self.started, self.begin, self.done, self.trained = False, clock(), 0, 0.0

    def _line(self, cells: list[str]) -> str:
        return " ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, self.COLUMNS))

    def __call__(self, record: dict) -> None:
        if not self.started:
            self.console.print(f"[bold]{self._line([name for name, _ in self.COLUMNS])}  ({self.metric} ×100)[/]")
            self.started = True

        def metric(part):
            return "—" if record[part] is None else fmt_value(record[part][self.metric])

        percent = record["percent_remaining"]["model"] if record["percent_remaining"] else None
        note = (
            f"  [red]{escape(record['error'])}[/]"
            if record["error"]
            else ("  [dim]finished earlier[/]" if record.get("reused") else "")
        )
        self.done += 1
        self.work_left -= run_cost(record["ratio"])
        self.trained += 0.0 if record.get("reused") else run_cost(record["ratio"])
        elapsed = self.clock() - self.begin
        self.console.print(
            self._line(
                [
                    str(record["seed"]),
                    record["kind"],
                    f"{record['ratio']:g}",
                    "—" if percent is None else f"{percent:.1f}",
                    metric("selection"),
                    metric("report"),
                    str(record["best_epoch"] or "—"),
                    "—" if record["seconds"] is None else f"{record['seconds']:.0f}",
                ]
            )
            + f"  [dim]{progress_note(self.done, self.total, elapsed, self.trained, self.work_left)}[/]"
            + note
        )


def run_cost(ratio: float) -> float:
    """A run's compute as a share of the full model's: a ticket's subnetwork is physically smaller
    (measured on rotten_tomatoes: r = 0.5 took 0.55 of the full run's time, r = 0.8 took 0.32)."""
    return 1 - 0.85 * ratio


def progress_note(done: int, total: int | None, elapsed: float, trained: float, left: float) -> str:
    """ "3/7 runs, 1:02 elapsed, ~1:30 left". The time left is `left` work at the pace of the work
    `trained` in this call (both in full-run units, `run_cost`): runs finished earlier come back at
    once and say nothing about speed, and a ticket at a high ratio is quicker than the full model."""

    def clock(s):
        return (
            f"{int(s) // 3600}:{int(s) % 3600 // 60:02d}:{int(s) % 60:02d}"
            if s >= 3600
            else f"{int(s) // 60}:{int(s) % 60:02d}"
        )

    text = f"{done}/{total} runs, {clock(elapsed)} elapsed" if total else f"{done} runs, {clock(elapsed)} elapsed"
    if total and trained and done < total:
        text += f", ~{clock(elapsed / trained * max(left, 0.0))} left"
    return text
