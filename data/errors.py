"""The one exception a user can cause in the data pipeline."""


class DataError(ValueError):
  """A problem with the data the user pointed us at; the message is one line naming the file and the fix."""
