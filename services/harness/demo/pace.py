"""How fast this machine runs the demo's processes right now, so its waits fit a loaded machine or an
emulated guest instead of failing on one ("the auth service did not start within 30s" on a busy host).

The guest sets ``KIPVS_GUEST_TIME_SCALE`` from its accelerator (``guest.vm.TIME_SCALE``: 3 under TCG);
:func:`calibrate` measures a start of Python importing kipvs's bus (what every service does first), and
when that is slower than on an idle machine (``REFERENCE_START_S``) stretches the scale by the ratio, for
this process and the services it starts (the environment). Every wait of the demo goes through
``guest.vm.time_scale()``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from services.harness.guest.vm import time_scale

REFERENCE_START_S = 0.6  # seconds a Python start importing shared.messaging.bus takes on an idle 2-core machine
MAX_STRETCH = 10.0  # the most a measurement may stretch the scale: a one-off stall is not the machine's pace


def calibrate() -> float:
    """Measure, set ``KIPVS_GUEST_TIME_SCALE`` (never below what it was) and return the scale in force."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import shared.messaging.bus"], check=False, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stretch = min(MAX_STRETCH, max(1.0, (time.monotonic() - started) / REFERENCE_START_S))
    scale = time_scale() * stretch
    os.environ["KIPVS_GUEST_TIME_SCALE"] = f"{scale:.2f}"
    return time_scale()
