"""User-facing errors: each names the problem and the fix."""

from __future__ import annotations


class SCRExportError(Exception):
    """An error caused by input the user can correct; the CLI prints it without a traceback.

    ``problem`` says what is wrong, ``fix`` says what to do about it.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")


class ConfigError(SCRExportError, ValueError):
    """An SCR configuration value is out of range or malformed."""


class ModelLoadError(SCRExportError):
    """A model argument cannot be resolved to a supported vision-language model."""


class InputError(SCRExportError):
    """An image or prompt cannot be turned into model inputs."""
