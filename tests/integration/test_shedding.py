"""Load shedding end to end: ``portico run`` of a slow app under a burst larger than one
instance can take. Admitted requests stay fast while the autoscaler adds instances (the
excess is held briefly, then shed with 503 + Retry-After), and shedding stops by itself
once the new instances are ready."""

from __future__ import annotations

import statistics

from tests.integration.test_orchestration import FleetFactory, fleet  # noqa: F401 (fixture)
from tests.support.backends import FLASK_APP_DIR
from tests.support.paced import paced

# One gunicorn sync worker per instance answers one request at a time: /sleep/0.2 makes an
# instance good for 5 requests/s. The burst is 8/s: two instances are enough.
SLEEP = 0.2
RATE = 12
SECONDS = 14.0
# Admitted requests wait at most the hold (1 s) plus their own time and one in the app's
# queue (shed = 2 per instance): well under this, where an unshed queue grows past it.
OBJECTIVE = 2.0


def test_shedding_while_instances_are_added_then_not(fleet: FleetFactory) -> None:  # noqa: F811
    f = fleet(
        run=[
            "--wsgi", "app:app", "--cwd", str(FLASK_APP_DIR),
            "--min", "1", "--max", "3", "--metric", "in_flight", "--target", "1",
            "--shed", "3",
        ]
    )  # fmt: skip
    f.wait_ready(1)
    result = paced(f.port, RATE, SECONDS, connections=24, target=f"/sleep/{SLEEP}")
    assert not result.failures, result.failures[:5]
    f.wait_log(r"scale default 1 -> (\d+)")
    admitted = sorted(lat for _, status, lat in result.outcomes if status == 200)
    shed = [sent for sent, status, _ in result.outcomes if status == 503]
    assert set(result.statuses) <= {200, 503}, result.statuses
    assert shed, "the burst was never shed: the test shows nothing"
    p99 = admitted[int(0.99 * (len(admitted) - 1))]
    assert p99 < OBJECTIVE, (p99, statistics.mean(admitted), result.statuses)
    # Shedding ended on its own: the last third of the run was all admitted.
    tail_from = result.first_at + SECONDS * 2 / 3
    assert not [t for t in shed if t >= tail_from], (
        [round(t - result.first_at, 2) for t in shed],
        f.output()[-2000:],
    )
