"""The `scr-export` command line. Each command is a class whose docstring is its help; heavy imports are lazy."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import SCRExportError


def _log(msg: str) -> None:
    print(f"[scr-export] {msg}", file=sys.stderr, flush=True)


# -- shared argument groups (declared once, used by the commands that need them) ---------------------------------
def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a preset (tiny-llava, tiny-qwen2-vl, tiny-internvl, tiny-chameleon, "
                   "small-llava) or a local checkpoint directory")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PyTorch reference")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="weights and activations (float32 is the parity reference)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when torch sees one)")


def add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", required=True, metavar="IMG",
                   help="image file (repeat for several images in one prompt)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the question or instruction")


def add_scr_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SCR (defaults: the family's values from SCR.md, or the preset's own ranges)")
    g.add_argument("--k", type=int, help="sources per image (default 32)")
    g.add_argument("--lambda", dest="lam", type=float, metavar="λ", help="redistribution strength (default 1.10)")
    g.add_argument("--layers", metavar="A..B", help="decoder layers to redistribute at, inclusive, 0-based")
    g.add_argument("--diag-layers", metavar="A..B", help="decoder layers whose attention forms the diagnostic map")
    g.add_argument("--border", choices=["exclude", "include"], help="may border cells be sources (default exclude)")
    g.add_argument("--scr-config", metavar="FILE", help="JSON file with any of k, lambda, layers, diag_layers, border")


def scr_config_from_args(family: Any, args: argparse.Namespace):
    from .config import SCRConfig

    overrides: dict[str, Any] = {}
    if getattr(args, "scr_config", None):
        path = Path(args.scr_config)
        if not path.is_file():
            raise SCRExportError(f"SCR config file {path} does not exist", "pass the path of a JSON file")
        text = path.read_text()
        SCRConfig.from_json(text)  # validates keys and values with a clear message
        overrides = {("lam" if k == "lambda" else k): (tuple(v) if isinstance(v, list) else v)
                     for k, v in json.loads(text).items()}
    for name in ("k", "lam", "layers", "diag_layers", "border"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return family.scr_config(**overrides)


def _load(args: argparse.Namespace):
    from .loading import load_vlm

    t0 = time.perf_counter()
    _log(f"loading {args.model} ...")
    fam = load_vlm(args.model, dtype=getattr(args, "dtype", "float32"), device=getattr(args, "device", "cpu"))
    _log(f"loaded {fam.display_name} from {fam.path} in {time.perf_counter() - t0:.1f}s "
         f"({fam.model.dtype}, {fam.device})")
    return fam


def _inputs(fam: Any, args: argparse.Namespace):
    from .processing import encode, load_image

    images = [load_image(p) for p in args.image]
    return images, encode(fam, [images], [args.prompt])


# -- commands -----------------------------------------------------------------------------------------------------
class Command:
    name: str

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


class Inspect(Command):
    """Show a model's family, decoder layers, SCR defaults and image-token geometry."""

    name = "inspect"

    def add_arguments(self, p):
        add_model_arg(p)
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    def run(self, args):
        fam = _load(args)
        cfg = fam.scr_config()
        info = {"model": args.model, "path": str(fam.path), "family": fam.name, "display_name": fam.display_name,
                "model_class": type(fam.model).__name__, "decoder_layers": fam.num_layers,
                "layers_path": fam.layers_path, "hidden_size": fam.text_config.hidden_size,
                "parameters": sum(p.numel() for p in fam.model.parameters()),
                "image_token": fam.tokenizer.convert_ids_to_tokens(fam.image_token_id),
                "image_token_id": fam.image_token_id, "grid_rule": fam.grid_rule, "scr": cfg.to_dict(),
                "prompt_template": fam.prompt_template}
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        w = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{w}}  {v}")
        return 0


def _log_plan(plan) -> None:
    for p in plan.images:
        what = f"skipped: {p.skipped}" if p.skipped else f"sources {p.sources.tolist()}"
        _log(f"image at {p.span.start}..{p.span.end - 1}: {what}")


