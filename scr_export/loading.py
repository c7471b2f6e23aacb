"""Resolve MODEL (a preset name or a local checkpoint directory) to a family adapter with model and processor."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .families import FAMILIES, QWEN_VL_MODEL_TYPES, VLMFamily, family_for_model_type, refuse_qwen_vl
from .presets import PRESETS, ensure_preset


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a transformers checkpoint directory",
                             "pass a directory written by save_pretrained, or a preset: " + ", ".join(PRESETS))
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{cfg_file} is not valid JSON ({exc})", "restore the checkpoint's config.json") from None


def detect_family(path: Path) -> type[VLMFamily]:
    """The family of a local checkpoint, from its config.json ``model_type``."""
    cfg = read_checkpoint_config(path)
    model_type = cfg.get("model_type")
    if model_type in QWEN_VL_MODEL_TYPES and "visual" in cfg:
        refuse_qwen_vl(str(path))
    fam = family_for_model_type(model_type)
    if fam is not None:
        return fam
    supported = ", ".join(f"{f.display_name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    if "vision_config" in cfg or "vq_config" in cfg or "visual" in cfg:
        raise ModelLoadError(f"{path} is a vision-language model of type {model_type!r}, which scr-export does not support",
                             f"supported families: {supported}")
    raise ModelLoadError(f"{path} (model_type {model_type!r}) is not a vision-language model",
                         f"SCR needs image tokens; use a VLM checkpoint of a supported family: {supported}")


def resolve_model_path(spec: str) -> tuple[Path, str | None]:
    """(checkpoint directory, preset name or None)."""
    if spec in PRESETS:
        return ensure_preset(spec), spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{spec!r} is neither a preset nor an existing directory",
                             f"presets: {', '.join(PRESETS)}; or pass a local checkpoint directory "
                             "(nothing is downloaded)")
    if not path.is_dir():
        raise ModelLoadError(f"{spec} is a file, not a checkpoint directory",
                             "pass the directory that holds config.json and the weights")
    return path, None


DTYPES = ("float32", "float16", "bfloat16")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was asked for but torch sees no CUDA device",
                             "use --device cpu, or install a CUDA build of torch on a GPU machine")
    return device


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs backend fallbacks (PIL image processors without torchvision) as warnings: not ours to show."""
    import transformers

    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        log.setLevel(level)


def _load_processing(path: Path, fix: str) -> tuple[Any, Any, dict[str, Any]]:
    """Tokenizer, image processor and processor_config.json (token-expansion settings) of a directory."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        image_processor = transformers.AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer / image processor from {path}: {exc}", fix) from None
    pc_file = path / "processor_config.json"
    processor_config = json.loads(pc_file.read_text()) if pc_file.is_file() else {}
    return tokenizer, image_processor, processor_config


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters are created on the meta device (shapes only, no bytes); buffers (rotary tables, vocabulary maps)
    are computed from the config as usual. Each parameter exists on the CPU only for the instant between its
    creation and its move (an uninitialised allocation the kernel never backs)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_vlm(spec: str, *, dtype: str = "float32", device: str = "cpu", weights: bool = True) -> VLMFamily:
    """Load MODEL with eager attention (the diagnostic pass needs attention probabilities).

    ``dtype`` is one of float32 (the parity reference), float16, bfloat16; ``device`` is cpu, cuda[:N] or auto.
    ``weights=False`` builds the model's structure only (parameters on the meta device, no weight read): what the
    streaming exporters trace; ``fam.weights`` (``onnx_export.weights.WeightSource``) then reads each weight from the
    checkpoint's safetensors when it is written, after checking every shape against the config.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
    device = resolve_device(device) if weights else "cpu"
    import torch
    import transformers

    path, preset = resolve_model_path(spec)
    fam_cls = detect_family(path)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    with _quiet_transformers():
        model_cls = getattr(transformers, fam_cls.model_class)
        try:
            if weights:
                model = model_cls.from_pretrained(path, attn_implementation="eager", dtype=torch_dtype)
            else:
                from .checkpoint import Checkpoint

                checkpoint = Checkpoint.open(path)  # a missing shard or index entry fails here, before any work
                config = transformers.AutoConfig.from_pretrained(path)
                with _parameters_on_meta():
                    model = model_cls._from_config(config, attn_implementation="eager", dtype=torch_dtype)
                model.tie_weights()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the {fam_cls.display_name} weights from {path}: {exc}",
                                 "check that the directory holds the model's weights (safetensors) and config") from None
        tokenizer, image_processor, processor_config = _load_processing(
            path, "the checkpoint directory needs its tokenizer and preprocessor_config.json")
    (model.to(device) if weights else model).eval()
    fam = fam_cls(model, tokenizer, image_processor, processor_config)
    fam.source, fam.path, fam.preset = spec, path, preset
    if not weights:
        from .onnx_export.weights import WeightSource

        fam.weights = WeightSource(model, checkpoint)  # checks every parameter's shape against the checkpoint
    return fam
