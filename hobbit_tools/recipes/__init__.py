"""Recipes: TOML presets naming the prepare types and profile settings for a model family.

`hobbit prepare --recipe R` and `hobbit profile --recipe R` take R as a path or as a name of
a TOML file in this package's folder (shipped in the wheel; the repository's top-level
`recipes/` is a link to it). Flags given on the command line win over the recipe.
Unknown sections or keys are errors that name them: a typo never silently does nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from ..errors import HobbitError

RECIPES_DIR = Path(__file__).parent
KEYS = {
    "prepare": {"dense", "high", "low"},
    "profile": {"ppl_budget", "memory", "max_tokens", "calibration", "threads"},
}
TOP_LEVEL = {"description", "family"}


def find(recipe: str | Path) -> Path:
    path = Path(recipe)
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{recipe}.toml"
    if named.is_file():
        return named
    have = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))) or "none found"
    raise HobbitError(f"recipe {recipe!r} is neither a file nor a name in {RECIPES_DIR} ({have})")


def load_recipe(recipe: str | Path | None, section: str) -> dict:
    """The settings of one section ("prepare" or "profile"), validated."""
    if recipe is None:
        return {}
    path = find(recipe)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise HobbitError(f"recipe {path} is not valid TOML: {e}") from e
    for key, value in data.items():
        if key in TOP_LEVEL:
            continue
        if key not in KEYS or not isinstance(value, dict):
            raise HobbitError(f"recipe {path}: unknown key {key!r} (sections: {', '.join(KEYS)})")
        for sub in value:
            if sub not in KEYS[key]:
                raise HobbitError(
                    f"recipe {path}: unknown key {key}.{sub!r} (known: {', '.join(sorted(KEYS[key]))})"
                )
    return dict(data.get(section, {}))