class Generate(Command):
    """Generate text with the PyTorch reference (greedy, KV cache), SCR on unless --no-scr."""

    name = "generate"

    def add_arguments(self, p):
        add_model_arg(p)
        add_input_args(p)
        p.add_argument("--no-scr", action="store_true", help="run the unmodified model")
        p.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
        p.add_argument("--show-plan", action="store_true", help="print the sources of each image")
        add_scr_args(p)
        add_runtime_args(p)

    def run(self, args):
        from .reference import generate

        if args.max_new_tokens < 1:
            raise SCRExportError(f"--max-new-tokens {args.max_new_tokens} is not positive", "use N >= 1")
        fam = _load(args)
        cfg = scr_config_from_args(fam, args)
        _, inputs = _inputs(fam, args)
        t0 = time.perf_counter()
        res = generate(fam, inputs, cfg, scr=not args.no_scr, max_new_tokens=args.max_new_tokens)
        dt = time.perf_counter() - t0
        if args.show_plan or not args.no_scr:
            _log_plan(res.plan)
        _log(f"{'SCR ' + str(cfg.to_dict()) if not args.no_scr else 'no SCR'}; {res.tokens.shape[1]} tokens in {dt:.2f}s")
        print(res.texts[0])
        return 0


class Explain(Command):
    """Draw the diagnostic attention map over the image, with SCR's sources and neighbours, and the credit entropy."""

    name = "explain"

    def add_arguments(self, p):
        add_model_arg(p)
        add_input_args(p)
        p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the picture")
        add_scr_args(p)
        add_runtime_args(p)

    def run(self, args):
        from calibration.credit_entropy import credit_entropy, image_token_norms

        from .explain import explain_data, render
        from .reference import plan_for_inputs

        out = Path(args.out)
        if out.suffix.lower() != ".png":
            raise SCRExportError(f"--out {out} is not a .png file", "name the output FILE.png")
        if not out.parent.exists():
            raise SCRExportError(f"the directory {out.parent} does not exist", "create it or choose another --out")
        fam = _load(args)
        cfg = scr_config_from_args(fam, args)
        images, inputs = _inputs(fam, args)
        _log("diagnostic pass ...")
        plan = plan_for_inputs(fam, inputs, cfg)
        norms = image_token_norms(fam, inputs.to(fam.device).tensors, inputs.layouts, cfg.layers[0])
        entropy = credit_entropy(norms[0][0])
        from .plots import save_png

        save_png(render(explain_data(fam, images[0], inputs, plan, entropy, cfg)), out)
        _log(f"credit entropy {entropy:.3f} nats; {len(plan.images[0].sources)} sources")
        print(out)
        return 0


def _scr_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in ("k", "lam", "layers", "diag_layers", "border")
            if getattr(args, name, None) is not None}


