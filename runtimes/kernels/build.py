"""Build the SCRNeighbourInject kernels from this folder's sources: the ONNX Runtime custom-op libraries (CPU with
g++, CUDA with nvcc + g++) and the PTX the TensorRT plugin embeds in engines.

    scr-export build-ops [--cuda] [--ptx ARCH ...] [--out DIR]

Libraries land in a cache keyed by the sources, the compiler and the flags (``$SCR_EXPORT_CACHE/ops/<key>/``), so
the ONNX Runtime runner finds the library that matches the installed sources (``find_library``) and a changed
source is never served by a stale build. The ORT C/C++ headers are not in the onnxruntime wheel: they come from
``$SCR_EXPORT_ORT_INCLUDE`` when set, else from Debian's ``libonnxruntime-dev`` 1.21 package (headers only, MIT),
downloaded once and checked against its sha256. Headers of API 21 give a library that loads in ORT >= 1.21.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from scr_export.errors import SCRExportError

SOURCES = Path(__file__).resolve().parent
KERNEL_CU = SOURCES / "scr_neighbour_inject.cu"
ORT_OPS_CC = SOURCES / "scr_ort_ops.cc"
HEADERS = (SOURCES / "scr_neighbour_inject.h", SOURCES / "scr_neighbour_inject_cpu.h")

ORT_HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
                   "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
CPU_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off"]
# compute_87 PTX runs on Orin (sm_87) and, JIT-compiled by the driver, on every newer GPU (sm_89, sm_90, ...)
PTX_ARCHS = ("87", "89", "90")
LIBRARY = {"cpu": "libscr_ort_ops.so", "cuda": "libscr_ort_ops_cuda.so"}


class BuildError(SCRExportError):
    """A kernel could not be built."""


class HeadersUnreachable(BuildError):
    """The server with the ONNX Runtime headers package could not be reached (no network, DNS, refused, timed out).

    Only this is a network problem: an HTTP error status (e.g. 404 once Debian drops the pinned version), a sha256
    mismatch or a file that is not a Debian archive are plain :class:`BuildError` s, because retrying cannot fix them.
    """


def _cache_root() -> Path:
    from scr_export.presets import cache_root

    return cache_root() / "ops"


def _tool(name: str, hint: str) -> str:
    env = {"g++": "CXX", "nvcc": "NVCC"}.get(name)
    path = os.environ.get(env) if env else None
    path = path or shutil.which(name)
    if not path and name in ("nvcc", "ptxas"):
        for root in sorted(Path("/usr/local").glob("cuda*"), reverse=True):
            if (root / "bin" / name).exists():
                path = str(root / "bin" / name)
                break
    if not path:
        raise BuildError(f"{name} was not found", hint)
    return path


def nvcc_available() -> bool:
    try:
        _tool("nvcc", "")
        return True
    except BuildError:
        return False


@functools.lru_cache(maxsize=None)
def _version(tool: str) -> str:  # asked on every runner start (find_library): once per process is enough
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else tool


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed ({' '.join(cmd[:1])} exit {proc.returncode}):\n{proc.stderr.strip()[-3000:]}",
                         "check the compiler installation; the command was: " + " ".join(cmd))
    return proc.stderr + proc.stdout


def _key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in (KERNEL_CU, ORT_OPS_CC, *HEADERS):
        h.update(p.read_bytes())
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _deb_data_members(deb: bytes):
    """The files of a .deb (an ar archive holding data.tar.*), without dpkg."""
    if not deb.startswith(b"!<arch>\n"):
        raise BuildError("the downloaded headers package is not a Debian archive", "delete it from the cache and retry")
    pos = 8
    while pos + 60 <= len(deb):
        name = deb[pos:pos + 16].decode().strip().rstrip("/")
        size = int(deb[pos + 48:pos + 58].decode().strip())
        body = deb[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size % 2)
    raise BuildError("the headers package holds no data.tar", "delete it from the cache and retry")


def ort_include_dir(progress: Callable[[str], None] = lambda m: None) -> Path:
    """A directory with onnxruntime_cxx_api.h and onnxruntime_lite_custom_op.h."""
    env = os.environ.get("SCR_EXPORT_ORT_INCLUDE")
    if env:
        inc = Path(env)
        if not (inc / "onnxruntime_lite_custom_op.h").exists():
            raise BuildError(f"$SCR_EXPORT_ORT_INCLUDE={env} has no onnxruntime_lite_custom_op.h",
                             "point it at ONNX Runtime's include/onnxruntime folder (>= 1.21), or unset it")
        return inc
    url, sha = ORT_HEADERS_DEB
    inc = _cache_root() / f"ort-headers-{sha[:12]}"
    if (inc / "onnxruntime_lite_custom_op.h").exists():
        return inc
    progress(f"fetching the ONNX Runtime C/C++ headers (Debian libonnxruntime-dev 1.21) from {url}")
    host = urllib.parse.urlsplit(url).hostname
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            deb = r.read()
    except urllib.error.HTTPError as exc:  # the server answered, but not with the package: retrying will not help
        raise BuildError(f"{host} answered HTTP {exc.code} ({exc.reason}) for the ONNX Runtime headers package {url}",
                         "the pinned Debian package may have left the archive: set SCR_EXPORT_ORT_INCLUDE to an "
                         "include/onnxruntime folder of ORT >= 1.21, or update ORT_HEADERS_DEB") from None
    except (OSError, http.client.HTTPException) as exc:  # no route, DNS, refused, timed out, connection dropped
        raise HeadersUnreachable(f"cannot reach {host} to download the ONNX Runtime headers ({exc})",
                                 "connect to the network and retry, or set SCR_EXPORT_ORT_INCLUDE to an "
                                 "include/onnxruntime folder of ORT >= 1.21") from None
    if hashlib.sha256(deb).hexdigest() != sha:
        raise BuildError("the downloaded ONNX Runtime headers package has an unexpected sha256",
                         "retry; if it persists set SCR_EXPORT_ORT_INCLUDE to a local ORT include folder")
    tmp = Path(tempfile.mkdtemp(prefix=".ort-headers-", dir=_ensure(_cache_root())))
    with _deb_data_members(deb) as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.endswith(".h") and "/include/onnxruntime/" in m.name:
                rel = m.name.split("/include/onnxruntime/", 1)[1]
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(m).read())
    try:
        tmp.rename(inc)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return inc


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _cuda_root(nvcc: str) -> Path:
    """The CUDA toolkit folder (with include/cuda_runtime.h); nvcc may be a wrapper script elsewhere."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(nvcc).resolve().parent.parent)]
    candidates += [str(p) for p in sorted(Path("/usr/local").glob("cuda*"), reverse=True)]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    raise BuildError(f"cannot find the CUDA toolkit that {nvcc} belongs to (no include/cuda_runtime.h)",
                     "set CUDA_HOME to the toolkit folder, e.g. /usr/local/cuda")


