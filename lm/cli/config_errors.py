"""Command-line and YAML mistakes (an unknown key, a wrong type, a YAML syntax error) as one `LMError`.

jsonargparse reports them as many lines (the usage, every branch of a Union, the given value as a
Python repr). `lm` parses with `exit_on_error=False` and turns its `ArgumentError` into one message
that names the key and what to do: for an unknown key, the closest valid one and every valid key
next to it; for a wrong value, the expected type; for a YAML syntax error, the file, line and column.

A positional argument (`runs` of `lm report`) is not an option: `--runs x` is answered with the command
written without the flag, and positional names are neither suggested nor listed as valid keys. A value
with no flag before it (`lm export model.ckpt`) is named as such, with the flag it probably lacks.

A key given twice in one YAML mapping (PyYAML keeps the last one without a word) is refused, naming the
key and both lines: importing this module registers, with `jsonargparse.set_loader`, a YAML loader that
checks for it before jsonargparse's own loader runs, so every `--config` file and YAML value of every
verb is checked; `refuse_duplicate_keys` says it with the file's name.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from jsonargparse import ArgumentParser, get_loader, set_loader

from lm.errors import LMError, MissingFileError
from lm.io.class_paths import import_class

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


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping."""


def duplicate_keys(text: str) -> list[tuple[str, int, int]]:
    """(dotted key, line of its first value, line of the repeat) of every key given twice in one mapping of
    the YAML `text` (1-based lines); [] for text that is no YAML (its own error is reported elsewhere)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        nodes = [(yaml.compose(text, Loader=loader), "")]
    except yaml.YAMLError:
        return []
    found = []
    while nodes:
        node, path = nodes.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = f"{path}.{key_node.value}" if path else str(key_node.value)
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    found.append((key, seen[key_node.value], line))
                seen.setdefault(key_node.value, line)
                nodes.append((value_node, key))
        elif isinstance(node, yaml.SequenceNode):
            nodes += [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
    return sorted(found, key=lambda item: item[2])


def refuse_duplicate_keys(paths: list[str]) -> None:
    """An `LMError` naming the first key given twice in the YAML files `paths`, with both lines."""
    for path in paths:
        try:
            repeats = duplicate_keys(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # the parser reports an unreadable file
        if repeats:
            key, first, again = repeats[0]
            more = f" (and {len(repeats) - 1} more key(s) given twice)" if len(repeats) > 1 else ""
            raise LMError(f"{path}: the key {key} is given twice, at lines {first} and {again}{more}: YAML would keep "
                          f"the last value without a word. Keep one of them.")


_JSONARGPARSE_YAML_LOAD = getattr(get_loader("yaml"), "wrapped", get_loader("yaml"))


def _load_yaml_refusing_duplicates(value: str) -> Any:
    """jsonargparse's YAML loader, after a check that no mapping gives a key twice."""
    if ":" in value:  # only a mapping can repeat a key
        repeats = duplicate_keys(value)
        if repeats:
            key, first, again = repeats[0]
            raise DuplicateKeyError(f"the key {key} is given twice, at lines {first} and {again}")
    return _JSONARGPARSE_YAML_LOAD(value)


_load_yaml_refusing_duplicates.wrapped = _JSONARGPARSE_YAML_LOAD  # type: ignore[attr-defined]
set_loader("yaml", _load_yaml_refusing_duplicates, (yaml.YAMLError,))


def explain_argument_error(message: str, parser: Any, args: list[str], prog: str) -> LMError:
    """The `LMError` for a jsonargparse parse failure `message` of `prog` (e.g. "lm fit") run with `args`;
    `parser` (the verb's own, or None) lists the valid keys."""
    explainers: tuple[Callable[..., Optional[LMError]], ...] = (
        _duplicate_key, _yaml_syntax, _positional_as_option, _missing_file, _class_path, _unknown_key, _stray_value,
        _wrong_value)
    for explain in explainers:
        error = explain(message, parser, args, prog)
        if error is not None:
            return error
    return LMError(f"{_last_lines(message)} (`{prog} --help` lists every option).")


def _duplicate_key(message: str, parser: Any, args: list[str], prog: str) -> Optional[LMError]:
    """A key given twice: in a `--config` file (named, with both lines), or in a YAML value of a flag."""
    if "is given twice" not in message:
        return None
    values = [arg.partition("=")[2] if arg.startswith("--") else arg for arg in args]
    files = [v for v in values if v.lower().endswith((".yaml", ".yml")) and Path(v).is_file()]  # --config, --data ...
    try:
        refuse_duplicate_keys(files)
    except LMError as error:
        return error
    match = re.search(r"the key (\S+) is given twice", message)
    key = f" {match.group(1)}" if match else ""
    return LMError(f"A YAML value of {prog} gives the key{key} twice: YAML would keep the last value without a "
                   f"word. Keep one of them.")


def _yaml_syntax(message: str, parser: Any, args: list[str], prog: str) -> Optional[LMError]:
    """jsonargparse reads a YAML file as a string and says `in "<unicode string>"`: find the file."""
    if "Problems parsing config" not in message and "<unicode string>" not in message:
        return None
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
    keys = _known_keys(parser, prefix[0] if prefix else "", class_path.group(1) if class_path else None)
    if not parent:  # a positional argument has no flag: never offer it as one
        keys = [k for k in keys if k not in _positionals(parser)]
    valid = _children(keys, parent)
    if not valid:
        return LMError(f"Unknown option {key}: `{prog} --help` lists every option.")
    close = _suggestions(name, parent, keys)
    guess = f" (did you mean {_or(close)}?)" if close else ""
    where = f"of {parent}" if parent else "at the top level"
    return LMError(f"Unknown option {key}{guess}. Valid keys {where}: {', '.join(valid)}.")


