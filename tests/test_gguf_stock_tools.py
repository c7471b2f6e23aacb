"""The GGUF files in llama.cpp's own tools (llama-cpp-python's ``Llama`` and its libmtmd chat handler), with no
scr-export code on the run path: the vocabulary tokenises as the checkpoint's tokenizer does, text completes as
the PyTorch model completes it, and Qwen2-VL's text GGUF + mmproj pair answers an image question."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

import llama_cpp  # noqa: E402,F401  (installed by the README's test command: a failed import fails)
import transformers  # noqa: E402,F401  (installed by the README's test command: a failed import fails)

from conftest import TINY_PRESETS, load, make_image  # noqa: E402

FAMILIES = ["llava", "internvl", "qwen2_vl", "chameleon"]

# Written here, not taken from the code under test: the kinds of text a tokenizer gets wrong first.
STRINGS = [
    "hello",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Déjà vu: crème brûlée, smörgåsbord, Ångström, São Paulo.",
    "東京タワーと北京的长城，서울의 남산타워",
    "Rocket 🚀, family 👨‍👩‍👧‍👦, thumbs 👍🏿, flag 🇯🇵.",
    "tabs\tand\nnew lines\r\n  two spaces,   three.",
    "",
]


def _gguf(family: str, quant: str, gguf_dir):
    out, _ = gguf_dir(family, quant)
    manifest = json.loads((out / "manifest.json").read_text())
    return out, out / manifest["gguf"]["file"], manifest


def _checkpoint_tokenizer(family: str):
    """The checkpoint's own tokenizer, loaded from its directory by transformers (not through scr-export)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(load(TINY_PRESETS[family]).path)


def _chat_strings(tok) -> list[str]:
    """The chat template rendered with an image and text, and every added token of the vocabulary in text."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this? ☕"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cup."}]}]
    out = [" ".join(t.content for t in tok.added_tokens_decoder.values() if not t.content.startswith("IMGIMG"))]
    if tok.chat_template:
        out.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenises_like_the_checkpoint_from_the_gguf_alone(family, gguf_dir):
    from llama_cpp import Llama

    _, path, manifest = _gguf(family, "q8_0", gguf_dir)
    tok = _checkpoint_tokenizer(family)
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in STRINGS + _chat_strings(tok):
            ids = llm.tokenize(text.encode(), add_bos=True, special=True)
            assert ids == tok(text, add_special_tokens=True)["input_ids"], text
            # and back: the GGUF's detokeniser restores the text byte for byte (special tokens rendered)
            assert llm.detokenize(ids, special=True).decode() == tok.decode(ids), text
        assert llm.metadata["tokenizer.ggml.model"] == "gpt2"
        # the converter's own check agrees, and is recorded where a user can read it
        check = manifest["gguf"]["tokenizer"]["check"]
        assert check["identical"] == check["strings"] > len(STRINGS)
    finally:
        llm.close()


def test_chat_template_and_end_of_turn_travel_in_the_gguf(gguf_dir):
    from llama_cpp import Llama

    _, path, _ = _gguf("qwen2_vl", "q8_0", gguf_dir)
    tok = _checkpoint_tokenizer("qwen2_vl")
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == im_end
        assert llm.tokenize(b"<|vision_start|>", add_bos=False, special=True) == [
            tok.convert_tokens_to_ids("<|vision_start|>")]
    finally:
        llm.close()


def _reference_greedy(family: str, ids: list[int], steps: int) -> list[int]:
    import torch

    model = load(TINY_PRESETS[family]).model
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", ["llava", "internvl", "chameleon"])
def test_a_plain_llama_completes_text_as_the_pytorch_model_does(family, gguf_dir):
    """llama-cpp-python's ``Llama`` on the f32 GGUF, greedy: the same tokens as transformers' ``generate``."""
    from llama_cpp import Llama

    _, path, _ = _gguf(family, "f32", gguf_dir)
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    try:
        prompt = "Describe the picture in one sentence:"
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        produced = []
        for token in llm.generate(ids, temp=0.0):  # llama-cpp-python's own greedy sampler
            produced.append(int(token))
            if len(produced) == 6 or token == llm.token_eos():
                break
        expected = _reference_greedy(family, ids, 6)
        n = min(len(produced), len(expected))
        assert n >= 1 and produced[:n] == expected[:n], (produced, expected)
        # and a text prompt through the completion API (llama-cpp-python appends a SEP token to a text prompt when
        # the vocabulary has one, as Chameleon's does, so only the length is compared)
        as_text = llm.create_completion(prompt, max_tokens=2, temperature=0.0)
        assert as_text["usage"]["prompt_tokens"] >= len(ids) and as_text["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()


SYSTEM_TURN = ("{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
               "<|im_end|>\n{% endif %}")


def test_qwen2_vl_gguf_and_mmproj_answer_an_image_question_in_llama_cpps_own_chat_handler(gguf_dir):
    """The pair as llama-mtmd-cli / llama-server take it: llama-cpp-python's MTMDChatHandler (libmtmd) reads the
    chat template, the vision markers and the end-of-turn token from the GGUF, and the projector from the mmproj; its
    greedy answer (the default system turn left out, as scr-export's prompt has none) is scr-export's llama.cpp
    runner's greedy answer with SCR off, token for token."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    out_dir, path, manifest = _gguf("qwen2_vl", "q8_0", gguf_dir)
    mmproj = out_dir / manifest["gguf"]["mmproj"]
    buf = io.BytesIO()
    picture = make_image(140, 112)  # 5 x 4 merged patches of 28: within the preset's pixel limits, so libmtmd's
    picture.save(buf, format="PNG")  # own preprocessing and the processor's make the same grid
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False, use_gpu=False)
    llm = Llama(model_path=str(path), chat_handler=handler, n_ctx=1024, n_threads=2, verbose=False)
    try:
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                   {"type": "text", "text": "What is in the image?"}]}],
            max_tokens=4, temperature=0.0, repeat_penalty=1.0)  # greedy: no penalty (the default is 1.1)
        usage = reply["usage"]
        # the prompt holds the image's embeddings: far more positions than its text tokens alone
        text_only = len(llm.tokenize(b"What is in the image?", add_bos=False, special=True))
        assert usage["prompt_tokens"] > text_only + 16
        assert usage["completion_tokens"] >= 1
        # the answer: what scr-export's llama.cpp runner decodes greedily from the same GGUF, mmproj, picture and
        # prompt with SCR off (llama.cpp's chat handler and our runner agree token for token)
        from runtimes.llamacpp.runner import LlamaCppVLM

        class NoSystemTurn(MTMDChatHandler):  # scr-export's prompt has no default system turn: the same text here
            def _get_chat_template(self, llama_model):
                return super()._get_chat_template(llama_model).replace(SYSTEM_TURN, "")

        assert SYSTEM_TURN in handler._get_chat_template(llm)
        plain = NoSystemTurn(clip_model_path=str(mmproj), verbose=False, use_gpu=False)
        llm.chat_handler = plain
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                   {"type": "text", "text": "What is in the image?"}]}],
            max_tokens=6, temperature=0.0, repeat_penalty=1.0)
        runner = LlamaCppVLM(out_dir)
        ours = runner.generate(runner.encode([[picture]], ["What is in the image?"]), scr=False,
                               max_new_tokens=reply["usage"]["completion_tokens"])
        ids = [int(t) for t in ours.tokens[0]]
        assert len(ids) == reply["usage"]["completion_tokens"]
        # llama-cpp-python renders a reply's tokens as UTF-8 dropping invalid bytes (a random model's byte tokens):
        # our tokens rendered the same way must be the reply's text
        assert reply["choices"][0]["message"]["content"] == llm.detokenize(ids).decode("utf-8", errors="ignore"), \
            (reply["usage"], ids)
    finally:
        llm.close()
        for h in {handler, llm.chat_handler}:
            h.mtmd_ctx and h._mtmd_cpp.mtmd_free(h.mtmd_ctx)
            h.mtmd_ctx = None