class Convert(Command):
    """Export MODEL to ONNX with SCR inserted by graph passes, then check parity against the PyTorch reference.

    Writes DIR with vision_encoder.onnx, embed_tokens.onnx, diagnostic.onnx, decoder_model_merged.onnx (weights
    beside each as .data), the tokenizer and image processor, and manifest.json (with the parity results). The
    directory appears only when everything succeeded. Exits 1 if a parity gate fails (the directory is kept, and
    its manifest records the failure), unless --no-fail-on-parity.
    """

    name = "convert"

    def add_arguments(self, p):
        add_model_arg(p)
        p.add_argument("--to", choices=["onnx", "gguf", "trt"], required=True,
                       help="target runtime: onnx (ONNX Runtime), gguf (llama.cpp), trt (TensorRT)")
        p.add_argument("--quant", default="q8_0", metavar="TYPE",
                       help="GGUF weight type: f32, f16, q8_0, q4_0, q4_k_m, ... (default q8_0; --to gguf only)")
        p.add_argument("--images", choices=["auto", "mmproj", "onnx"], default="auto",
                       help="--to gguf: llama.cpp's own projector (mmproj, Qwen2-VL) or our ONNX vision encoder; "
                            "auto picks mmproj where llama.cpp supports the family")
        p.add_argument("--out", required=True, metavar="DIR", help="the directory to write (must not exist)")
        p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4", "fp8"], default=None,
                       help="graph precision (default fp32 for onnx, fp16 for trt: strongly typed engines take it). "
                            "int8: static Q/DQ of the decoder's linear layers (calibrated with SCR on); int4: "
                            "weight-only blocks (MatMulNBits for onnx, blocked int4 Q/DQ for trt); fp8: E4M3 Q/DQ "
                            "(TensorRT on Ada/Hopper; ONNX Runtime CPU emulates it)")
        q = p.add_argument_group("quantization (--precision int8|int4|fp8, --to onnx|trt)")
        q.add_argument("--calib-data", metavar="PATH",
                       help="calibration pairs: a folder of images (optional prompts.txt, one prompt a line) or a "
                            "JSONL file of {\"image\": path, \"prompt\": text}; default: a built-in synthetic set "
                            "(smoke tests only)")
        q.add_argument("--calib-samples", type=int, metavar="N", help="use at most N pairs (default: all; 8 synthetic)")
        q.add_argument("--calib-decode-steps", type=int, default=4, metavar="N",
                       help="greedy decode steps per pair fed to the calibrator after the prefill (default 4)")
        q.add_argument("--diagnostic-precision", choices=["auto", "same", "w8", "float"], default="auto",
                       help="the diagnostic graph: like the decoder (same), int8 weight-only (w8, ONNX Runtime), or "
                            "float32; auto: same for int8/fp8, w8 for int4 on onnx, float for int4 on trt")
        q.add_argument("--int4-accuracy-level", type=int, default=4, metavar="L",
                       help="MatMulNBits compute type on ONNX Runtime: 4 = int8 activations (default, fast on CPU), "
                            "1 = float32 activations")
        q.add_argument("--smooth-alpha", type=float, default=None, metavar="A",
                       help="SmoothQuant strength for the MLP down projections' activation outliers, folded into "
                            "the up / down weights before calibration (default: 0.5 for int8, off for fp8; 0 = off)")
        t = p.add_argument_group("--to trt: engine limits (optimisation profiles) and building")
        t.add_argument("--max-batch", type=int, default=1, metavar="N", help="prompts per call (default 1)")
        t.add_argument("--max-images", type=int, default=1, metavar="N", help="images per prompt (default 1)")
        t.add_argument("--max-image-tokens", type=int, metavar="N",
                       help="image tokens per image (default: the model's; Qwen2-VL: 1280, a 1024×1024 image)")
        t.add_argument("--max-seq", type=int, metavar="N",
                       help="prompt + generated tokens (default: the images plus 512, within the model's positions)")
        t.add_argument("--build-engines", choices=["auto", "never", "always"], default="auto",
                       help="auto: build where TensorRT and a GPU are present, else write build_engines.sh only")
        p.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo",
                       help="torch.onnx exporter for the decoder (default dynamo)")
        p.add_argument("--attention", choices=["eager", "gqa"],
                       help="--to onnx: gqa (default) also writes the decoder with ONNX Runtime's GroupQueryAttention "
                            "on a shared KV buffer (same weights; decode steps about 2x faster on the CPU), which "
                            "runs one prompt at a time, beside the eager decoder that runs batches; eager writes "
                            "the eager decoder only")
        p.add_argument("--force", action="store_true", help="replace DIR if it exists")
        p.add_argument("--no-fail-on-parity", action="store_true", help="exit 0 even when a parity gate fails")
        p.add_argument("--no-validate", action="store_true",
                       help="skip the parity step (the float32 PyTorch reference is the largest thing in memory for "
                            "a 7B model: about 4 bytes per parameter); the manifest records 'not validated' and "
                            "`run` says so; run `scr-export validate DIR` later, on a bigger box or with --reference-device cuda")
        g = p.add_argument_group("SCR baked into the graphs (λ and k stay run-time inputs of the plan)")
        g.add_argument("--layers", metavar="A..B", help="decoder layers that get an SCR node")
        g.add_argument("--diag-layers", metavar="A..B", help="layers whose attention the diagnostic graph exposes")
        g.add_argument("--k", type=int, help="default sources per image recorded in the manifest")
        g.add_argument("--lambda", dest="lam", type=float, metavar="λ", help="default λ recorded in the manifest")
        g.add_argument("--border", choices=["exclude", "include"])

    def run(self, args):
        from .convert import convert_to_onnx
        from .manifest import QUANTIZED

        precision = args.precision
        quant_flags = [f for f, v in (("--calib-data", args.calib_data), ("--calib-samples", args.calib_samples))
                       if v is not None]
        if args.to == "gguf" and precision is not None:
            raise SCRExportError(f"--precision {precision} does not apply to --to gguf: GGUF weight types are "
                                 "chosen with --quant", "use --quant q8_0 (or f32, f16, q4_0, q4_k_m, ...)")
        if args.attention == "gqa" and args.to != "onnx":
            raise SCRExportError(f"--attention {args.attention} is for --to onnx (ONNX Runtime's contrib op)",
                                 "drop --attention, or convert with --to onnx")
        if quant_flags and precision not in QUANTIZED:
            raise SCRExportError(f"{' and '.join(quant_flags)} need a quantized precision (got "
                                 f"{precision or 'the default float'})",
                                 "add --precision int8 or fp8 (int4 is weight-only), or drop the calibration options")
        if precision in QUANTIZED:
            from calibration.quantize import QuantizeSpec, convert_quantized
            from runtimes.tensorrt.profiles import Limits

            spec = QuantizeSpec(precision, target=args.to, calib_data=args.calib_data,
                                calib_samples=args.calib_samples, decode_steps=args.calib_decode_steps,
                                diagnostic=args.diagnostic_precision, int4_accuracy_level=args.int4_accuracy_level,
                                smooth_alpha=args.smooth_alpha)
            limits = Limits(max_batch=args.max_batch, max_images=args.max_images,
                            max_image_tokens=args.max_image_tokens, max_seq=args.max_seq)
            res = convert_quantized(args.model, args.out, spec=spec, config_overrides=_scr_overrides(args),
                                    force=args.force, progress=_log, exporter=args.exporter, trt_limits=limits,
                                    build=args.build_engines, attention=args.attention or "gqa",
                                    validate=not args.no_validate)
            print(_tables(res[1]))
            if args.to == "trt" and res[2] is None:
                print(f"TensorRT engines: NOT built here; run {res[0] / 'build_engines.sh'} on the target device")
            return 0 if _passed(res[1]) or args.no_fail_on_parity else 1
        if args.to == "trt":
            from runtimes.tensorrt.convert import convert_to_trt
            from runtimes.tensorrt.profiles import Limits

            limits = Limits(max_batch=args.max_batch, max_images=args.max_images,
                            max_image_tokens=args.max_image_tokens, max_seq=args.max_seq)
            out, report, engines = convert_to_trt(args.model, args.out, precision=args.precision or "fp16",
                                                  limits=limits, config_overrides=_scr_overrides(args),
                                                  force=args.force, progress=_log, build=args.build_engines,
                                                  validate=not args.no_validate)
            print(_tables(report))
            if engines is None:
                print(f"TensorRT engines: NOT built here; run {out / 'build_engines.sh'} on the target device")
            else:
                print("TensorRT engines: " + ", ".join(f"{g} ({i['scr_path']})" for g, i in engines["graphs"].items()))
            return 0 if report is None or report or args.no_fail_on_parity else 1
        if args.to == "gguf":
            from runtimes.llamacpp.convert import convert_to_gguf

            _, reports = convert_to_gguf(args.model, args.out, quant=args.quant.lower(), images=args.images,
                                         config_overrides=_scr_overrides(args), force=args.force, progress=_log,
                                         validate=not args.no_validate)
            print(_tables(reports))
            return 0 if _passed(reports) or args.no_fail_on_parity else 1
        _, report = convert_to_onnx(args.model, args.out, precision=args.precision or "fp32", exporter=args.exporter,
                                    config_overrides=_scr_overrides(args), force=args.force, progress=_log,
                                    attention=args.attention or "gqa", validate=not args.no_validate)
        print(_tables(report))
        return 0 if report is None or report or args.no_fail_on_parity else 1


