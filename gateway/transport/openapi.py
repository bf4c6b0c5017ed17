"""The OpenAPI 3 document of the REST surface, served at /v2/openapi.json (and used to fuzz it)."""

from __future__ import annotations

from banditgate.jsontypes import JSONObject

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}


def _ok(schema: str) -> JSONObject:
    return {"description": "ok", "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _model_paths(prefix: str, params: list[JSONObject]) -> JSONObject:
    return {
        prefix: {"get": {"summary": "Model (or route) metadata", "parameters": params,
                         "responses": {"200": _ok("ModelMetadata"), "400": _ERROR, "401": _ERROR, "403": _ERROR,
                                       "404": _ERROR}}},
        f"{prefix}/ready": {"get": {"summary": "Model readiness", "parameters": params,
                                    "responses": {"200": _ok("Ready"), "404": _ok("Ready"), "401": _ERROR,
                                                  "403": _ERROR, "503": _ok("Ready")}}},
        f"{prefix}/infer": {"post": {
            "summary": "Inference; a route name is routed by its policy, a model name (+version) bypasses it",
            "parameters": params,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/InferRequest"}}}},
            "responses": {"200": _ok("InferResponse"), "400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR,
                          "413": _ERROR, "431": _ERROR, "503": _ERROR, "504": _ERROR}}},
    }


OPENAPI: JSONObject = {
    "openapi": "3.0.3",
    "info": {"title": "banditgate Open Inference Protocol (KServe V2) REST API", "version": "2"},
    "paths": {
        "/v2/health/live": {"get": {"summary": "Server liveness", "responses": {"200": _ok("Live")}}},
        "/v2/health/ready": {"get": {"summary": "Server readiness",
                                     "responses": {"200": _ok("Ready"), "503": _ok("Ready")}}},
        "/v2": {"get": {"summary": "Server metadata", "responses": {"200": _ok("ServerMetadata"), "401": _ERROR,
                                                                    "403": _ERROR}}},
        **_model_paths("/v2/models/{name}", [_NAME]),
        **_model_paths("/v2/models/{name}/versions/{version}", [_NAME, _VERSION]),
        "/v2/schemas": {"get": {"summary": "The JSON Schema of every event banditgate reads or writes",
                                "responses": {"200": _ok("EventSchemas")}}},
        "/v2/outcomes": {"post": {
            "summary": "Outcome events (one object or a list) produced to the outcomes topic",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                {"$ref": "#/components/schemas/Outcome"},
                {"type": "array", "items": {"$ref": "#/components/schemas/Outcome"}}]}}}},
            "responses": {"200": _ok("Accepted"), "400": _ERROR, "401": _ERROR, "403": _ERROR, "413": _ERROR}}},
    },
    "components": {"schemas": {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Live": {"type": "object", "properties": {"live": {"type": "boolean"}}},
        "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}, "name": {"type": "string"}}},
        "ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}}}},
        "TensorMetadata": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
            "name": {"type": "string"}, "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}}}},
        "ModelMetadata": {"type": "object", "required": ["name", "platform", "inputs", "outputs"], "properties": {
            "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}}}},
        "RequestInput": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
            "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                                    "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]},
            "parameters": {"type": "object"}, "data": {}}},
        "RequestOutput": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object"}}},
        "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestOutput"}}}},
        "ResponseOutput": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
            "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"}, "parameters": {"type": "object"}, "data": {}}},
        "InferResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "parameters": {"type": "object"},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/ResponseOutput"}}}},
        "Outcome": {"type": "object", "required": ["request_id"], "properties": {
            "request_id": {"type": "string"}, "reward": {"type": "number"}, "label": {},
            "ts": {"type": "number"}, "clicks": {"type": "array", "items": {"type": "string"}}}},
        "Accepted": {"type": "object", "properties": {"accepted": {"type": "integer"}}},
        "EventSchemas": {"type": "object", "required": ["schema_version", "schemas"], "properties": {
            "schema_version": {"type": "integer"}, "schemas": {"type": "object"}}},
    }},
}
