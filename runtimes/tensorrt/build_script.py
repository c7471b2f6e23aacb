"""``build_engines.sh``: builds a converted directory's TensorRT engines on the target device.

  ./build_engines.sh            plugin path when TensorRT >= 10.13 and scr-export are importable, else trtexec
  ./build_engines.sh plugin     `scr-export build-engines DIR`: SCR nodes as the AOT plugin (PTX in the engine),
                                two decoder profiles (prefill / decode)
  ./build_engines.sh trtexec    trtexec only (any TensorRT >= 10.0, e.g. JetPack 6 / 10.3): SCR nodes imported as
                                their ONNX function body, one merged decoder profile

Both record the build in manifest.json ("tensorrt" -> "engines"), which `scr-export run` / `validate` read.
"""

from __future__ import annotations

import shlex

from .profiles import merged

ENGINE_DIR = "engines"


def shape_arg(profile: dict, key: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(v) for v in s[key])}" for name, s in profile.items())


def trtexec_command(onnx_file: str, engine_file: str, profile: dict, strongly_typed: bool = True) -> list[str]:
    cmd = ["\"$TRTEXEC\"", f"--onnx=\"$DIR/{onnx_file}\"", f"--saveEngine=\"$DIR/{ENGINE_DIR}/{engine_file}\""]
    if profile:
        cmd += [f"--minShapes={shlex.quote(shape_arg(profile, 'min'))}",
                f"--optShapes={shlex.quote(shape_arg(profile, 'opt'))}",
                f"--maxShapes={shlex.quote(shape_arg(profile, 'max'))}"]
    if strongly_typed:  # the graph's own types decide the precision (fp16 graphs give fp16 engines); TRT 11 needs it
        cmd.append("--stronglyTyped")
    cmd += ["--profilingVerbosity=detailed", f"--exportLayerInfo=\"$DIR/{ENGINE_DIR}/{engine_file}.layers.json\"",
            "--skipInference"]
    return cmd


_RECORD = r'''
python3 - "$DIR" "$TRT_VERSION" <<'PY'
import json, os, sys
d, version = sys.argv[1], sys.argv[2]
m = json.load(open(os.path.join(d, "manifest.json")))
engines = {}
for g, f in m["tensorrt"]["engine_files"].items():
    info = os.path.join(d, "engines", f + ".layers.json")
    text = open(info).read() if os.path.exists(info) else ""
    engines[g] = {"file": "engines/" + f, "scr_path": "plugin" if "SCRNeighbourInject" in text and "PluginV3" in text
                  else "function", "profiles": 1}
m["tensorrt"]["engines"] = {"builder": "trtexec", "tensorrt": version, "graphs": engines}
tmp = os.path.join(d, "manifest.json.tmp")
json.dump(m, open(tmp, "w"), indent=2, sort_keys=True)
os.replace(tmp, os.path.join(d, "manifest.json"))
print("recorded the engines in manifest.json")
PY
'''


def build_script(manifest: dict, profiles: dict[str, list[dict]], version: str) -> str:
    files = manifest["tensorrt"]["engine_files"]
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the TensorRT engines of this directory on the target device (written by scr-export {version}).",
        "# Usage: ./build_engines.sh [auto|plugin|trtexec]    (TRTEXEC=/path/to/trtexec to pick the binary)",
        "#   plugin : `scr-export build-engines DIR`: SCR nodes run as the AOT plugin (needs TensorRT >= 10.13 and",
        "#            scr-export on this device); decoder with prefill and decode profiles",
        "#   trtexec: any TensorRT >= 10.0 (JetPack 6 ships 10.3): SCR nodes run as their ONNX function body",
        "set -euo pipefail",
        'DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        'MODE="${1:-auto}"',
        'if [ "$MODE" = auto ]; then',
        '  if command -v scr-export >/dev/null && python3 -c "import sys, tensorrt as t; '
        'v = tuple(int(x) for x in t.__version__.split(\'.\')[:2]); sys.exit(0 if v >= (10, 13) else 1)" 2>/dev/null; then',
        "    MODE=plugin",
        "  else",
        "    MODE=trtexec",
        "  fi",
        "fi",
        'if [ "$MODE" = plugin ]; then',
        '  exec scr-export build-engines "$DIR"',
        "fi",
        'if [ "$MODE" != trtexec ]; then echo "usage: $0 [auto|plugin|trtexec]" >&2; exit 2; fi',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        'if [ ! -x "$TRTEXEC" ]; then',
        '  echo "trtexec not found: install TensorRT (JetPack ships /usr/src/tensorrt/bin/trtexec) or set TRTEXEC" >&2',
        "  exit 2",
        "fi",
        'TRT_VERSION="$("$TRTEXEC" --help 2>&1 | sed -n \'s/.*TensorRT version: *\\([0-9.]*\\).*/\\1/p\' | head -1)"',
        'TRT_VERSION="${TRT_VERSION:-unknown}"',
        f'mkdir -p "$DIR/{ENGINE_DIR}"',
    ]
    for graph, engine in files.items():
        prof = merged(profiles[graph])
        lines.append(f'echo "[build_engines] {graph} -> {ENGINE_DIR}/{engine}"')
        lines.append(" \\\n    ".join(trtexec_command(manifest["graphs"][graph]["file"], engine, prof)))
    lines.append(_RECORD.strip("\n"))
    return "\n".join(lines) + "\n"