def _tables(reports) -> str:
    if reports is None:
        return "parity: NOT validated (--no-validate); the manifest says so. Check it later: scr-export validate DIR"
    if isinstance(reports, dict):
        quantized_onnx = "engine" in reports
        titles = {"dequantized": "against the PyTorch decoder on the GGUF's dequantized weights (engine error; gated)",
                  "float": "against the float32 PyTorch model (what users see; gated)" if quantized_onnx else
                           "against the float PyTorch model (what users see; gated for f32 only)",
                  "engine": "ONNX Runtime's quantized kernels against the same graph run unfused (kernel error; "
                            "gated)"}
        return "\n\n".join(f"== {titles.get(k, k)}\n{r.table()}" for k, r in reports.items())
    return reports.table()


def _passed(reports) -> bool:
    if reports is None:
        return True  # --no-validate: nothing was judged (the manifest and `run` say so)
    return all(bool(r) for r in reports.values()) if isinstance(reports, dict) else bool(reports)


def _runner(directory: str, device: str, runtime: str = "auto", attention: str = "auto"):
    from runtimes.registry import open_runtime

    return open_runtime(directory, runtime, device=device, attention=attention)


def add_attention_arg(p) -> None:
    p.add_argument("--attention", choices=["auto", "eager", "gqa"], default="auto",
                   help="ONNX Runtime: which decoder runs one prompt. auto: the GroupQueryAttention one where the "
                        "directory has it and the provider runs it natively (CPU; CUDA at fp16), else the eager one")


