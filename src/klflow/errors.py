"""The one exception type for user mistakes; the CLI prints it as a single line."""


class KLFlowError(Exception):
    """A problem the user can fix (bad input, bad config, missing file); not a bug."""