def library_dir(kind: str) -> Path:
    """Where the library of ``kind`` ('cpu' or 'cuda') for the current sources and compiler lives."""
    if kind == "cpu":
        cxx = _tool("g++", "install a C++17 compiler (Debian/Ubuntu: apt install g++)")
        return _cache_root() / f"cpu-{_key(_version(cxx), *CPU_FLAGS)}"
    nvcc = _tool("nvcc", "install the CUDA toolkit (nvcc) or put it on PATH")
    return _cache_root() / f"cuda-{_key(_version(nvcc), *CPU_FLAGS, *PTX_ARCHS)}"


def find_library(kind: str = "cpu") -> Path | None:
    """The built library for the current sources, or None (never builds)."""
    try:
        path = library_dir(kind) / LIBRARY[kind]
    except BuildError:
        return None
    return path if path.exists() else None


def _install(tmp_lib: Path, final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_lib, final)  # atomic: a reader never sees half a library
    return final


def build_cpu_library(progress: Callable[[str], None] = lambda m: None, force: bool = False) -> Path:
    """Compile the CPU custom-op library (about 5 s) and return its path."""
    final = library_dir("cpu") / LIBRARY["cpu"]
    if final.exists() and not force:
        return final
    inc = ort_include_dir(progress)
    cxx = _tool("g++", "install a C++17 compiler (Debian/Ubuntu: apt install g++)")
    progress(f"compiling {ORT_OPS_CC.name} for the CPU execution provider")
    with tempfile.TemporaryDirectory(dir=_ensure(final.parent)) as tmp:
        lib = Path(tmp) / LIBRARY["cpu"]
        _run([cxx, *CPU_FLAGS, f"-I{inc}", f"-I{SOURCES}", str(ORT_OPS_CC), "-o", str(lib)], "compiling the CPU op")
        return _install(lib, final)


