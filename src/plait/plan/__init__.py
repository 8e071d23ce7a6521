"""The planner: predict memory and step time of a layout from the model and the hardware
(``cost.py``, pure functions), describe the hardware (``hardware.py``: presets, ``plait probe``),
and choose a layout (``search.py``). Nothing here starts a process or allocates a model."""
