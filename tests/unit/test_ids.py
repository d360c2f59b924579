import threading
import time

import pytest

from outbox_relay.errors import ConfigError
from outbox_relay.ids import (
    EPOCH_MS,
    LEASED_INSTANCE_BITS,
    LEASED_INSTANCES,
    MAX_SHARD_ID,
    NOETL_SHARD_ID,
    SnowflakeGenerator,
    leased_instance,
    split_id,
)
from outbox_relay.producer import Producer


def test_layout_matches_noetl() -> None:
    # ((ms since 2024-01-01) << 23) | (shard << 18) | sequence
    before = time.time_ns() // 1_000_000
    snowflake = SnowflakeGenerator(7).next_id()
    after = time.time_ns() // 1_000_000
    unix_ms, shard, _ = split_id(snowflake)
    assert before <= unix_ms <= after
    assert shard == 7
    assert snowflake >> 23 == unix_ms - EPOCH_MS
    assert (snowflake >> 18) & 0x1F == 7


def test_ids_are_unique_and_increasing_across_threads() -> None:
    gen = SnowflakeGenerator(1)
    results: list[list[int]] = [[] for _ in range(4)]

    def mint(out: list[int]) -> None:
        out.extend(gen.next_id() for _ in range(20_000))

    threads = [threading.Thread(target=mint, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for r in results for i in r]
    assert len(set(every)) == len(every)
    for r in results:
        assert r == sorted(r)


def test_distinct_shards_never_collide() -> None:
    a, b = SnowflakeGenerator(0), SnowflakeGenerator(1)
    assert not {a.next_id() for _ in range(5000)} & {b.next_id() for _ in range(5000)}


@pytest.mark.parametrize("shard", [-1, MAX_SHARD_ID + 1])
def test_shard_out_of_range_is_refused(shard: int) -> None:
    with pytest.raises(ConfigError, match="shard id"):
        SnowflakeGenerator(shard)


def test_leased_instances_keep_the_time_bits_and_split_the_rest() -> None:
    gen = SnowflakeGenerator(2047, instance_bits=LEASED_INSTANCE_BITS)
    ids = [gen.next_id() for _ in range(10_000)]  # more than 4096: spills into new ms
    assert ids == sorted(set(ids))
    for snowflake in ids:
        unix_ms, instance, sequence = split_id(snowflake, instance_bits=LEASED_INSTANCE_BITS)
        assert instance == 2047
        assert sequence < 4096
        assert snowflake >> 23 == unix_ms - EPOCH_MS


def test_leased_instances_never_collide_with_each_other() -> None:
    a = SnowflakeGenerator(5, instance_bits=LEASED_INSTANCE_BITS)
    b = SnowflakeGenerator(6, instance_bits=LEASED_INSTANCE_BITS)
    assert not {a.next_id() for _ in range(5000)} & {b.next_id() for _ in range(5000)}


def test_noetls_shard_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # noetl.snowflake_id() mints with shard 1 and a sequence below 1024.
    with pytest.raises(ConfigError, match=r"noetl\.snowflake_id"):
        Producer(ids=SnowflakeGenerator(NOETL_SHARD_ID))
    monkeypatch.setenv("OUTBOX_SHARD_ID", str(NOETL_SHARD_ID))
    with pytest.raises(ConfigError, match="choose another OUTBOX_SHARD_ID"):
        Producer.from_env()


def test_leases_never_hand_out_an_instance_whose_ids_could_be_noetls() -> None:
    instances = [leased_instance(lease) for lease in range(LEASED_INSTANCES)]
    assert len(set(instances)) == len(instances)
    assert all(0 <= i < 1 << LEASED_INSTANCE_BITS for i in instances)
    # Bits 18-22 of an id are the instance's top five bits; NoETL's are always 1.
    assert not [i for i in instances if i >> (LEASED_INSTANCE_BITS - 5) == NOETL_SHARD_ID]
