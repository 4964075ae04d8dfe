"""The one exception type for mistakes a user can fix (config, data, paths)."""


class UserError(Exception):
  """A user mistake: the CLI prints the message alone and exits with status 2."""
