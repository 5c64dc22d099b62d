"""Loads params.yaml, plus the untracked endpoints overlay that points the pipeline at mirrors.

What a stage builds is decided by params.yaml, which DVC tracks. *Where* the upstream bytes come
from is not: the same content fetched from AWS or from the loopback mirror must hash the same and
must not make DVC rerun anything. So the `endpoints` section alone may be overridden by the YAML
file named in $TIDEPOOL_ENDPOINTS (the demo and the tests write one for their loopback servers).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from stages.errors import ConfigError
from stages.fsutil import repo_root

ENDPOINTS_ENV = "TIDEPOOL_ENDPOINTS"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """params.yaml with the endpoints overlay applied (if $TIDEPOOL_ENDPOINTS is set)."""
    params_path = Path(path) if path else repo_root() / "params.yaml"
    params = _read_yaml(params_path)
    overlay_path = os.environ.get(ENDPOINTS_ENV)
    if overlay_path:
        overlay = _read_yaml(Path(overlay_path))
        extra = set(overlay) - {"endpoints"}
        if extra:
            raise ConfigError(
                f"{overlay_path}: an endpoints overlay may only set `endpoints`, not {sorted(extra)}; "
                "anything that changes what is built belongs in params.yaml where DVC tracks it"
            )
        original = params.get("endpoints", {})
        params["endpoints"] = _deep_merge(original, overlay.get("endpoints", {}))
        # Remember which locations the overlay replaced, so outputs can name the upstream a
        # mirror stands in for instead of a loopback port or a checkout path (see canonical_url).
        params[CANONICAL_KEY] = {
            str(value): str(original[key])
            for key, value in overlay.get("endpoints", {}).items()
            if isinstance(value, str) and isinstance(original.get(key), str) and value != original[key]
        }
    return params


CANONICAL_KEY = "_canonical_endpoints"


def canonical_url(params: dict[str, Any], url: str) -> str:
    """The upstream URL for `url`: an overlaid endpoint prefix is replaced by params.yaml's value.

    Manifests record where each file comes from. Under a mirror (the demo's loopback servers, a
    local copy) the literal location changes from run to run, and outputs must not: two builds of
    the same bytes hash the same. Recording the upstream location keeps them equal and still says
    what the file is.
    """
    for mirror, upstream in sorted(params.get(CANONICAL_KEY, {}).items(), key=lambda kv: -len(kv[0])):
        if url.startswith(mirror):
            return upstream + url[len(mirror) :]
    return url


def require(mapping: dict[str, Any], dotted: str) -> Any:
    """Look up `a.b.c`, raising a ConfigError that names the missing key."""
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params.yaml: missing key `{dotted}`")
        node = node[part]
    return node
