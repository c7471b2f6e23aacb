"""Run a converted directory with ONNX Runtime: image + prompt -> vision -> diagnostic -> plan -> prefill with the
plan -> greedy decoding with a KV cache and an identity plan. The plan comes from the same host function as the
PyTorch reference (``scr_export.plan.plan_sequence``)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scr_export.attention_map import batch_maps
from scr_export.config import SCRConfig
from scr_export.errors import SCRExportError
from scr_export.hostproc.model import HostModel
from scr_export.manifest import QUANTIZED, read_manifest
from scr_export.plan import SequencePlan, plan_sequence
from scr_export.positions import vision_cu_seqlens, vision_positions
from scr_export.processing import VLMInputs

from .sampling import GREEDY, Sampling, TokenSink


GQA_DECODER = "decoder_gqa"  # session name of the decoder's GroupQueryAttention variant
MHA_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")  # run com.microsoft::MultiHeadAttention


class RuntimeUnavailable(SCRExportError):
    """ONNX Runtime (or the asked-for provider) is not installed."""


def pick_providers(device: str = "auto") -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU (or when asked for), else CPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailable("onnxruntime is not installed (it is scr-export's core dependency)",
                                 "pip install onnxruntime==1.32.0 (CPU), or onnxruntime-gpu==1.31.1 (CUDA)") from None
    check_one_onnxruntime()
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeUnavailable(f"the CUDA execution provider is not available (have: {', '.join(available)})",
                                 "pip install onnxruntime-gpu on a machine with CUDA, or use --device cpu")
    if "CUDAExecutionProvider" in available and device in ("auto", "cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def check_one_onnxruntime() -> None:
    """onnxruntime (the core dependency) and onnxruntime-gpu install the same module: with both, whichever was
    installed last wins file by file, a broken mix. Say so instead of failing somewhere inside ONNX Runtime."""
    from importlib import metadata

    have = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            have.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    if len(have) == 2:
        raise RuntimeUnavailable(f"both {have[0]} and {have[1]} are installed; they share the onnxruntime module",
                                 "keep one: pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                                 "onnxruntime-gpu==1.31.1 (CUDA) or onnxruntime==1.32.0 (CPU)")


def _float_inputs(session) -> dict[str, Any]:
    """A session's floating point inputs and the numpy type each takes (feeds are cast to it)."""
    return {i.name: (np.float16 if i.type == "tensor(float16)" else np.float32)
            for i in session.get_inputs() if "float" in i.type}


def _x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _accuracy_level_1(model) -> None:
    """MatMulNBits nodes compute with float32 activations (the engine-only reference)."""
    import onnx

    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            levels = [a for a in n.attribute if a.name == "accuracy_level"]
            if levels:
                levels[0].i = 1
            else:
                n.attribute.append(onnx.helper.make_attribute("accuracy_level", 1))


