"""The export's streaming parts without Kafka: the on-disk join gives exactly join_rows' rows in
groups that never exceed their bound, and the row-group writer keeps one schema and leaves
nothing behind when aborted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedback.export import (
    ExportError,
    ExportWriter,
    SchemaProbe,
    join_rows,
    read_export,
    write_export,
)
from feedback.export_join import SpillJoin

pytest.importorskip("pyarrow")

ROUTE = "churn"


def spill_rows(requests: list[dict[str, Any]], predictions: list[dict[str, Any]], outcomes: list[dict[str, Any]],
               since: float, until: float | None, batch: int = 7, max_rows: int = 5,
               max_bytes: int = 1 << 20) -> list[list[dict[str, Any]]]:
    join = SpillJoin(ROUTE, since, until)
    try:
        for begin in range(0, len(outcomes), batch):
            join.add_outcomes(outcomes[begin:begin + batch])
        for begin in range(0, len(requests), batch):
            join.add_requests(requests[begin:begin + batch])
        for begin in range(0, len(predictions), batch):
            join.add_predictions(predictions[begin:begin + batch])
        join.finish()
        return list(join.groups(max_rows, max_bytes))
    finally:
        join.close()


ids = st.sampled_from([f"r{i}" for i in range(12)])
events = st.tuples(
    st.lists(st.fixed_dictionaries({"request_id": ids, "route": st.sampled_from([ROUTE, "fraud"]),
                                    "inputs": st.one_of(st.none(), st.lists(st.integers(-5, 5), max_size=3)),
                                    "unit_id": st.one_of(st.none(), st.text(max_size=3))}), max_size=15),
    st.lists(st.fixed_dictionaries({"request_id": ids, "route": st.sampled_from([ROUTE, ROUTE, "fraud"]),
                                    "arm": st.sampled_from(["a", "b", "c"]), "shadow": st.booleans(),
                                    "model_version": st.integers(1, 3), "propensity": st.floats(0.1, 1.0)}),
             max_size=25),
    st.lists(st.fixed_dictionaries({"request_id": ids, "ts": st.one_of(st.integers(0, 20), st.floats(0, 20),
                                                                         st.none(), st.just(float("nan"))),
                                    "reward": st.one_of(st.none(), st.floats(0, 1)),
                                    "label": st.one_of(st.none(), st.integers(0, 1), st.text(max_size=2))}),
             max_size=20))


@settings(max_examples=150, deadline=None)
@given(events, st.integers(0, 10), st.one_of(st.none(), st.integers(5, 20)))
def test_the_disk_join_gives_exactly_the_rows_of_join_rows(data: Any, since: int, until: int | None) -> None:
    requests, predictions, outcomes = data
    expected = join_rows(requests, predictions, outcomes, ROUTE, since, until)
    groups = spill_rows(requests, predictions, outcomes, since, until)
    assert [row for group in groups for row in group] == expected
    assert all(0 < len(group) <= 5 for group in groups)


def test_groups_are_bounded_by_bytes_too() -> None:
    requests = [{"request_id": f"r{i}", "route": ROUTE, "inputs": [float(i)] * 500} for i in range(40)]
    predictions = [{"request_id": f"r{i}", "route": ROUTE, "arm": "a"} for i in range(40)]
    outcomes = [{"request_id": f"r{i}", "ts": float(i), "reward": 1.0} for i in range(40)]
    groups = spill_rows(requests, predictions, outcomes, 0.0, None, max_rows=1000, max_bytes=20_000)
    sizes = [len(json.dumps([row["inputs"] for row in group])) for group in groups]
    assert sum(len(group) for group in groups) == 40 and len(groups) > 4
    assert max(sizes) < 20_000 + 3_000  # one row of ~2.7 kB beyond the bound at most


def test_the_writer_finds_one_schema_over_all_row_groups(tmp_path: Path) -> None:
    # the first group alone would type `label` as int64 and `inputs` as list<int64>
    first = [{"request_id": "1", "label": 1, "inputs": [1, 2], "ts_outcome": 1.0}]
    second = [{"request_id": "2", "label": 0.5, "inputs": [0.5], "ts_outcome": 2.0}]
    third = [{"request_id": "3", "label": None, "outputs": {"p": 1}, "ts_outcome": 3.0}]
    probe = SchemaProbe()
    for group in (first, second, third):
        probe.add(group)
    schema, json_columns = probe.schema()
    assert str(schema.field("label").type) == "double" and json_columns == ()
    writer = ExportWriter(str(tmp_path), "r", 0.0, 10.0, schema, json_columns, rows_per_file=2)
    for group in (first, second, third):
        writer.write(group)
    manifest = writer.commit()
    assert [f["rows"] for f in manifest.files] == [2, 1]
    _, table = read_export(manifest.path)
    assert table.column("label").to_pylist() == [1.0, 0.5, None]
    assert table.column("inputs").to_pylist() == [[1.0, 2.0], [0.5], None]


def test_columns_without_a_common_type_go_to_json_across_groups(tmp_path: Path) -> None:
    rows = [{"request_id": str(i), "label": "cat" if i % 2 else i, "ts_outcome": float(i)} for i in range(6)]
    manifest = write_export(rows, str(tmp_path), "r", 0.0, None, row_group_rows=1)  # each group alone is typed
    assert manifest.json_columns == ("label",)
    _, table = read_export(manifest.path)
    assert [json.loads(v) for v in table.column("label").to_pylist()] == [0, "cat", 2, "cat", 4, "cat"]


def test_an_aborted_writer_leaves_nothing(tmp_path: Path) -> None:
    rows = [{"request_id": "1", "ts_outcome": 0.5}, {"request_id": "2", "ts_outcome": 0.7}]
    probe = SchemaProbe()
    probe.add(rows)
    schema, json_columns = probe.schema()
    writer = ExportWriter(str(tmp_path), "r", 0.0, 1.0, schema, json_columns, rows_per_file=1)
    writer.write(rows)
    assert writer.bytes_written > 0 and Path(writer.folder).exists()
    writer.abort()
    assert not Path(writer.folder).exists()


def test_a_value_that_does_not_fit_its_column_is_one_line(tmp_path: Path) -> None:
    probe = SchemaProbe()
    probe.add([{"request_id": "1", "label": 1}])
    schema, json_columns = probe.schema()
    writer = ExportWriter(str(tmp_path), "r", 0.0, 1.0, schema, json_columns)
    with pytest.raises(ExportError, match="column label"):
        writer.write([{"request_id": "2", "label": "not a number"}])
    writer.abort()
