"""The installed distribution's version, printed by every CLI's --version."""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "dsv3-grpo-toolkit"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
