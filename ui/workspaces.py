"""Opening a workspace from its recipe, and the recipe's place in the URL.

A recipe says how to rebuild a workspace from what is on disk; it travels in
the URL's `ws*` query parameters, so any page's link reopens the same set:

    ws=demo-quick&ws_build=1a2b3c4d           the built-in demo (which preset, which build)
    ws=own&ws_base=/m/base&ws_task=sst2=/m/sst2&ws_task=mnli=/m/mnli&ws_exclude=^classifier\\.
                                              your checkpoints, by path (task lines as name=path)
    ws=set&ws_path=~/sets/my_set.safetensors  a saved task-vector set (TaskVectorSet.save)

`sync_workspace()` (called by every page through ui.state.start_page) opens the
URL's workspace when the session has none or another one, from the caches
(the process-wide st.cache_resource loaders below, shared with the home page),
or records exactly what is missing; then writes the session's recipe back to
the URL. A link never turns on unpickling: a set loaded with "trust pickled
checkpoints" must be loaded from Home.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from analysis.errors import MergescopeError
from analysis.taskvectors import TaskVectorSet
from ui.state import Workspace, cache_root, get_workspace, set_workspace

PROBLEM_KEY = "_workspace_problem"  # why the URL's workspace could not be opened (this run), for require_workspace
DEMO_PRESETS = {"quick": ("quick demo", "python -m analysis.zoo build --quick"),
                "full": ("full demo", "python -m analysis.zoo build"),
                "tiny": ("tiny test demo", "python -m analysis.zoo build --tiny")}


class WorkspaceUnavailable(MergescopeError):
    """A link's workspace cannot be rebuilt here; the message says what is missing."""


# ---------------------------------------------------------------- loaders (cached, process-wide)
def _stamp(paths) -> tuple:
    """Modification times, so an edited checkpoint is re-read instead of served from the cache."""
    out = []
    for p in paths:
        p = Path(p).expanduser()
        try:
            out.append(p.stat().st_mtime_ns if p.is_file() else max((f.stat().st_mtime_ns for f in p.iterdir()), default=0))
        except OSError:
            out.append(None)
    return tuple(out)


@st.cache_resource(show_spinner=False, max_entries=4)
def load_checkpoint_set(base: str, tasks: tuple, exclude: tuple, trust_pickle: bool, stamp: tuple) -> TaskVectorSet:
    tvs = TaskVectorSet.from_checkpoints(base, dict(tasks), exclude=list(exclude), trust_pickle=trust_pickle)
    # kept stacked on the device once read (when they fit; else streamed): slider moves re-read nothing
    tvs.keep_resident()
    return tvs


@st.cache_resource(show_spinner=False, max_entries=2)
def load_saved_set(path: str, stamp: tuple) -> TaskVectorSet:
    tvs = TaskVectorSet.load(path)
    tvs.keep_resident()
    return tvs


@st.cache_resource(show_spinner=False, max_entries=2)
def open_demo_folder(folder: str):
    from analysis.zoo import open_demo
    return open_demo(folder)


# ---------------------------------------------------------------- workspaces with their recipes
def demo_recipe(folder: str | Path) -> dict:
    """{"kind": "demo", "preset": quick | full | tiny | …, "build": hash} from `<cache>/zoo-<preset>-<hash>`."""
    preset, build = Path(folder).name.removeprefix("zoo-").rsplit("-", 1)
    return {"kind": "demo", "preset": preset, "build": build}


def demo_workspace(folder: str | Path) -> Workspace:
    demo = open_demo_folder(str(folder))
    return Workspace(name="demo", tvs=demo.tvs, evaluator=demo.evaluator, reference=demo.reference,
                     extras={"demo": demo, "folder": str(folder), "heads": demo.evaluator.heads,
                             "hf_base": str(demo.base_path), "cards": demo.cards,
                             "hf_fill": [str(p) for p in demo.export_fill]},
                     recipe=demo_recipe(folder))


def checkpoint_recipe(base: str, pairs, exclude=(), trust: bool = False) -> dict:
    recipe = {"kind": "own", "base": str(base), "tasks": [[str(n), str(p)] for n, p in pairs],
              "exclude": [str(e) for e in exclude]}
    if trust:
        recipe["trust"] = True
    return recipe


def own_data_recipe(base: str, pairs, exclude, data, seed: int, max_len: int) -> dict:
    """The recipe of a set of Hugging Face folders run as models (ui.owndata), with its data files by path
    (uploads are kept under the cache folder, so their paths outlive the session)."""
    return {**checkpoint_recipe(base, pairs, exclude), "model": True,
            "data": [[str(t), str(p)] for t, p in dict(data).items()], "seed": int(seed), "max_len": int(max_len)}


