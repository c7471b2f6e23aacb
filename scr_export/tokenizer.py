"""A tokenizer built locally (no hub): byte-level BPE without merges plus the family's special tokens."""

from __future__ import annotations

from collections.abc import Sequence


def build_byte_tokenizer(special_tokens: Sequence[str], named_tokens: dict[str, str] | None = None,
                         chat_template: str | None = None, sep_token: str | None = None,
                         leading_tokens: Sequence[str] = (), add_bos: bool = False,
                         corpus: Sequence[str] | None = None, merges: int = 0):
    """A real ``PreTrainedTokenizerFast``: 256 byte tokens, then ``special_tokens`` in order.

    ``corpus`` and ``merges``: a byte-level BPE trained on ``corpus`` by the tokenizers library's ``BpeTrainer``
    (at most ``merges`` merges; the trained toy presets' words become single tokens, as a real BPE's would); without
    them, no merges (every byte one token).

    ``named_tokens`` become tokenizer attributes (``tokenizer.image_token`` ...), as the family processors expect.
    ``leading_tokens`` (e.g. Chameleon's 8192 image-code tokens) get the ids right after <s> </s> <pad> <unk>,
    as in the real vocabulary, and the bytes move behind them. ``add_bos``: tokenising with special tokens puts <s>
    first, as the Llama tokenizers of real LLaVA-1.5 and Chameleon checkpoints do (a post-processor in
    tokenizer.json, so transformers and the tokenizers library agree).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if leading_tokens:
        order = ["<s>", "</s>", "<pad>", "<unk>", *leading_tokens, *alphabet]
    else:
        order = alphabet
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(order)}, merges=[], unk_token="<unk>"
                                   if leading_tokens else None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if corpus is not None and merges > 0:
        if leading_tokens:
            raise ValueError("a trained BPE with leading tokens is not supported")
        from tokenizers import trainers

        trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + merges, initial_alphabet=alphabet,
                                      show_progress=False, min_frequency=2)
        backend.train_from_iterator(list(corpus), trainer)
    base = ["<s>", "</s>", "<pad>", "<unk>"] + ([sep_token] if sep_token else [])
    ordered = base + [t for t in special_tokens if t not in base]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ordered])
    if add_bos:
        bos = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", sep_token=sep_token, model_specific_special_tokens=dict(named_tokens or {}),
                                   chat_template=chat_template, padding_side="left")
