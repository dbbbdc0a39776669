"""The trigger drain's row limit after fetches cut by ``batch_bytes`` (pure logic)."""
from types import SimpleNamespace

from golconde.destination import TriggerDestination


def next_limit(limit, fetched, cut_by_bytes, batch_size=500):
    drain = SimpleNamespace(config=SimpleNamespace(batch_size=batch_size))
    return TriggerDestination._next_limit(drain, limit, fetched, cut_by_bytes)


def test_a_fetch_cut_by_bytes_asks_for_twice_as_many_rows_next():
    assert next_limit(500, 4, True) == 8
    assert next_limit(8, 1, True) == 2
    assert next_limit(500, 300, True) == 500          # never above batch_size


def test_a_single_oversized_row_keeps_the_limit_at_least_one_row_ahead():
    assert next_limit(500, 1, True) == 2


def test_full_by_count_doubles_back_up_to_batch_size():
    assert next_limit(8, 8, False) == 16
    assert next_limit(400, 400, False) == 500
    assert next_limit(500, 500, False) == 500


def test_a_fetch_that_took_everything_goes_back_to_batch_size():
    assert next_limit(8, 3, False) == 500
    assert next_limit(8, 0, False) == 500
