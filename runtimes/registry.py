"""One runtime interface, and the registry that opens a converted directory with the runtime its manifest names.

`validate` and the CLI reach runners only through ``open_runtime`` and the
``VLMRuntime`` protocol; the validator never imports a runner module, and runners never call the validator.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from scr_export.config import SCRConfig
from scr_export.errors import SCRExportError
from scr_export.manifest import pick_runtime, read_manifest

# manifest runtime -> (module, class); imported only when a directory asks for it
RUNTIMES = {
    "onnx": ("runtimes.onnxruntime_runner", "OrtVLM"),
    "tensorrt": ("runtimes.tensorrt.runner", "TrtVLM"),
    "llamacpp": ("runtimes.llamacpp.runner", "LlamaCppVLM"),
}


@runtime_checkable
class VLMRuntime(Protocol):
    """What every runner offers: a converted directory, opened."""

    manifest: dict
    config: SCRConfig   # the SCR configuration baked into the directory (layer ranges) with its run-time defaults
    provider: str       # what runs it, in words (execution provider, SCR kernel path, attention)

    def encode(self, images: Sequence[Sequence[Any]], prompts: Sequence[str], text_only: bool = False) -> Any:
        """Images + prompts -> the model's inputs (token ids, pixels, image-token layouts); ``text_only`` allows
        prompts without images (the server's text chats; SCR then has nothing to edit)."""

    def generate(self, inputs: Any, *, scr: bool = True, max_new_tokens: int = 32, plan: Any = None,
                 config: SCRConfig | None = None, forced_tokens: Sequence[Sequence[int]] | None = None,
                 keep_prefill_logits: bool = False, stop_at_eos: bool = True, sampling: Any = None,
                 on_token: Any = None) -> Any:
        """Diagnostic pass -> plan -> prefill with SCR -> decoding (``scr=False``: the identity plan), greedy unless
        ``sampling`` (``runtimes.sampling.Sampling``) says otherwise; ``on_token(row, token)`` is called after each
        step and stops the decoding by returning False. The result carries ``timings`` (seconds: diagnostic,
        prefill = to the first token, total) and ``cancelled``. A ``config`` whose baked-in parts (layer ranges)
        differ from the directory's is refused, not ignored."""

    def float_gate(self) -> str:
        """The parity gate (``scr_export.parity.GATES``) of this directory against the float32 PyTorch model."""

    def engine_reference(self, family: Any, inputs: Any, in_place: bool = False) -> tuple[str, Any, str] | None:
        """(name, reference with ``generate``, gate) that isolates this engine's own error, or None. ``in_place``:
        the float ``family`` is not needed afterwards, so the reference may take over its weights."""

    def release(self) -> None:
        """Let go of the model's memory (sessions, cached references) until the next run needs it again, so that
        validation can run the PyTorch reference in between with the deployed model out of memory."""


def check_context(length: int, new_tokens: int, limit: int | None, what: str) -> None:
    """Refuse a prompt (image tokens included) plus the tokens to generate that exceed ``limit`` positions, before
    anything is allocated. ``what`` names the limit (the model's positions, the engines' max_seq, n_ctx)."""
    if limit and length + new_tokens > limit:
        raise SCRExportError(f"the prompt is {length} tokens (image tokens included) and {new_tokens} more are asked "
                             f"for: {length + new_tokens} exceed {what} ({limit})",
                             "shorten the prompt, use fewer or smaller images, or ask for fewer new tokens")


def open_runtime(directory: str | Path, runtime: str = "auto", *, device: str = "auto", attention: str = "auto",
                 threads: int | None = None) -> VLMRuntime:
    """Open ``directory`` with ``runtime`` ("auto": as the manifest says). ``device`` and ``attention`` apply to
    ONNX Runtime; asking for them elsewhere is an error, not a silent no-op."""
    manifest = read_manifest(directory)
    kind = pick_runtime(manifest, runtime)
    if kind != "onnx":
        if attention != "auto":
            raise SCRExportError(f"--attention {attention} applies to ONNX Runtime, not {kind}",
                                 "drop --attention, or run with --runtime onnx")
        if kind == "llamacpp" and device == "cuda":
            raise SCRExportError("--device cuda applies to ONNX Runtime; llama.cpp's runner here runs on the CPU",
                                 "drop --device, or convert with --to onnx")
    module, name = RUNTIMES[kind]
    cls = getattr(importlib.import_module(module), name)
    if kind == "onnx":
        return cls(directory, device=device, threads=threads, attention=attention)
    return cls(directory, threads=threads)


__all__ = ["RUNTIMES", "VLMRuntime", "check_context", "open_runtime"]
