"""The base class of every bad-input error: the CLIs print its message and exit with code 2."""


class UserError(ValueError):
    """Bad input from the user (a recipe, a path, a checkpoint, a flag); the message says what to change."""


class ModelError(UserError):
    """The model cannot be built (unknown name, bad kwargs)."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ranks diverged); the message names the step and what to do."""


def one_line(e: BaseException) -> str:
    """The message alone, on one line, also when a DataLoader worker wrapped it in its traceback text."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())
