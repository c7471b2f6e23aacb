"""Benchmark (not a test): what `scr-export run` costs to start on an ONNX directory, torch-free (issue 11) against
the path before it, with the floor of numpy + ONNX Runtime alone for scale. Medians of --repeats fresh processes.

    python benchmarks/runtime_footprint.py [--model small-llava] [--dir DIR] [--repeats 3]

Each measure is a fresh Python process (peak RSS from getrusage of the child; wall-clock times):
  * before: the path `run` took before the lean runtime, rebuilt here: torch and transformers imported, the
    tokenizer, image processor and config loaded with transformers, inputs from ``scr_export.processing.encode``,
    then the same runner to the first token;
  * torch-free: `python -m scr_export.cli run DIR --image IMG --prompt P --max-new-tokens 1` in a process where
    importing torch, transformers or onnx raises (so it provably carries none of them);
  * floor: numpy + onnxruntime only, the same graphs and sessions, fed the inputs the runner computed (an .npz):
    vision -> embeddings -> diagnostic -> GroupQueryAttention prefill, the first token; no tokeniser, no images.
All three must give the same first token. Prints the figures and torch-free / before (issue 11's targets:
RSS <= 0.35x, start-up <= 0.3x).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
res = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
if res.returncode:
    sys.stderr.write(res.stderr[-3000:]); sys.exit(res.returncode)
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "stdout": res.stdout[-2000:]}))
"""

_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript", "onnx_ir"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
"""

_BEFORE = """
import json, sys, time, types
t0 = time.perf_counter()
import torch, transformers
from runtimes.onnxruntime_runner import OrtVLM
from scr_export.families import FAMILIES
from scr_export.processing import encode, load_image
t_import = time.perf_counter() - t0
d, image, prompt = sys.argv[1:4]
m = json.load(open(f"{d}/manifest.json"))
config = transformers.AutoConfig.from_pretrained(d)
tok = transformers.AutoTokenizer.from_pretrained(d)
proc = transformers.AutoImageProcessor.from_pretrained(d)
model = types.SimpleNamespace(config=config, dtype=torch.float32)
fam = FAMILIES[m["family"]](model, tok, proc, {})
runner = OrtVLM(d, device="cpu")
inputs = encode(fam, [[load_image(image)]], [prompt])
token = int(runner.generate(inputs, max_new_tokens=1, stop_at_eos=False).tokens[0, 0])
print(json.dumps({"import_s": t_import, "token": token}))
"""

_FLOOR = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import onnxruntime as ort
t_import = time.perf_counter() - t0
d, npz = sys.argv[1], np.load(sys.argv[2])
m = json.load(open(f"{d}/manifest.json"))
opts = ort.SessionOptions()
def session(file):
    return ort.InferenceSession(f"{d}/{file}", opts, providers=["CPUExecutionProvider"])
g = m["graphs"]
vision, embed, diag = session(g["vision"]["file"]), session(g["embed_tokens"]["file"]), session(g["diagnostic"]["file"])
dec = session(g["decoder"]["gqa"]["file"])
ids = npz["input_ids"]
feats = vision.run(None, {"pixel_values": npz["pixel_values"]})[0].reshape(-1, npz["hidden"])
emb = embed.run(None, {"input_ids": ids})[0]
emb[npz["image_mask"]] = feats
names = {i.name for i in diag.get_inputs()}
feed = {"inputs_embeds": emb, "attention_mask": npz["attention_mask"], "position_ids": npz["position_ids"]}
diag.run(None, {k: v for k, v in {**feed, **{n: np.zeros((1, npz["kv_heads"], 0, npz["head_dim"]), np.float32)
                                             for n in names if n.startswith("past")}}.items() if k in names})
n_layers, kv, hd, T = int(npz["layers"]), int(npz["kv_heads"]), int(npz["head_dim"]), ids.shape[1]
io = dec.io_binding()
for i in range(n_layers):
    for kind in ("key", "value"):
        buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv, T + 1, hd), np.float32))
        io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
        io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
step = {"inputs_embeds": emb, "attention_mask": npz["attention_mask"], "position_ids": npz["position_ids"],
        "scr_donor": npz["donor"], "scr_scale": npz["scale"], "scr_weight": npz["weight"],
        "seqlens_k": np.array([T - 1], np.int32), "total_sequence_length": np.array(T, np.int32)}
for i in dec.get_inputs():
    if not i.name.startswith("past"):
        io.bind_cpu_input(i.name, np.ascontiguousarray(step[i.name]))
io.bind_output("logits", "cpu")
dec.run_with_iobinding(io)
token = int(io.get_outputs()[-1].numpy()[0, -1].argmax())
print(json.dumps({"import_s": t_import, "token": token}))
"""


