"""What the two programs (``isdelta.run``, ``isdelta.score``) share.

- ``errors``  the exit codes and the errors that carry a message for the user
- ``config``  config sections (frozen pydantic), the model section, ``--set`` overrides
- ``cli``     one command-line ``main`` and its error boundary; the stage timer
- ``folder``  the output folder: lock, stamp, verified parts

The library (``engine`` … ``integrations``) never imports this package; the programs do.
"""

from __future__ import annotations

from isdelta.program.cli import Program, main, stage
from isdelta.program.config import (
    ModelConfig,
    Section,
    apply_overrides,
    format_errors,
    load_yaml_config,
    options_section,
)
from isdelta.program.errors import EXIT_CODES, ConfigError, ExitCode, OutputFolderError, ProgramError
from isdelta.program.folder import OutputFolder, folder_lock, note, stamp_of

__all__ = [
    "EXIT_CODES",
    "ConfigError",
    "ExitCode",
    "ModelConfig",
    "OutputFolder",
    "OutputFolderError",
    "Program",
    "ProgramError",
    "Section",
    "apply_overrides",
    "folder_lock",
    "format_errors",
    "load_yaml_config",
    "main",
    "note",
    "options_section",
    "stage",
    "stamp_of",
]
