"""Errors that are the user's to fix: the command line shows their message as one line, never a traceback."""


class UserError(Exception):
    """A problem the user can fix; the first line of the message says what and how."""


class SpecError(UserError):
    """An invalid option or combination of options."""


class Unsupported(UserError):
    """A cell its method cannot run (e.g. transformers' assisted generation at batch > 1): recorded with the
    reason and shown in the tables, never a crash and never a silent gap."""
