"""Errors a user can cause. The CLI prints them without a traceback and exits with code 2."""
import pickle

# Values that config interpolation read from environment variables (`${oc.env:VAR}`): often tokens or
# keys, so no error message shows them (config/loading.py adds them).
_FROM_ENVIRONMENT: set = set()
HIDDEN = "<from the environment>"


def hide_in_messages(value) -> None:
    """Never show `value` in the message of a UserError."""
    if isinstance(value, str) and value:
        _FROM_ENVIRONMENT.add(value)


def shown(value):
    """`value`, or HIDDEN for one read from the environment (for configs logged to a tracker)."""
    return HIDDEN if isinstance(value, str) and value in _FROM_ENVIRONMENT else value


def _hidden(message: str) -> str:
    for value in _FROM_ENVIRONMENT:  # quoted, as checks show values; bare when long enough not to be a word
        message = message.replace(repr(value), repr(HIDDEN))
        if len(value) >= 6:
            message = message.replace(value, HIDDEN)
    return message


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and how to fix it."""

    def __init__(self, message: str = ""):
        super().__init__(_hidden(str(message)))


class ConfigError(UserError):
    """A YAML / dict config has problems; `problems` lists every one, each starting with its key path."""

    def __init__(self, problems, header="invalid config"):
        self.problems = [_hidden(p) for p in ([problems] if isinstance(problems, str) else problems)]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):\n{lines}")


class DataError(UserError):
    """Input data is missing, malformed or inconsistent."""


class StoreError(UserError):
    """An object store (s3://, gs://, ...) could not be reached, or has no such bucket or object."""


class CheckpointError(UserError):
    """A checkpoint or model folder cannot be used (missing, truncated, another model, another architecture)."""


def pickle_refusal(error: BaseException) -> bool:
    """Whether `error`, or one it was raised from, is torch's `weights_only` refusal (transformers and
    peft re-raise it in their own words)."""
    while error is not None:
        if isinstance(error, pickle.UnpicklingError):
            return True
        error = error.__cause__ or error.__context__
    return False


def refused(what: str, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{what} holds pickled objects beyond tensors and plain types "
                           f"({str(e).splitlines()[0][:300]}); loading it could run arbitrary code, so it is "
                           "refused. Remove it, or re-save only the weights of a checkpoint you trust.")
