"""Run a converted directory's TensorRT engines: the same pipeline as the ONNX Runtime runner (vision -> diagnostic
-> host plan -> prefill with the plan -> greedy decode with the KV cache), with each ONNX Runtime session replaced by
an engine behind the same small interface (``get_inputs`` / ``get_outputs`` / ``run``). The pipeline code is the
ORT runner's, tested in CI; this module's engine calls need TensorRT and a GPU and are not exercised in CI.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from runtimes.onnxruntime_runner import OrtVLM
from scr_export.errors import SCRExportError

from .engines import import_tensorrt
from .profiles import covers


@dataclasses.dataclass(frozen=True)
class _Arg:
    name: str


class TrtSession:
    """One engine with ONNX Runtime's session interface; picks the optimisation profile that covers the feed. GPU
    memory and the stream come from cuda-python (``runtimes.tensorrt.cuda``): no torch on the run path."""

    def __init__(self, engine_path: Path, profiles: list[dict]):
        from .cuda import DeviceMemory

        trt = import_tensorrt()
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise SCRExportError(f"TensorRT cannot load {engine_path} (built by another TensorRT version or GPU?)",
                                 "rebuild the engines on this device: ./build_engines.sh")
        self.context = self.engine.create_execution_context()
        self.profiles = profiles
        self.profile = None  # the optimisation profile last selected on the context
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]
        self.memory = DeviceMemory()

    def get_inputs(self):
        return [_Arg(n) for n in self.inputs]

    def get_outputs(self):
        return [_Arg(n) for n in self.outputs]

    def get_providers(self):
        return [f"TensorRT {self.trt.__version__}"]

    def _dtype(self, name: str):
        trt = self.trt
        types = {trt.float32: np.float32, trt.float16: np.float16, trt.int64: np.int64, trt.int32: np.int32,
                 trt.int8: np.int8, trt.bool: np.bool_}
        dtype = self.engine.get_tensor_dtype(name)
        if dtype not in types:
            raise SCRExportError(f"the engine's tensor {name} is of type {dtype}, which the host cannot hold",
                                 "convert with float32 or float16 graph inputs and outputs")
        return types[dtype]

    def run(self, output_names, feed: dict[str, np.ndarray]):
        shapes = {k: tuple(v.shape) for k, v in feed.items()}
        idx = next((i for i, p in enumerate(self.profiles) if covers(p, shapes)), None)
        if idx is None:
            raise SCRExportError(f"the inputs {shapes} are outside the engine's optimisation profiles",
                                 "convert again with larger limits (--max-seq, --max-images, --max-batch)")
        mem = self.memory
        if idx != self.profile:
            self.context.set_optimization_profile_async(idx, int(mem.stream))
            self.profile = idx
        for name in self.inputs:
            value = np.ascontiguousarray(feed[name], self._dtype(name))
            self.context.set_input_shape(name, value.shape)
            self.context.set_tensor_address(name, mem.upload(name, value))
        shapes = {}
        for name in self.outputs:
            shapes[name] = tuple(self.context.get_tensor_shape(name))
            nbytes = int(np.prod(shapes[name], dtype=np.int64)) * np.dtype(self._dtype(name)).itemsize
            self.context.set_tensor_address(name, mem.buffer(name, nbytes))
        if not self.context.execute_async_v3(int(mem.stream)):
            raise SCRExportError("TensorRT failed to run the engine", "see TensorRT's log above")
        names = output_names or self.outputs
        outs = [mem.download(n, shapes[n], self._dtype(n)) for n in names]
        mem.synchronize()
        return outs


class TrtVLM(OrtVLM):
    """A converted directory whose TensorRT engines have been built (``build_engines.sh`` or build-engines)."""

    def context_limit(self) -> tuple[int | None, str]:
        return self.manifest["tensorrt"]["limits"].get("max_seq"), "the engines' --max-seq"

    def engine_reference(self, family, inputs, in_place=False):
        return None  # the engines are the only kernels here; the float comparison is the report

    def layer_states(self, inputs, *, scr=True, plan=None, config=None):
        raise SCRExportError("per-layer hidden states need engines built with the layer outputs marked, which "
                             "build_engines.sh does not build", "validate --per-layer --runtime onnx runs the same "
                             "ONNX graphs layer by layer")

    def __init__(self, directory: str | Path, device: str = "auto", threads: int | None = None,
                 scr_kernel: str | None = None):
        self._load_directory(directory)
        trt_info = self.manifest.get("tensorrt")
        if not trt_info:
            raise SCRExportError(f"{directory} was not converted for TensorRT", "convert with --to trt")
        engines = trt_info.get("engines")
        if not engines:
            raise SCRExportError(f"the TensorRT engines of {directory} have not been built (TensorRT was not "
                                 "available where the model was converted)",
                                 f"on the target device run {Path(directory) / 'build_engines.sh'}, then run again; "
                                 "or use ONNX Runtime on the same directory with --runtime onnx")
        import_tensorrt()
        self.providers = ["TensorRT"]
        self.recorder = None
        self.unfused = False
        self.device = device
        self.attention = "eager"  # the engines are built from the eager decoder
        self.sessions = {g: TrtSession(self.dir / info["file"], trt_info["profiles"][g])
                         for g, info in engines["graphs"].items()}
        self._input_types = {g: {} for g in self.sessions}  # the engines' own types: TrtSession casts
        self.scr_kernel = f"TensorRT {engines['graphs']['decoder']['scr_path']}"
        self.provider = f"TensorRT {engines['tensorrt']} ({engines.get('gpu', 'GPU')}), SCR nodes: " \
                        f"{'plugin (AOT PTX)' if engines['graphs']['decoder']['scr_path'] == 'plugin' else 'function body'}"
