"""Structured one-line errors of the training stages (standard library only).

A stage that refuses its input raises a `StageError` naming its own parameter (`data_dir`,
`model_dir`, `distribution`, ...), the value received and a reason. Where the reason points at
another parameter ("raise the limit `max_image_pixels=50000000`", "skip bad files with
`strict=False`") it holds a `Mention` instead of text, so that each reader names the parameters
its own way: `str(error)` as the library's keyword arguments, the command line
(`training.command_line.error_line`) as its flags.

Example:

```python
error = DataError("data_dir", "/data", ["cannot decode x.jpg; skip bad files ",
                                        Mention("strict", False)])
str(error)            # "data_dir=/data: cannot decode x.jpg; skip bad files with `strict=False`"
error.render(lambda m: f"--{m.parameter}")   # the reason, parameters named by the caller
```
"""

from __future__ import annotations

import dataclasses

__all__ = ["Mention", "StageError", "DataError", "RunDirError", "CheckpointError",
           "ClusterError", "WorkerMismatchError", "WorkerLostError"]


@dataclasses.dataclass(frozen=True)
class Mention:
    """A parameter named inside an error's reason.

    Attributes:
        parameter: str. The library parameter (`"max_image_pixels"`).
        value: the value the reason suggests, or `None` to name the parameter alone.
    """

    parameter: str
    value: object = None

    def as_keyword(self):
        """`max_image_pixels=5` in backquotes (the bare name when `value` is None; "with
        `strict=False`" for a bool)."""
        if self.value is None:
            return f"`{self.parameter}`"
        prefix = "with " if isinstance(self.value, bool) else ""
        return f"{prefix}`{self.parameter}={self.value}`"


class StageError(ValueError):
    """A stage cannot go on with the value of one of its parameters; one line.

    Args:
        parameter: str. The parameter at fault.
        value: the value received.
        reason: str, or a list of str and `Mention`s. What is wrong and how to fix it.

    Attributes:
        parameter, value: as given.
        parts: tuple of str and `Mention`.
    """

    def __init__(self, parameter, value, reason):
        self.parameter, self.value = parameter, value
        self.parts = (reason,) if isinstance(reason, str) else tuple(reason)
        super().__init__(f"{parameter}={value}: {self.reason}")

    def render(self, name=Mention.as_keyword):
        """The reason, each `Mention` written by `name(mention)`."""
        return "".join(p if isinstance(p, str) else name(p) for p in self.parts)

    @property
    def reason(self):
        """The reason with parameters as keyword arguments."""
        return self.render()


class DataError(StageError):
    """Data cannot be loaded as asked (parameters of `training.data`)."""


class RunDirError(StageError):
    """The run directory (or the export base path) cannot be used (`training.run_dir`)."""


class CheckpointError(StageError):
    """A backup exists but cannot be restored (`training.checkpoint`)."""


class ClusterError(StageError):
    """`TF_CONFIG` describes no cluster a multi-worker run can use (`training.cluster`)."""


class WorkerMismatchError(StageError):
    """The workers of a multi-worker run are not in the same state (`training.replica_sync`)."""


class WorkerLostError(RuntimeError):
    """A worker of a multi-worker run stopped or became unreachable; the message is one line."""
