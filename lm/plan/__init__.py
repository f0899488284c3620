"""`lm plan`: memory, speed and time of a recipe on a cluster, before renting it.

- devices.yaml / devices.py: the device kinds (peak FLOP/s per dtype, memory, interconnect, sources)
- recipe.py: the recipe parsed as `lm fit` parses it; the model built on the meta device (ModelShape);
  the training setup (Setup: precision, strategy, world size, micro-batch, accumulation, checkpointing)
- estimate.py: memory per device (itemized), communication per step, step time and throughput
- advice.py: fits or not, and the smallest change that makes it fit
- planner.py: make_plan (recipe + cluster -> Plan); report.py: format_plan (the printed text)
- probe.py: MemoryProbe, a callback that measures a real run (resident memory, step times) for the check
"""

from lm.plan.planner import Plan, make_plan
from lm.plan.report import format_plan

__all__ = ["Plan", "make_plan", "format_plan"]
