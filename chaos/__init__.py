"""The meshpush chaos suite: faults under load on a real local cluster, then an exact check.

Layers, bottom up: :mod:`chaos.events` (the recorded event log, pure data) →
:mod:`chaos.checker` (invariants over a log, pure) and :mod:`chaos.report` (table and JSON,
pure) → :mod:`chaos.faults` (one function per fault, scenarios, the seeded schedule) →
:mod:`chaos.harness` (cluster, clients, publishers, watchers, settle) → :mod:`chaos.run`
(``meshpush chaos``). docs/chaos.md explains the scenarios, the invariants and the report.
"""

from .checker import Violation as Violation
from .checker import check as check
from .events import EventLog as EventLog
from .faults import FAULTS as FAULTS
from .faults import SCENARIOS as SCENARIOS
from .faults import make_schedule as make_schedule

__all__ = ["FAULTS", "SCENARIOS", "EventLog", "Violation", "check", "make_schedule"]
