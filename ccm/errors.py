"""Every error ccm raises about a user's data, files, devices or cameras: one hierarchy, no heavy imports.

The command line prints a :class:`CcmError` as one line (``ccm <command>: error: …``, exit 2) and
anything else — a bug — with its traceback. Messages say what was expected, what was found and in
which file (and at which frames). Each class also derives from the builtin a caller would expect
(``ValueError`` for bad data, ``RuntimeError`` for a camera, ``FileNotFoundError`` for a missing
file), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class CcmError(Exception):
    """Base class: a problem with the user's input, environment or hardware, not a bug in ccm."""


class UsageError(CcmError, ValueError):
    """Command-line arguments or API parameters that do not fit together."""


class NotFoundError(CcmError, FileNotFoundError):
    """A file, or a shipped device/bundle/recipe name, that does not exist; lists what does."""


class DeviceError(CcmError, ValueError):
    """A device description that cannot be used; the message names the file and the field."""


class StackError(CcmError, ValueError):
    """A calibration stack that cannot be used; the message names the file and the problem."""


class RecipeError(CcmError, ValueError):
    """A training or dataset recipe that is invalid or does not fit the stack it is given."""


class SceneError(CcmError, ValueError):
    """Scene files or scene classes that cannot be used to simulate."""


class BundleError(CcmError, ValueError):
    """A bundle that cannot be used, or frames it cannot reconstruct; the message says why."""


class FrameError(CcmError, ValueError):
    """Frames that do not fit a device or bundle; the message says what was expected and found."""


class BackendError(CcmError, ValueError):
    """A backend that cannot run here (no GPU, no onnxruntime, a precision it lacks)."""


class QuantisationError(CcmError, ValueError):
    """int8 quantisation changes a bundle's output too much to be used."""


class RecordingError(CcmError, ValueError):
    """A recording that cannot be read as asked (missing, corrupt, wrong layout, bad selection)."""


class OutputError(CcmError, ValueError):
    """An output that cannot be written as asked (exists, an input of the same run, a full disk, …)."""


class SourceError(CcmError, RuntimeError):
    """A camera that disconnected, timed out or failed; names the source and what happened."""


__all__ = [name for name, obj in dict(globals()).items() if isinstance(obj, type) and issubclass(obj, CcmError)]
