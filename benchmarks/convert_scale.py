"""Benchmark (not a test): what converting a checkpoint of real width costs, in memory, time and bytes (issue 20).

    python benchmarks/convert_scale.py [--layers 2 4] [--routes fp32 fp16 int8 int4 q8_0 q4_0 q4_k_m trt]
                                       [--work DIR] [--validate] [--json FILE]
    python benchmarks/convert_scale.py --smoke        # a few-MB model, two routes: what the test suite runs

Builds, locally, LLaVA-1.5-7B's real widths cut in depth (CLIP ViT-L/14-336: hidden 1024, 16 heads, MLP 4096,
2 layers; Llama: hidden 4096, MLP 11008, 32 heads, vocabulary 32064, ``--layers`` decoder layers), saved as llava-hf
ships it (fp16 safetensors in 1 GB shards, legacy key names), with small-llava's tokenizer and processor. Each route
is one `scr-export convert` in a fresh process (peak RSS from getrusage of that process; wall time), by default
without the parity step (``--no-validate``: the issue's targets are for export and quantization; ``--validate``
adds it). Prints, per route and depth: peak RSS / checkpoint bytes, wall time, artefact bytes / checkpoint bytes,
the diagnostic graph's own bytes / directory bytes; then a linear fit of each route's peak RSS in the checkpoint's
bytes, evaluated at LLaVA-1.5-7B (7.06 B parameters, 13.5 GB fp16) and 13B (13.35 B, 26.1 GB).
Targets (issue 20): peak <= 1.5x the fp16 checkpoint for int4, GGUF and fp16 routes, <= 1.25x the float32 weights
(2x the fp16 checkpoint) for fp32; extrapolated 7B int4 and Q4_0 under 24 GB; the diagnostic graph <= 5 % of an
fp32 / fp16 directory.
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

ROUTES = {  # route -> convert arguments
    "fp32": ["--to", "onnx"], "fp16": ["--to", "onnx", "--precision", "fp16"],
    "int8": ["--to", "onnx", "--precision", "int8", "--calib-samples", "2"],
    "int4": ["--to", "onnx", "--precision", "int4"],
    "q8_0": ["--to", "gguf", "--quant", "q8_0"], "q4_0": ["--to", "gguf", "--quant", "q4_0"],
    "q4_k_m": ["--to", "gguf", "--quant", "q4_k_m"], "trt": ["--to", "trt", "--build-engines", "never"],
}
# bound of peak RSS, in multiples of the fp16 checkpoint's bytes (fp32: 1.25x the float32 weights = 2.5x fp16)
TARGET = {"fp32": 2.5, "fp16": 1.5, "int4": 1.5, "q8_0": 1.5, "q4_0": 1.5, "q4_k_m": 1.5}
REAL = {"LLaVA-1.5-7B": 7.06e9, "LLaVA-1.5-13B": 13.35e9}  # parameters

_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
res = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": res.returncode, "wall_s": time.perf_counter() - t,
                  "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "tail": (res.stdout + res.stderr)[-1500:]}))
"""


SIZES = {  # (vision widths, text widths) besides the real 7B ones: a few-MB smoke model, a ~260 MB test model
    "smoke": ((64, 128, 4), (128, 256, 4)), "test": ((256, 1024, 4), (1024, 2816, 16)),
}


def random_model(model_cls, config, dtype):
    """``model_cls(config)`` built on the meta device in ``dtype``, then given seeded random weights one tensor at a
    time (norm weights 1, biases 0): a model of real width held once, in its own dtype. Buffers are left to the
    caller (``to_empty`` does not initialise them)."""
    import torch

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = (torch.randn(p.shape, generator=gen) * (0.02 if p.ndim > 1 else 0.0)
                      + (1.0 if "norm" in name and name.endswith("weight") else 0.0)).to(dtype)
    return model


def build_checkpoint(out: Path, layers: int, size: str = "7b") -> Path:
    """LLaVA-1.5-7B's widths (or the ``SIZES`` ones), fp16, 1 GB shards, with small-llava's processing files.
    Built on the meta device and filled tensor by tensor in fp16, so building needs about one checkpoint."""
    import torch
    import transformers

    from scr_export.presets import ensure_preset

    if (out / "config.json").is_file():
        return out
    if size in SIZES:
        (vh, vi, vn), (th, ti, tn) = SIZES[size]
        vision = dict(hidden_size=vh, intermediate_size=vi, num_attention_heads=vn, num_hidden_layers=2,
                      image_size=336, patch_size=14, projection_dim=vh)
        text = dict(hidden_size=th, intermediate_size=ti, num_attention_heads=tn, num_key_value_heads=tn,
                    num_hidden_layers=layers, vocab_size=32064, max_position_embeddings=4096)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=2,
                      image_size=336, patch_size=14, projection_dim=768)
        text = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    num_hidden_layers=layers, vocab_size=32064, max_position_embeddings=4096)
    preset = ensure_preset("small-llava")
    base = json.loads((preset / "config.json").read_text())
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**vision),
        text_config=transformers.LlamaConfig(**text, rms_norm_eps=1e-5),
        image_token_index=base["image_token_index"], vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model = random_model(transformers.LlavaForConditionalGeneration, config, torch.float16)
    for name, b in model.named_buffers():
        if "inv_freq" in name:  # to_empty left it uninitialised: recompute from the config
            dim = config.text_config.hidden_size // config.text_config.num_attention_heads
            b.data = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    model.config.dtype = "float16"
    model.save_pretrained(tmp, max_shard_size="1GB")
    for f in preset.iterdir():
        if f.suffix in (".json", ".model", ".jinja", ".txt") and f.name not in ("config.json", "scr_export_preset.json",
                                                                                "model.safetensors.index.json"):
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, out)
    return out


