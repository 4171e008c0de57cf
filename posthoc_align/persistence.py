"""Save and load fitted estimators without pickle: safetensors arrays + JSON.

A saved estimator is a directory::

    config.json          format, format version, library version, class name,
                         parameters, the ``set_output`` configuration, JSON-able
                         learned attributes and warned-about state, checksums
                         (of the arrays file, of this file's own content and
                         of each nested estimator's config.json)
    arrays.safetensors   every numeric learned array (float64 kept)
    <child>/             nested estimators (e.g. one per layer of RotateAlign), each
                         bound to this save by its config checksum

Loading runs no code from the files: the class is looked up by name among the
package's own estimators, and arrays are read by safetensors. A modified or
foreign file gives a clear error: ``config.json`` carries the sha256 of the arrays
file and of its own canonical content, and the parameters are validated again. (A
checksum detects edits and corruption, not a deliberate forgery: load only saves
you trust.)

Examples
--------
>>> import numpy as np, tempfile
>>> from posthoc_align import LanguageMeanCentering, load
>>> est = LanguageMeanCentering().fit(np.eye(3), languages=["a", "b", "b"])
>>> with tempfile.TemporaryDirectory() as d:
...     est.save(d + "/centering")
...     again = load(d + "/centering")
>>> bool(np.array_equal(again.means_, est.means_))
True
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from ._covariance import ScatterMoments
from ._stats import LanguageMoments, PairMoments
from ._version import __version__

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "posthoc_align.estimator"
#: 2: config.json checksums its own content (version 1 did not); 3: it also records the
#: checksum of each nested estimator's config, so a child directory cannot be swapped
FORMAT_VERSION = 3
_CONFIG = "config.json"
_ARRAYS = "arrays.safetensors"
#: private JSON-able state kept by a save (what a streaming estimator has warned about
#: already, so a loaded copy warns exactly when the original would); only these names
#: are ever set from a file
_STATE_ATTRS = ("_few_pairs_warned", "_small_warned")
#: scikit-learn's ``set_output`` configuration (e.g. ``{"transform": "pandas"}``)
_OUTPUT_CONFIG = "_sklearn_output_config"
_OBJECTS = {
    "LanguageMoments": LanguageMoments,
    "PairMoments": PairMoments,
    "ScatterMoments": ScatterMoments,
}


def _registry() -> dict[str, type]:
    import posthoc_align

    return {
        name: obj
        for name in posthoc_align.__all__
        if isinstance(obj := getattr(posthoc_align, name), type) and issubclass(obj, BaseEstimator)
    }


def _json_value(v: Any) -> Any:
    """Encode a value as JSON, tagging tuples, numpy arrays/scalars and non-str-key dicts."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return {"__tuple__": [_json_value(x) for x in v]}
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {"__dict__": [[_json_value(k), _json_value(x)] for k, x in v.items()]}
    if isinstance(v, np.ndarray):
        return {
            "__ndarray__": [_json_value(x) for x in v.tolist()],
            "dtype": v.dtype.str if v.dtype.kind != "O" else "O",
            "shape": list(v.shape),
        }
    if v is None or isinstance(v, bool | int | float | str):
        return v
    hint = " (decode bytes labels first, e.g. labels.astype(str))" if isinstance(v, bytes) else ""
    raise TypeError(
        f"cannot save the {type(v).__name__} value {v!r}: saved labels and parameters must "
        f"be str, int, float, bool or None{hint}; use joblib.dump for other types."
    )


