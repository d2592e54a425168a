"""stackd: container stacks as systemd user services, owned and verified."""

__version__ = "0.1.0"
