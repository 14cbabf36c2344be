"""Exceptions kvzoo raises for bad input. Every message names the file, key, shape or value at fault."""


class KvzooError(Exception):
    """Base class of every error kvzoo raises on purpose."""


class CheckpointError(KvzooError):
    """A checkpoint file is missing, malformed, or does not match the model it is loaded into."""


class ConfigError(KvzooError):
    """A config.json (or an argument standing for one) is missing a field or has an invalid value."""


class KvzooWarning(UserWarning):
    """Input kvzoo accepts but that may not do what was meant (a prompt past the model's context, top_p
    under greedy decoding, ...). The CLI prints these as `kvzoo: warning: ...`."""