def _from_json(v: Any) -> Any:
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    if isinstance(v, dict):
        if "__tuple__" in v:
            return tuple(_from_json(x) for x in v["__tuple__"])
        if "__dict__" in v:
            return {_hashable(_from_json(k)): _from_json(x) for k, x in v["__dict__"]}
        if "__ndarray__" in v:
            dtype = object if v["dtype"] == "O" else np.dtype(v["dtype"])
            return np.array(v["__ndarray__"], dtype=dtype).reshape(v["shape"])
        raise ValueError(f"unexpected JSON object {sorted(v)}")
    return v


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def _config_digest(cfg: dict) -> str:
    """sha256 of the config's canonical JSON, without its own checksum entry."""
    body = {k: v for k, v in cfg.items() if k != "config_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save(est: BaseEstimator, path: str | Path) -> None:
    """Write ``est`` to the directory ``path`` (created; existing files replaced).

    Parameters
    ----------
    est : posthoc_align estimator
    path : str or Path
    """
    _save(est, path)


def _save(est: BaseEstimator, path: str | Path) -> str:
    """:func:`save`; returns the checksum of the written config (bound by a parent)."""
    from safetensors.numpy import save_file

    path = Path(path)
    cls = type(est).__name__
    if _registry().get(cls) is not type(est):
        raise TypeError(
            f"{cls} is not a posthoc_align estimator and cannot be saved without pickle; "
            "use joblib.dump for it."
        )
    path.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    params, attrs, objects, children, child_sha = {}, {}, {}, {}, {}
    for k, v in est.get_params(deep=False).items():
        if isinstance(v, BaseEstimator):
            child_sha[f"param.{k}"] = _save(v, path / f"param.{k}")
            children[f"param.{k}"] = k
        else:
            params[k] = _json_value(v)
    for k, v in vars(est).items():
        if k in ("_moments", "_pairs", "_scatter") and isinstance(
            v, LanguageMoments | PairMoments | ScatterMoments
        ):
            if isinstance(v, PairMoments) and v.has_buffers():
                pending = v.n_pending()
                waiting = (
                    f"rows still waiting for pivot partners ({pending}) and " if pending else ""
                )
                warnings.warn(
                    f"{cls}: {waiting}the kept pivot rows are not saved; a loaded copy "
                    "pairs later partial_fit rows only with partners in the later batches.",
                    UserWarning,
                    stacklevel=2,
                )
            meta, arrs = v.state()
            objects[k] = {"type": type(v).__name__, "meta": _json_value(meta)}
            for name, a in arrs.items():
                arrays[f"{k}/{name}"] = np.ascontiguousarray(a)
            continue
        if not k.endswith("_") or k.startswith("_"):
            continue
        if isinstance(v, np.ndarray) and v.dtype.kind in "fiub":
            arrays[k] = np.ascontiguousarray(v)
        elif isinstance(v, list) and v and all(isinstance(e, BaseEstimator) for e in v):
            for i, e in enumerate(v):
                child_sha[f"{k}.{i}"] = _save(e, path / f"{k}.{i}")
            children[k] = len(v)
        else:
            attrs[k] = _json_value(v)
    save_file(arrays, str(path / _ARRAYS))
    digest = hashlib.sha256((path / _ARRAYS).read_bytes()).hexdigest()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "class": cls,
        "params": params,
        "attributes": attrs,
        "objects": objects,
        "children": children,
        "children_sha256": child_sha,
        "arrays_sha256": digest,
    }
    output_config = getattr(est, _OUTPUT_CONFIG, None)
    if output_config:
        config["output_config"] = {k: _json_value(v) for k, v in output_config.items()}
    state = {k: _json_value(getattr(est, k)) for k in _STATE_ATTRS if hasattr(est, k)}
    if state:
        config["state"] = state
    config["config_sha256"] = _config_digest(config)
    (path / _CONFIG).write_text(json.dumps(config, indent=1))
    return config["config_sha256"]


def load(path: str | Path) -> BaseEstimator:
    """Load an estimator written by ``save`` / ``est.save(path)``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is not a posthoc_align save, was written by a newer format, or
        its files were modified.
    """
    return _load(Path(path))[0]


