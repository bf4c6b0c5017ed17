"""`kafka_batches.murmur2` (word-at-a-time) equals aiokafka's byte-by-byte murmur2, the Java
client's partitioner: a difference would put predictions on other partitions than outcomes."""

from __future__ import annotations

from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.transport.kafka_batches import murmur2, partition_for


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_murmur2_equals_aiokafkas(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)


def test_known_partitions_of_the_java_client() -> None:
    # Utils.toPositive(Utils.murmur2(key)) % partitions, from the Java client's own tests
    # (DefaultPartitionerTest / UtilsTest murmur2 values)
    assert murmur2(b"21") == (-973932308) & 0xFFFFFFFF
    assert murmur2(b"foobar") == (-790332482) & 0xFFFFFFFF
    assert murmur2(b"a-little-bit-long-string") == (-985981536) & 0xFFFFFFFF
    assert murmur2(b"a-little-bit-longer-string") == (-1486304829) & 0xFFFFFFFF
    assert murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") == (-58897971) & 0xFFFFFFFF
    assert murmur2(b"abc") == 479470107
    assert partition_for(b"foobar", 4) == (((-790332482) & 0x7FFFFFFF) % 4)
