"""`darwinfront demo`: the whole product on one machine, as a user would drive it.

Starts the embedded stack, submits the example job on the reference model over REST, follows it, prints the
front, downloads the smallest front model's configuration and applies it to the original model.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path

from darwinfront.cli import load_spec, print_front, wait_with_bar
from darwinfront.client import Client
from darwinfront.stack import EmbeddedStack


def run_demo(data_dir: Path, spec_path: Path) -> int:
    spec = load_spec(spec_path)
    print(f"building or loading {spec.model.source} and starting the embedded stack in {data_dir} ...")
    with EmbeddedStack(data_dir, port=0) as stack, Client(stack.url, stack.key) as client:
        print(f"API at {stack.url}; submitting {spec_path.name}")
        job = client.submit(spec)
        job = wait_with_bar(client, job.id)
        if job.status != "succeeded":
            print(f"job {job.id} {job.status}: {job.error}")
            return 1
        front = client.front(job.id)
        print_front(front)
        winner = min(front.points, key=lambda p: p.objectives["params"])
        configuration = client.configuration(job.id, winner.candidate_id)
        out = Path(data_dir) / "downloads"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{winner.candidate_id}.json").write_text(json.dumps(configuration, indent=2))
        archive = client.download_model(job.id, winner.candidate_id, out / f"{winner.candidate_id}.tar")
    return _apply(spec, configuration, archive)


def _apply(spec, configuration: dict, archive: Path) -> int:
    """Rebuild the downloaded configuration on the original model, as the README shows users."""
    import torch

    from workers import fitness, modeling, slicing
    from workers.configuration import rebuild
    from workers.data import load_texts, token_sequences

    model, tokenizer = modeling.load_model(spec.model.source, device="cpu")
    tokens = token_sequences(
        tokenizer, load_texts(spec.data.source), n_tokens=spec.data.calibration_tokens,
        seq_len=spec.data.seq_len, split="calibration", seed=spec.seed,
    )
    teacher = fitness.Teacher.of(model, tokens)
    dense_params = slicing.count_parameters(model)
    front_kl = configuration["metrics"]["kl"]

    # The archive holds the candidate exactly as it was scored (after its short fine-tune, if any).
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        scored, _ = slicing.load_pruned(Path(tmp) / configuration["candidate_id"])
        archive_kl = fitness.kl(scored, tokens, teacher)
    print(f"\nsliced model archive {archive.name}: {slicing.count_parameters(scored):,} of {dense_params:,} "
          f"parameters; KL recomputed {archive_kl:.5f} (front said {front_kl:.5f})")

    # The configuration rebuilt on the original model: the one-shot model, before any fine-tune.
    rebuild(model, tokenizer, configuration)
    one_shot_kl = fitness.kl(model, tokens, teacher)
    promised = configuration["metrics"][configuration["gives"]["rebuild"]]
    print(f"configuration rebuilt on the original model: {slicing.count_parameters(model):,} parameters; "
          f"one-shot KL {one_shot_kl:.5f} (front said {promised:.5f}"
          + ("; its KL is after the candidate's short fine-tune)" if configuration.get("weights") == "trained"
             else ")"))
    prompt = tokenizer("The with statement", return_tensors="pt")
    with torch.inference_mode():
        out = scored.generate(**prompt, max_new_tokens=24, do_sample=False)
    print("sample:", tokenizer.decode(out[0], skip_special_tokens=True))
    return 0