def test_the_placeholder_vocabulary_is_gone_tokenising_never_aborts(gguf_dir):
    """The old SPM-typed placeholder aborted the process on "hello" (std::out_of_range): every byte must map."""
    from llama_cpp import Llama

    _, path, _ = _gguf("llava", "q8_0", gguf_dir)
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        every_byte = bytes(range(1, 256)).decode("latin-1").encode()
        ids = llm.tokenize(every_byte, add_bos=False, special=False)
        assert len(ids) == len(every_byte) and min(ids) >= 0
        assert np.all(np.asarray(ids) < llm.n_vocab())
    finally:
        llm.close()


def test_a_sentencepiece_checkpoint_is_written_as_llama_cpps_spm_vocabulary(tmp_path):
    """LLaVA-1.5's tokenizer is SentencePiece (tokenizer.model); no preset has one, so a tiny one is trained here.
    llama.cpp, from the GGUF alone, tokenises as the checkpoint's sentencepiece model does (scores and byte pieces
    carried), keeps tokens transformers added (``<image>``) whole, and agrees with transformers' legacy Llama tokenizer
    on LLaVA's prompt (with ``legacy=False`` transformers drops the space llama.cpp and sentencepiece put after a
    special token; the conversion's check reports such a difference)."""
    import sentencepiece as spm  # noqa: E402  (installed by the README's test command)
    import gguf
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from runtimes.llamacpp.gguf_vocab import write_vocabulary

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("The quick brown fox jumps over the lazy dog. Déjà vu, crème brûlée. 東京 北京 서울. "
                       "What is in the image? USER: ASSISTANT: describe 12345\n") * 40)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "legacy": True}))  # sentencepiece's own behaviour after special tokens, as llama.cpp
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.save_pretrained(tmp_path)
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_context_length, 64), (w.add_embedding_length, 8), (w.add_block_count, 1),
                   (w.add_feed_forward_length, 8), (w.add_head_count, 1), (w.add_head_count_kv, 1),
                   (w.add_rope_dimension_count, 8)):
        add(v)
    w.add_layer_norm_rms_eps(1e-5)
    info = write_vocabulary(w, tok, tmp_path, "llava", len(tok))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert info["model"] == "llama" and info["kind"] == "SentencePiece"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in STRINGS + [" leading space", "two  spaces"]:
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == [1, *sp.encode(text)], text
        image = tok.convert_tokens_to_ids("<image>")
        prompt = "USER: <image>\nWhat is in the image? ASSISTANT:"
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        assert image in ids and ids == tok(prompt)["input_ids"]
    finally:
        llm.close()
