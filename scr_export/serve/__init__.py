"""`scr-export serve`: converted directories behind an OpenAI-compatible HTTP API, SCR per request.

protocol.py (requests, validation, errors) · images.py (image_url -> image, limits) · engine.py (runtimes, queue,
streaming, cancellation) · metrics.py (Prometheus) · app.py (FastAPI) · ray_app.py (the same app on Ray Serve).
Runtimes are reached only through ``runtimes.registry``, as the CLI and the validator reach them.
"""
