"""The applier's long-lived objects kept out of the cyclic garbage collector's full collections.

After a bootstrap the applier holds the node's whole plan and desired state: at 10,000 Services x 10
endpoints, millions of objects that live until the next bootstrap. CPython's full (oldest-generation)
collection walks every tracked object; it runs whenever the objects that survived younger collections
reach a quarter of the old ones, i.e. now and then during ordinary delta handling, and each one then
costs time proportional to the whole plan: 28-40 ms on the host at 2,000-10,000 Services, 2 ms at 100
(measured with ``tests/bench/envelope_guest.py``'s plan; under the guest's TCG, seconds). That is the tail
of "one endpoint change" at scale. ``gc.freeze()`` moves every object alive now into a permanent
generation that collections do not walk (the CPython documentation's advice for long-lived state,
``gc.freeze``; the planner does the same with its state, ``services/planner/core.py`` ``tune_gc``);
reference counting still frees them as usual when the plan drops them. Only reference
cycles among frozen objects would stay uncollected, so :func:`settle` first unfreezes what an earlier
bootstrap froze and collects once (one full pause per bootstrap, which reads and writes far more anyway).
"""

from __future__ import annotations

import gc


def hold() -> None:
    """Freeze what is alive now, without collecting: called once the bootstrap holds the plan it read,
    so the full collections that its tens of thousands of new objects (resolve, diff: 140,000 kernel
    operations at 10,000 x 10) set off do not walk the plan each time (about four at that size; resolve +
    diff on the loaded host, 4 runs each: 0.94-1.12 s without, 0.72-0.83 s with). :func:`settle` at its
    end collects what died meanwhile."""
    gc.freeze()


def settle() -> int:
    """Collect once, then freeze every object alive (see the module docstring); the number frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
