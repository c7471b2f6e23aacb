"""The `scr-export` command line. Each command is a class whose docstring is its help; heavy imports are lazy."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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
            for p in res.plan.images:
                what = f"skipped: {p.skipped}" if p.skipped else f"sources {p.sources.tolist()}"
                _log(f"image at {p.span.start}..{p.span.end - 1}: {what}")
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
        picture = render(explain_data(fam, images[0], inputs, plan, entropy, cfg))
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
        os.close(fd)
        try:
            picture.save(tmp, format="PNG")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _log(f"credit entropy {entropy:.3f} nats; {len(plan.images[0].sources)} sources")
        print(out)
        return 0


COMMANDS: list[Command] = [Inspect(), Generate(), Explain()]


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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
