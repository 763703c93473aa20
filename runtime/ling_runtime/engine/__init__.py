"""The engine on rank 0: requests checked once (`Engine.prepare`), continuous batching, cache
accounting, sampling and MTP acceptance; each step goes to the group's executor as a `StepPlan`."""
