"""Open Inference Protocol (KServe V2) tensors <-> numpy, REST JSON and the binary extension (pure).

REST binary tensor extension (what tritonclient's HTTP client sends by default): the body is a
JSON header of `Inference-Header-Content-Length` bytes followed by each binary tensor's raw
bytes, in order; a tensor's `parameters.binary_data_size` gives its length. BYTES elements are
each a 4-byte little-endian length followed by the bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import orjson

from banditgate.jsontypes import JSONObject, JSONValue
from gateway.errors import InvalidInput
from gateway.validation import check_shape, numbers_for

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
DATATYPE_OF = {dtype: name for name, dtype in DTYPES.items()}


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray
    parameters: JSONObject = field(default_factory=dict)


@dataclass
class InferRequest:
    id: str | None
    parameters: JSONObject
    inputs: list[Tensor]
    outputs: list[tuple[str, bool]] | None  # requested (name, binary); None = all, JSON


def datatype_for(array: np.ndarray) -> str:
    if array.dtype.kind in "US":
        return "BYTES"
    return DATATYPE_OF.get(array.dtype, "BYTES")


def _decode_bytes_elements(raw: bytes, count: int, name: str) -> np.ndarray:
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES data ends early (element {i} of {count})")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        out[i] = raw[offset:offset + length]
        offset += length
    if offset != len(raw):
        raise InvalidInput(f"input {name!r}: BYTES data has {len(raw) - offset} bytes left over")
    return out


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """A tensor from its flattened row-major little-endian bytes (REST binary or gRPC raw contents).
    `shape` has passed `check_shape` (its product fits in memory limits)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_bytes_elements(raw, count, name).reshape(shape)
    dtype = DTYPES[datatype].newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: {len(raw)} bytes of data for shape {shape} {datatype} "
                           f"(expected {count * dtype.itemsize})")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def tensor_from_json(name: str, datatype: str, shape: list[int], data: JSONValue) -> np.ndarray:
    """A tensor from JSON `data` (flat or nested); a value the datatype cannot hold exactly (INT8
    300, a fraction for INT32) is refused, never wrapped (gateway.validation.numbers_for)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        try:
            flat = np.array(data, dtype=object).reshape(-1)
        except (ValueError, TypeError):
            raise InvalidInput(f"input {name!r}: 'data' does not match datatype {datatype}") from None
        flat = np.array([v.encode() if isinstance(v, str) else v for v in flat], dtype=object)
    else:
        flat = numbers_for(data, DTYPES[datatype], f"input {name!r}").reshape(-1)
    if flat.size != count:
        raise InvalidInput(f"input {name!r}: {flat.size} values of data for shape {shape} ({count} expected)")
    return flat.reshape(shape)


def parse_rest_infer(body: bytes, header_length: int | None, max_elements: int, max_inputs: int) -> InferRequest:
    """Decode a REST infer body (JSON, or JSON header + binary tensors); raise InvalidInput."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {header_length} is outside the {len(body)}-byte body")
        header, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        header, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list) or not inputs_doc:
        raise InvalidInput("request needs a non-empty 'inputs' list")
    if len(inputs_doc) > max_inputs:
        raise InvalidInput(f"request has {len(inputs_doc)} inputs, over the limit of {max_inputs}")
    offset = 0
    tensors = []
    for item in inputs_doc:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput("each input needs a 'name'")
        name = item["name"]
        datatype = item.get("datatype")
        if datatype not in DTYPES:
            raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r} (one of {', '.join(DTYPES)})")
        raw_shape = item.get("shape")
        check_shape(raw_shape, name, max_elements)
        shape = cast("list[int]", raw_shape)  # check_shape refused anything but a list of ints
        parameters = item.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input {name!r}: binary_data_size {size} runs past the body")
            array = tensor_from_raw(name, datatype, shape, bytes(binary[offset:offset + size]))
            offset += size
        else:
            if "data" not in item:
                raise InvalidInput(f"input {name!r} has no 'data'")
            array = tensor_from_json(name, datatype, shape, item["data"])
        tensors.append(Tensor(name, datatype, shape, array, parameters if isinstance(parameters, dict) else {}))
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    outputs = None
    if isinstance(doc.get("outputs"), list):
        outputs = []
        for item in doc["outputs"]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidInput("each requested output needs a 'name'")
            params = item.get("parameters") or {}
            outputs.append((item["name"], bool(params.get("binary_data", False)) if isinstance(params, dict) else False))
    request_parameters = doc.get("parameters")
    request_id = doc.get("id")
    return InferRequest(id=str(request_id) if request_id is not None else None,
                        parameters=request_parameters if isinstance(request_parameters, dict) else {},
                        inputs=tensors, outputs=outputs)


def _raw_bytes(array: np.ndarray) -> bytes:
    if array.dtype == object or array.dtype.kind in "US":
        parts = []
        for value in array.reshape(-1):
            data = value if isinstance(value, bytes) else str(value).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _json_data(array: np.ndarray) -> list:
    if array.dtype == object:
        return [v.decode(errors="replace") if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
    return array.reshape(-1).tolist()


def build_rest_response(model_name: str, model_version: str, request_id: str | None, parameters: JSONObject,
                        outputs: dict[str, np.ndarray], binary: set[str], all_binary: bool = False
                        ) -> tuple[bytes, int | None]:
    """Encode an infer response; returns (body, header length or None when no binary outputs)."""
    doc_outputs = []
    blobs = []
    for name, array in outputs.items():
        entry: JSONObject = {"name": name, "datatype": datatype_for(array), "shape": list(array.shape)}
        if all_binary or name in binary:
            raw = _raw_bytes(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(array)
        doc_outputs.append(entry)
    doc: JSONObject = {"model_name": model_name, "model_version": model_version, "outputs": doc_outputs}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