def measure(cmd: list[str], repeats: int, env: dict | None = None) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, cwd=ROOT,
                             env=env)
        if out.returncode:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr}")
        runs.append(json.loads(out.stdout))
    runs.sort(key=lambda r: r["wall_s"])
    mid = runs[len(runs) // 2]
    return {"wall_s": mid["wall_s"], "peak_rss_mb": sorted(r["peak_rss_mb"] for r in runs)[len(runs) // 2],
            "stdout": mid["stdout"]}


def save_inputs(directory: Path, image: str, prompt: str, path: Path) -> None:
    """The runner computes the floor's inputs once (token ids, pixels, positions, the plan)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from runtimes.onnxruntime_runner import OrtVLM
    from scr_export.processing import load_image

    r = OrtVLM(directory, device="cpu")
    inputs = r.encode([[load_image(image)]], [prompt])
    plan = r.plan(inputs)
    ids = inputs.array("input_ids")
    am = inputs.array("attention_mask")
    positions, _ = r.positions(inputs)
    hidden = r._session("embed_tokens").get_outputs()[0].shape[-1]
    first = r.generate(inputs, plan=plan, max_new_tokens=1, stop_at_eos=False).tokens[0, 0]
    np.savez(path, first_token=first, input_ids=ids, attention_mask=am, position_ids=positions,
             pixel_values=inputs.array("pixel_values").astype(np.float32),
             image_mask=ids == r.family.image_token_id, donor=plan.donor, scale=plan.scale, weight=plan.weight,
             hidden=hidden, layers=r.num_layers, kv_heads=r.kv_heads, head_dim=r.head_dim)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-llava", help="converted with `scr-export convert --to onnx` if --dir "
                    "is not given (LLaVA-family presets: the floor feeds the image features at the image tokens)")
    ap.add_argument("--dir", help="an existing ONNX directory with the GroupQueryAttention decoder")
    ap.add_argument("--image", default=str(ROOT / "examples" / "red_car.png"))
    ap.add_argument("--prompt", default="What is the red object?")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="scr-footprint-"))
    directory = Path(args.dir) if args.dir else work / "onnx"
    if not args.dir:
        print(f"[bench] converting {args.model} to {directory}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "scr_export.cli", "convert", args.model, "--to", "onnx", "--out",
                        str(directory)], check=True, cwd=ROOT, capture_output=True)
    npz = work / "inputs.npz"
    save_inputs(directory, args.image, args.prompt, npz)

    run = ["-m", "scr_export.cli", "run", str(directory), "--image", args.image, "--prompt", args.prompt,
           "--max-new-tokens", "1", "--device", "cpu"]
    block = work / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(_BLOCK)  # the torch-free process: torch/transformers/onnx raise
    import os

    env = {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{ROOT}"}
    lean_imports = ["-c", "import time; t = time.perf_counter(); import scr_export.cli, runtimes.registry, "
                    "runtimes.onnxruntime_runner, scr_export.hostproc.model, onnxruntime, tokenizers, PIL.Image; "
                    "print(time.perf_counter() - t)"]
    before = measure([sys.executable, "-c", _BEFORE, str(directory), args.image, args.prompt], args.repeats)
    lean = measure([sys.executable, *run], args.repeats, env)
    lean_import = measure([sys.executable, *lean_imports], args.repeats, env)
    floor = measure([sys.executable, "-c", _FLOOR, str(directory), str(npz)], args.repeats)
    import numpy as np

    want = int(np.load(npz)["first_token"])
    got_before = json.loads(before["stdout"].strip().splitlines()[-1])
    got_floor = json.loads(floor["stdout"].strip().splitlines()[-1])
    for name, token in (("before", got_before["token"]), ("floor", got_floor["token"])):
        if token != want:  # every column must do the same work, not less
            raise SystemExit(f"the {name} path's first token {token} differs from the runner's {want}")
    rows = [("peak RSS (MB)", before["peak_rss_mb"], lean["peak_rss_mb"], floor["peak_rss_mb"]),
            ("imports (s)", got_before["import_s"], float(lean_import["stdout"].strip().splitlines()[-1]),
             got_floor["import_s"]),
            ("start to first token (s)", before["wall_s"], lean["wall_s"], floor["wall_s"])]
    print(f"{directory} ({args.model if not args.dir else 'given'}), CPU, median of {args.repeats} fresh processes; "
          f"the same first token ({want}) on every path")
    print(f"{'':<26}{'before':>10}{'torch-free':>12}{'floor':>10}{'torch-free/before':>19}{'floor/before':>14}")
    for name, a, b, c in rows:
        print(f"{name:<26}{a:>10.2f}{b:>12.2f}{c:>10.2f}{b / a:>19.3f}{c / a:>14.3f}")
    print("issue 11's targets for torch-free / before: RSS <= 0.35x, start-up <= 0.3x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