class Run(Command):
    """Run a converted directory (ONNX Runtime or llama.cpp, as its manifest says): image + prompt in, text out."""

    name = "run"

    def add_arguments(self, p):
        p.add_argument("dir", metavar="DIR", help="a directory written by `scr-export convert --to onnx`")
        add_input_args(p)
        p.add_argument("--no-scr", action="store_true", help="identity plan: the unmodified model")
        p.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="ONNX Runtime provider (auto: CUDA when onnxruntime-gpu sees a GPU)")
        p.add_argument("--runtime", choices=["auto", "onnx", "tensorrt", "llamacpp"], default="auto",
                       help="auto: as the directory was converted (TensorRT engines for --to trt)")
        add_attention_arg(p)
        g = p.add_argument_group("SCR plan (defaults: the manifest's)")
        g.add_argument("--k", type=int)
        g.add_argument("--lambda", dest="lam", type=float, metavar="λ")
        g.add_argument("--border", choices=["exclude", "include"])

    def run(self, args):
        from .processing import load_image

        if args.max_new_tokens < 1:
            raise SCRExportError(f"--max-new-tokens {args.max_new_tokens} is not positive", "use N >= 1")
        images = [load_image(p) for p in args.image]
        t0 = time.perf_counter()
        runner = _runner(args.dir, args.device, args.runtime, args.attention)
        _log(f"loaded {args.dir} ({runner.manifest['display_name']}, {runner.manifest['precision']}) on "
             f"{runner.provider} in {time.perf_counter() - t0:.1f}s")
        parity = runner.manifest.get("parity")
        if isinstance(parity, dict) and parity.get("status") == "not validated":
            _log(f"note: this directory was converted with --no-validate: its parity with the PyTorch reference "
                 f"has not been checked (scr-export validate {args.dir})")
        config = runner.config.replace(**{k: v for k, v in _scr_overrides(args).items()})
        inputs = runner.encode([images], [args.prompt])
        from .memory_guard import available_bytes, estimate

        family = getattr(runner, "family", None)  # the host-side adapter (the guard already ran in encode)
        est, avail = (estimate(family, inputs.tensors) if family is not None else {"bytes": 0}), available_bytes()
        if est["bytes"] > 2**28:  # worth a line: a photo-sized input
            _log(f"memory estimate: {est['bytes'] / 2**30:.1f} GB for {est['what']}"
                 + (f" ({avail / 2**30:.1f} GB available)" if avail else ""))
        t0 = time.perf_counter()
        res = runner.generate(inputs, scr=not args.no_scr, max_new_tokens=args.max_new_tokens, config=config)
        _log_plan(res.plan)
        _log(f"{'SCR ' + str(config.to_dict()) if not args.no_scr else 'no SCR'}; {res.tokens.shape[1]} tokens in "
             f"{time.perf_counter() - t0:.2f}s")
        print(res.texts[0])
        return 0


