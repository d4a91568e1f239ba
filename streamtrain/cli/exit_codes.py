"""Named process exit codes (documented in `streamtrain --help`)."""

OK = 0
RUNTIME_FAILURE = 1  # a service or the job failed while running
USAGE = 2  # bad flags, bad config, missing input: fix the invocation


class InputError(ValueError):
    """An input the command was given cannot be used (a file's bad row, ...): exit USAGE."""
