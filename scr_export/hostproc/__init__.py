"""Host pre-processing without torch or transformers (issue 11, in progress): images in numpy + PIL, image-token
expansion as plain functions, tokens with the ``tokenizers`` library, and the whole of ``encode`` from plain
settings, all equal to transformers' (tests/test_hostproc.py). Not yet on the runners' path: the family adapters still read transformers' configs,
whose defaults a converted directory does not hold yet (the converter has to record them in the manifest)."""

from .encode import HostSettings, encode, format_prompt
from .images import PROCESSORS, process
from .prompts import EXPANSIONS, expand
from .tokenize import HostTokenizer

__all__ = ["EXPANSIONS", "PROCESSORS", "HostSettings", "HostTokenizer", "encode", "expand", "format_prompt",
           "process"]