def _suggestions(name: str, parent: str, keys: list[str]) -> list[str]:
    """Up to five valid keys close to `name` under `parent`: a sibling (`hiden_size` -> `hidden_size`), or a
    deeper key whose last part is close (`--temprature` -> `sampling.temperature`, `--vocab_size` ->
    `data.vocab_size`); a name that begins one (`--temp`) counts as close. Best first."""
    start = f"{parent}." if parent else ""
    below = {key[len(start):] for key in keys if key.startswith(start) and len(key) > len(start)}
    candidates = below | {rel.split(".")[0] for rel in below}
    scores: dict[str, float] = {}
    for rel in candidates:
        leaf = rel.rpartition(".")[2]
        score = difflib.SequenceMatcher(None, name, leaf).ratio()
        if len(name) >= 3 and leaf.startswith(name):
            score = max(score, 0.85)
        score -= 0.01 * rel.count(".")  # on a tie, the shallower key
        if score >= 0.6:
            scores[rel] = score
    ranked = sorted(scores, key=lambda rel: (-scores[rel], rel))
    return [start + rel for rel in ranked if scores[rel] >= scores[ranked[0]] - 0.1][:5]


def _or(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _positionals(parser: Any) -> list[str]:
    """Names of the parser's positional arguments (given without a flag, e.g. the run folders of `lm report`)."""
    actions = getattr(parser, "_actions", [])
    return [a.dest for a in actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def _options(parser: Any) -> set[str]:
    """Every flag of the parser without its dashes (`output`, `sampling.temperature`, ...)."""
    return {o.lstrip("-") for a in getattr(parser, "_actions", []) for o in a.option_strings if o.startswith("--")}


def _positional_as_option(message: str, parser: Any, args: list[str], prog: str) -> Optional[LMError]:
    """`lm report --runs logs/x`: a positional argument written as an option (or a near miss of one, `--run`).
    jsonargparse then reports the flag as unknown, or reads its value as the positional and says the type is
    wrong; either way the fix is the same command without the flag."""
    positionals = _positionals(parser)
    if not positionals:
        return None
    options = _options(parser)
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        if name in options:
            continue
        close = [p for p in positionals if p.startswith(name) and len(name) >= 3]
        close = close or difflib.get_close_matches(name, positionals, n=1, cutoff=0.75)
        if not close:
            continue
        given = [value] if eq else [a for a in _take_values(args[i + 1:])]
        after = i + 1 + (0 if eq else len(given))
        fixed = [*args[:i], *[v for g in given for v in _as_list(g)], *args[after:]]
        valid = _children([k for k in _known_keys(parser, "", None) if k not in positionals], "")
        return LMError(f"Unknown option {name}: {close[0]} is a positional argument, given without a flag: "
                       f"`{prog} {shlex.join(fixed) if fixed else close[0].upper()}`. "
                       f"Valid keys at the top level: {', '.join(valid)}.")
    return None


def _take_values(args: list[str]) -> list[str]:
    values = []
    for arg in args:
        if arg.startswith("-"):
            break
        values.append(arg)
    return values


def _as_list(value: str) -> list[str]:
    """`[a, b]` (a list written as YAML, as jsonargparse would take it) -> ["a", "b"]; anything else as is."""
    if value.lstrip().startswith("["):
        try:
            loaded = yaml.safe_load(value)
        except yaml.YAMLError:
            return [value]
        if isinstance(loaded, list):
            return [str(item) for item in loaded]
    return [value]


_STRAY = re.compile(r"unrecognized arguments: ([^-\s]\S*)")
_FLAG_OF_SUFFIX = {(".yaml", ".yml"): "config", (".ckpt", ".pt", ".pth"): "ckpt_path"}


def _stray_value(message: str, parser: Any, args: list[str], prog: str) -> Optional[LMError]:
    """`lm export model.ckpt`: a value with no flag before it, in a verb that takes only options."""
    match = _STRAY.search(message)
    if match is None:
        return None
    value = match.group(1)
    flags = [flag for suffixes, flag in _FLAG_OF_SUFFIX.items() if value.lower().endswith(suffixes)]
    example = f"--{flags[0]} {value}" if flags and flags[0] in _options(parser) else f"--<option> {value}"
    valid = _children([k for k in _known_keys(parser, "", None) if k not in _positionals(parser)], "")
    listed = f" Valid keys at the top level: {', '.join(valid)}." if valid else ""
    return LMError(f"Unexpected value {value!r}: it has no option flag before it. Give every value after its "
                   f"flag, e.g. `{prog} {example}`.{listed}")


_CLASS_PATH_GIVEN = re.compile(r"Problem with given class_path '([^']+)'")


def _known_keys(parser: Any, outer: str, class_path: Optional[str]) -> list[str]:
    """Every dotted key the parser accepts (`init_args` levels left out). For a class chosen by
    `class_path` under `outer` (e.g. `--model my_pkg.MyModel`) the keys are that class's. A link's target
    (`model.config.vocab_size`, set from `data.vocab_size`) is left out: a value given to it is overwritten."""
    try:
        links = [action.target[0] for action in getattr(getattr(parser, "_links_group", None), "_group_actions", [])]
        if class_path:
            parser = ArgumentParser(exit_on_error=False)
            parser.add_class_arguments(import_class(class_path), outer)
        keys = [key for key in (parser.get_defaults().keys() if parser is not None else []) if key not in links]
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
