"""The one exception type for mistakes a user can fix; the CLI prints it as a single line."""

import difflib


class KdlabError(Exception):
    """A user-facing error: the message names the config key or file and says how to fix it."""


def close_matches(word: str, options: list[str]) -> str:
    """``" (did you mean x, y?)"`` or ``""``."""
    matches = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""
