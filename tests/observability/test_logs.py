"""JSON log lines carry structured fields (request_id) as keys, and the level flag applies."""

from __future__ import annotations

import io
import json
import logging

from banditgate.logs import JsonFormatter, setup_logging


def test_json_line_carries_request_id_and_level() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("banditgate.test.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("request %s dead-lettered", "r-1", extra={"request_id": "r-1", "reason": "bad_input"})
    finally:
        log.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["message"] == "request r-1 dead-lettered"
    assert (line["level"], line["logger"], line["request_id"], line["reason"]) == (
        "warning", "banditgate.test.json", "r-1", "bad_input")


def test_log_level_flag_sets_the_root_level() -> None:
    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    try:
        setup_logging("warning", json_format=True)
        assert root.level == logging.WARNING
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        setup_logging("debug")
        assert root.level == logging.DEBUG and not isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
