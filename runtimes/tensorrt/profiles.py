"""TensorRT optimisation profiles for a converted directory, sized from the model and the user's limits.

Each graph input's dimensions are read from its ONNX file; named (dynamic) dimensions get a (min, opt, max) range:

  batch     1 .. max_batch                       prompts per call
  seq       1 .. max_seq        (opt: the sample prompt with one image)
  past      0 for prefill / diagnostic; 1 .. max_seq-1 for decode
  total     past + seq
  images    image count (LLaVA, Chameleon) or tiles (InternVL) in the vision graph; images per prompt elsewhere
  patches   Qwen2-VL vision patches of one image (4 per image token)

The decoder gets two profiles, prefill (past = 0) and decode (seq = 1), so each is tuned for its own shapes;
trtexec builds get one merged profile (see build_script.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from scr_export.errors import SCRExportError

Range = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the engines must accept. None: derived from the model (see ``resolve``)."""

    max_batch: int = 1
    max_images: int = 1
    max_image_tokens: int | None = None  # per image
    max_seq: int | None = None           # prompt + generated tokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Facts about the model the profiles need (from the family and one sample prompt)."""

    family: str
    image_tokens: int          # per image, at the processor's default size
    max_image_tokens: int      # per image, the most the processor can produce
    sample_seq: int            # tokens of the sample prompt with one image
    text_tokens: int           # tokens of that prompt that are not image tokens
    max_positions: int
    tiles_per_image: int = 1   # InternVL: tiles + thumbnail at most; others 1
    sample_tiles: int = 1
    patches_per_token: int = 1  # Qwen2-VL: 4 (2×2 merge)


