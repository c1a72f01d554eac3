"""imgworker: a durable image-processing job service for one VM."""

from importlib.metadata import PackageNotFoundError, version

try:  # the one home of the version is pyproject.toml
    __version__ = version("imgworker")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
