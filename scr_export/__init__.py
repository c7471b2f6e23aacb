"""scr-export: Spatial Credit Redistribution (SCR) built into deployed vision-language models.

The core is importable without torch: the configuration and the plan. Model code loads lazily.
"""

from .config import SCRConfig
from .errors import ConfigError, InputError, ModelLoadError, SCRExportError
from .layout import Grid, ImageSpan
from .plan import GridPlan, ImagePlan, SequencePlan, plan_redistribution, plan_sequence

__version__ = "0.1.0"

__all__ = ["SCRConfig", "plan_redistribution", "plan_sequence", "GridPlan", "ImagePlan", "SequencePlan", "Grid",
           "ImageSpan", "SCRExportError", "ConfigError", "InputError", "ModelLoadError", "__version__"]
