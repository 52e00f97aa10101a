"""The `darwinfront` command line: serve the embedded stack, submit jobs, follow them, download results."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml
from pydantic import ValidationError

from darwinfront import keys
from darwinfront.client import Client
from darwinfront.core.errors import DarwinfrontError
from darwinfront.core.methods import parse_spec
from darwinfront.core.settings import data_dir
from darwinfront.core.spec import JobSpec
from darwinfront.watch import describe_progress, format_front
from service.schemas import Front, JobPublic

DEFAULT_DATA_DIR = data_dir()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_spec(path: Path) -> JobSpec:
    """Read a YAML or JSON job spec and validate it; errors name the file and the field."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise DarwinfrontError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "cannot parse"
        raise DarwinfrontError(f"{path} is not valid YAML/JSON{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise DarwinfrontError(f"{path}: a job spec is a mapping, got {type(raw).__name__}")
    try:
        return parse_spec(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "spec"
        raise DarwinfrontError(f"{path}: {field}: {first['msg']}") from None


def print_front(front: Front) -> None:
    print(format_front(front))


def wait_with_bar(client: Client, job_id: str) -> JobPublic:
    from tqdm import tqdm

    with tqdm(total=1, unit="eval", desc=job_id, dynamic_ncols=True) as bar:

        def update(job: JobPublic) -> None:
            progress = job.progress
            bar.total = max(progress.get("planned", 1), 1)
            bar.n = progress.get("evaluations", 0)
            bar.set_postfix_str(describe_progress(job.status, progress))
            bar.refresh()

        job = client.wait(job_id, on_progress=update, poll=0.5)
    return job


def cmd_serve(args) -> int:
    from darwinfront.stack import EmbeddedStack

    with EmbeddedStack(args.data_dir, host=args.host, port=args.port) as stack:
        print(f"darwinfront is serving at {stack.url} (docs: {stack.url}/docs)")
        print(f"API key (tenant 'local'): {stack.key}")
        print(f"Redis: {stack.redis_url}   data: {stack.data_dir}   Ctrl-C stops.")
        sys.stdout.flush()
        try:
            while stack.driver_process is None or stack.driver_process.poll() is None:
                time.sleep(0.5)
            print("the driver process exited; see driver.log", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


def cmd_driver(args) -> int:
    from workers.driver import main

    main()
    return 0


def cmd_submit(args) -> int:
    spec = load_spec(args.spec)
    client = Client(args.url, args.key)
    job = client.submit(spec)
    print(job.id)
    if args.wait:
        job = wait_with_bar(client, job.id)
        print(f"{job.id} {job.status}" + (f": {job.error}" if job.error else ""))
        return 0 if job.status == "succeeded" else 1
    return 0


def cmd_posttrain(args) -> int:
    client = Client(args.url, args.key)
    options = {"tokens": args.tokens, "lr": args.lr, "batch_size": args.batch_size, "loss": args.loss,
               "seed": args.seed}
    job = client.posttrain(args.job, args.candidate, **options)
    print(job.id)
    if args.wait:
        job = wait_with_bar(client, job.id)
        print(f"{job.id} {job.status}" + (f": {job.error}" if job.error else ""))
        if job.status != "succeeded":
            return 1
        post = client.configuration(job.id, args.candidate)["posttrain"]
        before, after = post["before"], post["after"]
        print(f"{args.candidate}: {post['tokens']:,} tokens ({post['loss']}); KL {before['kl']:.5f} -> "
              f"{after['kl']:.5f}, held-out KL {before['held_out_kl']:.5f} -> {after['held_out_kl']:.5f}, "
              f"perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}")
        print(f"download: darwinfront download {job.id} {args.candidate} --model")
    return 0


def cmd_evaluate(args) -> int:
    from darwinfront.watch import format_scores

    client = Client(args.url, args.key)
    options = {"limit": args.limit, "num_fewshot": args.num_fewshot, "batch_size": args.batch_size}
    job = client.evaluate(args.job, args.candidate, args.tasks, **options)
    print(job.id)
    if args.wait:
        job = wait_with_bar(client, job.id)
        print(f"{job.id} {job.status}" + (f": {job.error}" if job.error else ""))
        if job.status != "succeeded":
            return 1
        print(format_scores(client.scores(args.job, args.candidate)))
    return 0


def cmd_status(args) -> int:
    client = Client(args.url, args.key)
    if args.job:
        print(client.job(args.job).model_dump_json(indent=2))
        return 0
    listing = client.jobs(status=args.status)
    for job in listing.items:
        done = f"{job.progress.get('evaluations', 0)}/{job.progress.get('planned', '?')}"
        print(f"{job.id}  {job.status:<10} {done:>10}  {job.name or ''}")
    return 0


def cmd_front(args) -> int:
    client = Client(args.url, args.key)
    front = client.front(args.job)
    from darwinfront.watch import describe_deployment

    if deployment := describe_deployment(client.job(args.job).spec):
        print(deployment)
    print_front(front)
    if args.plot:
        from darwinfront.plot import plot_front

        print(plot_front(front, args.plot, dense_params=client.history(args.job).dense_params))
    return 0


def cmd_watch(args) -> int:
    from darwinfront.watch import watch

    job = watch(Client(args.url, args.key), args.job)
    print(f"{job.id} {job.status}" + (f": {job.error}" if job.error else ""))
    return 0 if job.status == "succeeded" else 1


def cmd_optuna_dashboard(args) -> int:
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise DarwinfrontError("this needs optuna-dashboard: pip install 'darwinfront[optuna]'") from None
    from service.history import job_storage

    url = args.redis_url or os.environ.get("DARWINFRONT_REDIS_URL") or os.environ.get("REDIS_URL")
    if not url:
        raise DarwinfrontError("give the job store's Redis: --redis-url or DARWINFRONT_REDIS_URL")
    print(f"optuna-dashboard of job {args.job} at http://{args.host}:{args.port} (Ctrl-C stops)")
    run_server(job_storage(url, args.job), host=args.host, port=args.port)
    return 0


def cmd_download(args) -> int:
    client = Client(args.url, args.key)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    ids = [args.candidate] if args.candidate else [p.candidate_id for p in client.front(args.job).points]
    for cid in ids:
        path = out / f"{cid}.json"
        path.write_text(json.dumps(client.configuration(args.job, cid), indent=2))
        print(path)
        if args.model:
            print(client.download_model(args.job, cid, out / f"{cid}.tar"))
        if args.gguf:
            print(client.download_gguf(args.job, cid, out / f"{cid}.{args.gguf_type}.gguf", args.gguf_type))
    return 0


def cmd_cancel(args) -> int:
    job = Client(args.url, args.key).cancel(args.job)
    print(f"{job.id} {job.status}")
    return 0


def cmd_demo(args) -> int:
    from darwinfront.demo import run_demo

    return run_demo(args.data_dir, EXAMPLES / "prune-tiny.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="darwinfront", description=__doc__)
    parser.add_argument("--url", help="server URL (default: $DARWINFRONT_URL or the local server)")
    parser.add_argument("--key", help="API key (default: $DARWINFRONT_API_KEY or the local server's)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the embedded stack: API + driver + Redis + local Ray")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.set_defaults(func=cmd_serve)

    sub.add_parser("driver", help="run a driver against $REDIS_URL").set_defaults(func=cmd_driver)

    p = sub.add_parser("submit", help="submit a job spec (YAML or JSON)")
    p.add_argument("spec", type=Path)
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("posttrain", help="post-train a candidate of a finished prune job on more tokens")
    p.add_argument("job", help="the structured_prune job")
    p.add_argument("candidate", help="one of its front candidates")
    p.add_argument("--tokens", type=int, help="training tokens (server default: 131072)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 8)")
    p.add_argument("--loss", choices=["kd", "ce"], help="kd: distil from the dense model (default); ce: next token")
    p.add_argument("--seed", type=int, help="seed of the batch order (default 0)")
    p.add_argument("--wait", action="store_true", help="follow the job, then print KL and perplexity before/after")
    p.set_defaults(func=cmd_posttrain)

    p = sub.add_parser("evaluate", help="score a candidate of a finished job on lm-eval-harness tasks")
    p.add_argument("job", help="the parent job (structured_prune, posttrain or kv_precision)")
    p.add_argument("candidate", help="one of its front candidates")
    p.add_argument("--tasks", required=True, help="lm_eval task names, comma-separated (e.g. arc_easy,piqa)")
    p.add_argument("--limit", type=int, help="score only the first N documents of each task")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, help="requests per forward pass (default 8)")
    p.add_argument("--wait", action="store_true", help="follow the job, then print the scores beside the dense")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("status", help="one job, or the list of jobs")
    p.add_argument("job", nargs="?")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("front", help="print a job's Pareto front")
    p.add_argument("job")
    p.add_argument("--plot", type=Path, metavar="FILE", help="also draw it to FILE (.png, .svg, .pdf: matplotlib)")
    p.set_defaults(func=cmd_front)

    p = sub.add_parser("watch", help="follow a job live: progress bar and front table")
    p.add_argument("job")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("optuna-dashboard", help="open a job's Optuna study in optuna-dashboard")
    p.add_argument("job")
    p.add_argument("--redis-url", help="the job store's Redis (default: $DARWINFRONT_REDIS_URL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_optuna_dashboard)

    p = sub.add_parser("download", help="download configurations (all front points by default)")
    p.add_argument("job")
    p.add_argument("candidate", nargs="?")
    p.add_argument("-o", "--output", default=".")
    p.add_argument("--model", action="store_true", help="also download the sliced model archive")
    p.add_argument("--gguf", action="store_true", help="also download the model as a GGUF file for llama.cpp")
    p.add_argument("--gguf-type", choices=("f16", "q8_0", "f32"), default="f16", help="the GGUF's weight type")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job")
    p.set_defaults(func=cmd_cancel)

    keys.add_parser(sub)

    p = sub.add_parser("demo", help="run examples/prune-tiny.yaml end to end on the embedded stack")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR / "demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DarwinfrontError as exc:
        print(f"darwinfront: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
