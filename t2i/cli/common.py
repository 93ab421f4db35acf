"""Shared click plumbing: user errors are one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from t2i.config import ConfigError


class UserError(click.ClickException):
    """Bad input from the user (path, preset, option): printed as one line, exit status 2."""

    exit_code = 2


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ConfigError / FileNotFoundError / ValueError raised for user input into UserError."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except (ConfigError, FileNotFoundError) as err:
            raise UserError(str(err)) from err

    return wrapper
