"""Pages keep their choices in the URL, and remember them across page switches.

    from ui import url
    f = url.widget(st.slider, "Rank fraction", key="spectra_rank_fraction", param="sp_f", default=0.12,
                   min_value=0.01, max_value=1.0, step=0.01)

A URL-backed widget starts from, in order: its live value (a rerun of the same
page), the URL's query parameter (a shared link), the value it last had in this
session (Streamlit forgets a widget's state when the user switches pages, so it
is kept here too), the given default. After the widget is drawn its value is
written back to the URL and to that memory, so the address bar always holds
the page's every choice, defaults included: a link means the same thing even
if a later version changes a default.

Values travel as text: bools as true/false, floats as Python's shortest exact
repr, lists (multiselect) and ranges as repeated parameters (`?p=a&p=b`), an
empty list as one empty value. A value a link gets wrong (not an option, out
of range, refused by `parse`) is reported with st.warning, never a traceback,
and the widget falls back to memory / default.

The workspace part of the URL (which task-vector set) is handled in
ui/workspaces.py; `ui.state.start_page` restores it on every page.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import streamlit as st

MEMORY_KEY = "_url_memory"   # widget key -> last value, survives page switches
_MISSING = object()


def to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _to_param(value: Any) -> str | list[str]:
    if isinstance(value, (list, tuple)):
        return [to_text(v) for v in value] if value else [""]
    return to_text(value)


def _from_text(text: str, like: Any) -> Any:
    """`text` as the type of `like` (the default). ValueError when it is not one."""
    if isinstance(like, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if isinstance(like, int):
        number = float(text)
        if number != int(number):
            raise ValueError("expected a whole number")
        return int(number)
    if isinstance(like, float):
        number = float(text)
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    return text


def _match_option(text: str, options: Sequence) -> Any:
    for o in options:
        if to_text(o) == text:
            return o
    for o in options:   # "0.10" for the option 0.1
        if isinstance(o, (int, float)) and not isinstance(o, bool):
            try:
                if float(text) == float(o):
                    return o
            except ValueError:
                break
    shown = ", ".join(to_text(o) for o in list(options)[:12]) + (", …" if len(options) > 12 else "")
    raise ValueError(f"not one of the choices here ({shown})")


def _check_bounds(value: Any, lo: Any, hi: Any) -> None:
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ValueError(f"outside the allowed range [{to_text(lo)}, {to_text(hi)}]")


def parse_param(texts: list[str], default: Any, options: Sequence | None = None,
                parse: Callable[[str], Any] | None = None, lo: Any = None, hi: Any = None) -> Any:
    """The value a query parameter's texts stand for (ValueError naming what is wrong)."""
    many = isinstance(default, (list, tuple))
    if many:
        texts = [t for t in texts if t != ""]     # one empty value: the empty list
        like = default[0] if len(default) else (options[0] if options else "")
        if options is not None:
            values = [_match_option(t, options) for t in texts]
        else:
            values = [parse(t) if parse else _from_text(t, like) for t in texts]
        if isinstance(default, tuple):
            if len(values) != len(default):
                raise ValueError(f"expected {len(default)} values")
            values = tuple(values)
        _check_bounds(values, lo, hi)
        return values
    text = texts[-1]
    if parse is not None:
        value = parse(text)
    elif options is not None:
        value = _match_option(text, options)
    else:
        value = _from_text(text, default)
    _check_bounds(value, lo, hi)
    return value


def _valid(value: Any, options: Sequence | None, lo: Any, hi: Any) -> bool:
    """Whether a remembered value still fits the widget (options change with the workspace or history)."""
    try:
        if options is not None:
            opts = list(options)
            vals = value if isinstance(value, list) else [value]
            if any(v not in opts for v in vals):
                return False
        _check_bounds(value, lo, hi)
    except (TypeError, ValueError):
        return False
    return True


def memory() -> dict:
    return st.session_state.setdefault(MEMORY_KEY, {})


def initial(key: str, param: str | None, default: Any, options: Sequence | None = None,
            parse: Callable[[str], Any] | None = None, lo: Any = None, hi: Any = None) -> Any:
    """What a widget starts from when it has no live value: the URL, else memory, else `default`."""
    qp = st.query_params
    if param is not None and param in qp:
        texts = qp.get_all(param)
        try:
            return parse_param(texts, default, options, parse, lo, hi)
        except Exception as exc:  # a bad link: say what was ignored, fall back
            shown = "&".join(f"{param}={t}" for t in texts)
            st.warning(f"Ignoring the link's `{shown}`: {exc}")
    remembered = memory().get(key, _MISSING)
    if remembered is not _MISSING and _valid(remembered, options, lo, hi):
        return remembered
    return default


def widget(fn: Callable, label: str, *, key: str, default: Any, param: str | None = None,
           options: Sequence | None = None, parse: Callable[[str], Any] | None = None, url: bool = True,
           **kwargs) -> Any:
    """Draw `fn(label, [options=...], key=key, **kwargs)` with its value kept in the URL as `param` (default:
    the key) and remembered across page switches. `url=False`: take nothing from the URL this time (the
    value is still written to it). Do not pass value/index/default: `default` is the widget's default."""
    param = param or key
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    opts = list(options) if options is not None else None
    state = st.session_state
    if key not in state or not _valid(state[key], opts, lo, hi):
        state[key] = initial(key, param if url else None, default, opts, parse, lo, hi)
    value = fn(label, options=opts, key=key, **kwargs) if opts is not None else fn(label, key=key, **kwargs)
    set_param(param, value)
    memory()[key] = list(value) if isinstance(value, list) else value
    return value


def set_param(param: str, value: Any) -> None:
    """Write one value to the URL (lists as repeated parameters)."""
    text = _to_param(value)
    if st.query_params.get_all(param) != (text if isinstance(text, list) else [text]):
        st.query_params[param] = text


def drop(*params: str) -> None:
    """Remove parameters that no longer describe the view (another method's knobs, another path kind)."""
    for p in params:
        if p in st.query_params:
            del st.query_params[p]


def first_run(key: str) -> bool:
    """True on the first run of a page visit (a fresh session or a page switch): `key`, one of the page's
    widget keys, has no live value yet. Actions a link restores (an evaluation behind a button) run then."""
    return key not in st.session_state
