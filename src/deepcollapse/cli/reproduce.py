"""`deepcollapse reproduce`: run both papers' experiments, check their claims, write report.json/.html."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from deepcollapse._validate import DeepCollapseError
from deepcollapse.cli.common import console, handle_errors

# Library messages name parameters; on the command line they are flags.
_FLAGS = {"resume=True": "--resume", "overwrite=True": "--overwrite", "cifar10=PATH": "--cifar10 PATH"}


def _as_flags(message: str) -> str:
    return re.sub("|".join(map(re.escape, _FLAGS)), lambda m: _FLAGS[m.group(0)], message)


def _bar() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _print_report(report: dict[str, Any], out: Path) -> None:
    s = report["summary"]
    for c in report["claims"]:
        if c["status"] == "fail":
            console.print(f"[red]fail[/red] {c['id']}: {c['statement']} ({c['explanation']})", highlight=False)
    console.print(
        f"{s['passed']} of {s['claims']} claims pass ({report['seconds']:.0f} s); "
        f"wrote {out}/report.json and {out}/report.html",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add the ``reproduce`` command to ``app``."""

    @app.command("reproduce")
    @handle_errors
    def reproduce_cmd(
        out: Annotated[Path, typer.Option(help="Report directory (report.json, report.html, runs/).")] = Path(
            "runs/reproduce"
        ),
        quick: Annotated[bool, typer.Option(help="The subset that fits in minutes on a 2-core CPU.")] = False,
        full: Annotated[bool, typer.Option(help="The papers' sizes (meant for a GPU).")] = False,
        only: Annotated[
            list[str] | None, typer.Option(help="Run (or rerun) only this experiment id; repeatable.")
        ] = None,
        cifar10: Annotated[
            Path | None, typer.Option(help="A CIFAR-10 copy (python batches) for the --full CIFAR-10 experiments.")
        ] = None,
        resume: Annotated[bool, typer.Option(help="Continue the report in --out where it stopped.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace the report in --out.")] = False,
        list_ids: Annotated[bool, typer.Option("--list", help="List the experiments of the size and exit.")] = False,
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    ) -> None:
        """Run the experiments of both papers (DUFM 2023, low-rank follow-up 2024) and check each claim
        against its expected value and tolerance; write OUT/report.json and a self-contained OUT/report.html."""
        from deepcollapse.experiments.reproduce import plan, reproduce

        if quick and full:
            raise DeepCollapseError("--quick and --full exclude each other")
        size = "quick" if quick else "full" if full else "default"
        if list_ids:
            for exp in plan(size):
                console.print(f"{exp.id:14s} {exp.paper}  {exp.title}", highlight=False)
            return
        bar, task = _bar() if progress else None, None

        def on_progress(exp_id: str, i: int, total: int) -> None:
            nonlocal task
            if bar is None:
                return
            if task is None:
                task = bar.add_task("experiments", total=total)
            bar.update(task, completed=i, description=f"experiment {exp_id}" if exp_id else "report")

        try:
            if bar is not None:
                bar.start()
            report = reproduce(out, size=size, only=only, resume=resume, overwrite=overwrite, cifar10=cifar10,
                               on_progress=on_progress)  # fmt: skip
        except DeepCollapseError as e:
            raise DeepCollapseError(_as_flags(str(e))) from None
        finally:
            if bar is not None:
                bar.stop()
        _print_report(report, out)