def _uint8_activations(model) -> None:
    """Symmetric int8 activation Q/DQ pairs -> uint8 with zero point 128: q_u8 = q_s8 + 128 represents exactly the
    same values ((q_u8 - 128) * scale), and ONNX Runtime's x86 CPU kernels fuse them (MatMulIntegerToFloat), which
    they do not for int8. The fused kernels are not bit-identical to the graph as written: on tiny-llava (red_car)
    the prefill logits differ by up to 2.3e-3 (int8 activations, unfused: 2.4e-7), inside the engine gate that
    ``validate`` applies. Weight DequantizeLinear nodes (constant int8 inputs) are left as they are."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    from graph_passes.edges import tensor_edges

    inits = {i.name: i for i in model.graph.initializer}
    _, consumers = tensor_edges(model.graph)
    zp_u8: dict[str, str] = {}
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        if len(q.input) < 3 or q.input[2] not in inits or q.input[0] in inits:
            continue
        zp = inits[q.input[2]]
        users = consumers.get(q.output[0], [])
        if zp.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zp)) or not users or \
                any(u.op_type != "DequantizeLinear" or len(u.input) < 3 or u.input[2] != q.input[2] for u in users):
            continue
        name = zp_u8.get(zp.name)
        if name is None:
            name = zp_u8[zp.name] = f"{zp.name}_u8"
            model.graph.initializer.append(
                numpy_helper.from_array(np.full(numpy_helper.to_array(zp).shape, 128, np.uint8), name))
        q.input[2] = name
        for u in users:
            u.input[2] = name
    used = {i for n in model.graph.node for i in n.input}
    stale = [i for i in model.graph.initializer if i.name in zp_u8 and i.name not in used]
    for i in stale:
        model.graph.initializer.remove(i)


def gpu_compute_capability() -> tuple[int, int] | None:
    """The first GPU's compute capability, from nvidia-smi (no framework needed); None where it cannot tell."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.split()
        major, minor = out[0].split(".")
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def check_fp8_gpu() -> None:
    """fp8 Q/DQ graphs on the CUDA provider need an fp8 GPU (Ada sm_89, Hopper sm_90 or newer)."""
    cc = gpu_compute_capability()
    if cc is None:
        return  # cannot tell (no nvidia-smi, e.g. Jetson): ONNX Runtime reports it itself
    if cc < (8, 9):
        raise RuntimeUnavailable(f"this GPU (sm_{cc[0]}{cc[1]}) has no fp8 support; fp8 graphs need sm_89 (Ada) "
                                 "or newer", "use --device cpu (fp8 emulated), or convert with --precision int8")


def have_onnx() -> bool:
    """The onnx package (the [export] extra) is installed: graph rewrites at load time need it."""
    import importlib.util

    try:
        return importlib.util.find_spec("onnx") is not None
    except ImportError:
        return False


@dataclasses.dataclass
class OrtResult:
    tokens: np.ndarray
    texts: list[str]
    plan: SequencePlan
    logits: list[np.ndarray]
    prefill_logits: np.ndarray | None
    attention: list[list[np.ndarray | None]]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds: diagnostic, prefill, decode
    cancelled: bool = False  # the token sink stopped the decoding


SHRINK_TOKENS = 256  # a run over at least this many positions gives its arena memory back when it ends


