"""ftscale: parameter-efficient fine-tuning from one CPU to many GPU nodes."""

__version__ = "0.1.0"
