"""imgworker: a durable image-processing job service for one VM."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # Looked up on first use: importlib.metadata pulls in the email package,
    # 30 ms of start-up in every `imgworker` command that never needs it.
    if name != "__version__":
        raise AttributeError(f"module 'imgworker' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:  # the one home of the version is pyproject.toml
        value = version("imgworker")
    except PackageNotFoundError:  # running from a checkout that was never installed
        value = "0+unknown"
    globals()["__version__"] = value
    return value
