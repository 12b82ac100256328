r"""``deepcollapse reproduce``: run the experiments of both papers and check each claim.

Every experiment (:data:`deepcollapse.experiments.papers.EXPERIMENTS`) writes its files into
``out/runs/<id>/`` and, when it has finished, ``out/runs/<id>/result.json``: its claims, figures and
settings. A claim is a check ``measured <relation> expected`` within ``tolerance``
(:func:`make_claim`), with its source (paper, theorem or figure). The report gathers the result files
into ``out/report.json`` and ``out/report.html`` (one self-contained page,
:mod:`deepcollapse.experiments.report`).

Sizes: ``quick`` (the subset that fits in minutes on a 2-core CPU), ``default`` (every experiment at CPU
size) and ``full`` (the papers' sizes, for a GPU). A killed run continues with ``resume=True``: the
experiments with a ``result.json`` of the same size are kept, an unfinished one starts again.
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepcollapse._validate import DeepCollapseError
from deepcollapse.files import read_json, write_json

__all__ = [
    "RELATIONS",
    "SIZES",
    "Experiment",
    "make_claim",
    "plan",
    "reproduce",
]

SIZES = ("quick", "default", "full")
RELATIONS = ("close", "at_most", "at_least")
MANIFEST = "reproduce.json"
RESULT = "result.json"


@dataclass(frozen=True)
class Experiment:
    """One experiment of the report: what the paper did, and a function that redoes it at a size.

    ``run(out, params, context)`` writes its files into ``out`` and returns ``{"claims": [...],
    "figures": [paths relative to out], "settings": {...}, "notes": [...]}``. ``params`` maps each
    size to the function's keyword arguments; a size missing from it leaves the experiment out of that
    size. A size's ``params["needs"]`` names a context entry (e.g. ``"cifar10"``) without which the
    experiment is skipped, and ``params["skip"]`` skips it with that reason (both shown in the report).
    """

    id: str
    paper: str
    title: str
    setting: str
    run: Callable[..., dict[str, Any]]
    params: dict[str, dict[str, Any]]
    stand_in: dict[str, str] = field(default_factory=dict)  # size -> what the stand-in replaces


def make_claim(
    claim_id: str,
    *,
    source: str,
    statement: str,
    measured: float | None,
    expected: float,
    tolerance: float,
    relation: str = "close",
    run: str = "",
    if_failed: str = "",
) -> dict[str, Any]:
    """A checked claim: ``status = "pass"`` iff ``measured`` is a finite number and

    ``close``: ``|measured - expected| <= tolerance``; ``at_most``: ``measured <= expected + tolerance``;
    ``at_least``: ``measured >= expected - tolerance``. A failed claim carries ``explanation``
    (``if_failed``, the experiment's reading of what a failure means).
    """
    if relation not in RELATIONS:
        raise DeepCollapseError(f"relation must be one of {', '.join(RELATIONS)}, got {relation!r}")
    ok = measured is not None and math.isfinite(float(measured))
    if ok:
        m = float(measured)
        if relation == "close":
            ok = abs(m - expected) <= tolerance
        elif relation == "at_most":
            ok = m <= expected + tolerance
        else:
            ok = m >= expected - tolerance
    claim = {
        "id": claim_id,
        "source": source,
        "statement": statement,
        "expected": expected,
        "measured": None if measured is None else float(measured),
        "tolerance": tolerance,
        "relation": relation,
        "status": "pass" if ok else "fail",
        "run": run,
    }
    if not ok:
        finite = measured is not None and math.isfinite(float(measured))
        why = "out of tolerance." if finite else "not measured (the run produced no finite value)."
        claim["explanation"] = f"{why} {if_failed}".strip()
    return claim


def plan(size: str, *, only: Sequence[str] | None = None, context: dict[str, Any] | None = None) -> list[Experiment]:
    """The experiments of ``size`` (in report order), restricted to ``only`` when given."""
    from deepcollapse.experiments.papers import EXPERIMENTS

    if size not in SIZES:
        raise DeepCollapseError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    ids = [e.id for e in EXPERIMENTS]
    for i in only or ():
        if i not in ids:
            raise DeepCollapseError(f"unknown experiment id {i!r}; choose from {', '.join(ids)}")
    chosen = [e for e in EXPERIMENTS if size in e.params]
    if only:
        chosen = [e for e in EXPERIMENTS if e.id in only]
    return chosen


def _versions() -> dict[str, str]:
    import numpy
    import torch

    from deepcollapse import __version__

    return {
        "deepcollapse": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _prepare(out: Path, size: str, context: dict[str, Any], *, resume: bool, overwrite: bool, only: bool) -> None:
    """Check ``out`` before anything is written: a report of another run is refused without resume/overwrite."""
    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise DeepCollapseError(f"out {out} exists and is not a directory")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not manifest.exists():
        raise DeepCollapseError(f"out {out} holds other files, not a report; choose an empty or new directory")
    if manifest.exists() and not overwrite:
        saved = read_json(manifest)
        if not (resume or only):
            raise DeepCollapseError(
                f"out {out} holds another report; pass resume=True to continue it or overwrite=True to replace it"
            )
        if saved.get("size") != size:
            raise DeepCollapseError(
                f"out {out} holds a report of size {saved.get('size')!r}, not {size!r}; use that size or overwrite=True"
            )
    if overwrite and occupied:
        if not manifest.exists():
            raise DeepCollapseError(f"out {out} holds files that are not a report; refusing to overwrite them")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(manifest, {"size": size, "context": context, "created": time.time()})


def _run_one(exp: Experiment, out: Path, size: str, context: dict[str, Any]) -> dict[str, Any]:
    run_dir = out / "runs" / exp.id
    done = run_dir / RESULT
    if done.exists():
        saved = read_json(done)
        if saved.get("size") == size:
            return saved
    if run_dir.exists():  # an unfinished (killed) run: start it again
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    base = {"id": exp.id, "paper": exp.paper, "title": exp.title, "setting": exp.setting, "size": size}
    params = exp.params.get(size) or exp.params.get("default") or {}
    needs = params.get("needs")
    why = f"skipped: {params['skip']}" if params.get("skip") else None
    if needs and not context.get(needs):
        why = f"skipped: needs {needs}=PATH (--{needs} on the command line), not given"
    if why:
        result = {**base, "skipped": why, "claims": [], "figures": [], "settings": params}
        write_json(done, result)
        return result
    t0 = time.perf_counter()
    got = exp.run(run_dir, dict(params), context)
    result = {
        **base,
        "stand_in": exp.stand_in.get(size),
        "claims": got["claims"],
        "figures": [f"runs/{exp.id}/{f}" for f in got.get("figures", [])],
        "settings": got.get("settings", params),
        "notes": got.get("notes", []),
        "seconds": time.perf_counter() - t0,
    }
    write_json(done, result)
    return result


def reproduce(
    out: str | Path,
    *,
    size: str = "default",
    only: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    cifar10: str | Path | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the experiments of ``size`` into ``out`` and write ``report.json`` and ``report.html``.

    ``only`` reruns those experiments (their old results are replaced; the others are kept). ``cifar10``:
    a CIFAR-10 copy (python batches) for the ``full`` size's CIFAR-10 experiments. ``on_progress(id, i,
    total)`` is called before each experiment and once at the end with ``id = ""``. Returns the report.
    """
    out = Path(out)
    experiments = plan(size, only=only)
    context: dict[str, Any] = {}
    if cifar10 is not None:
        from deepcollapse.nets.data import check_cifar10

        context["cifar10"] = str(check_cifar10(cifar10))
    _prepare(out, size, context, resume=resume, overwrite=overwrite, only=bool(only))
    for exp in experiments if only else ():
        shutil.rmtree(out / "runs" / exp.id, ignore_errors=True)
    t0 = time.perf_counter()
    for i, exp in enumerate(experiments):
        if on_progress is not None:
            on_progress(exp.id, i, len(experiments))
        _run_one(exp, out, size, context)
    if on_progress is not None:
        on_progress("", len(experiments), len(experiments))
    return write_report(out, size=size, seconds=time.perf_counter() - t0)


def write_report(out: Path, *, size: str, seconds: float) -> dict[str, Any]:
    """``report.json`` and ``report.html`` from every finished ``runs/<id>/result.json`` of ``out``."""
    from deepcollapse.experiments.papers import EXPERIMENTS
    from deepcollapse.experiments.report import render_html

    results = []
    for exp in EXPERIMENTS:
        path = out / "runs" / exp.id / RESULT
        if path.exists():
            results.append(read_json(path))
    claims = [c for r in results for c in r["claims"]]
    passed = sum(c["status"] == "pass" for c in claims)
    total_s = sum(r.get("seconds", 0.0) for r in results)
    report = {
        "claims": claims,
        "summary": {"claims": len(claims), "passed": passed, "failed": len(claims) - passed},
        "experiments": results,
        "settings": {"size": size, **read_json(out / MANIFEST).get("context", {})},
        "versions": _versions(),
        "seconds": total_s,
        "seconds_this_call": seconds,
    }
    write_json(out / "report.json", report)
    (out / "report.html").write_text(render_html(report, out), encoding="utf-8")
    return report
