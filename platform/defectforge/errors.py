"""One error hierarchy: what is the user's to fix, and what is a bug.

Why: the command line must tell the two apart. A ``DefectforgeError`` means the input is wrong (a
config field, a data file, a checkpoint, a tracking URI, an output folder) and its message names
what to fix; the CLI prints it as one ``error:`` line and exits 2. Every other exception is a bug
and keeps its traceback, so it cannot vanish behind a one-line message.

Each class also derives from the built-in exception it replaced (``ValueError``, ``RuntimeError``,
``FileNotFoundError``), so ``except ValueError`` written before this module keeps working. The
classes stay importable where they used to live (``config.ConfigError``, ``data.sample.DataError``,
``methods.base.CheckpointError``, ``tracking.TrackingError``,
``evaluate.metrics.extractors.MissingWeightsError``).
"""

from __future__ import annotations


class DefectforgeError(Exception):
    """Base of every user-facing error: the message names the file or field and what is wrong."""


class ConfigError(DefectforgeError, ValueError):
    """A configuration or command-line value problem, with the offending field (and file) named."""


class DataError(DefectforgeError, ValueError):
    """A dataset-level problem (missing or empty folder, unknown product, bad metadata, unsafe name).

    The message always names the path (and the column/field) so the user knows what to fix.
    """


class CheckpointError(DefectforgeError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or does not match its model; names the file."""


class TrackingError(DefectforgeError, RuntimeError):
    """The tracking server cannot be used (unreachable, refused, wrong URI)."""


class MissingWeightsError(DefectforgeError, FileNotFoundError):
    """A pretrained weights file is not in the local weights directory (nothing is downloaded)."""


class OutputError(DefectforgeError):
    """An output folder that cannot be used: not writable, or holding files this command would
    overwrite or mix with (see ``defectforge.paths.claim_output``)."""


class DeviceError(DefectforgeError):
    """A requested device (e.g. ``--device cuda``) that this machine does not have."""


class ClusterError(DefectforgeError, RuntimeError):
    """A Ray cluster that cannot be started or joined; names the address tried and how to choose another."""
