"""Command-line and YAML mistakes (an unknown key, a wrong type, a YAML syntax error) as one `LMError`.

jsonargparse reports them as many lines (the usage, every branch of a Union, the given value as a
Python repr). `lm` parses with `exit_on_error=False` and turns its `ArgumentError` into one message
that names the key and what to do: for an unknown key, the closest valid one and every valid key
next to it; for a wrong value, the expected type; for a YAML syntax error, the file, line and column.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Callable, Optional

from lm.errors import LMError, MissingFileError

_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_UNKNOWN = (
    re.compile(r"unrecognized arguments: --?([^\s=]+)"),
    re.compile(r"Option '([^']+)' is not accepted"),
    re.compile(r"Group '([^']+)' does not accept option '([^']+)'"),
    re.compile(r"Key '([^']+)' is not expected"),
)
_WRONG_VALUE = re.compile(r"Expected a (.+?)\. Got value: (.*)")
_MISSING_FILE = re.compile(r"File does not exist: '([^']+)'")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)':\s*\n\s*(No module named [^\n]+|[^\n]*has no attribute[^\n]+)")


def explain_argument_error(message: str, parser: Any, args: list[str], prog: str) -> LMError:
    """The `LMError` for a jsonargparse parse failure `message` of `prog` (e.g. "lm fit") run with `args`;
    `parser` (the verb's own, or None) lists the valid keys."""
    explainers: tuple[Callable[..., Optional[LMError]], ...] = (
        _yaml_syntax, _missing_file, _class_path, _unknown_key, _wrong_value)
    for explain in explainers:
        error = explain(message, parser, args, prog)
        if error is not None:
            return error
    return LMError(f"{_last_lines(message)} (`{prog} --help` lists every option).")


def _yaml_syntax(message: str, parser: Any, args: list[str], prog: str) -> Optional[LMError]:
    """jsonargparse reads a YAML file as a string and says `in "<unicode string>"`: find the file."""
    if "Problems parsing config" not in message and "<unicode string>" not in message:
        return None
    import yaml

    for path in config_files(args):
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            return LMError(f"{path}: YAML syntax error{where}: {problem}. Fix the file there (check brackets, quotes "
                           f"and indentation around that line).")
        except (OSError, UnicodeDecodeError) as error:
            return LMError(f"Cannot read config file {path}: {error}. Pass a UTF-8 YAML file to --config.")
    return None


def config_files(args: list[str]) -> list[str]:
    """The `--config FILE` / `--config=FILE` / `-c FILE` values of a command line, in order."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return [f for f in files if Path(f).is_file()]


def _missing_file(message: str, parser: Any, args: list[str], prog: str) -> Optional[LMError]:
    match = _MISSING_FILE.search(message)
    if match is None:
        return None
    key = ".".join(_PARSER_KEY.findall(message)) or "a path"
    hint = " (recipes are in experiments/)" if key == "config" else ""
    return MissingFileError(f"File not found: {match.group(1)} (given as --{key}). Check the path{hint}.")


def _class_path(message: str, parser: Any, args: list[str], prog: str) -> Optional[LMError]:
    match = _CLASS_PATH.search(message)
    if match is None:
        return None
    key = _PARSER_KEY.search(message)
    flag = f"--{key.group(1)} " if key else ""
    return LMError(f"Cannot import the class {flag}{match.group(1)}: {match.group(2).strip()}. Give an importable "
                   f"class path (e.g. lm.modules.LanguageModel); run from its package's folder or add it to PYTHONPATH.")


def _unknown_key(message: str, parser: Any, args: list[str], prog: str) -> Optional[LMError]:
    for pattern in _UNKNOWN:
        match = pattern.search(message)
        if match is not None:
            break
    else:
        return None
    prefix = [k for k in _PARSER_KEY.findall(message[:match.start()])]
    key = ".".join([*prefix, *match.groups()])
    parent, _, name = key.rpartition(".")
    class_path = _CLASS_PATH_GIVEN.search(message)
    valid = _children(_known_keys(parser, prefix[0] if prefix else "", class_path.group(1) if class_path else None),
                      parent)
    if not valid:
        return LMError(f"Unknown option {key}: `{prog} --help` lists every option.")
    close = difflib.get_close_matches(name, valid, n=1)
    guess = f" (did you mean {'.'.join([parent, close[0]]) if parent else close[0]}?)" if close else ""
    where = f"of {parent}" if parent else "at the top level"
    return LMError(f"Unknown option {key}{guess}. Valid keys {where}: {', '.join(valid)}.")


_CLASS_PATH_GIVEN = re.compile(r"Problem with given class_path '([^']+)'")


def _known_keys(parser: Any, outer: str, class_path: Optional[str]) -> list[str]:
    """Every dotted key the parser accepts (`init_args` levels left out). For a class chosen by
    `class_path` under `outer` (e.g. `--model my_pkg.MyModel`) the keys are that class's."""
    try:
        if class_path:
            from jsonargparse import ArgumentParser

            from lm.checkpoint import import_class

            parser = ArgumentParser(exit_on_error=False)
            parser.add_class_arguments(import_class(class_path), outer)
        keys = list(parser.get_defaults().keys()) if parser is not None else []
    except Exception:  # the list is a courtesy: never hide the original error behind another one
        return []
    return [".".join(p for p in key.split(".") if p != "init_args") for key in keys if not key.endswith("class_path")
            ] + [key.rpartition(".class_path")[0] for key in keys if key.endswith(".class_path")]


def _children(keys: list[str], parent: str) -> list[str]:
    """The names one level below `parent` ("" = the top level) among dotted `keys`."""
    start = f"{parent}." if parent else ""
    names = {key[len(start):].split(".")[0] for key in keys if key.startswith(start) and len(key) > len(start)}
    return sorted(names - {"config", "__path__"} if not parent else names)


def _wrong_value(message: str, parser: Any, args: list[str], prog: str) -> Optional[LMError]:
    match = _WRONG_VALUE.search(message)
    if match is None:
        return None
    key = ".".join(_PARSER_KEY.findall(message[:match.start()]))
    return LMError(f"{key or 'A value'}: expected {_type_name(match.group(1))}, got {match.group(2).strip()!r}. "
                   f"Give {key or 'it'} a value of that type (`{prog} --help` shows each option's type).")


def _type_name(annotation: str) -> str:
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", annotation)
    if literal:
        return f"one of {literal.group(1)}"
    plain = re.fullmatch(r"<class '([\w.]+)'>", annotation)
    return f"a value of type {plain.group(1)}" if plain else annotation


def _last_lines(message: str) -> str:
    """The innermost (most specific) lines of a nested jsonargparse message, as one line."""
    noise = ("Given value", "Subtypes:", "Errors:", "Does not validate", "- Expected a <class 'NoneType'>")
    lines = [line.strip(" -") for line in message.splitlines() if line.strip() and not any(n in line for n in noise)]
    return " ".join(lines[-2:]).rstrip(".") if lines else message.strip()


def explain_build_error(error: BaseException) -> LMError:
    """A class of the config refused its arguments while jsonargparse built it: the `LMError` it raised
    (jsonargparse wraps it in a Union's report), else the report's innermost lines."""
    cause: Optional[BaseException] = error
    while cause is not None:
        if isinstance(cause, LMError):
            return LMError(str(cause))
        cause = cause.__cause__ or cause.__context__
    return LMError(f"The config does not build: {_last_lines(str(error))}.")
