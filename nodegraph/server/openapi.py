"""The OpenAPI 3.1 document of the HTTP API, served at /api/openapi.json (docs/api.md explains it)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ERROR, description)


def _path_parameter(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


_RUN_STATUS = {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error", "message"],
        "properties": {"error": {"type": "string", "description": "Machine-readable code, e.g. unknown_run."},
                       "message": {"type": "string", "description": "What went wrong and what to do."}},
    },
    "Issue": {
        "type": "object", "required": ["code", "message"],
        "description": "One validation problem; node_id and input name where it is.",
        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                       "node_id": {"type": ["string", "null"]}, "input": {"type": ["string", "null"]}},
    },
    "InvalidWorkflow": {
        "type": "object", "required": ["error", "issues"],
        "properties": {"error": {"enum": ["invalid_workflow", "cannot_import"]}, "message": {"type": "string"},
                       "issues": {"type": "array", "items": {"$ref": "#/components/schemas/Issue"}}},
    },
    "Workflow": {
        "type": "object", "required": ["nodes"],
        "description": "A workflow document (`nodegraph schema` prints its full JSON Schema).",
        "properties": {"version": {"type": "integer"}, "nodes": {"type": "object"}, "ui": {"type": "object"}},
    },
    "NodeState": {
        "type": "object", "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["pending", "running", "cached", "executed", "failed", "cancelled"]},
            "node_type": {"type": "string"}, "seconds": {"type": "number"},
            "progress": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
            "files": {"type": "array", "items": {"type": "string"}},
            "file_urls": {"type": "array", "items": {"type": ["string", "null"]}},
        },
    },
    "Run": {
        "type": "object", "required": ["id", "status", "created", "nodes", "files"],
        "properties": {
            "id": {"type": "string"}, "status": _RUN_STATUS,
            "workflow": {"$ref": "#/components/schemas/Workflow"},
            "outputs": {"type": ["array", "null"], "items": {"type": "string"}},
            "created": {"type": "number"}, "started": {"type": ["number", "null"]},
            "finished": {"type": ["number", "null"]}, "seconds": {"type": ["number", "null"]},
            "nodes": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/NodeState"}},
            "files": {"type": "array", "items": {"type": "string"}},
            "file_urls": {"type": "array", "items": {"type": ["string", "null"]}},
            "error": {"type": ["object", "null"], "description": "Why it failed: the node, exception and message."},
            "worker": {"type": ["string", "null"], "description": "Where it ran: `local`, or a Ray worker (host:pid)."},
            "attempts": {"type": "array", "items": {"type": "object"},
                         "description": "Earlier attempts lost with their worker (worker, error, message, started, "
                                        "ended); the run was retried on another."},
            "prompt": {"type": ["string", "null"],
                       "description": "The first non-empty multi-line text input of its workflow (set or "
                                      "default), in node order."},
        },
    },
    "Queue": {
        "type": "object", "required": ["queued", "queued_count", "running", "running_ids", "paused"],
        "properties": {"queued": {"type": "array", "items": {"type": "string"}, "description": "Run ids, next first."},
                       "queued_count": {"type": "integer", "description": "How many runs wait."},
                       "running": {"type": ["string", "null"], "description": "The running run that started first."},
                       "running_ids": {"type": "array", "items": {"type": "string"},
                                       "description": "Every running run, in the order they started."},
                       "paused": {"type": "boolean"}},
    },
    "Catalogue": {
        "type": "object", "required": ["nodes", "types"],
        "properties": {
            "nodes": {"type": "object", "description": "Node type name -> inputs, outputs, category, description, "
                                                       "pack, aliases (other tools' names for it)."},
            "types": {"type": "object", "description": "Socket type name -> description, color, accepts."},
        },
    },
    "File": {
        "type": "object", "required": ["name", "size", "modified"],
        "properties": {"name": {"type": "string"}, "size": {"type": "integer"}, "modified": {"type": "number"},
                       "url": {"type": "string"}},
    },
    "Upload": {
        "type": "object", "required": ["name", "url"],
        "properties": {"name": {"type": "string"}, "folder": {"const": "inputs"}, "format": {"type": "string"},
                       "width": {"type": "integer"}, "height": {"type": "integer"}, "url": {"type": "string"}},
    },
}

_RUN_ID = _path_parameter("run_id", "The id returned when the run was submitted.")
_FOLDER = {"name": "folder", "in": "path", "required": True, "schema": {"type": "string", "enum": ["inputs", "outputs"]}}
_WORKFLOW_NAME = _path_parameter("name", "A plain file name ending in .json.")

PATHS: dict[str, Any] = {
    "/api/runs": {
        "post": {
            "summary": "Validate and queue a workflow",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["workflow"],
                "properties": {"workflow": {"$ref": "#/components/schemas/Workflow"},
                               "outputs": {"type": "array", "items": {"type": "string"},
                                           "description": "Run only what these nodes need."}}}}}},
            "responses": {
                "201": _json({"type": "object", "properties": {"id": {"type": "string"}, "status": {"const": "queued"}}},
                             "Queued."),
                "400": _json({"oneOf": [{"$ref": "#/components/schemas/InvalidWorkflow"}, _ERROR]},
                             "Invalid workflow (every issue at once) or malformed body."),
                "413": _error("Body over the size limit."),
            },
        },
        "get": {
            "summary": "List runs, oldest first, with the queue state",
            "parameters": [{"name": "status", "in": "query", "schema": _RUN_STATUS},
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0},
                            "description": "Only the newest this many."}],
            "responses": {"200": _json({"allOf": [{"$ref": "#/components/schemas/Queue"}, {
                "type": "object", "properties": {"runs": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}}}}]},
                "Runs without their workflow documents.")},
        },
    },
    "/api/runs/{run_id}": {
        "get": {
            "summary": "One run: status, timings, per-node state, files, error",
            "parameters": [_RUN_ID],
            "responses": {"200": _json({"$ref": "#/components/schemas/Run"}, "The run."),
                          "404": _error("No such run.")},
        },
        "delete": {
            "summary": "Delete a finished run from the history (the files it wrote stay)",
            "parameters": [_RUN_ID],
            "responses": {"200": _json({"type": "object", "required": ["id", "deleted"],
                                        "properties": {"id": {"type": "string"}, "deleted": {"const": True}}},
                                       "Deleted; a run_deleted event tells every client."),
                          "404": _error("No such run."),
                          "409": _error("The run is queued or running (`status` says which): cancel it first.")},
        },
    },
    "/api/runs/{run_id}/cancel": {"post": {
        "summary": "Cancel a queued or running run",
        "parameters": [_RUN_ID],
        "responses": {"200": _json({"type": "object", "properties": {"id": {"type": "string"}, "status": _RUN_STATUS,
                                                                     "cancel_requested": {"type": "boolean"}}},
                                   "Cancelled (queued) or cancelling (running: it stops within one step)."),
                      "404": _error("No such run."), "409": _error("The run already ended.")},
    }},
    "/api/queue": {
        "get": {"summary": "The queue: waiting runs in order, the running one, paused or not",
                "responses": {"200": _json({"$ref": "#/components/schemas/Queue"}, "The queue.")}},
        "delete": {"summary": "Cancel every queued run",
                   "responses": {"200": _json({"type": "object", "properties": {"cancelled": {"type": "integer"}}},
                                              "How many were cancelled.")}},
    },
    "/api/queue/order": {"post": {
        "summary": "Move queued runs to the front, in the given order",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["order"], "properties": {"order": {"type": "array", "items": {"type": "string"}}}}}}},
        "responses": {"200": _json({"type": "object", "properties": {"queued": {"type": "array", "items": {"type": "string"}}}},
                                   "The new queue order."),
                      "400": _error("Malformed body."), "409": _error("Some ids are not queued; nothing changed.")},
    }},
    "/api/queue/pause": {"post": {"summary": "Start no further runs (survives a restart)",
                                  "responses": {"200": _json({"type": "object"}, "Paused.")}}},
    "/api/queue/resume": {"post": {"summary": "Start queued runs again",
                                   "responses": {"200": _json({"type": "object"}, "Resumed.")}}},
    "/api/nodes": {"get": {"summary": "The node catalogue the editor draws from",
                           "responses": {"200": _json({"$ref": "#/components/schemas/Catalogue"}, "Every node type.")}}},
    "/api/models": {"get": {"summary": "The files each model folder offers",
                            "responses": {"200": _json({"type": "object", "properties": {"folders": {
                                "type": "object", "additionalProperties": {"type": "array"}}}}, "Folder -> files.")}}},
    "/api/files/{folder}": {"get": {
        "summary": "List the files of the inputs or outputs folder, newest first",
        "parameters": [_FOLDER, {"name": "images", "in": "query", "schema": {"const": "1"},
                                 "description": "Only image files."}],
        "responses": {"200": _json({"type": "object", "properties": {"files": {
            "type": "array", "items": {"$ref": "#/components/schemas/File"}}}}, "The files."),
            "404": _error("Unknown folder.")},
    }},
    "/api/files/{folder}/{path}": {"get": {
        "summary": "Download a file from the inputs or outputs folder",
        "parameters": [_FOLDER, _path_parameter("path", "Relative path inside the folder.")],
        "responses": {"200": {"description": "The file's bytes (HTML, SVG and scripts as attachments)."},
                      "403": _error("The path leaves the folder: '..', absolute, hidden or a symlink out."),
                      "404": _error("No such file.")},
    }},
    "/api/files/inputs": {"post": {
        "summary": "Upload an input image (multipart field 'file')",
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}}}},
        "responses": {"201": _json({"$ref": "#/components/schemas/Upload"}, "Stored under this name."),
                      "400": _error("Not multipart, or no 'file' field."),
                      "413": _error("Over the upload size limit."),
                      "415": _error("Not a PNG, JPEG, WebP, BMP or GIF image, unreadable, or too many pixels.")},
    }},
    "/api/workflows": {"get": {"summary": "The saved workflows (the server's workflows/ folder)",
                               "responses": {"200": _json({"type": "object", "properties": {"workflows": {
                                   "type": "array", "items": {"$ref": "#/components/schemas/File"}}}}, "Names.")}}},
    "/api/workflows/convert": {"post": {
        "summary": "Convert another tool's workflow (e.g. ComfyUI API or UI format) with the packs' importers",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
        "responses": {"200": _json({"type": "object", "required": ["workflow", "importer"], "properties": {
            "workflow": {"$ref": "#/components/schemas/Workflow"},
            "importer": {"type": ["string", "null"], "description": "The importer used; null for our own format."}}},
            "The workflow in our format."),
            "400": _json({"$ref": "#/components/schemas/InvalidWorkflow"},
                         "Recognised but not convertible: every unsupported node type and input."),
            "422": _error("No importer recognises the document.")},
    }},
    "/api/workflows/{name}": {
        "get": {"summary": "A saved workflow document", "parameters": [_WORKFLOW_NAME],
                "responses": {"200": _json({"$ref": "#/components/schemas/Workflow"}, "The document."),
                              "400": _error("Not a plain .json name."), "404": _error("No such workflow.")}},
        "put": {"summary": "Save a workflow document (replaces one of the same name)", "parameters": [_WORKFLOW_NAME],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Workflow"}}}},
                "responses": {"201": _json({"type": "object", "properties": {"name": {"type": "string"}}}, "Saved."),
                              "400": _error("Bad name or not a workflow document.")}},
    },
    "/api/health": {"get": {"summary": "Liveness and queue length",
                            "responses": {"200": _json({"type": "object", "properties": {
                                "ok": {"type": "boolean"}, "paused": {"type": "boolean"},
                                "queued": {"type": "integer"}}}, "Up.")}}},
    "/api/workers": {"get": {"summary": "Where runs execute: the local executor, or each worker of the Ray pool",
                             "responses": {"200": _json({"type": "object", "properties": {"workers": {
                                 "type": "array", "items": {"type": "object", "properties": {
                                     "name": {"type": "string"}, "node_id": {"type": ["string", "null"]},
                                     "ready": {"type": "boolean"}, "run_id": {"type": ["string", "null"]},
                                     "runs": {"type": "integer"}}}}}}, "The workers now.")}}},
    "/api/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1."}}}},
    "/api/events": {"get": {
        "summary": "WebSocket: every run and queue event as JSON text messages (see docs/api.md)",
        "responses": {"101": {"description": "Switching to the WebSocket protocol."}},
    }},
}


def openapi_document() -> dict[str, Any]:
    """The whole OpenAPI document: paths, shared schemas and the token scheme used beyond localhost."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "nodegraph server", "version": "1",
                 "description": "Queue workflow runs, follow their events, fetch the node catalogue and files."},
        "servers": [{"url": "http://127.0.0.1:8188"}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "token": {"type": "http", "scheme": "bearer",
                          "description": "Needed only when serving beyond localhost (`--listen`); "
                                         "also accepted as ?token= or the nodegraph_token cookie."},
            },
        },
    }
