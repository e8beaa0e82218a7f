"""Group commit units for the store tests: an event row, the table every store test writes."""

from __future__ import annotations

import datetime as dt

from strongroom.events.tables import events
from strongroom.store.group import Write

_INSERT = events.insert()


def event_write(merchant_id: str, event_id: str, type_: str = "test.grouped") -> Write:
    return Write(
        _INSERT,
        {
            "merchant_id": merchant_id,
            "id": event_id,
            "livemode": False,
            "created": dt.datetime.now(dt.UTC),
            "type": type_,
            "object_id": "obj_1",
            "data": {"object": {"id": "obj_1"}},
        },
    )