class Validate(Command):
    """Check a converted directory against the PyTorch reference (teacher-forced) and apply DESIGN.md's gates.

    Prints a table per output (max |Δ|, max rel. error, cosine, norm ratio, top-1 agreement, KL) with plan
    agreement, SCR-effect cosine and greedy-token agreement; writes the same as JSON (--json); exits 1 if a gate
    fails. The reference is the checkpoint named in the manifest (presets are rebuilt deterministically).
    """

    name = "validate"

    def add_arguments(self, p):
        p.add_argument("dir", metavar="DIR", help="a directory written by `scr-export convert --to onnx`")
        p.add_argument("--image", action="append", metavar="IMG", help="image(s) to validate on (default: synthetic)")
        p.add_argument("--prompt", default="What is in this picture? Describe the main object.", metavar="TEXT")
        p.add_argument("--data", metavar="PATH", help="validate over a dataset: a folder of images (+ prompts.txt), a "
                       'JSONL of {"image", "prompt"}, or POPE-format JSONL {"image", "question" or "text", "label": '
                       '"yes"|"no"}; the gates apply to the aggregate (5th / 95th percentile)')
        p.add_argument("--limit", type=int, metavar="N", help="with --data: the first N samples")
        p.add_argument("--image-root", metavar="DIR", help="with --data: image paths are relative to DIR (e.g. COCO's "
                       "val2014 for POPE's files) instead of the JSONL's folder")
        p.add_argument("--per-layer", action="store_true", help="also compare the hidden state after every "
                       "decoder layer, with and without SCR (the first sample): where quantization breaks")
        p.add_argument("--plot", metavar="FILE.png", help="draw the per-sample numbers (--data) and the per-layer "
                       "error (--per-layer) with the gates")
        p.add_argument("--steps", type=int, default=16, help="teacher-forced decode steps (default 16)")
        p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE (with --data, the "
                       "per-sample records also go to FILE's stem + .samples.jsonl); nothing is ever written into "
                       "DIR: it may be read-only on a device")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        p.add_argument("--runtime", choices=["auto", "onnx", "tensorrt", "llamacpp"], default="auto",
                       help="auto: as the directory was converted (TensorRT engines for --to trt)")
        p.add_argument("--reference-device", default="cpu", metavar="cpu|cuda[:N]",
                       help="where the PyTorch reference runs (a 7B float32 reference needs 28 GB: on a GPU, with "
                            "--reference-dtype float16, it needs 14 GB of GPU memory)")
        p.add_argument("--reference-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                       help="the reference's precision; below float32 an fp32 directory is judged by the fp16 gates "
                            "(the reference's own rounding exceeds the fp32 gate)")
        add_attention_arg(p)

    def run(self, args):
        from .manifest import read_manifest
        from .parity import (compare_inputs, default_inputs, layer_parity, layer_table, open_for_validation,
                             write_report)
        from .processing import load_image

        read_manifest(args.dir)  # clear errors before loading anything heavy
        if args.steps < 1:
            raise SCRExportError(f"--steps {args.steps} is not positive", "use at least 1 (8 or more recommended)")
        if args.plot:
            plot = Path(args.plot)
            if plot.suffix.lower() != ".png":
                raise SCRExportError(f"--plot {plot} is not a .png file", "name the picture FILE.png")
            if not plot.parent.exists():
                raise SCRExportError(f"the directory {plot.parent} does not exist", "create it or choose another --plot")
            if not (args.data or args.per_layer):
                raise SCRExportError("--plot has nothing to draw for one image without --per-layer",
                                     "add --data PATH (per-sample numbers) or --per-layer")
        if args.data:
            return self._dataset(args)
        for flag in ("limit", "image_root"):
            if getattr(args, flag) is not None:
                raise SCRExportError(f"--{flag.replace('_', '-')} applies to --data only", "add --data PATH, or drop it")
        images = [[load_image(p) for p in args.image]] if args.image else None
        prompts = [args.prompt] if images else None
        _log("running the deployed model and the PyTorch reference ...")
        if images is None:
            images, prompts = default_inputs()
        layers = None
        if not args.per_layer:  # the reference, then the deployed model: one in memory at a time
            from .parity import validate_in_sequence

            report = validate_in_sequence(args.dir, images=images, prompts=prompts, steps=args.steps,
                                          device=args.device, runtime=args.runtime, attention=args.attention,
                                          reference_device=args.reference_device,
                                          reference_dtype=args.reference_dtype)
            print(_tables(report))
        else:
            runner, family = open_for_validation(args.dir, device=args.device, runtime=args.runtime,
                                                 attention=args.attention, reference_device=args.reference_device,
                                                 reference_dtype=args.reference_dtype)
            inputs = runner.encode(images, prompts)
            report = compare_inputs(runner, family, inputs, args.steps)
            print(_tables(report))
            _log("per-layer hidden states ...")
            layers = layer_parity(runner, family, inputs)  # both in memory: per layer, side by side
            print(layer_table(layers))
        if args.plot:
            self._plot(args.plot, None, layers)
        if args.json:
            write_report(report, args.json, extra={"per_layer": layers} if layers else None)
            _log(f"report written to {args.json}")
        return 0 if _passed(report) else 1

    @staticmethod
    def _plot(path, report, layers):
        from .parity import GATES
        from .plots import save_png, validation_figure

        save_png(validation_figure(report, layers, GATES), path)
        _log(f"picture written to {path}")

    def _dataset(self, args):
        from .dataset_parity import validate_dataset, write_dataset_report

        if args.image:
            raise SCRExportError("--image and --data were both given", "validate on one image (--image) or over a "
                                 "dataset (--data), not both")
        _log(f"validating {args.dir} over {args.data} against the PyTorch reference ...")
        report = validate_dataset(args.dir, args.data, limit=args.limit, steps=args.steps, device=args.device,
                                  runtime=args.runtime, attention=args.attention, image_root=args.image_root,
                                  per_layer=args.per_layer)
        print(report.table())
        if report.per_layer:
            from .parity import layer_table

            print(layer_table(report.per_layer))
        if args.plot:
            self._plot(args.plot, report, report.per_layer)
        if args.json:
            lines = write_dataset_report(report, args.json)
            _log(f"report written to {args.json}, per-sample records to {lines}")
        return 0 if report else 1


