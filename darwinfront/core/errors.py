"""The error tree shared by the service, the search and the workers."""


class DarwinfrontError(Exception):
    """Base class of every error darwinfront raises on purpose."""


class InvalidSpec(DarwinfrontError, ValueError):
    """A job spec or configuration document is malformed; the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # rebuilt from its two arguments when it crosses Ray (pickle passes `args`, one string)
        return type(self), (self.field, self.message)


class InvalidTransition(DarwinfrontError):
    """A job status change that the state machine forbids (for example out of a terminal state)."""


class JobNotFound(DarwinfrontError, KeyError):
    """No job with this id exists for this tenant."""

    def __str__(self) -> str:  # KeyError quotes its message; we don't want that
        return str(self.args[0]) if self.args else "job not found"


class CandidateNotFound(DarwinfrontError, KeyError):
    """No stored result (configuration or exported model) for this candidate of this job."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "candidate not found"
