"""Ports handed to instances are never handed out twice while their instance may hold them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from portico.control import ports
from portico.control.ports import PortAllocator


def offer(monkeypatch: pytest.MonkeyPatch, *offers: int) -> None:
    """Make the kernel offer ``offers`` in turn: what it does while nobody has bound them."""
    it: Iterator[int] = iter(offers)
    monkeypatch.setattr(ports, "kernel_free_port", lambda: next(it))


def test_a_held_port_is_not_handed_out_again_even_when_the_kernel_offers_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel offers the same port again as long as nobody has bound it yet: exactly
    # what happens while a just-started instance boots.
    offer(monkeypatch, 5001, 5001, 5001, 5002)
    allocator = PortAllocator()
    assert allocator.allocate() == 5001
    assert allocator.allocate() == 5002


def test_a_claimed_port_is_skipped_when_the_kernel_offers_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An adopted container's port: not handed out here, but taken all the same.
    offer(monkeypatch, 5001, 5002)
    allocator = PortAllocator()
    allocator.claim(5001)
    assert allocator.allocate() == 5002


def test_a_released_port_is_handed_out_again(monkeypatch: pytest.MonkeyPatch) -> None:
    offer(monkeypatch, 5001, 5001, 5002, 5001)
    allocator = PortAllocator()
    assert allocator.allocate() == 5001
    assert allocator.allocate() == 5002  # 5001 still held: skipped
    allocator.release(5001)
    assert allocator.allocate() == 5001  # its instance is gone: free again


def test_a_released_claim_is_handed_out_again(monkeypatch: pytest.MonkeyPatch) -> None:
    offer(monkeypatch, 5001)
    allocator = PortAllocator()
    allocator.claim(5001)
    allocator.release(5001)
    assert allocator.allocate() == 5001


def test_allocation_gives_up_when_every_offer_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "kernel_free_port", lambda: 5001)
    allocator = PortAllocator()
    allocator.claim(5001)
    with pytest.raises(OSError, match="no free loopback port"):
        allocator.allocate()
