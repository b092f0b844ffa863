"""The one exception type for user mistakes; the CLI prints it as a single line."""


class KLFlowError(Exception):
    """A problem the user can fix (bad input, bad config, missing file); not a bug."""


def alternatives(values: tuple[str, ...]) -> str:
    """The allowed values as an error message lists them: 'a' or 'b', 'a', 'b' or 'c'."""
    quoted = [repr(value) for value in values]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
