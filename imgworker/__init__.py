"""imgworker: a durable image-processing job service for one VM."""

__version__ = "0.1.0"
