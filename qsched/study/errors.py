"""The study's user-facing error type (a ValueError, so the CLI prints it as one line)."""


class StudyError(ValueError):
    """Bad study input: a missing or malformed study directory, system spec, prompt file or manifest."""
