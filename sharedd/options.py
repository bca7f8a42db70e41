"""Option declarations and value parsing: the one source of truth for config
option names, types, defaults and help (man pages and docs are checked
against it).

Modules that add options (drivers, helpers, hooks) declare a list of Opt in
an OPTIONS attribute; the config loader collects them.
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
import difflib
import glob
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import netaddr

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Opt:
    name: str
    type: str            # str | int | float | bool | list | path | ip | host
    default: Any = None
    help: str = ""
    choices: Optional[Sequence[str]] = None
    min: Optional[float] = None
    max: Optional[float] = None
    required: bool = False
    secret: bool = False  # never logged or shown


_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def parse_value(opt: Opt, raw: str) -> Any:
    """Parse raw text for opt; raise ValueError with a short reason."""
    raw = raw.strip()
    if opt.type == "bool":
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{raw!r} is not a boolean (use true or false)")
    if opt.type in ("int", "float"):
        try:
            value = int(raw) if opt.type == "int" else float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a{'n integer' if opt.type == 'int' else ' number'}") from None
        # the value as written (not -3.0 for -3)
        if opt.min is not None and value < opt.min:
            raise ValueError(f"{raw} is below the minimum {opt.min:g}")
        if opt.max is not None and value > opt.max:
            raise ValueError(f"{raw} is above the maximum {opt.max:g}")
        return value
    if opt.type == "list":
        items = [i.strip() for i in raw.replace("\n", ",").split(",") if i.strip()]
        if opt.choices:
            for item in items:
                if item not in opt.choices and ":" not in item:
                    raise ValueError(f"{item!r} is not one of {', '.join(opt.choices)}")
        return items
    if opt.type == "path":
        if not raw:
            return ""
        if not os.path.isabs(raw):
            raise ValueError(f"{raw!r} is not an absolute path")
        return os.path.normpath(raw)
    if opt.type == "ip":
        if not raw:
            return ""
        try:
            return str(netaddr.IPAddress(raw))
        except (netaddr.AddrFormatError, ValueError):
            raise ValueError(f"{raw!r} is not an IPv4 or IPv6 address") from None
    if opt.choices and raw not in opt.choices:
        raise ValueError(f"{raw!r} is not one of {', '.join(opt.choices)}")
    return raw


def config_files(path: str) -> List[str]:
    """The main file and its drop-ins (FILE.d/*.conf by name), in the order applied."""
    return [path] + sorted(glob.glob(os.path.join(path + ".d", "*.conf")))


def read_ini(files: List[str], optional_main: bool = False
             ) -> Tuple[Dict[str, Dict[str, str]], Dict[Tuple[str, str], str]]:
    """Merge INI files (later ones win); remember which file set each
    (section, option). No interpolation, no DEFAULT inheritance, case-sensitive
    option names. optional_main: a missing first file means defaults."""
    merged: Dict[str, Dict[str, str]] = {}
    origin: Dict[Tuple[str, str], str] = {}
    for i, path in enumerate(files):
        parser = configparser.ConfigParser(default_section="\x00none", interpolation=None,
                                           strict=True, empty_lines_in_values=False)
        parser.optionxform = str
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f, source=path)
        except FileNotFoundError:
            if i == 0 and optional_main:
                continue
            raise ConfigError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        except configparser.Error as exc:
            raise ConfigError(f"{path}: {ini_error(exc)}") from None
        for section in parser.sections():
            merged.setdefault(section, {})      # an empty section still exists
            for key, value in parser.items(section, raw=True):
                merged[section][key] = value
                origin[(section, key)] = path
    return merged, origin


def ini_error(exc: configparser.Error) -> str:
    """configparser's complaint in one line, with the line number first."""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return (f"line {exc.lineno}: {exc.line.strip()!r} comes before any [section] "
                "header")
    if isinstance(exc, configparser.ParsingError):
        lineno, line = exc.errors[0]
        try:
            line = str(ast.literal_eval(line))   # configparser keeps its repr
        except (ValueError, SyntaxError):
            pass
        return f"line {lineno}: {line.strip()!r} is neither 'option = value' nor a [section]"
    if isinstance(exc, configparser.DuplicateSectionError):
        return f"line {exc.lineno}: section [{exc.section}] appears twice"
    if isinstance(exc, configparser.DuplicateOptionError):
        return f"line {exc.lineno}: [{exc.section}] {exc.option} is set twice"
    return " ".join(str(exc).split())


def unknown(key: str, known: Iterable[str]) -> str:
    """'unknown option', with the likeliest meant one."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return "unknown option" + (f" (did you mean {close[0]}?)" if close else "")


def parse_options(opts: Sequence[Opt], raw: Dict[str, str], where: Callable[[str], str],
                  check_unknown: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Parse the raw text of opts; defaults for the rest.

    where(option) prefixes every message ("FILE: [section] option"). Keys of
    check_unknown (default: all of raw) that no Opt declares are refused.
    """
    known = {o.name for o in opts}
    for key in (raw if check_unknown is None else check_unknown):
        if key not in known:
            raise ConfigError(f"{where(key)}: {unknown(key, known)}")
    values: Dict[str, Any] = {}
    for opt in opts:
        if opt.name in raw:
            try:
                values[opt.name] = parse_value(opt, raw[opt.name])
            except ValueError as exc:
                raise ConfigError(f"{where(opt.name)}: {exc}") from None
        elif opt.required:
            raise ConfigError(f"{where(opt.name)}: required option is missing")
        else:
            values[opt.name] = opt.default
    return values