def _load(path: Path, expected_sha: str | None = None) -> tuple[BaseEstimator, str | None]:
    """:func:`load`; also checks the config's checksum against a parent's record."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    cfg_file, arr_file = path / _CONFIG, path / _ARRAYS
    if not cfg_file.is_file() or not arr_file.is_file():
        raise ValueError(
            f"{path} is not a saved posthoc_align estimator: expected {_CONFIG} and {_ARRAYS} "
            "inside (write one with est.save(path))."
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_file} is not valid JSON ({exc}); the save is corrupted") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} is not a posthoc_align estimator config")
    version = cfg.get("format_version")
    if type(version) is not int or version < 1:
        raise ValueError(
            f"{cfg_file}: format_version is {version!r}, not a positive integer; the file "
            "was edited or is not a posthoc_align save. Save the estimator again."
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses format version {cfg['format_version']}, newer than this library's "
            f"{FORMAT_VERSION} (posthoc_align {__version__}); upgrade posthoc_align."
        )
    if cfg.get("library_version") != __version__:
        warnings.warn(
            f"{path} was written by posthoc_align {cfg.get('library_version')}; this is "
            f"{__version__}.",
            UserWarning,
            stacklevel=2,
        )
    if version == 1:
        warnings.warn(
            f"{path} was saved in format version 1, whose {_CONFIG} has no checksum: edits "
            "to its parameters cannot be detected. Save it again to get the checks.",
            UserWarning,
            stacklevel=3,
        )
    if version >= 2 and cfg.get("config_sha256") != _config_digest(cfg):
        raise ValueError(
            f"{cfg_file} does not match its own checksum: the file was edited or corrupted "
            "after saving. Save the estimator again (edit parameters with set_params on the "
            "loaded estimator, not in the file)."
        )
    if expected_sha is not None and cfg.get("config_sha256") != expected_sha:
        raise ValueError(
            f"{path} is not the nested estimator its parent saved (its {_CONFIG} checksum "
            "differs from the parent's record): a child directory was replaced or edited. "
            "Save the whole estimator again."
        )
    raw = arr_file.read_bytes()
    if hashlib.sha256(raw).hexdigest() != cfg.get("arrays_sha256"):
        raise ValueError(
            f"{arr_file} does not match the checksum in {_CONFIG}: the file was modified or "
            "corrupted. Save the estimator again."
        )
    try:
        arrays = load_file(str(arr_file))
    except SafetensorError as exc:  # pragma: no cover - checksum catches it first
        raise ValueError(f"{arr_file} is not a valid safetensors file: {exc}") from exc
    cls = _registry().get(cfg.get("class"))
    if cls is None:
        raise ValueError(f"{path}: unknown estimator class {cfg.get('class')!r}")
    try:
        params = {k: _from_json(v) for k, v in cfg["params"].items()}
        bound = cfg.get("children_sha256") if version >= 3 else None

        def child(name: str) -> BaseEstimator:
            sha = None
            if bound is not None:
                sha = bound[name]  # KeyError: an unrecorded child (caught below)
            return _load(path / name, sha)[0]

        for name, k in cfg["children"].items():
            if name.startswith("param."):
                params[k] = child(name)
        est = cls(**params)
        est._validate_params()
        # saves older than the set_output / state entries simply have none
        output_config = cfg.get("output_config") or {}
        if output_config:
            if not hasattr(est, "set_output"):
                raise ValueError(f"{cls.__name__} has no set_output, but the save has one")
            est.set_output(**output_config)  # validates the values
        for k, v in (cfg.get("state") or {}).items():
            if k not in _STATE_ATTRS:
                raise KeyError(f"unexpected state entry {k!r}")
            setattr(est, k, _from_json(v))
        for k, v in cfg["attributes"].items():
            setattr(est, k, _from_json(v))
        for k, v in cfg["children"].items():
            if not k.startswith("param."):
                setattr(est, k, [child(f"{k}.{i}") for i in range(int(v))])
        for k, spec in cfg["objects"].items():
            prefix = f"{k}/"
            arrs = {n[len(prefix) :]: a for n, a in arrays.items() if n.startswith(prefix)}
            setattr(est, k, _OBJECTS[spec["type"]].from_state(_from_json(spec["meta"]), arrs))
        for k, a in arrays.items():
            if "/" not in k:
                setattr(est, k, a)
    except (KeyError, TypeError, AttributeError, FileNotFoundError) as exc:
        raise ValueError(
            f"{path}: the saved configuration is incomplete or altered ({exc})"
        ) from exc
    except ValueError as exc:  # e.g. InvalidParameterError from _validate_params
        raise ValueError(f"{path}: the saved configuration is invalid ({exc})") from exc
    return est, cfg.get("config_sha256")
