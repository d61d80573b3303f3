"""Where a publish's time goes: wall and CPU seconds of each phase, for ``--json``.

A publish's cost is what its users schedule around (a post-build hook, a timer), and on
a shared machine its wall time follows the load, its CPU time much less: both are kept
per phase (CPU of this process and of its finished workers), so a slow run says which
part was slow and whether it waited or worked.
"""

import resource
import time


class Clock:
    def __init__(self):
        self.phases: dict[str, list[float]] = {}
        self._wall, self._cpu = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        workers = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.monotonic(), (own.ru_utime + own.ru_stime
                                  + workers.ru_utime + workers.ru_stime)

    def lap(self, phase: str) -> None:
        """The time since the last lap (or the start) was *phase*'s."""
        wall, cpu = self._now()
        self.phases[phase] = [round(wall - self._wall, 3), round(cpu - self._cpu, 3)]
        self._wall, self._cpu = wall, cpu
