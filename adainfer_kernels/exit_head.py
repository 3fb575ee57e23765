"""TEMPORARY (replaced by the exit-head branch at merge): exit_head dispatches to the reference."""

from adainfer_kernels.reference import exit_head_ref as exit_head  # noqa: F401
