"""No shared disk needed: Ray processes whose cache and database directories differ from the driver's (their own
`runtime_env`) receive the job's level database and builtin model through Ray, and what they export comes back
to the driver's data directory through Ray, never through a path the driver reads."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
import ray

from darwinfront.core.methods import parse_spec
from search.genome import LevelSpace
from workers import artifacts, slicing, transfer
from workers.evaluate_job import Scorer
from workers.evaluator import Evaluator
from workers.pool import builtin_model_files, init_ray, run_prepare
from workers.posttrain_job import Posttrainer, shipped

pytestmark = pytest.mark.integration

SPEC = {
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "eval_tokens": 256, "seq_len": 64, "database_tokens": 512},
    "prune": {"targets": [0.5], "criterion": "obs", "training_aware": False, "levels": 8},
    "search": {"generations": 1, "offspring": 2},
    "seed": 5,
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_ray(micro_dir):
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> dict[str, Path]:
    """The cache and database directories of 'another node': nothing of the job is there."""
    root = tmp_path_factory.mktemp("node2")
    return {"cache": root / "cache", "database": root / "databases"}


def _env(elsewhere: dict[str, Path], **extra: str) -> dict:
    env = {"DARWINFRONT_CACHE_DIR": str(elsewhere["cache"]), "DARWINFRONT_DATABASE_DIR": str(elsewhere["database"])}
    return {"env_vars": {**env, **extra}}


@pytest.fixture(scope="module")
def prepared(local_ray) -> dict:
    return run_prepare(parse_spec(SPEC).model_dump(mode="json"))


def test_the_database_and_the_builtin_model_reach_an_evaluator_with_other_directories(prepared, elsewhere, tmp_path):
    spec = parse_spec(SPEC).model_dump(mode="json")
    files = prepared["files"]
    source_db, source_model = Path(files["database"]), Path(files["model"])
    assert files["node"] == transfer.node_id() and any(source_db.glob("*.safetensors"))
    evaluator = ray.remote(Evaluator).options(num_cpus=1, runtime_env=_env(elsewhere)).remote(spec, prepared, 1)
    opened = ray.get(evaluator.__ray_call__.remote(lambda self: (str(self.database.directory), self.database.built)))
    copy_db, copy_model = elsewhere["database"] / source_db.name, elsewhere["cache"] / source_model.name
    assert opened == (str(copy_db), False)  # found (copied), not built again
    assert _tree(copy_db) == _tree(source_db) and _tree(copy_model) == _tree(source_model)

    space = LevelSpace.from_dict(prepared["space"])
    request = {"genome": space.uniform(0.5).to_dict(), "seed": 0, "train_tokens": 0}
    result = {"candidate_id": "c1", "target": 0.5, "kl": 0.1, "held_out_kl": 0.1, "perplexity": 10.0}
    reply = ray.get(evaluator.export_point.remote({"candidate_id": "c1", "request": request, "result": result}))
    exported = transfer.Located.from_dict(reply["files"])
    assert Path(exported.path).is_relative_to(elsewhere["cache"])  # written where the driver does not look
    data_dir = tmp_path / "driver-data"
    # this process sees the folder (one machine): read from the disk; another node's comes through Ray
    assert transfer.seen_here(exported) == transfer.Located(None, exported.path)
    elsewhere_node = transfer.Located("f" * 56, exported.path)
    assert transfer.seen_here(elsewhere_node) == elsewhere_node
    assert transfer.seen_here(transfer.Located(exported.node, exported.path + "-gone")).node == exported.node
    assert transfer.listing(exported)[0][0] == "c1.tar"  # the evaluator wrote the archive itself
    streamed = artifacts.take(data_dir, "streamed", "c1", exported, through_ray=True)
    meta = artifacts.take_exported(data_dir, "job", "c1", reply["files"])  # renamed into place, folder deleted
    assert not Path(exported.path).exists() and meta["sha256"] is None
    archive = data_dir / "artifacts" / meta["path"]
    assert _sha(archive) == streamed["sha256"] == _sha(data_dir / "artifacts" / streamed["path"])
    assert meta["files"] == streamed["files"] >= 4
    with tarfile.open(archive, "r:") as tar:
        tar.extractall(tmp_path / "out", filter="data")
    model, _ = slicing.load_pruned(tmp_path / "out" / "c1")
    assert slicing.count_parameters(model) == reply["configuration"]["parameters"]
    assert (tmp_path / "out" / "c1" / "README.md").is_file()  # the model card travelled with the weights
    ray.kill(evaluator)


def test_an_archive_reaches_a_process_with_other_directories(local_ray, elsewhere, tmp_path):
    """What a posttrain job does with its parent's archive: the trainer streams it from the driver's node."""
    folder = tmp_path / "artifacts" / "parent"
    folder.mkdir(parents=True)
    (folder / "c1.tar").write_bytes(bytes(range(256)) * 50_000)  # 12.8 MB: two chunks

    def receive(where: dict, size: int) -> tuple[str, str]:
        from darwinfront.core import settings

        target = settings.cache_dir() / "received.tar"
        target.parent.mkdir(parents=True, exist_ok=True)
        transfer.fetch_file(transfer.Located.from_dict(where), "c1.tar", size, target)
        return str(target), hashlib.sha256(target.read_bytes()).hexdigest()

    size = (folder / "c1.tar").stat().st_size
    task = ray.remote(receive).options(runtime_env=_env(elsewhere))
    path, digest = ray.get(task.remote(transfer.here(folder).to_dict(), size))
    assert Path(path).is_relative_to(elsewhere["cache"]) and digest == _sha(folder / "c1.tar")


def test_a_shared_cache_copies_nothing_and_an_empty_export_fails(prepared, elsewhere, tmp_path):
    fresh = {"cache": tmp_path / "nfs-cache", "database": tmp_path / "nfs-databases"}
    shared = ray.remote(transfer.bring).options(runtime_env=_env(fresh, DARWINFRONT_SHARED_CACHE="1"))
    assert ray.get(shared.remote(prepared["files"])) == []
    assert not fresh["cache"].exists() and not fresh["database"].exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="wrote no archive"):
        artifacts.take(tmp_path / "data", "job", "c", transfer.here(empty))


def test_a_follow_up_on_another_node_trains_against_the_driver_s_builtin_model(prepared, tmp_path):
    """A posttrain or evaluate actor elsewhere gets the builtin dense model the parent searched against, byte for
    byte, instead of training its own."""
    spec = parse_spec(SPEC).model_dump(mode="json")
    files = builtin_model_files(spec)
    source = Path(files["model"])
    assert files["node"] == transfer.node_id() and source == Path(prepared["files"]["model"])
    assert builtin_model_files({**spec, "model": {**spec["model"], "source": "/some/local/model"}}) is None

    space = LevelSpace.from_dict(prepared["space"])
    evaluator = Evaluator(spec, prepared)
    request = {"genome": space.uniform(0.5).to_dict(), "seed": 0, "train_tokens": 0}
    configuration = evaluator.configuration(request, {"candidate_id": "c1", "target": 0.5, "kl": 0.1})
    evaluator.export(configuration, str(tmp_path / "export"))
    meta = artifacts.archive(tmp_path / "data", "parent", "c1", tmp_path / "export")
    archive = shipped(str(tmp_path / "data" / "artifacts" / meta["path"]), in_process=False)
    trains = {"tokens": 256, "lr": 1e-3, "batch_size": 2, "loss": "kd", "seed": 0}
    scores = {"tasks": ["darwinfront_pydoc_mc"]}
    for name, cls, options in (("trainer", Posttrainer, trains), ("scorer", Scorer, scores)):
        node = {"cache": tmp_path / name / "cache", "database": tmp_path / name / "databases"}
        actor = ray.remote(cls).options(num_cpus=1, runtime_env=_env(node)).remote(
            spec, configuration, archive, options, files, 1)
        ray.get(actor.__ray_call__.remote(lambda self: None))
        assert _tree(node["cache"] / source.name) == _tree(source), name
        ray.kill(actor)