def _open_own_model_set(recipe: dict) -> Workspace:
    from ui.owndata import load_own_workspace
    for task, path in recipe.get("data", []):
        if not Path(path).expanduser().exists():
            raise WorkspaceUnavailable(f"this link's data file of task {task!r} `{path}` does not exist on this machine")
    pairs = [(str(n), str(p)) for n, p in recipe["tasks"]]
    form = {"base": recipe["base"], "lines": "\n".join(f"{n} = {p}" for n, p in pairs),
            "exclude": next(iter(recipe.get("exclude", ())), ""), "trust": False,
            "data": "\n".join(f"{t} = {p}" for t, p in recipe.get("data", [])),
            "seed": recipe.get("seed", 0), "max_len": recipe.get("max_len", 128)}
    ws = load_own_workspace(recipe["base"], pairs, {t: Path(p) for t, p in recipe.get("data", [])},
                            int(recipe.get("seed", 0)), int(recipe.get("max_len", 128)), form,
                            tuple(recipe.get("exclude", ())))
    ws.recipe = recipe
    return ws


def checkpoint_workspace(base: str, pairs, exclude=(), trust: bool = False, form: dict | None = None) -> Workspace:
    """Your checkpoints by path (ValidationError / CheckpointError when they cannot be read)."""
    pairs = [(str(n), str(p)) for n, p in pairs]
    tvs = load_checkpoint_set(str(base), tuple(pairs), tuple(exclude), bool(trust),
                              _stamp([base] + [p for _, p in pairs]))
    if form is None:   # opened from a link: the home page's form shows what was loaded
        form = {"base": str(base), "lines": "\n".join(f"{n} = {p}" for n, p in pairs),
                "exclude": next(iter(exclude), ""), "trust": bool(trust)}
    return Workspace(name=Path(base).stem or "checkpoints", tvs=tvs, extras={"form": form},
                     recipe=checkpoint_recipe(base, pairs, exclude, trust))


def saved_set_workspace(path: str) -> Workspace:
    tvs = load_saved_set(str(path), _stamp([path]))
    return Workspace(name=Path(path).stem, tvs=tvs, recipe={"kind": "set", "path": str(path)})


def open_recipe(recipe: dict) -> Workspace:
    """The workspace a recipe describes, from the caches; WorkspaceUnavailable says what is missing."""
    kind = recipe.get("kind")
    if kind == "demo":
        return _open_demo(recipe)
    if kind == "own":
        if recipe.get("trust"):
            raise WorkspaceUnavailable("this link's checkpoints were loaded with “trust pickled checkpoints”, "
                                       "which a link never turns on: load them from **Home**")
        for label, path in [("base checkpoint", recipe["base"])] + [(f"checkpoint of task {n!r}", p)
                                                                    for n, p in recipe["tasks"]]:
            if not Path(path).expanduser().exists():
                raise WorkspaceUnavailable(f"this link's {label} `{path}` does not exist on this machine")
        try:
            with st.spinner("Opening the link's checkpoints…"):
                if recipe.get("model"):
                    return _open_own_model_set(recipe)
                return checkpoint_workspace(recipe["base"], recipe["tasks"], recipe.get("exclude", ()))
        except MergescopeError as exc:
            raise WorkspaceUnavailable(f"this link's checkpoints could not be loaded: {exc}") from exc
    if kind == "set":
        path = recipe["path"]
        if not Path(path).expanduser().is_file():
            raise WorkspaceUnavailable(f"this link's saved task-vector set `{path}` does not exist on this machine")
        try:
            with st.spinner("Opening the link's saved set…"):
                return saved_set_workspace(path)
        except MergescopeError as exc:
            raise WorkspaceUnavailable(f"this link's saved set `{path}` could not be opened: {exc}") from exc
    raise WorkspaceUnavailable(f"this link names an unknown workspace kind {kind!r} (expected demo, own or set)")


def _open_demo(recipe: dict) -> Workspace:
    root = cache_root()
    preset, build = recipe["preset"], recipe.get("build")
    name, command = DEMO_PRESETS.get(preset, (f"{preset} demo", f"python -m analysis.zoo build  # preset {preset}"))
    found = sorted((p for p in root.glob(f"zoo-{preset}-*") if (p / "manifest.json").is_file()),
                   key=lambda p: -p.stat().st_mtime) if root.is_dir() else []
    exact = [p for p in found if p.name == f"zoo-{preset}-{build}"]
    if not found:
        where = "build it from **Home**" if preset == "quick" else f"run `{command}`"
        raise WorkspaceUnavailable(f"the {name} is not built in `{root}`: {where}")
    folder = (exact or found)[0]
    try:
        with st.spinner("Opening the demo (backbone, heads, encoded data)…"):
            ws = demo_workspace(folder)
    except Exception as exc:  # a damaged build folder: a message, never a traceback
        raise WorkspaceUnavailable(f"the {name} in `{folder}` could not be opened ({type(exc).__name__}): {exc}") \
            from exc
    if build and not exact:
        ws.extras["restore_note"] = (f"The link was made with {name} build `{build}`; this machine has "
                                     f"`{demo_recipe(folder)['build']}` (another recipe: numbers may differ).")
    return ws


