import pytest

from server.engine.block_pool import BlockPool, BlockTable, OutOfBlocks


def test_null_block_is_reserved_and_counts_are_exact():
    pool = BlockPool(8)
    assert pool.num_usable == 7 and pool.num_free == 7
    got = pool.allocate(7)
    assert BlockPool.NULL_BLOCK not in got and sorted(got) == list(range(1, 8))
    assert pool.num_free == 0 and pool.usage == 1.0
    with pytest.raises(OutOfBlocks):
        pool.allocate(1)
    pool.free(got)
    assert pool.num_free == 7 and pool.usage == 0.0


def test_refcounts_and_double_free():
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.incref([b])
    pool.free([b])
    assert pool.num_free == 2  # still referenced once
    pool.free([b])
    assert pool.num_free == 3
    with pytest.raises(ValueError):
        pool.free([b])
    with pytest.raises(ValueError):
        pool.free([BlockPool.NULL_BLOCK])


def test_failed_allocation_takes_nothing():
    pool = BlockPool(4)
    pool.allocate(2)
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    assert pool.num_free == 1


def test_freed_blocks_are_reused_first():
    # one request after another keeps writing the same (mapped, cached) blocks instead of walking
    # through the whole cache
    pool = BlockPool(64)
    first = pool.allocate(5)
    pool.free(first)
    assert sorted(pool.allocate(5)) == sorted(first)
    other = pool.allocate(3)
    assert not set(other) & set(first)


def test_block_table_lookahead_truncate_release():
    pool = BlockPool(10)
    t = BlockTable(block_size=4)
    t.ensure(pool, 9)  # positions 0..8 -> 3 blocks
    assert len(t.blocks) == 3 and pool.num_free == 6
    t.ensure(pool, 12)
    assert len(t.blocks) == 3  # still fits
    t.ensure(pool, 13)
    assert len(t.blocks) == 4 and pool.num_free == 5
    slots = t.slots(3, 6)
    assert slots == [t.blocks[0] * 4 + 3, t.blocks[1] * 4 + 0, t.blocks[1] * 4 + 1]
    t.truncate(pool, 5)  # rollback: keep 2 blocks
    assert len(t.blocks) == 2 and pool.num_free == 7
    t.truncate(pool, 8)  # never grows
    assert len(t.blocks) == 2
    t.release(pool)
    assert t.blocks == [] and pool.num_free == 9
