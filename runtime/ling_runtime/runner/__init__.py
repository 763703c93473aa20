"""One tensor-parallel rank: its model and cache (`build.py`), executing the engine's `StepPlan`s
(`plan.py`, `model_runner.py`), with decode and MTP steps replayed as CUDA graphs on GPU."""
