"""Host pre-processing without torch or transformers: images in numpy + PIL, image-token expansion as plain
functions, tokens with the ``tokenizers`` library (special tokens as the checkpoint's tokenizer adds them: BOS for
Llama tokenizers), and the whole of ``encode`` from plain settings, all equal to transformers' (tests/test_hostproc.py).
``model.HostModel`` puts it together for a converted directory: what every runner builds its inputs with."""

from .encode import HostSettings, encode, format_prompt
from .images import PROCESSORS, process
from .prompts import EXPANSIONS, expand
from .tokenize import HostTokenizer

__all__ = ["EXPANSIONS", "PROCESSORS", "HostSettings", "HostTokenizer", "encode", "expand", "format_prompt",
           "process"]