def model_shape(family: Any) -> ModelShape:
    """Measure the model's image-token geometry with the family's own processor on the sample image."""
    from scr_export.sample import sample_image
    from scr_export.processing import encode

    inputs = encode(family, [[sample_image()]], ["Describe the picture."])
    n_img = sum(s.size for s in inputs.layouts[0])
    seq = int(inputs.shape[1])
    tc = family.text_config
    max_pos = int(getattr(tc, "max_position_embeddings", 4096) or 4096)
    name = family.name
    if name == "qwen2_vl":
        ip = family.image_processor
        max_pixels = getattr(ip, "max_pixels", None) or (ip.size or {}).get("longest_edge") or 12845056
        patch, merge = ip.patch_size, ip.merge_size
        most = int(max_pixels // (patch * patch * merge * merge))
        return ModelShape(name, n_img, most, seq, seq - n_img, max_pos, patches_per_token=merge * merge)
    if name == "internvl":
        tiles = int(inputs.tensors["pixel_values"].shape[0])
        per_tile = n_img // tiles
        max_tiles = int(getattr(family.image_processor, "max_patches", 12) or 12) + 1  # + thumbnail
        return ModelShape(name, n_img, per_tile * max_tiles, seq, seq - n_img, max_pos,
                          tiles_per_image=max_tiles, sample_tiles=tiles)
    return ModelShape(name, n_img, n_img, seq, seq - n_img, max_pos)


def resolve(limits: Limits, shape: ModelShape) -> Limits:
    """Fill the limits the user left open and check the rest against the model."""
    for field in ("max_batch", "max_images"):
        if getattr(limits, field) < 1:
            raise SCRExportError(f"--{field.replace('_', '-')} {getattr(limits, field)} is not positive", "use >= 1")
    img = limits.max_image_tokens or shape.max_image_tokens
    if shape.family == "qwen2_vl" and limits.max_image_tokens is None:
        img = min(img, 1280)  # a 1024×1024 image; the processor's own ceiling (16k tokens) is rarely wanted on edge
    if img < shape.image_tokens and shape.family != "qwen2_vl":
        raise SCRExportError(f"--max-image-tokens {img} is below the {shape.image_tokens} tokens every "
                             f"{shape.family} image takes", f"use at least {shape.image_tokens}")
    seq = limits.max_seq or min(shape.max_positions, limits.max_images * img + max(512, shape.text_tokens + 256))
    if seq > shape.max_positions:
        raise SCRExportError(f"--max-seq {seq} exceeds the model's {shape.max_positions} positions",
                             f"use --max-seq <= {shape.max_positions}")
    need = limits.max_images * min(img, shape.image_tokens) + shape.text_tokens + 1
    if seq < need:
        raise SCRExportError(f"--max-seq {seq} cannot hold {limits.max_images} image(s) and the prompt "
                             f"({need} tokens)", f"use --max-seq >= {need}")
    return dataclasses.replace(limits, max_image_tokens=img, max_seq=seq)


def _dims(onnx_path: Path) -> dict[str, list]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def _fill(dims: dict[str, list], ranges: dict[str, Range], graph: str) -> dict[str, dict[str, list[int]]]:
    out: dict[str, dict[str, list[int]]] = {}
    for name, ds in dims.items():
        if all(isinstance(d, int) for d in ds):
            continue  # static input: no profile entry needed
        shapes: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        for d in ds:
            r = (d, d, d) if isinstance(d, int) else ranges.get(d)
            if r is None:
                raise SCRExportError(f"{graph}: input {name} has a dynamic dimension {d!r} that scr-export does not "
                                     "size", "convert again with this scr-export version")
            for key, v in zip(("min", "opt", "max"), r):
                shapes[key].append(int(v))
        out[name] = shapes
    return out


def graph_profiles(directory: Path, manifest: dict, limits: Limits, shape: ModelShape) -> dict[str, list[dict]]:
    """``{graph: [profile, ...]}``, a profile mapping each dynamic input to {"min", "opt", "max"} shapes."""
    lim = resolve(limits, shape)
    b, seq = lim.max_batch, lim.max_seq
    opt_seq = min(shape.sample_seq, seq)
    batch: Range = (1, 1, b)
    prompt_images: Range = (1, 1, lim.max_images)
    prefill = {"batch": batch, "seq": (1, opt_seq, seq), "past": (0, 0, 0), "total": (1, opt_seq, seq),
               "images": prompt_images}
    decode = {"batch": batch, "seq": (1, 1, 1), "past": (1, opt_seq, seq - 1), "total": (2, opt_seq + 1, seq),
              "images": prompt_images}
    if shape.family == "qwen2_vl":
        per = shape.patches_per_token
        vision = {"patches": (4, shape.image_tokens * per, lim.max_image_tokens * per)}
    elif shape.family == "internvl":
        vision = {"images": (1, shape.sample_tiles, lim.max_images * b * shape.tiles_per_image)}
    else:
        vision = {"images": (1, 1, lim.max_images * b)}
    graphs = manifest["graphs"]
    files = {g: Path(directory) / info["file"] for g, info in graphs.items()}
    profiles = {
        "vision": [_fill(_dims(files["vision"]), vision, "vision")],
        "embed_tokens": [_fill(_dims(files["embed_tokens"]), {"batch": batch, "seq": (1, opt_seq, seq)},
                               "embed_tokens")],
    }
    if "diagnostic" in files:
        profiles["diagnostic"] = [_fill(_dims(files["diagnostic"]), prefill, "diagnostic")]
    if "decoder" in files:
        dims = _dims(files["decoder"])
        profiles["decoder"] = [_fill(dims, prefill, "decoder"), _fill(dims, decode, "decoder")]
    return profiles


def merged(profiles: list[dict]) -> dict:
    """One profile covering several (for tools that take one): elementwise min of mins, max of maxes, first opt."""
    out = json.loads(json.dumps(profiles[0]))
    for p in profiles[1:]:
        for name, s in p.items():
            out[name]["min"] = [min(a, c) for a, c in zip(out[name]["min"], s["min"])]
            out[name]["max"] = [max(a, c) for a, c in zip(out[name]["max"], s["max"])]
    return out


def covers(profile: dict, feed_shapes: dict[str, tuple]) -> bool:
    """Whether every fed shape lies within the profile's min..max."""
    for name, s in profile.items():
        if name not in feed_shapes:
            continue
        shp = feed_shapes[name]
        if len(shp) != len(s["min"]) or any(not lo <= v <= hi for v, lo, hi in zip(shp, s["min"], s["max"])):
            return False
    return True
