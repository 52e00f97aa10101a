"""lm-evaluation-harness on our models: find the tasks, wrap a loaded model in lm_eval's `HFLM`, score it with
`lm_eval.simple_evaluate`, and shape its results into what the front carries (per task: metric, value, stderr).

Tasks are lm_eval's own (hub tasks: arc_easy, hellaswag, piqa, winogrande...) or the YAML tasks of the local task
folders: `workers/eval_tasks/` (shipped: `darwinfront_pydoc_mc`) and those named by `DARWINFRONT_EVAL_TASKS`
(folders separated by `os.pathsep`). A local task's relative `data_files` are read relative to its YAML file.
Local names are looked up first, in their folders alone (fast); lm_eval's whole catalog is indexed only for a
name that is not local.

A `kv_precision` candidate is scored with its quantized KV cache inside every forward (`kv_config`), as its KL
was measured; that covers the log-likelihood tasks, so generation tasks are refused for it.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version as installed
from pathlib import Path
from typing import Any

from darwinfront.core.errors import InvalidSpec

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
TASKS_ENV = "DARWINFRONT_EVAL_TASKS"
OFFLINE_HINT = ("run the driver where the Hugging Face hub is reachable, or download the dataset into its cache "
                "there first (HF_DATASETS_CACHE), or use a local task (an lm_eval YAML with `dataset_path: json` "
                f"and `data_files`, in a folder named by {TASKS_ENV})")


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise InvalidSpec("method", "evaluate jobs need lm-evaluation-harness where the driver runs: "
                          "pip install 'darwinfront[eval]'") from None
    return lm_eval


def task_folders() -> list[Path]:
    """The local task folders: the shipped one, then those of `DARWINFRONT_EVAL_TASKS` that exist."""
    extra = [Path(p).expanduser() for p in os.environ.get(TASKS_ENV, "").split(os.pathsep) if p]
    return [TASKS_DIR, *(p for p in extra if p.is_dir())]


def offline() -> bool:
    """Whether the Hugging Face hub is switched off here (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`)."""
    return any(os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _absolute_data_files(config: dict, folder: Path) -> dict:
    """`config` with the relative paths of `dataset_kwargs.data_files` made relative to `folder`."""
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is None:
        return config

    def fix(path: str) -> str:
        return path if "://" in path or Path(path).is_absolute() else str(folder / path)

    if isinstance(files, str):
        kwargs["data_files"] = fix(files)
    elif isinstance(files, Mapping):
        kwargs["data_files"] = {split: fix(p) if isinstance(p, str) else [fix(x) for x in p]
                                for split, p in files.items()}
    else:
        kwargs["data_files"] = [fix(p) for p in files]
    return {**config, "dataset_kwargs": kwargs}


@dataclass
class Tasks:
    """The requested tasks, built: lm_eval `Task` objects per requested name (a group gives its subtasks)."""

    built: dict[str, list[Any]]
    local: frozenset[str]  # names found in the local folders
    manager: Any  # the TaskManager that built them (simple_evaluate indexes a default one when given none)

    def leaves(self, name: str) -> list[str]:
        """The task names a requested name is scored as (itself, or a group's subtasks)."""
        return [task.config.task for task in self.built[name]]

    def version(self, name: str) -> str:
        """The versions of a requested name's tasks (a changed task is scored again, not read from the cache)."""
        return ",".join(str((task.config.metadata or {}).get("version")) for task in self.built[name])

    def generative(self, name: str) -> bool:
        """Whether any of its tasks generates text (rather than scoring given continuations)."""
        return any(task.OUTPUT_TYPE == "generate_until" for task in self.built[name])


def _catalog(local_only: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in task_folders()], include_defaults=not local_only)


def _unknown(missing: Sequence[str], manager) -> InvalidSpec:
    known = manager.all_tasks
    hints = {name: difflib.get_close_matches(name, known, n=3) for name in missing}
    close = "; ".join(f"{n}: did you mean {', '.join(h)}?" for n, h in hints.items() if h)
    local = ", ".join(sorted(_catalog(local_only=True).all_tasks))
    return InvalidSpec("evaluate.tasks", f"unknown lm_eval task(s) {', '.join(missing)}"
                       + (f" ({close})" if close else "") + f"; local tasks here: {local}; "
                       "`lm_eval ls tasks` lists lm_eval's own")


def load_tasks(names: Sequence[str]) -> Tasks:
    """Build the tasks `names` (their datasets are read now).

    Raises:
        InvalidSpec: at `evaluate.tasks`: a name no folder and no lm_eval catalog knows (with close names and
            the local ones), or a task whose dataset cannot be read (offline: what to do instead).
    """
    _lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader TaskManager itself reads YAML with

    manager = _catalog(local_only=True)
    local = frozenset(n for n in names if n in manager.all_tasks)
    if len(local) < len(names):
        manager = _catalog(local_only=False)
        missing = [n for n in names if n not in manager.all_tasks]
        if missing:
            raise _unknown(missing, manager)
    built: dict[str, list[Any]] = {}
    for name in names:
        entry = manager.task_index[name]
        spec: str | dict = name
        if name in local and entry.yaml_path is not None:  # a task (not a group) of ours: its data beside it
            config = load_yaml(entry.yaml_path, resolve_func=True)
            if "task" in config:
                spec = _absolute_data_files(config, Path(entry.yaml_path).parent)
        try:
            built[name] = list(manager.load([spec])["tasks"].values())
        except Exception as exc:  # datasets raises many kinds (ConnectionError, FileNotFoundError, hub errors)
            raise _unreadable(name, name in local, exc) from None
    return Tasks(built=built, local=local, manager=manager)


def _unreadable(name: str, local: bool, exc: Exception) -> InvalidSpec:
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
    if local:
        return InvalidSpec("evaluate.tasks", f"local task {name!r} cannot be read ({reason})")
    where = "the hub is switched off here (HF_HUB_OFFLINE)" if offline() else "the hub could not be reached"
    return InvalidSpec("evaluate.tasks", f"task {name!r} needs its dataset from the Hugging Face hub and {where} "
                       f"({reason}); {OFFLINE_HINT}")


def wrap(model, tokenizer, *, batch_size: int, kv_config=None):
    """lm_eval's `HFLM` around an already loaded model (no copy, no reload); with `kv_config` every forward
    quantizes K/V into a fresh cache of that configuration (as the KV search measured it)."""
    from lm_eval.models.huggingface import HFLM

    if kv_config is None:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    import torch

    from workers.kv.cache import build_cache

    class QuantizedCacheLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            with torch.no_grad():
                cache = build_cache(self.model, kv_config, storage="simulated", quantize_in_forward=True)
                return self.model(input_ids=inps, past_key_values=cache, use_cache=True).logits  # (B, T, vocab)

    return QuantizedCacheLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def score(lm, tasks: Tasks, names: Sequence[str], *, limit: int | None, num_fewshot: int | None,
          seed: int) -> dict[str, dict]:
    """`simple_evaluate` of `lm` on the built tasks of `names`; returns `shape(results)`."""
    lm_eval = _lm_eval()
    chosen = [task for n in names for task in tasks.built[n]]
    results = lm_eval.simple_evaluate(
        model=lm, tasks=chosen, task_manager=tasks.manager, num_fewshot=num_fewshot, limit=limit, log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    return shape(results)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def shape(results: Mapping[str, Any]) -> dict[str, dict]:
    """lm_eval's results dict -> per task: its main metric (the first it declares), value, stderr (None when
    lm_eval has none, e.g. one document), every metric with its stderr, documents scored and few-shot count.

    lm_eval keys a value as `<metric>,<filter>` and its error as `<metric>_stderr,<filter>`; the main metric's
    filter is the first one the task reports it under.
    """
    shaped = {}
    for task, row in results["results"].items():
        declared = list((results.get("higher_is_better") or {}).get(task) or {})
        metrics: dict[str, dict] = {}
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or _number(value) is None:
                continue
            name = metric if filt == "none" else f"{metric},{filt}"
            metrics.setdefault(name, {"value": float(value), "stderr": _number(row.get(f"{metric}_stderr,{filt}"))})
        if not metrics:
            continue
        main = next((m for m in declared if m in metrics), next(iter(metrics)))
        samples = (results.get("n-samples") or {}).get(task, {}).get("effective")
        shaped[task] = {"metric": main, **metrics[main], "metrics": metrics, "samples": samples,
                        "num_fewshot": (results.get("n-shot") or {}).get(task),
                        "higher_is_better": (results.get("higher_is_better") or {}).get(task, {}).get(main)}
    return shaped


def setting_key(task: str, version: str, *, limit: int | None, num_fewshot: int | None, seed: int) -> str:
    """The dense cache's key of one task's score: everything that changes it (the model is the parent job's)."""
    return (f"{task}|version={version}|limit={limit}|num_fewshot={num_fewshot}|seed={seed}"
            f"|lm_eval={installed('lm_eval')}")


def beside_dense(candidate: Mapping[str, dict], dense: Mapping[str, dict], *, job_id: str, limit: int | None
                 ) -> dict[str, dict]:
    """Per task: the candidate's entry with the dense model's value and stderr of the same metric beside it
    (`dense`), its difference (`delta`), the evaluate job and the limit."""
    merged = {}
    for task, entry in candidate.items():
        base = (dense.get(task) or {}).get("metrics", {}).get(entry["metric"])
        delta = None if base is None else entry["value"] - base["value"]
        merged[task] = {**entry, "dense": base, "delta": delta, "job": job_id, "limit": limit}
    return merged
