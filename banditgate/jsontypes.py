"""Names for decoded JSON, the one place where dynamic typing is the honest type.

Every event, config file and HTTP body banditgate reads arrives through ``orjson.loads`` /
``json.loads`` (typed ``Any`` upstream: a JSON document can hold anything). The values are
checked field by field at the edge (``banditgate.events``, ``gateway.validation``,
``banditgate.config``) before any code relies on their shape, so after that check the alias
only records "this came from JSON" - it is deliberately not a recursive union, which would
force a cast at every one of the hundreds of reads that the edge check already made safe.
"""
from __future__ import annotations

from typing import Any, TypeAlias

JSONValue: TypeAlias = Any  # Any: orjson.loads / json.loads return untyped values (checked at the edge)
JSONObject: TypeAlias = dict[str, JSONValue]
"""A decoded (or to-be-encoded) JSON object."""
