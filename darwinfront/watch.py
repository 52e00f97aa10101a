"""`darwinfront watch JOB`: follow a job live, a progress bar of its evaluations and its front as a table.

It reads the job's server-sent event stream (`Client.stream`), so a change shows as soon as the driver writes it;
a dropped stream is resumed after the last event seen.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from darwinfront.client import Client, StreamMessage
from darwinfront.core.errors import DarwinfrontError
from service.schemas import Front, JobPublic

RECONNECTS = 5


# what a front point may carry beside its objectives, shown when some point has it
DETAILS = {"held_out_kl": "held-out KL", "effective_bits": "effective", "preset": "preset"}


def _cell(value: object, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):>{width},}"
    if isinstance(value, float):
        return f"{value:>{width}.5g}"
    return f"{value!s:>{width}}"


def describe_progress(status: str, progress: dict) -> str:
    """The bar's label: what the job is doing now (a prepare step with its ETA, or the generation)."""
    if progress.get("phase") == "prepare" or ("message" in progress and "generation" not in progress):
        return f"{status}: {progress.get('message', '')}"
    if "generation" in progress:
        return f"{status} gen {progress['generation']}/{progress.get('generations', '?')}"
    return f"{status} gen -"


def describe_deployment(spec: dict) -> str | None:
    """The deployment point a joint job's memory objective (and its latency, when measured) is measured at (None for
    other methods)."""
    deployment = spec.get("deployment")
    if spec.get("method") != "joint" or not deployment:
        return None
    cap = (spec.get("joint") or {}).get("memory_cap")
    latency = deployment.get("latency")
    return (f"memory at batch {deployment['batch_size']} x {deployment['context']:,} tokens, {deployment['dtype']} "
            f"weights and KV (scales, zero points and residual window included)"
            + (f"; cap {cap:,} B ({cap / 2**30:.3g} GiB)" if cap else "")
            + (f"; latency: median ms of one decoding step of batch {deployment['batch_size']} with the candidate's "
               f"cache holding {latency['context']:,} tokens (measured, noisy)" if latency else ""))


def format_front(front: Front) -> str:
    """The front as a fixed-width table, one column per objective it declares, cheapest (its cost, the second
    objective; the only one of a one-objective front) first."""
    if not front.points:
        return "(front is empty so far)"
    names = [o.name for o in front.objectives]
    columns = [("target", "target")] if any(p.target is not None for p in front.points) else []
    columns += [(name, name) for name in names]
    columns += [(key, title) for key, title in DETAILS.items() if any(getattr(p, key, None) is not None
                                                                       for p in front.points)]
    widths = [max(len(title), 12) for _, title in columns]
    lines = [f"{'candidate':<24} " + " ".join(f"{title:>{w}}" for (_, title), w in zip(columns, widths, strict=True))]
    tasks = sorted({task for p in front.points for task in (getattr(p, "scores", None) or {})})
    columns += [(task, task) for task in tasks]
    widths += [max(len(task), 15) for task in tasks]
    lines[0] += "".join(f" {task:>{w}}" for task, w in zip(tasks, widths[-len(tasks):], strict=True)) if tasks else ""
    for p in sorted(front.points, key=lambda p: p.objectives[names[min(1, len(names) - 1)]]):
        scores = getattr(p, "scores", None) or {}
        values = [p.objectives[key] if key in p.objectives else getattr(p, key, None) for key, _ in columns]
        values[len(values) - len(tasks):] = [_score_cell(scores.get(task)) for task in tasks]
        lines.append(f"{p.candidate_id:<24} " + " ".join(_cell(v, w) for v, w in zip(values, widths, strict=True)))
    if tasks:
        lines.append("(lm-eval scores: candidate (dense); `darwinfront evaluate` adds them)")
    return "\n".join(lines)


def _score_cell(entry: dict | None) -> str | None:
    """A task's score as `value (dense)`, or None when the candidate was not scored on it."""
    if entry is None:
        return None
    dense = (entry.get("dense") or {}).get("value")
    return f"{entry['value']:.4f} ({'-' if dense is None else f'{dense:.4f}'})"


def format_scores(scores: dict[str, dict]) -> str:
    """A candidate's lm-eval scores as a table: task, metric, value ± stderr, the dense model's, the change."""
    if not scores:
        return "(no lm-eval scores yet)"

    def pm(value: float | None, stderr: float | None) -> str:
        return "-" if value is None else f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")

    lines = [f"{'task':<28} {'metric':<10} {'candidate':>18} {'dense':>18} {'change':>8}"]
    for task, e in sorted(scores.items()):
        dense = e.get("dense") or {}
        change = "-" if e.get("delta") is None else f"{e['delta']:+.4f}"
        lines.append(f"{task:<28} {e['metric']:<10} {pm(e['value'], e.get('stderr')):>18} "
                     f"{pm(dense.get('value'), dense.get('stderr')):>18} {change:>8}")
    return "\n".join(lines)


class _Display:
    """The bar (on stderr) and the front tables and notices (on `out`)."""

    def __init__(self, job_id: str, out: TextIO, bar: bool):
        self.out = out
        self.bar = tqdm(total=1, unit="eval", desc=job_id, dynamic_ncols=True, disable=not bar, file=sys.stderr)
        self.job: JobPublic | None = None

    def show(self, message: StreamMessage) -> None:
        if message.event == "job":
            self.job = message.data
            progress = self.job.progress
            self.bar.total = max(int(progress.get("planned", 1)), 1)
            self.bar.n = int(progress.get("evaluations", 0))
            self.bar.set_postfix_str(describe_progress(self.job.status, progress))
            self.bar.refresh()
        elif message.event == "front" and message.data.points:
            tqdm.write(f"\nfront after generation {message.data.generation}:\n{format_front(message.data)}",
                       file=self.out)
        elif message.event == "prepare":
            tqdm.write(f"prepare: {message.data.data.get('message', '')}", file=self.out)
        elif message.event == "candidate_failed":
            data = message.data.data
            tqdm.write(f"candidate {data.get('candidate_id')} failed: {data.get('error')}", file=self.out)

    def close(self) -> None:
        self.bar.close()


def watch(client: Client, job_id: str, *, out: TextIO | None = None, bar: bool = True) -> JobPublic:
    """Follow `job_id` until it is final; returns the final job. Tables go to `out` (stdout), the bar to stderr.

    Raises:
        DarwinfrontError: The server cannot be reached, or the stream dropped more than `RECONNECTS` times in a row.
    """
    display, last, failures = _Display(job_id, out or sys.stdout, bar), "0-0", 0
    try:
        while True:
            try:
                for message in client.stream(job_id, after=last):
                    failures = 0
                    last = message.id or last
                    display.show(message)
                    if message.event == "end":
                        return display.job or client.job(job_id)
            except DarwinfrontError:
                failures += 1
                if failures > RECONNECTS:
                    raise
            time.sleep(min(2.0 * failures, 10.0))
    finally:
        display.close()
