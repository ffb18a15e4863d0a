"""Settings: loading a config (`settings.load`) and every static check of its values (`settings.validate`).

Every problem is a `ConfigError` whose message is one line naming the key and the fix; `train.py` prints it
and exits non-zero.
"""


class ConfigError(ValueError):
  """A config key, value or combination of values that cannot work, in the user's terms."""