class BuildOps(Command):
    """Build the SCRNeighbourInject kernels: the ONNX Runtime custom-op library (CPU; --cuda adds the CUDA kernel)
    and, with --ptx, the PTX that TensorRT engines embed. The ONNX Runtime runner then loads the library by itself
    (SCR_EXPORT_ORT_OPS=function turns it off); without it the SCR nodes run as their ONNX function body.
    """

    name = "build-ops"

    def add_arguments(self, p):
        p.add_argument("--cuda", action="store_true", help="also build the CUDA library (needs nvcc and libcudart)")
        p.add_argument("--ptx", nargs="*", metavar="ARCH", help="write PTX for these compute capabilities "
                       "(default with no value: 87 89 90) and report registers and spills per entry point")
        p.add_argument("--force", action="store_true", help="rebuild even if a build for these sources exists")

    def run(self, args):
        from runtimes.kernels import build

        t0 = time.perf_counter()
        lib = build.build_cpu_library(_log, force=args.force)
        print(f"cpu   {lib}")
        if args.cuda:
            print(f"cuda  {build.build_cuda_library(_log, force=args.force)}")
        if args.ptx is not None:
            for arch in args.ptx or build.PTX_ARCHS:
                if not arch.isdigit():
                    raise SCRExportError(f"--ptx {arch} is not a compute capability", "use digits, e.g. 87 for Orin")
                ptx = build.build_ptx(arch)
                report = build.ptxas_report(ptx, arch)
                worst = max(r.get("spill_stores", 0) + r.get("spill_loads", 0) for r in report.values())
                regs = max(r.get("registers", 0) for r in report.values())
                print(f"ptx   {ptx}  (sm_{arch}: {len(report)} entry points, <= {regs} registers, "
                      f"{worst} spill bytes)")
        _log(f"done in {time.perf_counter() - t0:.1f}s")
        return 0


class BuildEngines(Command):
    """Build the TensorRT engines of a directory converted with --to trt, on this device (TensorRT and a GPU
    needed): the SCR nodes become the ahead-of-time plugin on TensorRT >= 10.13, their ONNX function body on older
    TensorRT. Records the engines, and which path each took, in the manifest. build_engines.sh calls this.
    """

    name = "build-engines"

    def add_arguments(self, p):
        p.add_argument("dir", metavar="DIR", help="a directory written by `scr-export convert --to trt`")

    def run(self, args):
        from runtimes.tensorrt.engines import build_engines

        engines = build_engines(args.dir, _log)
        for g, info in engines["graphs"].items():
            print(f"{g:<13} {info['file']:<28} SCR: {info['scr_path']:<9} profiles: {info['profiles']}")
        return 0


