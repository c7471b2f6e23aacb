"""`scr-export serve DIR --ray`: the same FastAPI app as a Ray Serve deployment, Ray's HTTP proxy in front.

Each replica builds the app on its own worker (``serve.ingress`` with a builder, evaluated on the replica) and loads
the directory before it reports healthy, so the proxy sends requests only to replicas that can answer. A local Ray
instance by default, an existing cluster with ``--address``; a fraction of a GPU per replica where the cluster has
GPUs (``--num-gpus``, default 1 / replicas).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

APP_NAME = "scr-export"


def build_application(settings: Any, replicas: int, num_gpus: float | None, gpus_in_cluster: float = 0.0):
    """The Ray Serve application: ``replicas`` copies of the app, each with its own engine."""
    from ray import serve

    def build_app():  # runs on each replica
        from scr_export.serve.app import create_app
        from scr_export.serve.engine import Engine

        engine = Engine(settings.engine)
        engine.load()  # before the replica reports healthy
        return create_app(settings, engine)

    gpus = num_gpus if num_gpus is not None else (min(1.0, gpus_in_cluster / replicas) if gpus_in_cluster else 0.0)
    replica = type("SCRExportReplica", (), {"__doc__": "One loaded copy of the converted directory."})
    deployment = serve.deployment(
        serve.ingress(build_app)(replica), name="SCRExport", num_replicas=replicas,
        max_ongoing_requests=settings.engine.max_concurrency + settings.engine.queue,
        ray_actor_options={"num_cpus": 1, "num_gpus": gpus})
    return deployment.bind()


def serve_with_ray(settings: Any, *, replicas: int, address: str | None, host: str, port: int,
                   num_gpus: float | None, log=print, wait: bool = True) -> int:
    import ray
    from ray import serve

    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             **({} if address else {"namespace": APP_NAME}))
    stop = threading.Event()
    if wait:  # before the deployment starts: a SIGTERM while replicas load also shuts down cleanly
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    serve.start(http_options={"host": host, "port": port})
    log(f"Ray Serve: {replicas} replica(s) of {settings.engine.directory} on "
        f"{'cluster ' + address if address else 'a local Ray instance'}; loading (each replica loads the model)")
    serve.run(build_application(settings, replicas, num_gpus, gpus), name=APP_NAME, route_prefix="/")
    log(f"serving on http://{host}:{port} through Ray's HTTP proxy")
    if not wait:
        return 0
    stop.wait()
    log("shutting down Ray Serve")
    if address:  # someone else's cluster: take the application off it, leave the cluster
        serve.delete(APP_NAME)
    ray.shutdown()  # a local instance: stopping Ray stops its proxy and replicas with it
    return 0
