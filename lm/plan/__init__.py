"""`lm plan`: memory, speed and time of a recipe on a cluster, before renting it.

- devices.yaml / devices.py: the device kinds (peak FLOP/s per dtype, memory, interconnect, sources)
- recipe.py: the recipe parsed as `lm fit` parses it; the model built on the meta device (ModelShape);
  the training setup (Setup: precision, strategy, world size, micro-batch, accumulation, checkpointing,
  the chunked loss)
- estimate.py: memory per device (itemized), communication per step, step time and throughput
- advice.py: fits or not, and the smallest change that makes it fit
- planner.py: make_plan (recipe + cluster -> Plan); printout.py: format_plan (the printed text)
- speed_probe.py: on `cpu`, times the recipe's own training step here (Lightning's loop, a few steps on
  random tokens): the MFU the plan uses unless `--mfu` is given
- probe.py: MemoryProbe, a callback that measures a real run (resident memory, step times) for the check;
  measure_step_memory, the peak memory of one training step in a fresh process; logged_tokens_per_second, the tokens/s an `lm fit` run reports (median over its log intervals)
"""

from lm.plan.planner import Plan, make_plan
from lm.plan.printout import format_plan

__all__ = ["Plan", "make_plan", "format_plan"]
