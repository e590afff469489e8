"""The upload's parameters: read from query and form alike (declared once, by `UploadParams`,
validated once), resolved into the task's parameters, and described for OpenAPI. Shared by
POST /upload and the tus uploads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

import training_server_trainer as trainer
from training_server_models import ServerConfig, TaskParams, UnprocessableError, UploadParams
from training_server_utils import readable_errors
from training_server_webhooks import check_webhook_url

# Accepted under the seed's name as well: start_training means auto_training.
SEED_ALIASES = {"start_training": "auto_training"}
UPLOAD_FIELDS = frozenset(UploadParams.model_fields) | frozenset(SEED_ALIASES)


def upload_params(
    settings: ServerConfig, query: Mapping[str, str], form: Mapping[str, str]
) -> tuple[TaskParams, bool]:
    """The task's parameters from the upload's query and form fields (form wins; unknown
    names are ignored), validated once by `UploadParams`; 422 in words otherwise."""
    data: dict[str, str] = {}
    for source in (query, form):
        for name, value in source.items():
            if name in UPLOAD_FIELDS:
                key = SEED_ALIASES.get(name, name)
                if key != name and key in source:
                    continue  # the new name given beside the old one wins
                data[key] = value
    try:
        upload = UploadParams.model_validate(data)
    except ValidationError as exc:
        raise UnprocessableError(readable_errors(list(exc.errors()))) from None
    check_webhook_url(settings, upload.webhook_url)
    max_frames = upload.max_frames or max(settings.default_max_frames, upload.min_frames or 0)
    min_frames = upload.min_frames or min(settings.default_min_frames, max_frames)
    if min_frames > max_frames:
        raise UnprocessableError("min_frames must not be larger than max_frames")
    iterations = trainer.resolve_iterations(
        upload.iterations, upload.preset, settings.trainer_iterations
    )
    passed = {
        name: value
        for name, value in upload.model_dump().items()
        if name in TaskParams.model_fields and name not in _RESOLVED
    }
    params = TaskParams(
        **passed,
        max_frames=max_frames,
        min_frames=min_frames,
        auto_training=upload.auto_training,
        iterations=iterations,
    )
    return params, upload.auto_training


_RESOLVED = frozenset({"max_frames", "min_frames", "auto_training", "iterations"})


def upload_openapi() -> dict[str, Any]:
    """The OpenAPI description of POST /upload's body and query, from `UploadParams`."""
    fields = UploadParams.model_json_schema().get("properties", {})
    fields = {**fields, "start_training": {"type": "boolean", "description": "= auto_training"}}
    return {
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": schema}
            for name, schema in fields.items()
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": "a video; or a ZIP of photos; or repeat the "
                                "field for several photos or videos of one scene",
                            },
                            **fields,
                        },
                    }
                }
            },
        },
    }
