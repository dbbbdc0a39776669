"""listener.Confirmations: the pipeline of sent batches both flows settle in order."""
from __future__ import annotations

import pytest

from golconde.broker import BrokerError
from golconde.listener import Confirmations


class FakeReceipt:
    """A receipt that is confirmed already, or once waited for (or refused, raising)."""

    def __init__(self, confirmed: bool, refused: bool = False) -> None:
        self.confirmed = confirmed
        self.refused = refused
        self.waited = False

    def done(self) -> bool:
        return self.confirmed

    def wait(self) -> None:
        self.waited = True
        if self.refused:
            raise BrokerError("refused")
        self.confirmed = True


def test_finishes_confirmed_batches_in_order_and_stops_at_the_first_unconfirmed():
    pipeline: Confirmations[str] = Confirmations()
    late = FakeReceipt(False)
    pipeline.add([FakeReceipt(True), FakeReceipt(True)], "a")
    pipeline.add([FakeReceipt(True), late], "b")
    pipeline.add([FakeReceipt(True)], "c")         # confirmed, but after an unconfirmed one
    finished = []
    pipeline.settle(keep=3, finish=finished.append)
    assert finished == ["a"] and list(pipeline) == ["b", "c"] and not late.waited


def test_waits_for_the_oldest_while_more_than_keep_are_left():
    pipeline: Confirmations[int] = Confirmations()
    receipts = [FakeReceipt(False) for _ in range(4)]
    for number, receipt in enumerate(receipts):
        pipeline.add([receipt], number)
    finished = []
    pipeline.settle(keep=2, finish=finished.append)
    assert finished == [0, 1] and len(pipeline) == 2
    assert [r.waited for r in receipts] == [True, True, False, False]
    pipeline.settle(keep=0, finish=finished.append)
    assert finished == [0, 1, 2, 3] and len(pipeline) == 0


def test_a_refused_send_leaves_its_batch_and_the_later_ones():
    pipeline: Confirmations[str] = Confirmations()
    pipeline.add([FakeReceipt(True)], "a")
    pipeline.add([FakeReceipt(False, refused=True)], "b")
    pipeline.add([FakeReceipt(True)], "c")
    finished = []
    with pytest.raises(BrokerError):
        pipeline.settle(keep=0, finish=finished.append)
    assert finished == ["a"] and list(pipeline) == ["b", "c"]
    pipeline.clear()
    assert len(pipeline) == 0


def test_a_failing_finish_keeps_its_batch():
    pipeline: Confirmations[str] = Confirmations()
    pipeline.add([FakeReceipt(True)], "a")

    def finish(item: str) -> None:
        raise RuntimeError("database gone")

    with pytest.raises(RuntimeError):
        pipeline.settle(keep=0, finish=finish)
    assert list(pipeline) == ["a"]
