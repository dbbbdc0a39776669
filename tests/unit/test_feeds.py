"""golconde.target.FeedGraph: which destinations the targets of a process feed, and the cycles."""
from __future__ import annotations

from golconde.feeds import FeedGraph


def test_a_target_feeding_its_own_destination_is_a_cycle():
    graph = FeedGraph()
    assert graph.update(1, "D", ["D"]) == ["D", "D"]


def test_a_chain_is_no_cycle():
    graph = FeedGraph()
    assert graph.update(1, "A", ["B"]) is None      # A's target writes a table captured for B
    assert graph.update(2, "B", ["C"]) is None
    assert graph.update(3, "C", []) is None
    assert graph.update(4, "A", ["B", "C"]) is None  # two targets of A, both chains


def test_a_cycle_is_found_by_the_target_that_closes_it_and_by_the_others_after():
    graph = FeedGraph()
    assert graph.update(1, "E1", ["E2"]) is None     # alone: a chain so far
    assert graph.update(2, "E2", ["E3"]) is None
    assert graph.update(3, "E3", ["E1"]) == ["E3", "E1", "E2", "E3"]
    assert graph.update(1, "E1", ["E2"]) == ["E1", "E2", "E3", "E1"]   # at its next check


def test_a_cycle_elsewhere_does_not_stop_a_target_outside_it():
    graph = FeedGraph()
    graph.update(1, "X", ["Y"])
    graph.update(2, "Y", ["X"])
    assert graph.update(3, "A", ["X"]) is None       # A feeds into the cycle, is not part of it


def test_a_cycle_ends_with_the_entry_that_closed_it():
    graph = FeedGraph()
    graph.update(1, "E1", ["E2"])
    assert graph.update(2, "E2", ["E1"]) == ["E2", "E1", "E2"]
    graph.forget(2)                                  # that listener ended
    assert graph.update(1, "E1", ["E2"]) is None
    assert graph.update(2, "E2", []) is None         # its trigger dropped: no feed any more
    assert graph.update(1, "E1", ["E2"]) is None
