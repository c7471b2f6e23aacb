"""Streaming export: trace on the meta device, then fill each initializer from the checkpoint when it is written.

The model the exporters trace has no weights (``load_vlm(weights=False)``); every parameter initializer of the traced
graph becomes an ``onnx_ir.LazyTensor`` that reads its tensor from the checkpoint's safetensors (memory-mapped, one
tensor at a time), casts it to the graph's dtype and, where the graph wants it transposed (a linear layer's weight
as a MatMul operand), transposes it. ``onnx_ir`` writes the external data tensor by tensor, so the exporter's peak
holds one weight, not the model. Which checkpoint key feeds which parameter is transformers' own renaming
(``get_model_conversion_mapping``: llava-hf's ``language_model.model.*`` keys and the like).
"""

from __future__ import annotations

import contextlib
from typing import Any

import onnx_ir as ir
import torch

from ..checkpoint import Checkpoint
from ..errors import ModelLoadError, SCRExportError

_IR_DTYPE = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
             torch.bfloat16: ir.DataType.BFLOAT16}
_TORCH_DTYPE = {v: k for k, v in _IR_DTYPE.items()}
LARGE = 8192  # elements: onnxscript's constant-folding input limit; larger weights are never folded in memory


class WeightSource:
    """Which checkpoint tensor feeds each parameter of a weight-less model, checked against the config's shapes."""

    def __init__(self, model: torch.nn.Module, checkpoint: Checkpoint):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.checkpoint = checkpoint
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta_state = model.state_dict()
        by_param: dict[str, str] = {}
        for key in checkpoint.tensors:
            name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
            if converter is not None:
                raise ModelLoadError(f"the checkpoint's tensor {key!r} needs transformers' conversion {converter!r} "
                                     "(a tensor made from several), which the streaming exporter does not apply",
                                     "load and save the model once with transformers' save_pretrained, then convert")
            by_param[name] = key
        # parameters by object, so a tied weight (lm_head = embed_tokens) resolves to the tensor that is stored
        self._key_of: dict[int, str] = {}
        expected: dict[str, tuple[int, ...]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            key = by_param.get(name)
            if key is not None:
                self._key_of[id(param)] = key
                expected[key] = tuple(param.shape)
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) not in self._key_of:
                raise ModelLoadError(f"the checkpoint has no tensor for the parameter {name!r}",
                                     "check that the directory holds the whole model (all shards) for its config.json")
        checkpoint.check_shapes(expected, "the model")

    def stored_dtype(self, param: torch.nn.Parameter) -> torch.dtype:
        """The float type ``param`` is stored in (the checkpoint's, where it is a float type torch has)."""
        key = self.key(param)
        stored = self.checkpoint[key].dtype if key is not None else None
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(stored,
                                                                                                 param.dtype)

    def key(self, param: torch.nn.Parameter) -> str | None:
        return self._key_of.get(id(param))

    def lazy(self, key: str, dtype: ir.DataType, shape: tuple[int, ...], perm: tuple[int, ...] | None = None
             ) -> ir.LazyTensor:
        """The checkpoint's ``key`` as a tensor of ``dtype`` (transposed by ``perm``), read when it is written."""
        checkpoint = self.checkpoint
        torch_dtype = _TORCH_DTYPE.get(dtype)

        def read() -> ir.Tensor:
            t = checkpoint.read(key)  # one copy out of the memory map, in the checkpoint's type
            if perm is not None:
                t = t.permute(*perm)
            # the cast and the transposed layout in one copy (the largest tensor, a 7B token table, is 0.5 GB)
            return to_ir(t.to(torch_dtype or t.dtype, memory_format=torch.contiguous_format))

        return ir.LazyTensor(read, dtype=dtype, shape=ir.Shape(shape), name=key)


