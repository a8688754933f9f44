"""The capcli command line: one module per pipeline stage, each command a thin layer over the pipeline."""

from capcli.cli.app import ErrorHandlingGroup, app, main

__all__ = ["ErrorHandlingGroup", "app", "main"]
