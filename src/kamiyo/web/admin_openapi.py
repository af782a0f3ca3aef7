"""The OpenAPI 3.1 document of the admin API, assembled from its operations' pydantic models.

Each ``Operation`` names its models (query, path, body, answer); their JSON Schemas come from
pydantic (``models_json_schema``, shared definitions under ``components/schemas``), so every
bound, enum and required field the models check is stated here, and nothing is written twice.
Query and path parameters are the properties of their model, one parameter each.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from kamiyo.web.admin_models import ErrorAnswer

_REF = "#/components/schemas/{model}"

# What each error status means, for the operations that may answer it.
ERROR_TEXT = {
    400: "a malformed or out-of-bounds input: `field` names it, `reason` says what is wrong",
    403: "a cookie-authenticated change without the page's CSRF token",
    404: "not found",
    413: "request body over its cap (the connection is closed)",
}
# Errors every operation may answer, besides its own.
COMMON_ERRORS = {
    401: "no or wrong admin token",
    405: "method not allowed (the Allow header lists the methods)",
    429: "too many wrong admin tokens from this address: retry after Retry-After seconds",
    503: "the database is unavailable",
}


@dataclass(frozen=True)
class Operation:
    """One admin API operation as the schema describes it."""

    method: str
    path: str
    operation_id: str
    summary: str
    answer: type[BaseModel]
    query: type[BaseModel] | None = None
    path_params: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    description: str | None = None


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional parameter's schema without its ``null`` branch: a parameter is absent, never null."""
    branches = schema.get("anyOf")
    if branches is None:
        return schema
    kept = [branch for branch in branches if branch != {"type": "null"}]
    if len(kept) != 1:
        return schema
    rest = {key: value for key, value in schema.items() if key not in ("anyOf", "default")}
    default = schema.get("default")
    return {**kept[0], **rest, **({"default": default} if default is not None else {})}


def _parameters(schema: dict[str, Any], where: str) -> list[dict[str, Any]]:
    required = set(schema.get("required", ()))
    parameters = []
    for name, prop in schema["properties"].items():
        prop = _without_null({key: value for key, value in prop.items() if key != "title"})
        description = prop.pop("description", name)
        parameters.append(
            {
                "name": name,
                "in": where,
                "required": where == "path" or name in required,
                "description": description,
                "schema": prop,
            }
        )
    return parameters


def openapi_document(
    operations: Iterable[Operation], *, info: dict[str, Any], security: dict[str, Any]
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``operations``."""
    operations = list(operations)
    inputs: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for operation in operations:
        inputs += [(model, "validation") for model in (operation.query, operation.path_params, operation.body) if model]
        inputs.append((operation.answer, "serialization"))
    inputs.append((ErrorAnswer, "serialization"))
    refs, top = models_json_schema(list(dict.fromkeys(inputs)), ref_template=_REF)
    components: dict[str, Any] = top.get("$defs", {})

    def inline(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        ref = refs[(model, mode)]["$ref"].rsplit("/", 1)[-1]
        return dict(components[ref])

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(refs[(model, mode)])

    error_content = {"application/json": {"schema": ref(ErrorAnswer, "serialization")}}
    paths: dict[str, dict[str, Any]] = {}
    for operation in operations:
        responses: dict[str, Any] = {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": ref(operation.answer, "serialization")}},
            }
        }
        for code in sorted({*operation.errors, *COMMON_ERRORS}):
            text = ERROR_TEXT.get(code) or COMMON_ERRORS[code]
            responses[str(code)] = {"description": text, "content": error_content}
        entry: dict[str, Any] = {
            "summary": operation.summary,
            "operationId": operation.operation_id,
            "tags": ["admin"],
            "responses": responses,
        }
        if operation.description:
            entry["description"] = operation.description
        parameters = []
        if operation.path_params is not None:
            parameters += _parameters(inline(operation.path_params, "validation"), "path")
        if operation.query is not None:
            parameters += _parameters(inline(operation.query, "validation"), "query")
        if parameters:
            entry["parameters"] = parameters
        if operation.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(operation.body, "validation")}},
            }
        paths.setdefault(operation.path, {})[operation.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": info,
        "components": {"schemas": components, **security},
        "security": [{name: []} for name in security["securitySchemes"]],
        "paths": paths,
    }
