"""Ports handed to instances are never handed out twice while their instance may hold them."""

from __future__ import annotations

from portico.control import ports
from portico.control.ports import PortAllocator


def test_a_held_port_is_not_handed_out_again_even_when_the_kernel_offers_it(
    monkeypatch,
) -> None:
    # The kernel offers the same port again as long as nobody has bound it yet: exactly
    # what happens while a just-started instance boots.
    offers = iter([5001, 5001, 5001, 5002])
    monkeypatch.setattr(ports, "kernel_free_port", lambda: next(offers))
    allocator = PortAllocator()
    assert allocator.allocate() == 5001
    assert allocator.allocate() == 5002


def test_released_ports_can_be_reused_and_claimed_ones_are_skipped() -> None:
    allocator = PortAllocator()
    held = {allocator.allocate() for _ in range(50)}
    assert len(held) == 50
    for port in held:
        allocator.release(port)
    allocator.claim(ports.kernel_free_port())
    assert len({allocator.allocate() for _ in range(20)}) == 20
