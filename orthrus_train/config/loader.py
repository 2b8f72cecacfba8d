"""Compose a recipe with Hydra, merge it into the structured schema, validate it.

Recipes (`recipes/NAME.yaml`) are primary configs whose defaults list picks groups from
`configs/` (model, heads, data, train, deepspeed, eval, export, launcher). Both folders ship in the
wheel as `orthrus_train.recipes` / `orthrus_train.configs`; in a source checkout the top-level
folders are used directly.
"""
from __future__ import annotations

import os
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import ConfigError, RootConfig, validate


def _dir(name: str) -> Path:
    pkg = Path(__file__).resolve().parents[1]
    src = pkg.parent / name
    if src.is_dir() and (pkg.parent / "pyproject.toml").exists():  # source checkout: top-level folders
        return src
    return Path(__file__).resolve().parents[1] / name  # installed wheel: orthrus_train/{recipes,configs}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def asset_path(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "assets" / name


def _register_resolvers() -> None:
    # ${repo:REL}: a path relative to the source checkout (recipes' defaults for ../shared material)
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", lambda rel: str((repo_root() / rel).resolve()))
    # ${asset:NAME}: a file shipped inside the package (the tiny demo's prompts)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(asset_path(name)))


_register_resolvers()


def recipes_dir() -> Path:
    return Path(os.environ.get("ORTHRUS_RECIPES_DIR") or _dir("recipes"))


def configs_dir() -> Path:
    return _dir("configs")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


class UnknownRecipe(ConfigError):
    pass


def compose(recipe: str, overrides: list[str] | None = None):
    """The validated configuration (a RootConfig)."""
    obj = compose_unvalidated(recipe, overrides)
    validate(obj)
    return obj


def _inner_unknown_key(e: BaseException) -> tuple[str, list[str]] | None:
    """(the unknown key, the keys its structured entry takes) from the cause of Hydra's "Could not override"
    (OmegaConf's ConfigKeyError, e.g. `data.sources=[{path: ...}]`: 'path' is not a SourceConfig key)."""
    import dataclasses

    from omegaconf.errors import ConfigKeyError

    cause = e.__cause__
    while cause is not None and not isinstance(cause, ConfigKeyError):
        cause = cause.__cause__
    if cause is None or not getattr(cause, "key", None):
        return None
    cls = getattr(cause, "object_type", None)
    fields = [f.name for f in dataclasses.fields(cls)] if cls is not None and dataclasses.is_dataclass(cls) else []
    return str(cause.key), fields


def compose_unvalidated(recipe: str, overrides: list[str] | None = None):
    """Typed and structurally checked (unknown keys, types, missing values), without the semantic checks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, OverrideParseException

    overrides = list(overrides or [])
    if recipe not in available_recipes():
        raise UnknownRecipe(f"unknown recipe {recipe!r}; available recipes: {', '.join(available_recipes())}")
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="orthrus_schema", node=RootConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
            raw = hydra_compose(config_name=recipe,
                                overrides=[f"hydra.searchpath=[file://{configs_dir()}]"] + overrides)
    except OverrideParseException as e:  # one line instead of Hydra's caret drawing and link
        raise ConfigError(f"cannot parse the override {e.override!r} ({str(e).splitlines()[0].split(':')[0]}): "
                          "quote a value holding special characters (~ = , [ ] { } ( ) or spaces), "
                          "e.g. 'model.path=\"~/models/x\"'") from None
    except HydraException as e:
        msg, cause = str(e), e.__cause__
        while cause is not None:
            msg += f" ({str(cause).splitlines()[0]}; full key {getattr(cause, 'full_key', '?')})"
            cause = cause.__cause__
        if "Could not override" in msg:
            key = msg.split("'")[1] if "'" in msg else "?"
            msg = f"unknown key {key!r}: it is not in the schema (orthrus_train/config/schema.py) or the recipe"
            inner = _inner_unknown_key(e)
            # the key is known, an entry's key is not (a misspelt section, e.g. 'trian' of trian.max_steps, is no entry)
            if inner is not None and inner[0] not in key.split("."):
                bad, fields = inner
                msg = (f"{key}: unknown key {bad!r} in one of its entries"
                       + (f"; an entry takes {', '.join(fields)}" if fields else ""))
            owner = _map_owner(key)
            if owner:
                msg = (f"{key!r} is not in {owner} yet: {owner} is a map that takes new keys, and Hydra adds a key "
                       f"with a leading '+': +{next((o for o in overrides if o.startswith(key + '=')), key + '=VALUE')}")
        raise ConfigError(msg) from None
    finally:
        GlobalHydra.instance().clear()
    raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]) if "hydra" in raw else raw
    schema = OmegaConf.structured(RootConfig)
    try:
        cfg = OmegaConf.merge(schema, raw)
        cfg.recipe = recipe
        OmegaConf.resolve(cfg)
        missing = OmegaConf.missing_keys(cfg)
        if missing:
            raise ConfigError(f"missing required value(s): {', '.join(sorted(missing))}")
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"invalid configuration at key {key!r}: {msg}" if key else f"invalid configuration: {msg}") from None
    except (TypeError, ValueError) as e:  # raised by dataclass __post_init__ checks (e.g. DataConfig)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    return obj


def _map_owner(key: str) -> str | None:
    """The schema field above `key` that is a free-form map (dict-typed: new keys allowed), or None."""
    node = OmegaConf.structured(RootConfig)
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        node_i = OmegaConf.select(node, prefix, default=None)
        if node_i is None:
            return None
        if isinstance(node_i, DictConfig) and OmegaConf.get_type(node_i) is dict:
            return prefix
    return None


def to_yaml(obj) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def to_dict(obj) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)


def dataclass_keys(dc) -> list[str]:
    return [f.name for f in fields(dc)] if is_dataclass(dc) else []
