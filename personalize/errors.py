"""The project's one exception base and its kinds.

Every error a user can cause or meet (a bad setting, a taken port, a missing
service or jar) is a ``PersonalizeError`` with a message that says what to do;
the CLI prints it as one line and exits with ``exit_code``.
"""


class PersonalizeError(Exception):
    """Base of every error the project raises on purpose."""

    exit_code = 2


class ConfigError(PersonalizeError):
    """A setting (environment variable or flag) has a value we cannot use."""


class PortTakenError(PersonalizeError):
    """A port the stack needs is already in use by another process."""


class StackError(PersonalizeError):
    """A local service could not be started, stopped or reached."""


class ServiceUnavailable(PersonalizeError):
    """A service the command needs (Kafka, Redis, Flink) does not answer."""

    exit_code = 3


class MissingArtifact(PersonalizeError):
    """A jar or program the project installs (``make setup``) is missing."""