def to_ir(t: torch.Tensor, name: str | None = None) -> ir.Tensor:
    """A CPU torch tensor as an onnx_ir tensor without a copy (bfloat16 through ml_dtypes, numpy has no bf16)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return ir.Tensor(t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(t.numpy(), name=name)


@contextlib.contextmanager
def on_meta(module: torch.nn.Module):
    """The module entirely on the meta device while tracing (buffers included: torch.export wants one device);
    its real buffers are restored afterwards. Yields ``{buffer object id: real tensor}``."""
    saved = []
    real: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and buf.device.type != "meta":
                saved.append((sub, name, buf))
    try:
        for sub, name, buf in saved:
            meta = buf.to("meta")
            sub._buffers[name] = meta
            real[id(meta)] = buf
        yield real
    finally:
        for sub, name, buf in saved:
            sub._buffers[name] = buf


def export_streaming(module: torch.nn.Module, args: tuple, source: WeightSource, **export_kw) -> ir.Model:
    """``torch.onnx.export(module, args)`` traced on the meta device; initializers filled lazily from ``source``
    (parameters) or the module's real buffers; weight transposes folded into the lazy reads; then onnxscript's
    optimizer (what the exporter's ``optimize=True`` runs), told to leave the large weights alone."""
    export_kw.pop("optimize", None)
    export_kw.pop("dynamo", None)
    params = {name: p for name, p in module.named_parameters(remove_duplicate=False)}
    with on_meta(module) as real_buffers, torch.no_grad():
        buffers = {name: real_buffers.get(id(b)) for name, b in module.named_buffers(remove_duplicate=False)}
        meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        program = torch.onnx.export(module, meta_args, None, dynamo=True, optimize=False, **export_kw)
    model = program.model
    weights: set[str] = set()
    for name, value in model.graph.initializers.items():
        if name in params:
            key = source.key(params[name])
            if key is None:
                raise SCRExportError(f"the parameter {name!r} has no checkpoint tensor", "report this as a bug")
            value.const_value = source.lazy(key, value.dtype, tuple(value.shape))
            weights.add(name)
        elif name in buffers and buffers[name] is not None:
            value.const_value = to_ir(buffers[name].detach(), name)
        elif _is_meta(value.const_value):
            raise SCRExportError(f"the traced graph holds a constant {name!r} whose value the weight-less trace "
                                 "cannot know", "report this as a bug (the streaming export needs a real buffer)")
    _fold_weight_transposes(model, weights, source)
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    def leave_weights(node: ir.Node) -> bool | None:
        for v in node.inputs:
            if v is not None and isinstance(v.const_value, ir.LazyTensor) and v.const_value.size > LARGE:
                return False
        return None

    onnxscript.optimizer.optimize_ir(model, should_fold=leave_weights)
    onnxscript.rewriter.onnx_fusions.fuse(model)
    return model


def _is_meta(t: Any) -> bool:
    raw = getattr(t, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.device.type == "meta"


def _fold_weight_transposes(model: ir.Model, weights: set[str], source: WeightSource) -> None:
    """``Transpose(W)`` of a weight read nowhere else becomes the initializer ``W`` transposed on read (what constant
    folding does with the weight in memory), named ``<W>.T`` / ``<W>.perm...``."""
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or src.name not in weights or len(src.uses()) != 1:
            continue
        lazy = src.const_value
        shape = tuple(int(d) for d in src.shape)
        perm_attr = node.attributes.get("perm")
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(len(shape))))
        out_shape = tuple(shape[p] for p in perm)
        name = f"{src.name}.T" if perm == (1, 0) else f"{src.name}.perm{''.join(map(str, perm))}"
        new = ir.Value(name=name, shape=ir.Shape(out_shape), type=ir.TensorType(src.dtype),
                       const_value=source.lazy(lazy.name, src.dtype, out_shape, perm))
        graph.register_initializer(new)
        out = node.outputs[0]
        out.replace_all_uses_with(new)
        if out in graph.outputs:
            raise SCRExportError(f"a transposed weight {src.name} is a graph output", "report this as a bug")
        graph.remove(node, safe=True)
        graph.initializers.pop(src.name)
        weights.add(name)