# ---------------------------------------------------------------- the recipe in the URL
def recipe_to_query(recipe: dict) -> dict[str, str | list[str]]:
    kind = recipe["kind"]
    if kind == "demo":
        out = {"ws": f"demo-{recipe['preset']}"}
        if recipe.get("build"):
            out["ws_build"] = recipe["build"]
        return out
    if kind == "own":
        out = {"ws": "own", "ws_base": recipe["base"], "ws_task": [f"{n}={p}" for n, p in recipe["tasks"]]}
        if recipe.get("exclude"):
            out["ws_exclude"] = list(recipe["exclude"])
        if recipe.get("trust"):
            out["ws_trust"] = "true"
        if recipe.get("model"):   # Hugging Face folders run as models, with their data files
            out.update({"ws_model": "true", "ws_seed": str(recipe.get("seed", 0)),
                        "ws_maxlen": str(recipe.get("max_len", 128))})
            if recipe.get("data"):
                out["ws_data"] = [f"{t}={p}" for t, p in recipe["data"]]
        return out
    if kind == "set":
        return {"ws": "set", "ws_path": recipe["path"]}
    raise ValueError(f"unknown workspace kind {kind!r}")


def recipe_from_query(qp) -> dict | None:
    """The URL's recipe; None when it names none. WorkspaceUnavailable when it is malformed."""
    ws = qp.get("ws")
    if not ws:
        return None
    if ws.startswith("demo-"):
        recipe = {"kind": "demo", "preset": ws.removeprefix("demo-"), "build": qp.get("ws_build")}
        return recipe if recipe["build"] else {k: v for k, v in recipe.items() if k != "build"}
    if ws == "own":
        base, lines = qp.get("ws_base"), qp.get_all("ws_task")
        if not base or not lines:
            raise WorkspaceUnavailable("this link's `ws=own` needs `ws_base` and at least one `ws_task=name=path`")
        tasks = []
        for line in lines:
            if "=" not in line:
                raise WorkspaceUnavailable(f"this link's `ws_task={line}` is not of the form name=path")
            tasks.append(line.split("=", 1))
        exclude = [e for e in qp.get_all("ws_exclude") if e]
        if qp.get("ws_model") == "true":
            data = []
            for line in qp.get_all("ws_data"):
                if "=" not in line:
                    raise WorkspaceUnavailable(f"this link's `ws_data={line}` is not of the form task=path")
                data.append(line.split("=", 1))
            try:
                seed, max_len = int(qp.get("ws_seed", 0)), int(qp.get("ws_maxlen", 128))
            except ValueError:
                raise WorkspaceUnavailable("this link's `ws_seed` / `ws_maxlen` are not whole numbers") from None
            return own_data_recipe(base, tasks, exclude, dict(data), seed, max_len)
        return checkpoint_recipe(base, tasks, exclude, qp.get("ws_trust") == "true")
    if ws == "set":
        if not qp.get("ws_path"):
            raise WorkspaceUnavailable("this link's `ws=set` needs `ws_path`")
        return {"kind": "set", "path": qp.get("ws_path")}
    raise WorkspaceUnavailable(f"this link's `ws={ws}` names no workspace (expected demo-quick, demo-full, own "
                               "or set)")


def _same(a: dict | None, b: dict | None) -> bool:
    """Same workspace: a link without a build hash matches any build of its preset."""
    if a is None or b is None:
        return a is b
    if a.get("kind") == b.get("kind") == "demo":
        return a["preset"] == b["preset"] and (not a.get("build") or not b.get("build") or a["build"] == b["build"])
    return a == b


def write_recipe(recipe: dict | None) -> None:
    """The session's workspace into the URL (replacing any other ws* parameters)."""
    qp = st.query_params
    wanted = recipe_to_query(recipe) if recipe else {}
    for k in [k for k in qp if k == "ws" or k.startswith("ws_")]:
        if k not in wanted:
            del qp[k]
    for k, v in wanted.items():
        if qp.get_all(k) != (v if isinstance(v, list) else [v]):
            qp[k] = v


def sync_workspace() -> str | None:
    """Open the URL's workspace when the session holds none or another; then put the session's recipe in the URL.

    Returns (and keeps in st.session_state for require_workspace) what stopped the link's workspace from
    opening, or None."""
    st.session_state.pop(PROBLEM_KEY, None)
    ws = get_workspace()
    try:
        wanted = recipe_from_query(st.query_params)
        if wanted is not None and (ws is None or not _same(wanted, ws.recipe)):
            ws = open_recipe(wanted)
            set_workspace(ws)
    except WorkspaceUnavailable as exc:
        st.session_state[PROBLEM_KEY] = str(exc)
    if ws is not None and ws.recipe:
        write_recipe(ws.recipe)
    return st.session_state.get(PROBLEM_KEY)
