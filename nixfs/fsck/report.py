"""What ``nixfs fsck`` found and did: findings, repairs, the summary and the exit code.

Checks hand every finding to a ``Report`` together with the repair that fixes
it; the report applies the repair at once (with ``--repair``), while the check
still holds the directory descriptors the repair needs.  Exit codes:

- 0: no damage (harmless leftovers may be listed, or tidied with ``--repair``);
- 1: damage was found and all of it repaired;
- 4: damage is left (not repaired, or not repairable here);
- 2: usage errors (``fsck`` refuses an upper in use by a mount).
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

CLEAN, REPAIRED, DAMAGED, USAGE = 0, 1, 4, 2

# Severity of a finding.
DAMAGE = "damage"      # wrong: the exit code is 4 unless repaired
HARMLESS = "harmless"  # redundant leftovers; --repair tidies them, the exit code ignores them
NOTE = "note"          # worth knowing, nothing to repair (e.g. unregistered store paths)


@dataclass
class Finding:
    kind: str
    path: str        # relative to the upper (or a store path)
    detail: str
    severity: str = DAMAGE
    repairable: bool = False
    repaired: bool = False
    repair_error: str = ""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("kind", "path", "detail", "severity",
                                                "repairable", "repaired", "repair_error")}


@dataclass
class Report:
    repair: bool = False
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    progress: Callable[[str, int], None] | None = None  # (phase, count) on long runs

    def add(self, kind: str, path, detail: str, *, severity: str = DAMAGE,
            fix: Callable[[], None] | None = None) -> Finding:
        """Record a finding; with --repair, apply *fix* now (errors are recorded, not raised)."""
        if isinstance(path, bytes):
            path = path.decode(errors="backslashreplace")
        f = Finding(kind, path, detail, severity, repairable=fix is not None)
        if self.repair and fix is not None and severity != NOTE:
            try:
                fix()
                f.repaired = True
            except Exception as e:  # noqa: BLE001 - a failed repair is reported, not fatal
                f.repair_error = f"{type(e).__name__}: {e}"
                log.warning("repairing %s %s failed: %s", kind, path, e)
        self.findings.append(f)
        return f

    def count(self, phase: str, n: int = 1) -> None:
        total = self.checked.get(phase, 0) + n
        self.checked[phase] = total
        if self.progress is not None:
            self.progress(phase, total)

    @property
    def exit_code(self) -> int:
        damage = [f for f in self.findings if f.severity == DAMAGE]
        if any(not f.repaired for f in damage):
            return DAMAGED
        return REPAIRED if damage else CLEAN

    def as_dict(self) -> dict:
        return {"exit_code": self.exit_code, "repair": self.repair,
                "seconds": round(time.monotonic() - self.started, 2),
                "checked": dict(self.checked),
                "findings": [f.as_dict() for f in self.findings]}

    def render(self) -> str:
        lines = []
        for f in self.findings:
            state = ("repaired" if f.repaired else
                     f"repair failed: {f.repair_error}" if f.repair_error else
                     "" if f.severity == NOTE else
                     "repairable with --repair" if f.repairable else "not repairable")
            label = {DAMAGE: "DAMAGE", HARMLESS: "redundant", NOTE: "note"}[f.severity]
            lines.append(f"{label:9} {f.kind:22} {f.path}: {f.detail}"
                         + (f" [{state}]" if state else ""))
        by = {s: sum(1 for f in self.findings if f.severity == s)
              for s in (DAMAGE, HARMLESS, NOTE)}
        repaired = sum(1 for f in self.findings if f.repaired)
        checked = ", ".join(f"{n} {phase}" for phase, n in self.checked.items()) or "nothing"
        verdict = {CLEAN: "clean", REPAIRED: "damage found and repaired",
                   DAMAGED: "damage left"}[self.exit_code]
        lines.append(f"nixfs fsck: {verdict} ({by[DAMAGE]} damaged, {by[HARMLESS]} redundant, "
                     f"{by[NOTE]} notes, {repaired} repaired; checked {checked} in "
                     f"{time.monotonic() - self.started:.1f} s)")
        return "\n".join(lines)