def baseline_rss() -> int:
    """Peak RSS of a process that only imports what `convert` imports (the interpreter and the libraries)."""
    code = "import torch, transformers, onnx, onnx_ir, onnxscript, onnxruntime, safetensors"
    res = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-c", code], capture_output=True, text=True)
    return json.loads(res.stdout)["peak_rss"]


def weight_bytes(ckpt: Path) -> int:
    return sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def diagnostic_own_bytes(d: Path) -> int:
    """Bytes only the diagnostic graph holds (its file and a weights file of its own; 0 for shared weights)."""
    return sum(f.stat().st_size for f in d.glob("diagnostic.onnx*"))


def run_route(ckpt: Path, route: str, out: Path, layers: int, validate: bool) -> dict:
    argv = [sys.executable, "-m", "scr_export.cli", "convert", str(ckpt), *ROUTES[route], "--out", str(out),
            "--force", "--layers", "0..0", "--diag-layers", f"0..{max(0, min(1, layers - 1))}"]
    if not validate:
        argv.append("--no-validate")
    cache = out.parent / f".cache-{out.name}"  # a fresh cache: int8 calibration is measured, not read back
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "SCR_EXPORT_CACHE": str(cache)}
    res = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, cwd=ROOT, env=env)
    shutil.rmtree(cache, ignore_errors=True)
    return json.loads(res.stdout)


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(intercept, slope) of y = a + b x through two or more points (least squares)."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--routes", nargs="+", default=list(ROUTES), choices=list(ROUTES))
    ap.add_argument("--work", type=Path, help="where checkpoints and outputs go (default: a temporary directory)")
    ap.add_argument("--validate", action="store_true", help="include the parity step (the float32 reference)")
    ap.add_argument("--smoke", action="store_true", help="a few-MB model, fp32 and q8_0 at 1 layer (the test's run)")
    ap.add_argument("--json", type=Path, help="also write the measurements as JSON")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.routes = [1], ["fp32", "q8_0"]
    work = args.work or Path(tempfile.mkdtemp(prefix="convert-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    base = baseline_rss()
    print(f"== a process that imports torch, transformers, onnx, onnxruntime and exits: {base / 1e6:.0f} MB peak RSS "
          "(included in every figure below)", flush=True)
    for layers in args.layers:
        ckpt = build_checkpoint(work / f"llava7b-width-{layers}L{'-smoke' if args.smoke else ''}", layers,
                                "smoke" if args.smoke else "7b")
        ck = weight_bytes(ckpt)
        print(f"== checkpoint {ckpt.name}: {ck / 1e6:.0f} MB fp16 ({ck // 2 / 1e9:.3f} B parameters)", flush=True)
        for route in args.routes:
            out = work / f"out-{route}-{layers}L"
            r = run_route(ckpt, route, out, layers, args.validate)
            row = {"route": route, "layers": layers, "checkpoint_bytes": ck, **r}
            if r["rc"] == 0:
                row["artefact_bytes"] = dir_bytes(out)
                row["diagnostic_own_bytes"] = diagnostic_own_bytes(out)
                shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            ok = "" if r["rc"] == 0 else f"  FAILED rc={r['rc']}: {r['tail'][-300:]}"
            print(f"{route:>7} {layers}L  peak RSS {r['peak_rss'] / 1e6:8.0f} MB = {r['peak_rss'] / ck:5.2f}x ckpt"
                  f"  wall {r['wall_s']:6.1f}s" + (f"  artefact {row['artefact_bytes'] / ck:5.2f}x ckpt, diagnostic "
                  f"own {row['diagnostic_own_bytes'] / row['artefact_bytes'] * 100:5.1f}% of the directory"
                  if r["rc"] == 0 else "") + ok, flush=True)
    print("\n== peak RSS, linear in the checkpoint's bytes, extrapolated (parameters x 2 bytes, fp16)")
    print(f"{'route':>7} {'target':>8} " + " ".join(f"{n:>16}" for n in REAL))
    for route in args.routes:
        pts = [(r["checkpoint_bytes"], r["peak_rss"]) for r in rows if r["route"] == route and r["rc"] == 0]
        worst = max((p[1] / p[0] for p in pts), default=float("nan"))
        f = fit(pts)
        target = TARGET.get(route)
        est = " ".join(f"{(f[0] + f[1] * 2 * n) / 1e9:13.1f} GB" if f else f"{'-':>16}" for n in REAL.values())
        verdict = "" if target is None else ("meets" if worst <= target else "ABOVE") + f" (worst {worst:.2f}x)"
        print(f"{route:>7} {('<= %.2fx' % target) if target else '-':>8} {est}  {verdict}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
