"""Benchmark (not a test): what a user's photo costs at the processor's own pixel limits (issue 20, item 7).

    python benchmarks/photo_memory.py [--work DIR] [--image PHOTO] [--size 1280x960] [--skip-validate]
    python benchmarks/photo_memory.py --smoke      # a few-MB Qwen2-VL, a small photo: what the test suite runs

Builds, locally, Qwen2-VL-2B's real widths cut in depth (vision: embed 1280, 16 heads, MLP ratio 4, merge 2, 3
layers; decoder: hidden 1536, 12 heads, 2 KV heads, MLP 8960, vocabulary 151936, tied embeddings, 2 layers; bf16
safetensors) with the processor's own pixel limits (min 3136, max 12845056 pixels), converts it to fp32 ONNX
(without the parity step) and measures, each in a fresh process (peak RSS from getrusage, wall time):
`run` (8 tokens) and `validate` (8 steps: the PyTorch reference and ONNX Runtime one after the other) on a
photo-sized image (default a synthetic 1280x960 photo: about 1560 image tokens, 6250 vision patches). Prints each as
peak RSS / the checkpoint's bytes, beside the guard's estimate for that image.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from convert_scale import _MEASURE, random_model  # noqa: E402  (shared: one way to measure, one to build)

REAL = {"vision": dict(embed_dim=1280, num_heads=16, mlp_ratio=4, depth=3, hidden_size=1536),
        "text": dict(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
                     vocab_size=151936, num_hidden_layers=2, mrope=[16, 24, 24])}
SMOKE = {"vision": dict(embed_dim=64, num_heads=4, mlp_ratio=2, depth=2, hidden_size=128),
         "text": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                      vocab_size=1024, num_hidden_layers=2, mrope=[4, 6, 6])}


def build_checkpoint(out: Path, smoke: bool = False) -> Path:
    import torch
    import transformers

    from scr_export.presets import ensure_preset

    if (out / "config.json").is_file():
        return out
    widths = SMOKE if smoke else REAL
    preset = ensure_preset("tiny-qwen2-vl")
    base = json.loads((preset / "config.json").read_text())
    t = dict(widths["text"])
    mrope = t.pop("mrope")
    text = dict(base["text_config"], **t, rope_parameters={"mrope_section": mrope, "rope_theta": 1000000.0,
                                                           "rope_type": "default"})
    text.pop("layer_types", None)
    vision = dict(base["vision_config"], **widths["vision"])
    cfg = dict(base, text_config=text, vision_config=vision, tie_word_embeddings=True)
    cfg.pop("scr_export", None)
    config = transformers.Qwen2VLConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",
                                                                                        "transformers_version")})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model = random_model(transformers.Qwen2VLForConditionalGeneration, config, torch.bfloat16)
    model.tie_weights()
    for name, b in model.named_buffers():  # rotary tables: to_empty left them uninitialised
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if name.endswith("inv_freq") and hasattr(module, "rope_init_fn"):
            inv, _ = module.rope_init_fn(module.config, "cpu")
            b.data = inv
        elif name.endswith("inv_freq"):
            dim = b.numel() * 2
            b.data = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    model.config.dtype = "bfloat16"
    model.save_pretrained(tmp, max_shard_size="1GB")
    for f in preset.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "scr_export_preset.json",
                                                              "model.safetensors.index.json"):
            shutil.copy(f, tmp / f.name)
    pp = json.loads((tmp / "preprocessor_config.json").read_text())
    pp["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}  # Qwen2-VL's own processor limits
    (tmp / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))
    os.replace(tmp, out)
    return out


def photo(path: Path, width: int, height: int) -> Path:
    """A synthetic photo: smooth colour fields, a few objects and sensor noise (JPEG, as a camera writes it)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([0.5 + 0.4 * np.sin(3 * x + 1), 0.5 + 0.3 * np.cos(4 * y), 0.4 + 0.3 * x * y], -1)
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    pic = Image.fromarray((img * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 200), rng.integers(0, height - 200)
        draw.ellipse([x0, y0, x0 + rng.integers(60, 200), y0 + rng.integers(60, 200)],
                     fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    pic.save(path, quality=90)
    return path


def measure(argv: list[str]) -> dict:
    res = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, cwd=ROOT)
    return json.loads(res.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--image", type=Path, help="a photo of yours (default: a synthetic one of --size)")
    ap.add_argument("--size", default="1280x960")
    ap.add_argument("--skip-validate", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="photo-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.size = "448x336"
    ckpt = build_checkpoint(work / ("qwen2vl-2b-width" + ("-smoke" if args.smoke else "")), args.smoke)
    ck = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    w, h = (int(v) for v in args.size.split("x"))
    image = args.image or photo(work / f"photo-{w}x{h}.jpg", w, h)
    cli = [sys.executable, "-m", "scr_export.cli"]
    out = work / "onnx"
    if not (out / "manifest.json").is_file():
        r = measure([*cli, "convert", str(ckpt), "--to", "onnx", "--no-validate", "--layers", "0..0",
                     "--diag-layers", "0..1", "--out", str(out), "--force"])
        if r["rc"]:
            print(r["tail"])
            return 1
    print(f"== {ckpt.name}: {ck / 1e6:.0f} MB (bf16); image {image.name}")
    rows = [("run, 8 tokens", [*cli, "run", str(out), "--image", str(image), "--prompt", "What is in the picture?",
                               "--max-new-tokens", "8"])]
    if not args.skip_validate:
        rows.append(("validate, 8 steps", [*cli, "validate", str(out), "--image", str(image), "--steps", "8"]))
    status = 0
    for name, command in rows:
        r = measure(command)
        estimate = next((line for line in r["tail"].splitlines() if "memory estimate" in line), "")
        print(f"{name:>18}: rc {r['rc']}  peak RSS {r['peak_rss'] / 1e6:7.0f} MB = {r['peak_rss'] / ck:5.2f}x the "
              f"checkpoint  wall {r['wall_s']:6.1f}s  {estimate.strip()}")
        if r["rc"] not in (0, 1):  # 1: a parity gate (random weights); anything else is a failure
            print(r["tail"][-1500:])
            status = 1
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
