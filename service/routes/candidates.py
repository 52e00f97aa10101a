"""What a finished candidate can be downloaded as: its configuration JSON, its sliced model archive, and that
model as a GGUF file for llama.cpp (converted from the archive on first request, torch-free)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse

from darwinfront.core.outputs import file_sha256
from darwinfront.gguf_export.archive import gguf_of_archive
from service.routes.deps import JobDep, SettingsDep, StoreDep, blocking
from service.schemas import ErrorBody

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs/{job_id}/candidates", tags=["results"])

CandidateId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
_FILE_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_NOT_FOUND = {404: {"model": ErrorBody, "description": "No such job, or no such candidate in it."}}


def _archive_path(artifacts_dir: Path, job_id: str, relative: str) -> Path | None:
    """The archive's real path if it is a file inside the job's artifact folder (symlinks resolved), else None."""
    folder = (artifacts_dir / job_id).resolve()
    path = (artifacts_dir / relative).resolve()
    return path if path.is_relative_to(folder) and path.is_file() else None


@router.get("/{candidate_id}/config", responses=_NOT_FOUND)
async def get_configuration(job: JobDep, candidate_id: CandidateId, store: StoreDep) -> JSONResponse:
    """The candidate's configuration document, as a JSON download."""
    configuration = await blocking(store.get_result, job.id, candidate_id)
    filename = _FILE_SAFE.sub("_", f"{job.id}-{candidate_id}.json")
    return JSONResponse(configuration, headers={"Content-Disposition": f'attachment; filename="{filename}"'})


async def _stored_archive(job_id: str, candidate_id: str, store, settings) -> tuple[dict, Path]:
    """The artifact metadata and the archive's path; 404 `artifact_missing` when the file is not on this server."""
    meta = await blocking(store.get_artifact, job_id, candidate_id)
    path = await blocking(_archive_path, settings.artifacts_dir, job_id, meta["path"])
    if path is None:
        log.warning("artifact of %s/%s is missing or outside its job folder: %s", job_id, candidate_id, meta["path"])
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail={"code": "artifact_missing",
                    "message": f"the model archive of candidate {candidate_id!r} is not on this server"},
        )
    return meta, path


@router.get(
    "/{candidate_id}/model",
    response_class=FileResponse,
    responses={200: {"content": {"application/x-tar": {}, "application/gzip": {}}}, **_NOT_FOUND},
)
async def get_model(
    job: JobDep, candidate_id: CandidateId, store: StoreDep, settings: SettingsDep
) -> FileResponse:
    """The sliced model archive (a `.tar` of a Hugging Face directory; `.tar.gz` from older jobs), with its SHA-256
    in `X-Checksum-SHA256`: an archive the driver renamed into place is hashed on its first download, and kept."""
    meta, path = await _stored_archive(job.id, candidate_id, store, settings)
    if not meta.get("sha256"):
        meta = {**meta, "sha256": await blocking(file_sha256, path)}
        await blocking(store.add_artifact_checksum, job.id, candidate_id, meta["sha256"])
    headers = {"X-Checksum-SHA256": meta["sha256"]}
    media_type = "application/gzip" if path.name.endswith(".gz") else "application/x-tar"
    return FileResponse(path, media_type=media_type, filename=path.name, headers=headers)


@router.get(
    "/{candidate_id}/gguf",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **_NOT_FOUND},
)
async def get_gguf(
    job: JobDep, candidate_id: CandidateId, store: StoreDep, settings: SettingsDep,
    gguf_type: Annotated[Literal["f16", "q8_0", "f32"], Query(alias="type")] = "f16",
) -> FileResponse:
    """The sliced model as a GGUF file (llama.cpp's `deci` architecture, per-layer widths), in `type` f16, q8_0 or
    f32; written from the model archive on the first request (seconds for a small model) and kept beside it."""
    _, archive = await _stored_archive(job.id, candidate_id, store, settings)
    try:
        path = await blocking(gguf_of_archive, archive, gguf_type)
    except ValueError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail={"code": "gguf_unsupported", "message": str(exc)}
        ) from None
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)
