"""Run a GGUF directory: image + prompt -> (our ONNX vision encoder) -> llama.cpp diagnostic pass through the eval
callback -> host plan -> llama.cpp prefill with SCR edits at ``l_out-L`` -> greedy decoding (no hooks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scr_export.attention_map import image_maps
from scr_export.config import SCRConfig
from scr_export.errors import SCRExportError
from scr_export.manifest import read_manifest
from scr_export.plan import SequencePlan, plan_sequence
from scr_export.processing import VLMInputs

from ..onnxruntime_runner import OrtResult, OrtVLM
from .context import LlamaContext
from .quirks import fix_logits
from .scr_hooks import AttentionCollector, install_redistribution


class LlamaCppVLM:
    """A GGUF directory written by ``scr-export convert --to gguf``."""

    def __init__(self, directory: str | Path, threads: int | None = None, gpu_layers: int = 0,
                 gguf_file: str | None = None):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        if "gguf" not in self.manifest:
            raise SCRExportError(f"{self.dir} is not a GGUF directory (its manifest has no 'gguf' entry)",
                                 "run it with `scr-export run` as an ONNX directory, or convert with --to gguf")
        self.images = OrtVLM(self.dir, device="cpu")  # vision encoder + token embeddings (ONNX Runtime)
        self.family = self.images.family
        self.config = SCRConfig.from_dict(self.manifest["scr"])
        g = self.manifest["gguf"]
        self.n_head = int(g["n_head"])
        self.llama = LlamaContext(self.dir / (gguf_file or g["file"]), n_ctx=int(g["n_ctx"]), threads=threads,
                                  gpu_layers=gpu_layers)
        self.provider = "llama.cpp " + ("CPU" if gpu_layers == 0 else f"GPU ({gpu_layers} layers offloaded)")
        self.architecture = g["architecture"]
        self.masked_ids = None
        if self.architecture == "chameleon":
            self.masked_ids = np.asarray(sorted(
                int(v) for k, v in self.family.tokenizer.get_vocab().items() if k.startswith("IMGIMG")), np.int64)
        self.mtmd = None
        self._dequantized = None  # (reference family, its dequantized twin): engine_reference, built once
        if g.get("mmproj"):
            from .mmproj import MtmdImages

            self.mtmd = MtmdImages(self.dir / g["mmproj"], self.llama.model, threads=threads or 2)

    # -- the runtime interface (runtimes.registry.VLMRuntime) ----------------------------------------------------
    def float_gate(self) -> str:
        """Against the float model: gated at f32; quantized GGUFs are gated against their own dequantized weights
        (random tiny models exaggerate quantization error, so the float comparison is reported)."""
        return "fp32" if self.manifest["precision"] == "fp32" else "report"

    def engine_reference(self, family, inputs: VLMInputs):
        """The same decoder in PyTorch on the GGUF's dequantized weights, with llama.cpp's known quirks, fed the
        image features llama.cpp used: engine error alone."""
        from scr_export.reference import TorchReference, image_features_override

        from .quantize import dequantized_model
        from .quirks import apply_quirks

        g = self.manifest["gguf"]
        if self._dequantized is None or self._dequantized[0] is not family:  # once per family (dataset validation)
            deq = dequantized_model(family, self.dir / g["file"], g["qk_permuted"])
            apply_quirks(deq, g["architecture"])
            self._dequantized = (family, deq)
        deq = self._dequantized[1]
        same_images = None
        if self.mtmd is not None:
            features = self.image_features(inputs)
            same_images = lambda: image_features_override(deq, features)  # noqa: E731
        return "dequantized", TorchReference(deq, same_images), self.manifest["precision"]

    def image_features(self, inputs: VLMInputs) -> np.ndarray:
        """Image-token features in sequence order: libmtmd (mmproj) or the ONNX vision encoder."""
        if self.mtmd is None:
            raise SCRExportError("this directory has no mmproj", "image features come from the ONNX encoder")
        feats = []
        patch = self.family.config.vision_config.patch_size * self.family.config.vision_config.spatial_merge_size
        for spans, images in zip(inputs.layouts, inputs.images or []):
            for span, image in zip(spans, images):
                # The mmproj carries no pixel limits of this checkpoint's processor, so give libmtmd the image at the
                # size the processor resized it to (PIL bicubic, as the processor does); libmtmd then only normalises.
                (grid_rows, grid_cols), = [(g.rows, g.cols) for g in span.grids]
                size = (grid_cols * patch, grid_rows * patch)
                if image.size != size:
                    from PIL import Image

                    image = image.convert("RGB").resize(size, Image.BICUBIC)
                f, rows, cols = self.mtmd.embed(image, self.llama.n_embd)
                grids = [(g.rows, g.cols) for g in span.grids]
                if grids != [(rows, cols)]:
                    raise SCRExportError(f"libmtmd made a {rows}x{cols} token grid where the processor made {grids}",
                                         "the image was resized differently; pass an image whose sides are multiples "
                                         "of 28 within the model's pixel limits, or convert with --images onnx")
                feats.append(f)
        return np.concatenate(feats, axis=0)

    def embed(self, inputs: VLMInputs) -> np.ndarray:
        if self.mtmd is None:
            return self.images.embed(inputs).astype(np.float32)
        ids = inputs.array("input_ids")
        embeds = self.images._run("embed_tokens", {"input_ids": ids})[0].astype(np.float32)
        mask = ids == self.family.image_token_id
        embeds[mask] = self.image_features(inputs)
        return embeds

    def encode(self, images: Sequence[Sequence[Any]], prompts: Sequence[str]) -> VLMInputs:
        inputs = self.images.encode(images, prompts)
        if inputs.shape[0] != 1:
            raise SCRExportError("the llama.cpp runner takes one prompt at a time", "pass a single prompt")
        return inputs

    def _positions(self, inputs: VLMInputs) -> tuple[np.ndarray | None, int | None]:
        """M-RoPE rows [3, T] for Qwen2-VL and its first generated token's position (numpy, once per request);
        None, None for 1-D positions 0..T-1."""
        if not self.family.uses_mrope:
            return None, None
        prefill, first = self.images.positions(inputs)
        return prefill[:, 0], int(first[0, 0, 0])

    def _hooked_prefill(self, inputs: VLMInputs, embeds: np.ndarray, want_logits: bool, active: bool = True):
        """One prefill of the prompt from an empty cache with the callback's handlers live (``active``); the
        handlers and what the callback recorded are cleared afterwards, whatever happens. Every handler must have
        fired: a tensor renamed in a new llama.cpp must not make SCR a silent no-op."""
        cb = self.llama.callback
        self.llama.reset()
        cb.seen.clear()
        expected = set(cb.handlers) if active else set()
        cb.active = active
        try:
            out = self.llama.decode_embeddings(embeds[0], want_logits=want_logits,
                                               positions=self._positions(inputs)[0])
        finally:
            cb.active = False
            cb.handlers.clear()
            fired = set(cb.seen)
            cb.seen.clear()
        missing = sorted(expected - fired)
        if missing:
            raise SCRExportError(f"the llama.cpp hooks on {', '.join(missing)} never fired during the prefill: this "
                                 "llama.cpp does not name those tensors so, and SCR would silently do nothing",
                                 "use the tested llama-cpp-python (see the README's versions), or report the "
                                 "tensor names of this one")
        return out

    def attention_maps(self, inputs: VLMInputs, embeds: np.ndarray, config: SCRConfig):
        cb = self.llama.callback
        cb.handlers.clear()
        collector = AttentionCollector(cb, config, inputs.shape[1], self.n_head)
        self._hooked_prefill(inputs, embeds, want_logits=False)
        return [image_maps(collector.result(), inputs.array("input_ids")[0], inputs.array("attention_mask")[0],
                           inputs.layouts[0])]

    def layer_states(self, inputs: VLMInputs, *, scr: bool = True, plan: SequencePlan | None = None,
                     config: SCRConfig | None = None) -> np.ndarray:
        """The hidden state after every decoder layer at the prefill, [layers, T, D] float32: ``l_out-L`` through
        the eval callback, after the SCR edit where a layer has one (``plan``, or the runner's own)."""
        config = (config or self.config).clamped(self.family.num_layers)
        length = inputs.shape[1]
        embeds = self.embed(inputs)
        if not scr:
            plan = SequencePlan.identity(1, length)
        elif plan is None:
            plan = plan_sequence(inputs.layouts, self.attention_maps(inputs, embeds, config), length, config)
        cb = self.llama.callback
        cb.handlers.clear()
        install_redistribution(cb, config, plan.donor[0], plan.scale[0], plan.weight[0])
        states: dict[int, np.ndarray] = {}

        def capture(layer, edit):
            def handler(name, rows):
                out = edit(name, rows) if edit is not None else None
                states[layer] = np.array(rows if out is None else out, np.float32)
                return out
            return handler

        for i in range(self.family.num_layers):
            cb.handlers[f"l_out-{i}"] = capture(i, cb.handlers.get(f"l_out-{i}"))
        # logits for every position: llama.cpp otherwise computes the last layer for the output rows only
        self._hooked_prefill(inputs, embeds, want_logits=True)  # fails if any l_out-L never fired
        return np.stack([states[i] for i in range(self.family.num_layers)])

    def generate(self, inputs: VLMInputs, *, scr: bool = True, max_new_tokens: int = 32,
                 plan: SequencePlan | None = None, config: SCRConfig | None = None,
                 forced_tokens: Sequence[Sequence[int]] | None = None, keep_prefill_logits: bool = False,
                 stop_at_eos: bool = True) -> OrtResult:
        from runtimes.registry import check_context

        config = (config or self.config).clamped(self.family.num_layers)
        fam = self.family
        length = inputs.shape[1]
        steps = max_new_tokens if forced_tokens is None else len(forced_tokens[0])
        check_context(length, steps, self.llama.n_ctx, "the llama.cpp context (n_ctx)")
        embeds = self.embed(inputs)
        maps: list = []
        if not scr:
            plan = SequencePlan.identity(1, length)
        elif plan is None:
            maps = self.attention_maps(inputs, embeds, config)
            plan = plan_sequence(inputs.layouts, maps, length, config)
            plan.attention = maps
        cb = self.llama.callback
        cb.handlers.clear()
        install_redistribution(cb, config, plan.donor[0], plan.scale[0], plan.weight[0])
        # no hook at all for an identity plan: bit-identical to plain llama.cpp
        logits = self._hooked_prefill(inputs, embeds, want_logits=True, active=not plan.is_identity)
        fix_logits(self.architecture, logits, self.masked_ids)
        first_position = self._positions(inputs)[1]
        prefill = logits[None].copy() if keep_prefill_logits else None
        last = logits[-1].astype(np.float32)
        eos = fam.tokenizer.eos_token_id
        suppressed = fam.suppressed_token_ids()
        tokens, out_logits = [], []
        for step in range(steps):
            out_logits.append(last[None])
            if forced_tokens is not None:
                nxt = int(forced_tokens[0][step])
            else:
                masked = last.copy()
                masked[suppressed] = -np.inf
                nxt = int(masked.argmax())
            tokens.append(nxt)
            if forced_tokens is None and stop_at_eos and nxt == eos:
                break
            if step == steps - 1:
                break
            position = None if first_position is None else first_position + step
            last = fix_logits(self.architecture, self.llama.decode_token(nxt, position),
                              self.masked_ids).astype(np.float32)
        toks = np.asarray([tokens], np.int64)
        pad = fam.tokenizer.pad_token_id
        text = fam.tokenizer.decode([t for t in tokens if t not in (pad, eos)])
        return OrtResult(tokens=toks, texts=[text], plan=plan, logits=out_logits, prefill_logits=prefill,
                         attention=maps)