class Serve(Command):
    """Serve a converted directory over HTTP with OpenAI's chat-completions API, SCR per request.

    POST /v1/chat/completions (text and image_url parts, stream, max_tokens, temperature/top_p/seed, stop, and the
    extension field "scr": {"enabled", "k", "lambda", "layers"}), GET /v1/models, /health (ready once the model is
    loaded), /metrics (Prometheus). A bounded queue answers 429 beyond it; SIGTERM drains in-flight requests. With
    --ray, the same app runs as a Ray Serve deployment with --replicas replicas. Needs scr-export[serve] (and [ray]).
    """

    name = "serve"

    def add_arguments(self, p):
        p.add_argument("dir", metavar="DIR", help="a converted directory (ONNX, TensorRT or GGUF)")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--max-concurrency", type=int, default=1, metavar="N",
                       help="requests computed at once, each on its own loaded copy of the model (default 1)")
        p.add_argument("--queue", type=int, default=16, metavar="N",
                       help="requests that may wait beyond those; more get 429 with Retry-After (default 16)")
        p.add_argument("--runtime", default="auto", choices=["auto", "onnx", "tensorrt", "llamacpp"])
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--threads", type=int, metavar="N", help="CPU threads per model copy")
        p.add_argument("--served-model-name", metavar="NAME", help="the model id clients use (default: DIR's name)")
        p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="default max_tokens per request")
        p.add_argument("--max-images", type=int, default=4, metavar="N", help="images per request (default 4)")
        p.add_argument("--max-image-mb", type=float, default=20.0, metavar="MB", help="size of one image (default 20)")
        p.add_argument("--allow-local-files", action="store_true",
                       help="accept image_url as an absolute local path or file:// URL")
        p.add_argument("--allow-remote-urls", action="store_true", help="fetch http(s) image URLs")
        p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                       help="on SIGTERM, wait this long for in-flight requests (default 30)")
        p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (scr-export[ray])")
        p.add_argument("--replicas", type=int, default=1, metavar="N", help="with --ray: replicas (default 1)")
        p.add_argument("--address", metavar="ADDR", help="with --ray: an existing cluster (ray://host:10001 or "
                       "auto); default: a local Ray instance")
        p.add_argument("--num-gpus", type=float, default=None, metavar="F",
                       help="with --ray: GPUs per replica (default: 1/replicas where a GPU is present, else 0)")

    def run(self, args):
        from .serve.settings import settings_from_args

        settings = settings_from_args(args)
        if args.ray:
            from .serve.ray_app import serve_with_ray

            return serve_with_ray(settings, replicas=args.replicas, address=args.address, host=args.host,
                                  port=args.port, num_gpus=args.num_gpus, log=_log)
        import uvicorn

        from .serve.app import create_app

        _log(f"serving {args.dir} on http://{args.host}:{args.port} (loading the model; /health says when ready)")
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=int(args.drain_timeout))
        return 0


COMMANDS: list[Command] = [Inspect(), Generate(), Explain(), Convert(), Run(), Validate(), BuildOps(),
                           BuildEngines(), Serve()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scr-export",
        description="Deploy VLMs with Spatial Credit Redistribution built in, and prove parity with PyTorch.")
    parser.add_argument("--version", action="version", version=f"scr-export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        doc = (cmd.__doc__ or "").strip()
        p = sub.add_parser(cmd.name, help=doc.splitlines()[0], description=doc)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


# a package a command imports lazily -> the extra that installs it (pyproject.toml's optional dependencies)
# a missing package -> the extra that installs it (ModuleNotFoundError's name); onnxruntime is a core dependency
# (runtimes.onnxruntime_runner.pick_providers names the fix when it is missing)
MISSING_EXTRA = {"torch": "export", "transformers": "export", "safetensors": "export", "tqdm": "export",
                 "matplotlib": "export",
                 "onnx": "export", "onnx_ir": "export", "onnxscript": "export",
                 "llama_cpp": "llamacpp", "gguf": "llamacpp", "tensorrt": "tensorrt", "cuda": "tensorrt",
                 "onnxruntime_genai": "bench", "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve",
                 "pydantic": "serve", "starlette": "serve", "httpx": "serve",
                 "ray": "ray"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    try:
        return args._command.run(args)
    except SCRExportError as exc:
        print(f"scr-export {args.command}: error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        package = (exc.name or "").split(".")[0]
        extra = MISSING_EXTRA.get(package)
        if extra is None:
            raise
        print(f"scr-export {args.command}: error: this command needs {package}, which is not installed",
              file=sys.stderr)
        print(f"  fix: pip install 'scr-export[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
