"""Run REDbot (HTTP lint) on one URL and print its notes as JSON lines; run as a script.

``python -m tests.support.redbot_check URL [Header: value ...]`` prints one JSON object per
note and subnote: level (good, info, warning, bad), category, summary and the note's class
name. Run in its own process because REDbot drives its own event loop (thor) globally.
"""

from __future__ import annotations

import json
import sys
from configparser import ConfigParser
from typing import Any


def main(argv: list[str]) -> int:
    import thor
    from redbot.resource import HttpResource

    url, *raw_headers = argv
    headers = [tuple(h.split(": ", 1)) for h in raw_headers]
    parser = ConfigParser()
    parser.read_dict({"redbot": {"enable_local_access": "True"}})
    resource = HttpResource(parser["redbot"])
    resource.set_request(url, headers=headers)

    @thor.events.on(resource)
    def check_done() -> None:
        thor.stop()

    resource.check()
    thor.run()
    out: list[dict[str, Any]] = []
    if resource.fetch_error is not None:
        print(json.dumps({"level": "bad", "category": "fetch", "summary": str(resource.fetch_error),
                          "name": "fetch_error"}))
        return 1

    def emit(note: Any) -> None:
        out.append(
            {
                "level": note.level.value,
                "category": note.category.value,
                "summary": note.summary,
                "name": type(note).__name__,
            }
        )
        for sub in getattr(note, "subnotes", []):
            emit(sub)

    for note in resource.response.notes:
        emit(note)
    for item in out:
        print(json.dumps(item))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
