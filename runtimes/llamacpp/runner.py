"""Run a GGUF directory: image + prompt -> (our ONNX vision encoder or libmtmd) -> llama.cpp diagnostic pass through
the eval callback, stopped after the last diagnostic layer -> host plan -> llama.cpp prefill with SCR edits at
``l_out-L`` -> the prompt's KV cache moved to a context without any callback -> greedy decoding at plain cost."""

from __future__ import annotations

import time
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
from ..sampling import GREEDY, Sampling, TokenSink
from .context import LlamaContext
from .eval_callback import EvalCallback
from .quirks import fix_logits
from .scr_hooks import AttentionCollector, install_redistribution


PREFILL_CONTEXT = 512  # the hooked context's first size (grown in steps of 256 for longer prompts)
DECODE_UBATCH = 512  # the decoding context never prefills: llama.cpp's default micro-batch (64 measured 3 % slower per step)


class LlamaCppVLM:
    """A GGUF directory written by ``scr-export convert --to gguf``."""

    def __init__(self, directory: str | Path, threads: int | None = None, gpu_layers: int = 0,
                 gguf_file: str | None = None):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        if "gguf" not in self.manifest:
            raise SCRExportError(f"{self.dir} is not a GGUF directory (its manifest has no 'gguf' entry)",
                                 "run it with `scr-export run` as an ONNX directory, or convert with --to gguf")
        self.images = OrtVLM(self.dir, device="cpu")  # the vision encoder (ONNX Runtime)
        if "embed_tokens" not in self.manifest["graphs"]:  # the GGUF's own table (directories before: ONNX)
            from .token_table import GGUFTokenTable

            self.images.token_table = GGUFTokenTable(self.dir / self.manifest["gguf"]["file"])
        self.family = self.images.family
        self.config = SCRConfig.from_dict(self.manifest["scr"])
        g = self.manifest["gguf"]
        self.n_head = int(g["n_head"])
        self.n_ctx = int(g["n_ctx"])
        self.threads = threads
        # decoding: a context without an eval callback (the callback cannot be removed from a live context, and
        # ggml asks it about every node of every step); it owns the model and holds the whole sequence
        self.decoder = LlamaContext(self.dir / (gguf_file or g["file"]), n_ctx=self.n_ctx, threads=threads,
                                    gpu_layers=gpu_layers, with_callback=False, n_ubatch=DECODE_UBATCH)
        self.callback = EvalCallback()
        # the prefill (diagnostic and SCR passes): a hooked context sized to the prompt, grown on demand
        self.llama = self._prefill_context(PREFILL_CONTEXT)
        self.cut_diagnostic = True  # stop the diagnostic pass after its last layer (False: the whole prefill)
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

            self.mtmd = MtmdImages(self.dir / g["mmproj"], self.decoder.model, threads=threads or 2)

    def _prefill_context(self, length: int) -> LlamaContext:
        """The hooked context, with room for ``length`` positions in one micro-batch (rebuilt larger when a longer
        prompt comes: its KV cache and attention buffers scale with the prompt, not with n_ctx)."""
        current = getattr(self, "llama", None)
        if current is not None and current.n_ctx >= length:
            return current
        size = min(self.n_ctx, -(-max(length, PREFILL_CONTEXT) // 256) * 256)
        if current is not None:
            current.close()
        self.llama = LlamaContext(n_ctx=size, threads=self.threads, callback=self.callback,
                                  share_model_of=self.decoder)
        return self.llama

    # -- the runtime interface (runtimes.registry.VLMRuntime) ----------------------------------------------------
    def float_gate(self) -> str:
        """Against the float model: gated at f32; quantized GGUFs are gated against their own dequantized weights
        (random tiny models exaggerate quantization error, so the float comparison is reported)."""
        return "fp32" if self.manifest["precision"] == "fp32" else "report"

    def release(self) -> None:
        """Drop the dequantized-weights reference (the GGUF model itself stays: it is the quantized one)."""
        self._dequantized = None

    def engine_reference(self, family, inputs: VLMInputs, in_place: bool = False):
        """The same decoder in PyTorch on the GGUF's dequantized weights, with llama.cpp's known quirks, fed the
        image features llama.cpp used: engine error alone."""
        from scr_export.reference import TorchReference, image_features_override

        from .quantize import dequantized_model
        from .quirks import apply_quirks

        g = self.manifest["gguf"]
        if self._dequantized is None or self._dequantized[0] is not family:  # once per family (dataset validation)
            deq = dequantized_model(family, self.dir / g["file"], g["qk_permuted"], copy=not in_place)
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
                f, rows, cols = self.mtmd.embed(image, self.decoder.n_embd)
                grids = [(g.rows, g.cols) for g in span.grids]
                if grids != [(rows, cols)]:
                    raise SCRExportError(f"libmtmd made a {rows}x{cols} token grid where the processor made {grids}",
                                         "the image was resized differently; pass an image whose sides are multiples "
                                         "of 28 within the model's pixel limits, or convert with --images onnx")
                feats.append(f)
        return np.concatenate(feats, axis=0)

    def embed(self, inputs: VLMInputs) -> np.ndarray:
        if self.mtmd is None or not any(inputs.layouts):  # our ONNX encoder, or no image at all
            return self.images.embed(inputs).astype(np.float32)
        ids = inputs.array("input_ids")
        embeds = self.images.embed_ids(ids).astype(np.float32)
        mask = ids == self.family.image_token_id
        embeds[mask] = self.image_features(inputs)
        return embeds

    def encode(self, images: Sequence[Sequence[Any]], prompts: Sequence[str], text_only: bool = False) -> VLMInputs:
        """Any number of prompts, any number of images each (left-padded like every runtime's); llama.cpp runs them
        one sequence per prompt. ``text_only``: prompts without images are allowed."""
        return self.images.encode(images, prompts, text_only=text_only)

    def _rows(self, inputs: VLMInputs) -> list[tuple[int, np.ndarray | None, int | None]]:
        """Per prompt (once per request): its first real position (rows are left-padded), its M-RoPE rows [3, n]
        (None for 1-D positions 0..n-1) and the position of its first generated token."""
        prefill, first = self.images.positions(inputs) if self.family.uses_mrope else (None, None)
        rows = []
        for b, mask in enumerate(inputs.array("attention_mask").astype(bool)):
            off = int(np.argmax(mask)) if mask.any() else mask.size
            if off == mask.size or not mask[off:].all():
                raise SCRExportError(f"prompt {b} is not left-padded (mask {mask.astype(int).tolist()[:16]}...)",
                                     "encode prompts with the runner's encode(), which pads on the left")
            rows.append((off, None, None) if prefill is None else (off, prefill[:, b, off:], int(first[0, b, 0])))
        return rows

    def _row(self, inputs: VLMInputs, b: int) -> tuple[int, np.ndarray | None, int | None]:
        return self._rows(inputs)[b]

    def _hooked_prefill(self, inputs: VLMInputs, embeds: np.ndarray, want_logits: bool, active: bool = True,
                        stop_after: str | None = None, row: int = 0, rows: list | None = None):
        """One prefill of prompt ``row`` (its real positions only) from an empty cache in the hooked context, with
        the callback's handlers live (``active``); ``stop_after``: a tensor after whose handler the graph stops (its
        outputs are then garbage). The handlers and what the callback recorded are cleared afterwards, whatever
        happens. Every handler must have fired: a tensor renamed in a new llama.cpp must not make SCR a silent
        no-op. ``rows``: ``_rows(inputs)`` if the caller has it."""
        cb = self.callback
        off, positions, _ = (rows or self._rows(inputs))[row]
        llama = self._prefill_context(inputs.shape[1] - off)
        llama.reset()
        cb.seen.clear()
        expected = set(cb.handlers) if active else set()
        cb.active = active
        cb.stop_after = stop_after
        try:
            out = llama.decode_embeddings(embeds[row, off:], want_logits=want_logits, positions=positions)
        finally:
            cb.active = False
            cb.stop_after = None
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
        """The diagnostic pass, one prompt after another: head-mean attention rows of the diagnostic layers, the
        graph stopped right after the last one (no later layer, no logits: the pass costs about (last diagnostic
        layer + 1) / layers of a prefill); its KV cells are cleared before the next prefill. Maps per prompt and
        image, in the batch's padded positions (as every runtime hands them to the plan)."""
        batch, length = inputs.shape
        ids, mask = inputs.array("input_ids"), inputs.array("attention_mask")
        maps, rows = [], self._rows(inputs)
        for b, (off, _, _) in enumerate(rows):
            cb = self.callback
            cb.handlers.clear()
            collector = AttentionCollector(cb, config, length - off, self.n_head)
            last = f"kq_soft_max-{collector.layers[-1]}" if self.cut_diagnostic and collector.layers else None
            # the next prefill in this context starts from a cleared cache: nothing of a cut pass reaches it
            self._hooked_prefill(inputs, embeds, want_logits=False, stop_after=last, row=b, rows=rows)
            layer_rows = collector.result()
            padded = np.zeros((layer_rows.shape[0], length, length), layer_rows.dtype)  # padding: no attention
            padded[:, off:, off:] = layer_rows
            maps.append(image_maps(padded, ids[b], mask[b], inputs.layouts[b]))
        return maps

    def _install_plan(self, config: SCRConfig, plan: SequencePlan, b: int, off: int) -> None:
        """Row ``b`` of the batch plan (padded positions) as the hooks of its own sequence (positions from 0)."""
        self.callback.handlers.clear()
        donor = plan.donor[b, off:] - off
        if (donor < 0).any():
            raise SCRExportError(f"the plan of prompt {b} moves credit from a padding position",
                                 "plan from the runner's own encode() of this batch")
        install_redistribution(self.callback, config, donor, plan.scale[b, off:], plan.weight[b, off:])

    def layer_states(self, inputs: VLMInputs, *, scr: bool = True, plan: SequencePlan | None = None,
                     config: SCRConfig | None = None) -> np.ndarray:
        """The hidden state after every decoder layer at the prefill of the first prompt, [layers, T, D] float32
        (its real positions): ``l_out-L`` through the eval callback, after the SCR edit where a layer has one
        (``plan``, or the runner's own)."""
        config = (config or self.config).clamped(self.family.num_layers)
        batch, length = inputs.shape
        embeds = self.embed(inputs)
        if not scr:
            plan = SequencePlan.identity(batch, length)
        elif plan is None:
            plan = plan_sequence(inputs.layouts, self.attention_maps(inputs, embeds, config), length, config)
        rows = self._rows(inputs)
        self._install_plan(config, plan, 0, rows[0][0])
        cb = self.callback
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
        self._hooked_prefill(inputs, embeds, want_logits=True, rows=rows)  # fails if any l_out-L never fired
        return np.stack([states[i] for i in range(self.family.num_layers)])

    def generate(self, inputs: VLMInputs, *, scr: bool = True, max_new_tokens: int = 32,
                 plan: SequencePlan | None = None, config: SCRConfig | None = None,
                 forced_tokens: Sequence[Sequence[int]] | None = None, keep_prefill_logits: bool = False,
                 stop_at_eos: bool = True, sampling: Sampling | None = None,
                 on_token: TokenSink | None = None) -> OrtResult:
        """Decoding (greedy unless ``sampling`` says otherwise; ``on_token(row, token)`` after each step, False
        stops) of every prompt of the batch, one llama.cpp sequence after another, with the same plan,
        tokens and logits layout as the other runtimes (padded positions; a prompt that ended early gets the pad
        token, and zero logits, until the batch ends)."""
        from runtimes.registry import check_context

        config = (config or self.config).clamped(self.family.num_layers)
        fam = self.family
        batch, length = inputs.shape
        steps = max_new_tokens if forced_tokens is None else len(forced_tokens[0])
        check_context(length, steps, self.n_ctx, "the llama.cpp context (n_ctx)")
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        embeds = self.embed(inputs)
        maps: list = []
        if not scr or (plan is None and not any(inputs.layouts)):  # no image: SCR has nothing to edit
            plan = SequencePlan.identity(batch, length)
        elif plan is None:
            t_diag = time.perf_counter()
            maps = self.attention_maps(inputs, embeds, config)
            timings["diagnostic"] = time.perf_counter() - t_diag
            plan = plan_sequence(inputs.layouts, maps, length, config)
            plan.attention = maps
        eos = fam.tokenizer.eos_token_id
        pad = fam.tokenizer.pad_token_id if fam.tokenizer.pad_token_id is not None else eos
        pick = (sampling or GREEDY).picker()
        rows, prompts = [], self._rows(inputs)
        for b in range(batch):
            rows.append(self._generate_row(inputs, embeds, b, prompts, plan, config, steps, forced_tokens,
                                           keep_prefill_logits, stop_at_eos, pick, on_token, timings, t0))
            if rows[-1][3]:  # cancelled: the other prompts are not started
                break
        n = max(len(toks) for toks, *_ in rows)
        tokens = np.full((batch, n), pad if pad is not None else 0, np.int64)
        logits = [np.zeros((batch, self.decoder.n_vocab), np.float32) for _ in range(n)]
        prefill = np.zeros((batch, length, self.decoder.n_vocab), np.float32) if keep_prefill_logits else None
        for b, (toks, row_logits, row_prefill, _) in enumerate(rows):
            tokens[b, : len(toks)] = toks
            for step, lg in enumerate(row_logits):
                logits[step][b] = lg
            if prefill is not None:
                prefill[b, length - row_prefill.shape[0]:] = row_prefill
        texts = [fam.tokenizer.decode([t for t in row if t not in (pad, eos)]) for row in tokens.tolist()]
        timings["total"] = time.perf_counter() - t0
        return OrtResult(tokens=tokens, texts=texts, plan=plan, logits=logits, prefill_logits=prefill,
                         attention=maps, timings=timings, cancelled=any(r[3] for r in rows))

    def _generate_row(self, inputs: VLMInputs, embeds: np.ndarray, b: int, prompts: list, plan: SequencePlan,
                      config: SCRConfig, steps: int, forced_tokens, keep_prefill_logits: bool, stop_at_eos: bool,
                      pick, on_token, timings: dict[str, float], t0: float):
        """Prompt ``b`` (``prompts``: ``_rows(inputs)``): SCR prefill in the hooked context, KV cache moved to the
        plain one, decoding steps there."""
        off, _, first_position = prompts[b]
        self._install_plan(config, plan, b, off)
        row_identity = not plan.active()[b].any()
        # no hook at all for an identity plan: bit-identical to plain llama.cpp
        logits = self._hooked_prefill(inputs, embeds, want_logits=True, active=not row_identity, row=b, rows=prompts)
        fix_logits(self.architecture, logits, self.masked_ids)
        # decode in the plain context (the hooked one's callback would be asked about every node of every step):
        # the prompt's KV cache, SCR's edits included, moves there
        self.llama.copy_state_to(self.decoder)
        last = logits[-1].astype(np.float32)
        timings.setdefault("prefill", time.perf_counter() - t0)  # the first prompt's first token
        eos = self.family.tokenizer.eos_token_id
        suppressed = self.family.suppressed_token_ids()
        tokens, out_logits, cancelled = [], [], False
        for step in range(steps):
            out_logits.append(last)
            if forced_tokens is not None:
                nxt = int(forced_tokens[b][step])
            else:
                masked = last.copy()
                masked[suppressed] = -np.inf
                nxt = int(pick(masked[None])[0])
            tokens.append(nxt)
            if on_token is not None and not on_token(b, nxt):
                cancelled = True
                break
            if forced_tokens is None and stop_at_eos and nxt == eos:
                break
            if step == steps - 1:
                break
            position = None if first_position is None else first_position + step
            last = fix_logits(self.architecture, self.decoder.decode_token(nxt, position),
                              self.masked_ids).astype(np.float32)
        return tokens, out_logits, (logits.copy() if keep_prefill_logits else None), cancelled
