"""Certificate expiry as Prometheus gauges, read at scrape time (``GET /metrics``).

One sample per certificate a TLS listener serves: the configured files (read from disk at
each scrape, so a replaced file shows its new date) and the automatic ones (ACME or the
internal CA, from ``control.acme.CertManager``'s status). The value is the end of validity as
a Unix timestamp, the Prometheus convention for dates: an alert is then
``portico_tls_certificate_expiry_timestamp_seconds - time() < 14 * 86400``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from portico.admin.metrics import Family
from portico.config.model import Config
from portico.policy.certificates import load_chain, names_of

EXPIRY = "portico_tls_certificate_expiry_timestamp_seconds"


def tls_families(
    config: Config, auto_status: Callable[[], dict[str, dict[str, Any]]] | None
) -> list[Family]:
    """The expiry family, or nothing when no listener has TLS."""
    if not config.tls:
        return []
    family = Family(EXPIRY, "gauge", "End of validity of a served certificate (Unix time).")
    for i, listener in enumerate(config.tls):
        for j, cert in enumerate(listener.certs):
            try:
                with open(cert.cert, "rb") as f:
                    leaf = load_chain(f.read())[0]
            except (OSError, ValueError):
                continue  # unreadable now: the reload check reports it; no sample is honest
            labels = [("listener", f"tls[{i}]"), ("source", f"certs[{j}]"),
                      ("names", ",".join(names_of(leaf)))]  # fmt: skip
            family.samples.append((labels, leaf.not_valid_after_utc.timestamp()))
    for key, status in (auto_status() if auto_status is not None else {}).items():
        not_after = status.get("not_after")
        if not not_after:
            continue  # not issued yet
        labels = [("listener", key), ("source", "auto"), ("names", ",".join(status["names"]))]
        family.samples.append((labels, dt.datetime.fromisoformat(not_after).timestamp()))
    return [family]
