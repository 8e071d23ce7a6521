"""Pipeline parallel: balanced stages, one runtime for every schedule, a simulator.

- ``stages.py``: ``apply_pipeline`` keeps this rank's stages of a described model and returns the
  runtime; the tied-weight helpers. ``partition.py`` balances the stages.
- ``runtime.py`` executes the schedules of ``plait/schedules.py`` (pure action lists and what each
  action waits for and sends; kept below the configuration, which validates against its registry)
  with point-to-point transfers (``transfers.py``: their order and release); ``zero_bubble.py``
  splits backward; ``simulate.py`` and ``report.py`` time and draw the same action lists.
"""
