"""Shared click plumbing: user errors are one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from t2i.config import ConfigError
from t2i.data.errors import DataError
from t2i.models.io import WeightsError


class UserError(click.ClickException):
    """Bad input from the user (path, preset, option): printed as one line, exit status 2."""

    exit_code = 2


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ConfigError / DataError / WeightsError / FileNotFoundError (raised for user input:
    options, paths, data sources, weights files of another config) into UserError."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except (ConfigError, DataError, WeightsError, FileNotFoundError) as err:
            raise UserError(str(err)) from err

    return wrapper
