"""Pipeline parallel: balanced stages (partition), schedules as data, one runtime, a simulator.

- ``stages.py``: ``apply_pipeline`` keeps this rank's stages of a described model and returns the
  runtime; the tied-weight helpers.
- ``schedules.py``: pure action lists and what each action waits for and sends (no torch).
- ``runtime.py`` executes them with point-to-point transfers (``transfers.py``: order and release),
  ``zero_bubble.py`` splits backward, ``simulate.py`` and ``report.py`` time and draw them.

This package's face imports nothing, so the schedule registry can be read without torch.distributed.
"""
