"""A spec file's bytes to plain YAML data, or one `SpecError` line naming the file.

Read as a careless or hostile user may write it: a size limit on the read (`/dev/zero` as the
spec), UTF-8 or refused, no aliases (nine nested ones in 3 KB expand to gigabytes), no repeated
keys (YAML keeps the last one silently), and bounded nesting (the composer recurses).
"""

from __future__ import annotations

import reprlib
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a spec is a few KB; the limit only stops /dev/zero or a log file
MAX_DEPTH = 16  # the deepest real value is 4 levels down (methods.gd.lr.low)
_repr = reprlib.Repr()  # (keyword arguments need Python 3.12)
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 4, 4, 2


def show(value: Any) -> str:
    """A value as an error shows it: its repr, shortened (a 1 MB string stays a readable line)."""
    return _repr.repr(value)


class SpecError(ValueError):
    """A spec problem, as one line: '<file>: <key>: <what is wrong>; allowed: <values>'."""

    def __init__(self, message: str):
        # one line, whatever a value or a YAML error brought in
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class _Loader(yaml.SafeLoader):
    """yaml.safe_load without aliases, repeated keys or nesting deeper than MAX_DEPTH."""

    def __init__(self, text: str, src: str):
        super().__init__(text)
        self.src, self.depth = src, 0

    def _refuse(self, mark, what: str, allowed: str) -> SpecError:
        return SpecError(f"{self.src}: line {mark.line + 1}: {what}; allowed: {allowed}")

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise self._refuse(
                event.start_mark, f"alias *{event.anchor}", "no aliases (write the value out)"
            )
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self._refuse(event.start_mark, f"nested deeper than {MAX_DEPTH} levels", "a spec")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class refuses it
                continue
            if repeated:
                raise self._refuse(
                    key_node.start_mark, f"key {show(key)} repeated", "each key once"
                )
        return super().construct_mapping(node, deep)


def _read(path: Path) -> str:
    """The text of a regular file of at most MAX_BYTES, UTF-8 (read with a bound: /dev/zero)."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise SpecError(f"{path}: is {kind}; allowed: a YAML file")
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror or e}; allowed: a YAML file") from None
    if len(data) > MAX_BYTES:
        raise SpecError(f"{path}: larger than {MAX_BYTES >> 20} MiB; allowed: a spec of a few KB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            f"{path}: byte {e.start} (0x{data[e.start]:02x}) is not UTF-8; allowed: UTF-8 text"
        ) from None


def read_yaml(path: Path) -> Any:
    """The file's YAML data (plain Python values), or a `SpecError`."""
    text = _read(path)
    try:
        loader = _Loader(text, str(path))  # its reader refuses control characters at once
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except SpecError:
        raise
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an int of 5,000 digits, a 13th month
        raise SpecError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
