"""The TensorRT path: the SCRNeighbourInject plugin, optimisation profiles, engine building and the engine runner.

Only ``plugin.py``, ``engines.py`` and ``runner.py`` import ``tensorrt``; everything they decide is computed by the
plain-Python modules (``plugin_rules``, ``profiles``, ``build_script``), which are tested on every machine.
"""
