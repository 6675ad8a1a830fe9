"""Errors a user can cause. The CLI prints them without a traceback and exits with code 2."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """A YAML / dict config has problems; `problems` lists every one, each starting with its key path."""

    def __init__(self, problems, header="invalid config"):
        self.problems = list(problems) if not isinstance(problems, str) else [problems]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):\n{lines}")


class DataError(UserError):
    """Input data is missing, malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint or model folder cannot be used (missing, truncated, another model, another architecture)."""