def build_cuda_library(progress: Callable[[str], None] = lambda m: None, force: bool = False,
                       archs: tuple[str, ...] = PTX_ARCHS) -> Path:
    """Compile the CUDA custom-op library (kernel with nvcc, registration with g++, linked to libcudart)."""
    final = library_dir("cuda") / LIBRARY["cuda"]
    if final.exists() and not force:
        return final
    inc = ort_include_dir(progress)
    cxx = _tool("g++", "install a C++17 compiler (Debian/Ubuntu: apt install g++)")
    nvcc = _tool("nvcc", "install the CUDA toolkit (nvcc) or put it on PATH")
    cuda = _cuda_root(nvcc)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs] + \
              [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    progress(f"compiling {KERNEL_CU.name} with nvcc for sm_{', sm_'.join(archs)} (+ PTX)")
    with tempfile.TemporaryDirectory(dir=_ensure(final.parent)) as tmp:
        obj = Path(tmp) / "kernel.o"
        _run([nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-fmad=false", *gencode, f"-I{SOURCES}", "-c",
              str(KERNEL_CU), "-o", str(obj)], "compiling the CUDA kernel")
        lib = Path(tmp) / LIBRARY["cuda"]
        libdir = next((p.parent for p in (cuda / "lib64" / "libcudart.so", cuda / "lib" / "libcudart.so",
                                          *cuda.glob("targets/*/lib/libcudart.so")) if p.exists()), cuda / "lib64")
        progress("linking the CUDA custom-op library")
        _run([cxx, *CPU_FLAGS, "-DSCR_WITH_CUDA", f"-I{inc}", f"-I{SOURCES}", f"-I{cuda / 'include'}",
              str(ORT_OPS_CC), str(obj), f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-lcudart", "-o", str(lib)],
             "linking the CUDA op")
        return _install(lib, final)


def build_ptx(arch: str = "87", out: Path | None = None) -> Path:
    """The kernel as PTX for compute_<arch> (entry points only, no host launcher): what TensorRT engines embed."""
    nvcc = _tool("nvcc", "install the CUDA toolkit (nvcc) or put it on PATH")
    final = out or (_cache_root() / f"ptx-{_key(_version(nvcc), arch)}" / f"scr_neighbour_inject_sm{arch}.ptx")
    if final.exists() and out is None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_suffix(".ptx.tmp")
    _run([nvcc, "-ptx", "-O3", "-std=c++17", "-fmad=false", "-DSCR_PTX_ONLY", f"-arch=compute_{arch}", str(KERNEL_CU),
          "-o", str(tmp)], f"generating PTX for compute_{arch}")
    os.replace(tmp, final)
    return final


_PTXAS_LINE = re.compile(r"Compiling entry function '(\w+)'|Used (\d+) registers|(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: Path, sm: str) -> dict[str, dict[str, int]]:
    """Per entry point: registers and spill bytes from ``ptxas -v`` for ``sm_<sm>``."""
    ptxas = _tool("ptxas", "install the CUDA toolkit (ptxas) or put it on PATH")
    text = _run([ptxas, f"-arch=sm_{sm}", "-v", str(ptx), "-o", os.devnull], f"ptxas for sm_{sm}")
    report: dict[str, dict[str, int]] = {}
    current = None
    for m in _PTXAS_LINE.finditer(text):
        if m.group(1):
            current = report.setdefault(m.group(1), {})
        elif current is not None and m.group(2):
            current["registers"] = int(m.group(2))
        elif current is not None and m.group(3):
            current["spill_stores"], current["spill_loads"] = int(m.group(3)), int(m.group(4))
    return report
