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
    """One engine with ONNX Runtime's session interface; picks the optimisation profile that covers the feed."""

    def __init__(self, engine_path: Path, profiles: list[dict]):
        import torch

        trt = import_tensorrt()
        self.trt, self.torch = trt, torch
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
        self.stream = torch.cuda.Stream()

    def get_inputs(self):
        return [_Arg(n) for n in self.inputs]

    def get_outputs(self):
        return [_Arg(n) for n in self.outputs]

    def get_providers(self):
        return [f"TensorRT {self.trt.__version__}"]

    def _torch_dtype(self, name: str):
        trt, torch = self.trt, self.torch
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}[self.engine.get_tensor_dtype(name)]

    def run(self, output_names, feed: dict[str, np.ndarray]):
        torch = self.torch
        shapes = {k: tuple(v.shape) for k, v in feed.items()}
        idx = next((i for i, p in enumerate(self.profiles) if covers(p, shapes)), None)
        if idx is None:
            raise SCRExportError(f"the inputs {shapes} are outside the engine's optimisation profiles",
                                 "convert again with larger limits (--max-seq, --max-images, --max-batch)")
        with torch.cuda.stream(self.stream):
            if idx != self.profile:
                self.context.set_optimization_profile_async(idx, self.stream.cuda_stream)
                self.profile = idx
            keep = []
            for name in self.inputs:
                t = torch.from_numpy(np.ascontiguousarray(feed[name])).to("cuda", self._torch_dtype(name))
                if t.numel() == 0:  # TensorRT wants a valid address even for empty tensors
                    keep.append(torch.empty(1, dtype=t.dtype, device="cuda"))
                    addr = keep[-1].data_ptr()
                else:
                    addr = t.data_ptr()
                keep.append(t)
                self.context.set_input_shape(name, t.shape)
                self.context.set_tensor_address(name, addr)
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
                self.context.set_tensor_address(name, outs[name].data_ptr() if outs[name].numel() else
                                                torch.empty(1, device="cuda").data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise SCRExportError("TensorRT failed to run the engine", "see TensorRT's log above")
        self.stream.synchronize()
        names = output_names or self.outputs
        return [outs[n].cpu().numpy() for n in names]


class TrtVLM(OrtVLM):
    """A converted directory whose TensorRT engines have been built (``build_engines.sh`` or build-engines)."""

    def context_limit(self) -> tuple[int | None, str]:
        return self.manifest["tensorrt"]["limits"].get("max_seq"), "the engines' --max-seq"

    def engine_reference(self, family, inputs):
        return None  # the engines are the only kernels here; the float comparison is the report

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
