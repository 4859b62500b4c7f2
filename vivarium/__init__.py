"""vivarium: disposable, network-fenced Debian VMs for AI coding agents."""

from vivarium.instance import Status
from vivarium.sandbox import Sandbox

__all__ = ["Sandbox", "Status"]

__version__ = "0.1.0"
