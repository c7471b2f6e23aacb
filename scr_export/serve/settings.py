"""`scr-export serve`'s flags -> the app's settings, with the checks a flag needs (clear errors, exit 2)."""

from __future__ import annotations

from pathlib import Path

from scr_export.errors import SCRExportError

from .engine import EngineSettings


def settings_from_args(args):
    from scr_export.manifest import read_manifest

    from .app import ServeSettings
    from .images import ImagePolicy

    read_manifest(args.dir)  # a clear error for a directory that is not a converted model, before anything starts
    for flag, value, low in (("--max-concurrency", args.max_concurrency, 1), ("--queue", args.queue, 0),
                             ("--max-tokens", args.max_tokens, 1), ("--max-images", args.max_images, 0),
                             ("--port", args.port, 0), ("--replicas", args.replicas, 1)):
        if value < low:
            raise SCRExportError(f"{flag} {value} is below {low}", f"use {flag} >= {low}")
    if args.max_image_mb <= 0:
        raise SCRExportError(f"--max-image-mb {args.max_image_mb} is not positive", "use a size in MB, e.g. 20")
    engine = EngineSettings(directory=Path(args.dir), runtime=args.runtime, device=args.device, threads=args.threads,
                            max_concurrency=args.max_concurrency, queue=args.queue,
                            default_max_tokens=args.max_tokens, max_images=args.max_images,
                            model_name=args.served_model_name)
    images = ImagePolicy(allow_local_files=args.allow_local_files, allow_remote_urls=args.allow_remote_urls,
                         max_bytes=int(args.max_image_mb * 2**20))
    return ServeSettings(engine=engine, images=images, drain_timeout_s=args.drain_timeout)