def _shrink_after(feed: dict[str, Any]):
    """Run options that shrink ONNX Runtime's CPU arena at the end of a large run (a photo's prefill: its attention
    and logits are GBs), so one request's peak is not kept for the rest of the process; None (no options) for the
    small runs, decode steps above all, which reuse the arena's blocks. Measured: benchmarks/photo_memory.py."""
    x = feed.get("inputs_embeds")
    if x is None or x.ndim < 2 or x.shape[0] * x.shape[1] < SHRINK_TOKENS:
        return None
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class OrtVLM:
    """A converted directory, loaded into ONNX Runtime sessions."""

    def __init__(self, directory: str | Path, device: str = "auto", threads: int | None = None,
                 scr_kernel: str | None = None, unfused: bool = False, attention: str = "auto",
                 share_weights: bool | str = "auto"):
        """``unfused=True`` runs quantized graphs as written, without ONNX Runtime's quantized kernels: Q/DQ graphs
        with ``session.disable_quant_qdq`` (DequantizeLinear + float MatMul), MatMulNBits at accuracy level 1
        (float32 activations). It is the engine-only reference of `validate`: fused vs unfused is kernel error,
        unfused vs the float model is quantization error.

        ``attention``: which decoder runs one prompt. ``auto`` takes the GroupQueryAttention decoder where the
        directory has one and the provider runs it natively (CPU; CUDA for float16 graphs), else the eager one;
        batches of several prompts always run the eager decoder (loaded when first needed).

        ``share_weights``: the graphs that name the decoder's weights file (decoder, its GroupQueryAttention twin,
        the diagnostic graph) get one memory-mapped copy of it (``runtimes.ort_weights``; pre-packing off for
        them: less memory, slower MatMuls); ``auto`` does so on the CPU when that file is over a quarter of the
        memory available."""
        self._load_directory(directory)
        self.providers = pick_providers(device)
        self.device = device
        self.unfused = unfused
        self.recorder = None  # callable(graph name, feed): sees every feed (the calibration reader records them)
        quant = self.manifest.get("quantization") or {}
        if quant and "CUDAExecutionProvider" in self.providers and self.manifest.get("precision") == "fp8":
            check_fp8_gpu()
        self.threads, self._quant, self._scr_kernel_mode = threads, quant, scr_kernel
        # what runs the SCRNeighbourInject nodes: the custom-op library when built, else their ONNX function body
        self.scr_kernel = self._options("decoder")[1]
        self.attention = self._pick_attention(attention)
        vision = self.manifest["graphs"].get("vision") or {}
        # the vision graph with ONNX Runtime's MultiHeadAttention (a flash kernel: no [heads, N, N] matrix), where
        # the directory has one and the provider runs the op; the memory guard counts what that graph needs
        self._vision_mha = bool(vision.get("mha")) and self.providers[0] in MHA_PROVIDERS
        self.family.vision_attention = "fused" if self._vision_mha else "eager"
        self.sessions = {}
        self.token_table = None  # callable(ids) -> embeddings replacing the embed_tokens graph (GGUF directories)
        self._input_types: dict[str, dict[str, Any]] = {}
        from .ort_weights import SharedWeights, worth_sharing

        weights = self.dir / (self.manifest["graphs"].get("decoder", {}).get("file", "") + ".data")
        self.shared_weights = SharedWeights() if self.providers[0] == "CPUExecutionProvider" and (
            share_weights is True or (share_weights == "auto" and worth_sharing(weights))) else None
        self._shared_file = weights.name
        self._tmp = None
        self._engine = None  # the unfused twin (engine_reference), when asked for
        for name in self.manifest["graphs"]:
            self._session(GQA_DECODER if name == "decoder" and self.attention == "gqa" else name)
        if "decoder" in self.manifest["graphs"] and "decoder" not in self.sessions:
            self._check_readable(self.dir / self.manifest["graphs"]["decoder"]["file"])  # loaded for batches
        ep = next(iter(self.sessions.values())).get_providers()[0] if self.sessions else self.providers[0]
        self.provider = ep if "decoder" not in self.manifest["graphs"] else \
            f"{ep}, SCR nodes: {self.scr_kernel}, attention: {self.attention}"
        if unfused:
            self.provider += ", quantized kernels off (engine reference)"

    def _pick_attention(self, requested: str) -> str:
        if requested not in ("auto", "eager", "gqa"):
            raise SCRExportError(f"attention {requested!r} is unknown", "use auto (default), eager or gqa")
        decoder = self.manifest["graphs"].get("decoder", {})
        if decoder.get("attention") == "gqa":
            raise SCRExportError(f"{self.dir} was converted by an earlier scr-export whose --attention gqa replaced "
                                 "the eager decoder", "convert the model again (both decoders are written now)")
        has_gqa = "gqa" in decoder
        cuda = self.providers[0] == "CUDAExecutionProvider"
        native = not cuda or self.float_type == np.float16  # ORT's CUDA GroupQueryAttention takes float16 only
        if requested == "gqa":
            if not has_gqa:
                raise SCRExportError(f"{self.dir} has no GroupQueryAttention decoder",
                                     "convert again with --to onnx --attention gqa (the default), or use "
                                     "--attention eager")
            if not native:
                raise SCRExportError("ONNX Runtime's CUDA GroupQueryAttention takes float16 only; this directory's "
                                     "decoder is float32", "use --attention eager (or auto), or convert with "
                                     "--precision fp16")
        if requested == "eager" or not has_gqa or not native:
            return "eager"
        return "gqa"

    @staticmethod
    def _check_readable(path: Path) -> None:
        """A graph loaded only when first needed is parsed now (without its weights), so a damaged file is
        reported at load time, not in the middle of a batch."""
        if not have_onnx():  # the lean install: presence only (ONNX Runtime parses it when first needed)
            if not path.is_file() or path.stat().st_size == 0:
                raise SCRExportError(f"{path.name} is missing or empty", "convert the model again")
            return
        import onnx

        try:
            onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise SCRExportError(f"ONNX Runtime cannot load {path.name}: not a readable ONNX file "
                                 f"({type(exc).__name__})", "the file is damaged or incomplete: convert the model "
                                 "again") from None

    def _options(self, name: str):
        """Session options of graph ``name`` and what runs its SCR nodes. Each session has its own thread pool,
        and ONNX Runtime's pool threads spin after a run: on a small CPU the side graphs' spinning threads took the
        cores from the decoder step that follows them (measured on small-llava, 2 cores: the prefill 150 ms alone,
        190 ms right after the vision encoder). So only the decoders spin; the token embedding (a Gather) runs on
        the calling thread."""
        import onnxruntime as ort

        from runtimes.kernels.ort_library import attach

        opts = ort.SessionOptions()
        if name == "embed_tokens":
            opts.intra_op_num_threads = 1
        elif self.threads:
            opts.intra_op_num_threads = self.threads
        if name not in ("decoder", GQA_DECODER):
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if name == "vision":
            # A photo's vision attention is the largest transient of a request (GBs at Qwen2-VL's pixel limits);
            # with the arena, ONNX Runtime would keep that peak for the rest of the process. Without it, the blocks
            # go back to the system after each image (measured: benchmarks/photo_memory.py, README).
            opts.enable_cpu_mem_arena = False
        if self.unfused:
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        elif self._quant.get("precision") == "int4":
            # blocked int4 Q/DQ files (--to trt) are fused into MatMulNBits on the CPU: at the recorded level
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                          str(self._quant["int4_accuracy_level"]))
        return opts, attach(opts, self.providers, self._scr_kernel_mode)

    def _session(self, name: str):
        """The ONNX Runtime session of graph ``name``, loaded on first use (``decoder_gqa`` is the decoder's
        GroupQueryAttention variant, over the same weights file)."""
        if name in self.sessions:
            return self.sessions[name]
        import onnxruntime as ort

        graph = "decoder" if name == GQA_DECODER else name
        info = self.manifest["graphs"][graph]
        path = self.dir / (info["gqa"]["file"] if name == GQA_DECODER else
                           info["mha"]["file"] if name == "vision" and self._vision_mha else info["file"])
        gq = self._quant.get("graphs", {}).get(graph, {})
        fmt = gq.get("format")
        if self.unfused and fmt == "matmulnbits":
            path = self._rewritten(path, _accuracy_level_1)
        elif (not self.unfused and fmt == "qdq" and gq.get("precision", self._quant.get("precision")) == "int8"
              and self.providers[0] == "CPUExecutionProvider" and _x86() and have_onnx()):
            # ONNX Runtime fuses int8 activations into its int8 kernels only on ARM; on x86 it wants uint8 (the
            # same values with zero point 128), so the file stays one. The rewrite needs onnx: a lean install runs
            # the int8 file as written (unfused on x86: slower, and within 2.4e-7 of the graph's own arithmetic).
            path = self._rewritten(path, _uint8_activations)
        opts = self._options(graph)[0]
        if self.shared_weights is not None and graph in ("decoder", "diagnostic"):
            self.shared_weights.attach(opts, path, only={self._shared_file})
        try:
            session = ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise SCRExportError(f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0]}",
                                 "the file is damaged or incomplete: convert the model again") from None
        self.sessions[name] = session
        self._input_types[name] = _float_inputs(session)
        return session

    def _rewritten(self, path: Path, edit) -> Path:
        """A copy of graph ``path`` changed by ``edit(model)`` in a private directory; the weights file is linked
        (or copied across file systems), never changed."""
        import tempfile

        import onnx

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="scr-ort-")
        model = onnx.load(str(path), load_external_data=False)
        edit(model)
        out = Path(self._tmp.name) / path.name
        onnx.save(model, str(out))
        locations = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
        for name in locations:
            data, link = path.parent / name, out.parent / name
            if link.exists():
                continue
            try:  # ONNX Runtime refuses external data outside the model's directory, so a symlink will not do
                os.link(data, link)
            except OSError:  # another file system: copy
                import shutil

                shutil.copyfile(data, link)
        return out

    def _load_directory(self, directory: str | Path) -> None:
        """Manifest, the host model (family adapter, tokenizer, torch-free encode) and decoder geometry: what every
        runtime's runner shares."""
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        self.host = HostModel(self.dir, self.manifest)
        self.family = self.host.family
        from graph_passes.contract import ATTENTION_ROWS

        diagnostic = self.manifest.get("graphs", {}).get("diagnostic")
        if diagnostic and diagnostic.get("outputs") != [ATTENTION_ROWS]:
            raise SCRExportError(f"{self.dir} was converted by an earlier scr-export: its diagnostic graph reduces "
                                 "the attention map itself, where the runtimes now hand the host per-layer rows",
                                 "convert the model again with this version")
        self.config = SCRConfig.from_dict(self.manifest["scr"])
        d = self.manifest["decoder"]
        self.num_layers, self.kv_heads, self.head_dim = d["num_layers"], d["kv_heads"], d["head_dim"]
        # the KV cache's type: the decoder's own (float16 only for fp16 graphs; quantized graphs keep float32 I/O)
        self.float_type = np.float16 if self.manifest.get("precision") == "fp16" and "gguf" not in self.manifest \
            else np.float32

    # -- the runtime interface (runtimes.registry.VLMRuntime) ----------------------------------------------------
    def float_gate(self) -> str:
        precision = self.manifest["precision"]
        return f"{precision}/float" if precision in QUANTIZED else precision

    def release(self) -> None:
        """Drop the sessions (reloaded on first use) and the unfused twin."""
        import gc

        self.sessions.clear()
        self._input_types.clear()
        self._engine = None
        if self.shared_weights is not None:
            from .ort_weights import SharedWeights

            self.shared_weights = SharedWeights()  # unmaps the file once no session holds its values
        gc.collect()

    def engine_reference(self, family: Any, inputs: VLMInputs, in_place: bool = False):
        """Quantized graphs: the same graphs run unfused (kernel error apart from quantization error)."""
        precision = self.manifest["precision"]
        if precision not in QUANTIZED or self.unfused:
            return None
        if self._engine is None:  # loaded once: dataset validation asks for it per sample
            self._engine = OrtVLM(self.dir, device=self.device, unfused=True, attention=self.attention)
        return "engine", self._engine, f"{precision}/engine"

    def context_limit(self) -> tuple[int | None, str]:
        return getattr(self.family.text_config, "max_position_embeddings", None), "the model's positions"

    def check_config(self, config: SCRConfig) -> None:
        """The layer ranges are baked into the graphs: a config that asks for others is refused, not ignored."""
        for name in ("layers", "diag_layers"):
            want, have = tuple(getattr(config, name)), tuple(getattr(self.config, name))
            if want != have:
                flag = "--" + name.replace("_", "-")
                raise SCRExportError(f"{name} {want[0]}..{want[1]} asked, but this directory's graphs have "
                                     f"{have[0]}..{have[1]} built in", f"convert again with {flag} "
                                     f"{want[0]}..{want[1]}, or leave {name} at the manifest's")

    # -- pieces -------------------------------------------------------------------------------------------------
    def positions(self, inputs: VLMInputs) -> tuple[np.ndarray, np.ndarray]:
        """Prefill position ids and the first generated token's (numpy, once per request)."""
        arrays = {k: inputs.array(k) for k in ("input_ids", "attention_mask", "image_grid_thw") if k in inputs.tensors}
        if self.family.uses_mrope:
            arrays.setdefault("image_grid_thw", np.zeros((0, 3), np.int64))  # a text-only prompt
        return self.family.host_positions(arrays)

    def encode(self, images: Sequence[Sequence[Any]], prompts: Sequence[str], text_only: bool = False) -> VLMInputs:
        """Images + prompts -> numpy inputs, without torch or transformers (``scr_export.hostproc``);
        ``text_only``: prompts without images are allowed (SCR then has nothing to edit)."""
        return self.host.encode(images, prompts, text_only=text_only)

    def _run(self, name: str, feed: dict[str, np.ndarray], outputs=None):
        """Run one graph; float inputs are cast to the graph's own input type (GGUF directories hold float32
        vision graphs beside an f16 decoder)."""
        session = self._session(name)
        types = self._input_types[name]
        feed = {k: (v.astype(types[k]) if k in types and v.dtype != types[k] else v)
                for k, v in feed.items() if k in self._wanted(name)}
        if self.recorder is not None:
            self.recorder(name, feed)
        return session.run(outputs, feed, _shrink_after(feed))

    def _wanted(self, name: str) -> set[str]:
        cache = self.__dict__.setdefault("_wanted_cache", {})
        if name not in cache:
            cache[name] = {i.name for i in self._session(name).get_inputs()}
        return cache[name]

    def _run_decoder(self, feed: dict[str, Any]) -> dict[str, Any]:
        """One decoder call, outputs by name. (I/O binding of the KV cache alone was measured here: no gain on the
        CPU provider; what pays is not copying the cache at all, the GroupQueryAttention graphs below.)"""
        names = [o.name for o in self._session("decoder").get_outputs()]
        return dict(zip(names, self._run("decoder", feed)))

    @property
    def shared_kv(self) -> bool:
        """One prompt runs the GroupQueryAttention decoder, with one KV buffer per layer that is both past and
        present."""
        return self.attention == "gqa"

    def _gqa_cache(self, batch: int, max_len: int) -> dict:
        """The shared KV buffers (one per layer and kind, past and present at once) and an I/O binding with them
        bound once; each call rebinds only the step's own inputs."""
        import onnxruntime as ort

        if batch != 1:
            raise ValueError(f"the GroupQueryAttention decoder runs one prompt at a time; got {batch}")
        device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        shape = (1, self.kv_heads, max_len, self.head_dim)
        io = self._session(GQA_DECODER).io_binding()
        buffers = {}
        for i in range(self.num_layers):
            for kind in ("key", "value"):
                buf = buffers[(i, kind)] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.float_type), device, 0)
                io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
        step_inputs = sorted(k for k in self._wanted(GQA_DECODER) if not k.startswith("past_key_values."))
        return {"io": io, "buffers": buffers, "max_len": max_len, "inputs": step_inputs}

    def _run_gqa(self, feed: dict[str, Any], cache: dict, total: int) -> np.ndarray:
        """One decoder call on the shared cache (``total`` = tokens in the cache after this call); returns logits."""
        if total > cache["max_len"]:
            raise SCRExportError(f"{total} tokens exceed the KV buffer of {cache['max_len']}",
                                 "this is a bug in the runner's buffer sizing: report it")
        feed = {**feed, "seqlens_k": np.full((1,), total - 1, np.int32),
                "total_sequence_length": np.array(total, np.int32)}
        if self.recorder is not None:
            self.recorder(GQA_DECODER, feed)
        io, types = cache["io"], self._input_types[GQA_DECODER]
        for k in cache["inputs"]:
            v = feed[k]
            io.bind_cpu_input(k, np.ascontiguousarray(v.astype(types[k]) if k in types and v.dtype != types[k] else v))
        io.bind_output("logits", "cpu")  # rebound each call: its shape changes between prefill and decode
        self._session(GQA_DECODER).run_with_iobinding(io, _shrink_after(feed))
        return io.get_outputs()[-1].numpy()

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings [B, T, D]: the embed_tokens graph, or ``token_table`` where one is set (a GGUF
        directory embeds from the GGUF's own table, as llama.cpp does)."""
        if self.token_table is not None:
            return self.token_table(ids).astype(self.float_type, copy=False)
        return self._run("embed_tokens", {"input_ids": ids})[0]

    def embed(self, inputs: VLMInputs) -> np.ndarray:
        """inputs_embeds [B, T, D]: token embeddings with the image features (or VQ ids) put at the image tokens."""
        fam = self.family
        ids = inputs.array("input_ids").copy()
        mask = ids == fam.image_token_id
        if "pixel_values" not in inputs.tensors and not mask.any():  # text only
            return self.embed_ids(ids)
        pv = inputs.array("pixel_values").astype(self.float_type)
        if fam.name == "chameleon":
            codes = self._run("vision", {"pixel_values": pv})[0]
            ids[mask] = codes.reshape(-1)
            return self.embed_ids(ids)
        embeds = self.embed_ids(ids)
        if fam.name == "qwen2_vl":
            feats, offset = [], 0
            for thw in inputs.array("image_grid_thw"):
                n = int(thw.prod())
                feats.append(self._run("vision", {"pixel_values": pv[offset:offset + n],
                                                  "vision_position_ids": vision_positions(thw, fam.merge),
                                                  "cu_seqlens": vision_cu_seqlens(thw)})[0])
                offset += n
            features = np.concatenate(feats, axis=0)
        else:
            features = self._run("vision", {"pixel_values": pv})[0]
            features = features.reshape(-1, features.shape[-1])
        if features.shape[0] != mask.sum():
            raise SCRExportError(f"the vision graph gave {features.shape[0]} image features for {mask.sum()} image tokens",
                                 "the image does not fit the exported vision graph (size or tile count)")
        embeds[mask] = features.astype(embeds.dtype)
        return embeds

    def _past(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.float_type)
        return {f"past_key_values.{i}.{k}": empty for i in range(self.num_layers) for k in ("key", "value")}

    def attention_maps(self, inputs: VLMInputs, embeds: np.ndarray, positions: np.ndarray):
        """The diagnostic graph's per-layer head-mean rows, reduced on the host (``scr_export.attention_map``)."""
        from graph_passes.contract import ATTENTION_ROWS

        ids, am = inputs.array("input_ids"), inputs.array("attention_mask")
        feed = {"inputs_embeds": embeds, "attention_mask": am, "position_ids": positions, **self._past(ids.shape[0])}
        rows = self._run("diagnostic", feed, [ATTENTION_ROWS])[0]
        return batch_maps(rows, ids, am, inputs.layouts)

    def plan(self, inputs: VLMInputs, config: SCRConfig | None = None) -> SequencePlan:
        config = config or self.config
        embeds = self.embed(inputs)
        positions, _ = self.positions(inputs)
        maps = self.attention_maps(inputs, embeds, positions)
        plan = plan_sequence(inputs.layouts, maps, inputs.shape[1], config)
        plan.attention = maps
        return plan

    def layer_states(self, inputs: VLMInputs, *, scr: bool = True, plan: SequencePlan | None = None,
                     config: SCRConfig | None = None) -> np.ndarray:
        """The hidden state after every decoder layer at the prefill, [layers, T, D] float32 (batch row 0), with
        the SCR edit where a layer has one (``plan``, or the runner's own; identity with ``scr=False``). Runs a
        private copy of the eager decoder with those outputs added (``graph_passes.expose_layers``); needs onnx."""
        from graph_passes.expose_layers import LAYER_OUTPUT, expose_layer_outputs

        if "decoder_layers" not in self.sessions:
            import onnxruntime as ort

            path = self._rewritten(self.dir / self.manifest["graphs"]["decoder"]["file"],
                                   lambda m: expose_layer_outputs(m, self.num_layers))
            session = ort.InferenceSession(str(path), self._options("decoder")[0], providers=self.providers)
            self.sessions["decoder_layers"], self._input_types["decoder_layers"] = session, _float_inputs(session)
        batch, length = inputs.shape
        if not scr:
            plan = SequencePlan.identity(batch, length)
        elif plan is None:
            plan = self.plan(inputs, config)
        positions, _ = self.positions(inputs)
        feed = {"inputs_embeds": self.embed(inputs), "attention_mask": inputs.array("attention_mask"),
                "position_ids": positions, "scr_donor": plan.donor, "scr_scale": plan.scale,
                "scr_weight": plan.weight, **self._past(batch)}
        names = [LAYER_OUTPUT.format(i) for i in range(self.num_layers)]
        return np.stack([o[0] for o in self._run("decoder_layers", feed, names)]).astype(np.float32)

    # -- the pipeline -------------------------------------------------------------------------------------------
    def generate(self, inputs: VLMInputs, *, scr: bool = True, max_new_tokens: int = 32,
                 plan: SequencePlan | None = None, config: SCRConfig | None = None,
                 forced_tokens: Sequence[Sequence[int]] | None = None, keep_prefill_logits: bool = False,
                 stop_at_eos: bool = True, sampling: Sampling | None = None,
                 on_token: TokenSink | None = None) -> OrtResult:
        """``sampling``: how tokens are picked (default greedy); ``on_token(row, token)`` after each step, False
        stops (streaming, cancellation)."""
        from runtimes.registry import check_context

        config = config or self.config
        self.check_config(config)
        fam = self.family
        batch, length = inputs.shape
        steps = max_new_tokens if forced_tokens is None else len(forced_tokens[0])
        check_context(length, steps, *self.context_limit())
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        embeds = self.embed(inputs)
        positions, first_pos = self.positions(inputs)
        maps: list = []
        if not scr or (plan is None and not any(inputs.layouts)):  # no image: SCR has nothing to edit
            plan = SequencePlan.identity(batch, length)
        elif plan is None:
            t_diag = time.perf_counter()
            maps = self.attention_maps(inputs, embeds, positions)
            timings["diagnostic"] = time.perf_counter() - t_diag
            plan = plan_sequence(inputs.layouts, maps, length, config)
            plan.attention = maps
        am = inputs.array("attention_mask")
        feed = {"inputs_embeds": embeds, "attention_mask": am, "position_ids": positions,
                "scr_donor": plan.donor, "scr_scale": plan.scale, "scr_weight": plan.weight}
        cache = None
        if self.shared_kv and batch == 1:
            cache = self._gqa_cache(batch, length + max(steps, 1))
            outs = {"logits": self._run_gqa(feed, cache, length)}
        else:
            outs = self._run_decoder({**feed, **self._past(batch)})
        prefill = outs["logits"].astype(np.float32) if keep_prefill_logits else None
        last = outs["logits"][:, -1].astype(np.float32)
        timings["prefill"] = time.perf_counter() - t0  # images, diagnostic pass, plan, SCR prefill: the first token
        pick = (sampling or GREEDY).picker()
        cancelled = False
        eos = fam.tokenizer.eos_token_id
        pad = fam.tokenizer.pad_token_id if fam.tokenizer.pad_token_id is not None else eos
        suppressed = fam.suppressed_token_ids()
        finished = np.zeros(batch, bool)
        tokens, logits = [], []
        identity = SequencePlan.identity(batch, 1)
        # decode positions grow by one a step in every family (scr_export.positions); the mask is one array
        mask_all = np.concatenate([am, np.ones((batch, max(steps - 1, 0)), am.dtype)], axis=1)
        for step in range(steps):
            logits.append(last)
            if forced_tokens is not None:
                nxt = np.asarray([row[step] for row in forced_tokens], np.int64)
            else:
                masked = last.copy()
                masked[:, suppressed] = -np.inf
                nxt = np.where(finished, pad, pick(masked)).astype(np.int64)
            tokens.append(nxt)
            if on_token is not None and not all([on_token(b, int(nxt[b])) for b in range(batch)]):
                cancelled = True
                break
            if forced_tokens is None and stop_at_eos and eos is not None:
                finished |= nxt == eos
                if finished.all():
                    break
            if step == steps - 1:
                break
            feed = {"inputs_embeds": self.embed_ids(nxt[:, None]),
                    "attention_mask": np.ascontiguousarray(mask_all[:, :length + step + 1]),
                    "position_ids": first_pos + step,
                    "scr_donor": identity.donor, "scr_scale": identity.scale, "scr_weight": identity.weight}
            if cache is not None:
                last = self._run_gqa(feed, cache, length + step + 1)[:, -1].astype(np.float32)
                continue
            for i in range(self.num_layers):
                for k in ("key", "value"):
                    feed[f"past_key_values.{i}.{k}"] = outs[f"present.{i}.{k}"]
            outs = self._run_decoder(feed)
            last = outs["logits"][:, -1].astype(np.float32)
        toks = np.stack(tokens, axis=1) if tokens else np.zeros((batch, 0), np.int64)
        texts = [fam.tokenizer.decode([t for t in row if t not in (pad, eos)]) for row in toks.tolist()]
        timings["total"] = time.perf_counter() - t0
        return OrtResult(tokens=toks, texts=texts, plan=plan, logits=logits, prefill_logits=prefill, attention=maps,
                         timings=timings, cancelled=cancelled)
