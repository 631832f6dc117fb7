"""The one exception type for mistakes a user can fix; the CLI prints it as a single line."""


class KdlabError(Exception):
    """A user-facing error: the message names the config key or file and says how to fix it."""
