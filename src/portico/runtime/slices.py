"""EndpointSlices to endpoint rows: which pod addresses of a Service take traffic, which drain.

Pure: takes the slices as the API serves them (discovery.k8s.io/v1 JSON) and the addresses
the upstream knows, returns ``membership.EndpointRow``s for ``membership.sync``.

The conditions, as the API reference defines them:

* ``ready`` unset means ready ("nil should be interpreted as true"; Traefik#12389 dropped
  such endpoints);
* ``serving`` unset means true, ``terminating`` unset means false;
* an endpoint takes new requests only when ready and not terminating;
* a known endpoint that stops being ready, or starts terminating (serving or not), drains:
  no new requests, in-flight ones go on (Traefik#11101 dropped them at once). It leaves
  when it leaves the slices (the pod is gone), or comes back when it is ready again;
* an endpoint never seen ready is not added just to drain.

The same address in two slices (the controller moves endpoints between slices) is one
endpoint. A dual-stack Service has one slice family per IP family, so each pod appears once
per family; a pod gets one endpoint, on IPv4 when it has one (``targetRef`` says which pod).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from portico.runtime.membership import EndpointRow

FAMILY_ORDER = {"IPv4": 0, "IPv6": 1, "FQDN": 2}


def slice_port(ports: list[Mapping[str, Any]] | None, wanted: str | int | None) -> int | None:
    """The port number of ``wanted`` (a name or a number) in a slice's ``ports``.

    Unset: the slice's only port (the first, if there are several and none is named "").
    A slice with ``ports`` null serves all ports (a headless Service without ports): then only
    a number can be used."""
    if not ports:
        return wanted if isinstance(wanted, int) else None
    for p in ports:
        if (p.get("protocol") or "TCP") != "TCP":
            continue
        name, number = p.get("name") or "", p.get("port")
        if not isinstance(number, int):
            continue
        if wanted is None or name == wanted or (isinstance(wanted, int) and number == wanted):
            return number
    return None


def _pod_key(endpoint: Mapping[str, Any], address: str) -> str:
    ref = endpoint.get("targetRef") or {}
    uid = ref.get("uid") or ""
    name = ref.get("name") or ""
    return f"{ref.get('namespace') or ''}/{name}/{uid}" if (uid or name) else address


def endpoint_rows(
    slices: Iterable[Mapping[str, Any]],
    port: str | int | None,
    known: set[tuple[str, int]],
) -> tuple[list[EndpointRow], list[str]]:
    """The rows the upstream should have, and the reasons slices were skipped."""
    problems: list[str] = []
    # pod -> (family rank, host, port, draining); one per pod, best family first.
    chosen: dict[str, tuple[int, str, int, bool]] = {}
    ordered = sorted(
        slices, key=lambda s: (FAMILY_ORDER.get(str(s.get("addressType")), 9), _name(s))
    )
    for sl in ordered:
        family = str(sl.get("addressType") or "")
        if family not in FAMILY_ORDER:
            problems.append(f"slice {_name(sl)}: address type {family!r} not supported")
            continue
        number = slice_port(sl.get("ports"), port)
        if number is None:
            problems.append(f"slice {_name(sl)}: no port {port!r} ({_port_list(sl)})")
            continue
        rank = FAMILY_ORDER[family]
        for ep in sl.get("endpoints") or ():
            addresses = ep.get("addresses") or ()
            if not addresses:
                continue
            host = str(addresses[0])  # the API: consumers use the first address
            conditions = ep.get("conditions") or {}
            ready = conditions.get("ready") is not False
            terminating = conditions.get("terminating") is True
            active = ready and not terminating
            if not active and (host, number) not in known:
                continue
            key = _pod_key(ep, host)
            row = (rank, host, number, not active)
            previous = chosen.get(key)
            if previous is None or (row[0], row[3]) < (previous[0], previous[3]):
                chosen[key] = row
    rows = sorted({(h, p, d) for _, h, p, d in chosen.values()})
    # The same address reached through two pods' entries (a stale copy): active wins.
    merged: dict[tuple[str, int], bool] = {}
    for h, p, d in rows:
        merged[(h, p)] = merged.get((h, p), True) and d
    return [(h, p, d) for (h, p), d in sorted(merged.items())], problems


def _name(sl: Mapping[str, Any]) -> str:
    return str((sl.get("metadata") or {}).get("name") or "?")


def _port_list(sl: Mapping[str, Any]) -> str:
    ports = sl.get("ports") or []
    said = [f"{p.get('name') or '(unnamed)'}={p.get('port')}" for p in ports]
    return "ports: " + (", ".join(said) or "none")
