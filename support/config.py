"""The configuration machinery of train.py: nanoGPT-style config files and --key=value overrides.

train.py declares the keys (its Config dataclass and model.ModelArgs, with ranges from support/checks.py's `ranged`)
and reads the result; this file adds what turns a command line into checked values: config files run as Python
whose plain globals are keys, `--key=value` parsed with ast.literal_eval (anything that is not a Python literal is a
string), a bare `--flag` for a bool key, every value checked against its field's type and declared range, a
suggestion for an unknown key, and the line of a config file that broke. Errors are ConfigError, one line naming the
file or flag; train.py's main says them as its own.
"""

import ast
import difflib
import traceback
from pathlib import Path

from support.checks import check_value, expected


class ConfigError(ValueError):
    """A config file or --key=value that cannot be used: one line naming the file or flag and what was expected."""


def load(argv: list[str], fields: dict, flags=()) -> dict:
    """argv (config files and --key=value, without the program name) -> {key: checked value}.

    fields: key -> dataclass Field (its type and metadata["range"]); flags: the keys a bare --key sets to True.
    Config files come first, then the --key=value overrides, wherever they stand on the command line.
    """
    values = {}
    for arg in sorted(argv, key=lambda a: a.startswith("--")):
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:  # a bare --flag sets a bool key
                if key in flags:
                    set_value(values, key, True, arg, fields)
                    continue
                raise ConfigError(f"{arg}: expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # not a Python literal: a string such as a path
            set_value(values, key, value, arg, fields)
        else:
            path = Path(arg)
            if not path.is_file():
                raise ConfigError(f"{arg}: config file not found (expected config/<recipe>.py or --key=value)")
            namespace = {}
            try:
                exec(compile(path.read_text(), str(path), "exec"), namespace)
            except (Exception, SystemExit) as e:  # a config file is the user's Python: say where it broke, one line
                raise ConfigError(f"{path}{config_line(e, path)}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from None
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    set_value(values, key, value, str(path), fields)
    return values


def set_value(values: dict, key: str, value, where: str, fields: dict):
    """values[key] = value once the key is known and the value of its field's type and in its declared range."""
    if key not in fields:
        close = difflib.get_close_matches(key, list(fields), n=1)
        raise ConfigError(f"{where}: unknown config key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    f = fields[key]
    try:
        check_value(key, value, f.type, f.metadata.get("range"))
    except ValueError as e:
        raise ConfigError(f"--{e}" if where.startswith("--") else f"{where}: {e}") from None
    values[key] = float(value) if f.type is float else value


def config_line(e: BaseException, path: Path) -> str:
    """': line N' of a config file where e was raised (the innermost frame in that file), or ''."""
    if isinstance(e, SyntaxError) and e.lineno:
        return f": line {e.lineno}"
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
    return f": line {lines[-1]}" if lines else ""


def keys_help(defaults, fields: dict) -> str:
    """--help's table: each key of `defaults` (a dataclass) with its default and the values it takes."""
    return "\n".join(f"  --{k}={getattr(defaults, k)!r}".ljust(40) + expected(f.type, f.metadata.get("range"))
                     for k, f in fields.items())
