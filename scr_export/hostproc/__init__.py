"""Host pre-processing without torch or transformers (issue 11, in progress): images in numpy + PIL and tokens
with the ``tokenizers`` library, equal to transformers' (tests/test_hostproc.py). Not yet on the runners' path:
the prompt formats and the family adapters still load through transformers."""

from .images import PROCESSORS, process
from .tokenize import HostTokenizer

__all__ = ["PROCESSORS", "HostTokenizer", "process"]
