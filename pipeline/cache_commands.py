"""Commands of this stage (registered on pipeline.cli.main)."""
from .cli import main  # noqa: F401
