"""One exception type for problems the user can fix.

The CLI catches :class:`LMForgeError` and prints its message as a single line
(``error: <problem>. <fix>``) with a non-zero exit code, never a traceback.
Library code raises it for bad input: files, configs, checkpoints, prompts.
"""


class LMForgeError(Exception):
    """A user-facing error: the message names the problem and the fix."""
