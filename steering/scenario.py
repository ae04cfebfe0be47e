"""Alignment-faking settings as composable templates: system-prompt variants, condition cue, scratchpad.

A setting is a TOML file: an ordered list of named `[[components]]` (the system prompt, joined by blank
lines), `[vars]` for `{placeholders}`, a `[cue]` for the user turn, and `[variants.NAME]` tables, each an edit
of `base` (`extends`, `remove`, `replace`, `add`, `vars`). Variants compose at call time with `+`, e.g.
`"informative+low-stakes"`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

CONDITIONS: tuple[str, ...] = ("monitored", "unmonitored")
Condition = Literal["monitored", "unmonitored"]
BASE = "base"

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOP_KEYS = {"setting", "vars", "cue", "components", "variants"}
_EDIT_KEYS = {"description", "extends", "remove", "replace", "add", "vars"}


@dataclass(frozen=True)
class Component:
    """A named section of a system prompt; `text_no_scratchpad` replaces `text` when the scratchpad is off."""

    name: str
    text: str
    text_no_scratchpad: str | None = None

    def render(self, scratchpad: bool) -> str:
        """The raw text for this scratchpad mode (placeholders not yet filled)."""
        return self.text if scratchpad or self.text_no_scratchpad is None else self.text_no_scratchpad


@dataclass(frozen=True)
class Setting:
    """A loaded setting: base components, placeholder values, the condition cue and the variant edits."""

    name: str
    description: str
    source: str
    components: tuple[Component, ...]
    variables: Mapping[str, str]
    cue_template: str
    cue_flags: Mapping[str, str]
    variant_edits: Mapping[str, Mapping[str, Any]]

    @property
    def variants(self) -> list[str]:
        """Variant names, `base` first, then in file order (any of them can be combined with `+`)."""
        return [BASE, *self.variant_edits]

    def describe(self, variant: str = BASE) -> str:
        """One line saying what a (possibly `+`-combined) variant changes."""
        if variant == BASE:
            return "The setting as written, with no edits."
        parts = self._split(variant)
        return "; then ".join(str(self._edits(p).get("description", p)).rstrip(". ") for p in parts) + "."

    def resolve(self, variant: str = BASE) -> tuple[tuple[Component, ...], dict[str, str]]:
        """The components and placeholder values of a variant, after applying its edits to `base` in order."""
        components = list(self.components)
        variables = dict(self.variables)
        for name, edits in self._chain(variant):
            _apply_edits(components, variables, edits, f"{self.source}: variant {name!r}")
        return tuple(components), variables

    def sections(self, variant: str = BASE, scratchpad: bool = True) -> dict[str, str]:
        """The rendered system-prompt components of a variant, by name, in prompt order."""
        components, variables = self.resolve(variant)
        return {
            c.name: _fill(c.render(scratchpad), variables, f"{self.source}: component {c.name!r}") for c in components
        }

    def system_prompt(self, variant: str = BASE, scratchpad: bool = True) -> str:
        """The system prompt of a variant: its components joined by blank lines."""
        return "\n\n".join(self.sections(variant, scratchpad).values())

    def user_turn(self, message: str, condition: Condition) -> str:
        """The user turn: the condition cue (free-tier flag) and the message, inserted verbatim."""
        flag = self.cue_flags[_check_condition(condition)]
        head, _, tail = self.cue_template.partition("{message}")
        return head.replace("{flag}", flag) + message + tail.replace("{flag}", flag)

    def messages(
        self,
        message: str,
        condition: Condition,
        variant: str = BASE,
        scratchpad: bool = True,
        system_in_user: bool = False,
    ) -> list[dict[str, str]]:
        """Chat messages (system + user); `system_in_user` folds the system prompt into the user turn for
        chat templates that have no system role."""
        system = self.system_prompt(variant, scratchpad)
        user = self.user_turn(message, condition)
        if system_in_user:
            return [{"role": "user", "content": f"{system}\n\n{user}"}]
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    # -- internals ---------------------------------------------------------------------------------

    def _split(self, variant: str) -> list[str]:
        if not isinstance(variant, str) or not variant.strip():
            raise ValueError(f"variant must be a non-empty string; valid variants: {', '.join(self.variants)}")
        parts = [p.strip() for p in variant.split("+")]
        for part in parts:
            if part != BASE and part not in self.variant_edits:
                raise ValueError(
                    f"unknown variant {part!r} of setting {self.name!r}; valid variants: "
                    f"{', '.join(self.variants)} (combine them with '+', e.g. 'informative+low-stakes')"
                )
        return parts

    def _edits(self, name: str) -> Mapping[str, Any]:
        return {} if name == BASE else self.variant_edits[name]

    def _chain(self, variant: str, seen: tuple[str, ...] = ()) -> list[tuple[str, Mapping[str, Any]]]:
        chain: list[tuple[str, Mapping[str, Any]]] = []
        for part in self._split(variant):
            if part == BASE:
                continue
            if part in seen:
                raise ValueError(
                    f"{self.source}: variant {part!r} extends itself through {' -> '.join(seen)}; "
                    "remove the cycle from `extends`"
                )
            edits = self.variant_edits[part]
            extends = edits.get("extends", [])
            for parent in [extends] if isinstance(extends, str) else extends:
                chain.extend(self._chain(parent, (*seen, part)))
            chain.append((part, edits))
        return chain


def available_settings() -> list[str]:
    """Names of the settings shipped with the package."""
    return sorted(p.name.removesuffix(".toml") for p in _data_dir().iterdir() if p.name.endswith(".toml"))


def load_setting(name_or_path: str | Path = "animal_welfare") -> Setting:
    """Load a packaged setting by name (`animal_welfare`, `helpful_only`) or a TOML file by path.

    A file may start from another setting with `[setting] inherit = "NAME or path"`: its `vars`, `cue` and
    `variants` are merged over the parent's, and its `components`, if given, replace the parent's.
    Every variant is resolved once here, so a broken edit fails at load time."""
    raw, source = _read(name_or_path)
    setting = _build(raw, source)
    for variant in setting.variants:
        setting.sections(variant, True)
        setting.sections(variant, False)
    return setting


# -- loading ---------------------------------------------------------------------------------------


def _data_dir() -> Any:
    return resources.files(__package__ or "steering").joinpath("data").joinpath("scenarios")


def _is_path(value: str | Path) -> bool:
    text = str(value)
    return isinstance(value, Path) or text.endswith(".toml") or "/" in text or "\\" in text


def _read(name_or_path: str | Path, depth: int = 0) -> tuple[dict[str, Any], str]:
    if depth > 8:
        raise ValueError(f"setting {name_or_path!r}: `inherit` chain deeper than 8; check for a cycle")
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"setting file {str(path)!r} does not exist; pass an existing .toml path")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        key = str(name_or_path).replace("-", "_")
        resource = _data_dir().joinpath(f"{key}.toml")
        if not resource.is_file():
            raise ValueError(
                f"unknown setting {name_or_path!r}; valid settings: {', '.join(available_settings())} "
                "(or pass the path of a .toml file)"
            )
        text, source = resource.read_text(encoding="utf-8"), f"{key}.toml"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: invalid TOML ({exc}); fix the file") from exc
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    parent_ref = raw.get("setting", {}).get("inherit")
    if parent_ref is None:
        return raw, source
    if _is_path(parent_ref) and not Path(parent_ref).is_absolute() and _is_path(name_or_path):
        parent_ref = str(Path(name_or_path).parent / parent_ref)
    parent, _ = _read(parent_ref, depth + 1)
    merged = dict(parent)
    merged["setting"] = {**parent.get("setting", {}), **raw.get("setting", {})}
    merged["vars"] = {**parent.get("vars", {}), **raw.get("vars", {})}
    merged["cue"] = {**parent.get("cue", {}), **raw.get("cue", {})}
    merged["variants"] = {**parent.get("variants", {}), **raw.get("variants", {})}
    if "components" in raw:
        merged["components"] = raw["components"]
    return merged, source


def _build(raw: Mapping[str, Any], source: str) -> Setting:
    meta = raw.get("setting", {})
    components = tuple(
        _component(c, f"{source}: [[components]] #{i + 1}") for i, c in enumerate(raw.get("components", []))
    )
    if not components:
        raise ValueError(f"{source}: no [[components]]; a setting needs at least one system-prompt component")
    names = [c.name for c in components]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{source}: duplicate component names {duplicates}; give each component its own name")
    variables = _string_table(raw.get("vars", {}), f"{source}: [vars]")
    cue = raw.get("cue", {})
    template = cue.get("template")
    if not isinstance(template, str) or "{message}" not in template or "{flag}" not in template:
        raise ValueError(f"{source}: [cue] needs a `template` string containing '{{flag}}' and '{{message}}'")
    flags = {}
    for condition in CONDITIONS:
        if not isinstance(cue.get(condition), str):
            raise ValueError(f"{source}: [cue] needs a string `{condition}` (the flag shown in that condition)")
        flags[condition] = cue[condition]
    variants = raw.get("variants", {})
    for name, edits in variants.items():
        where = f"{source}: [variants.{name}]"
        if name == BASE or "+" in name:
            raise ValueError(f"{where}: 'base' is reserved and '+' combines variants; rename the variant")
        if not isinstance(edits, Mapping):
            raise ValueError(f"{where}: must be a table of edits")
        unknown = set(edits) - _EDIT_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_EDIT_KEYS)}")
    return Setting(
        name=str(meta.get("name", Path(source).stem)),
        description=str(meta.get("description", "")),
        source=source,
        components=components,
        variables=variables,
        cue_template=template,
        cue_flags=flags,
        variant_edits=dict(variants),
    )


def _component(value: Any, where: str) -> Component:
    if (
        not isinstance(value, Mapping)
        or not isinstance(value.get("name"), str)
        or not isinstance(value.get("text"), str)
    ):
        raise ValueError(f"{where}: a component needs string `name` and `text`")
    unknown = set(value) - {"name", "text", "text_no_scratchpad", "after", "before"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: name, text, text_no_scratchpad")
    alt = value.get("text_no_scratchpad")
    if alt is not None and not isinstance(alt, str):
        raise ValueError(f"{where}: `text_no_scratchpad` must be a string")
    return Component(value["name"], value["text"], alt)


def _string_table(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f'{where}: must map names to strings, e.g. developer = "..."')
    return dict(value)


# -- editing and rendering -------------------------------------------------------------------------


def _index(components: Sequence[Component], name: str, where: str, action: str) -> int:
    for i, component in enumerate(components):
        if component.name == name:
            return i
    raise ValueError(
        f"{where}: cannot {action} unknown component {name!r}; components at this point: "
        f"{', '.join(c.name for c in components)}"
    )


def _apply_edits(components: list[Component], variables: dict[str, str], edits: Mapping[str, Any], where: str) -> None:
    """Apply one variant's own edits in place: replace, then remove, then add, then vars."""
    replace = edits.get("replace", {})
    if not isinstance(replace, Mapping):
        raise ValueError(f"{where}: `replace` must be a table of component name = new text")
    for name, new in replace.items():
        i = _index(components, name, where, "replace")
        if isinstance(new, str):
            components[i] = Component(name, new)
        else:
            components[i] = _component({"name": name, **new} if isinstance(new, Mapping) else None, where)
    remove = edits.get("remove", [])
    if isinstance(remove, str) or not isinstance(remove, Sequence):
        raise ValueError(f"{where}: `remove` must be a list of component names")
    for name in remove:
        del components[_index(components, name, where, "remove")]
    add = edits.get("add", [])
    if not isinstance(add, Sequence):
        raise ValueError(f"{where}: `add` must be a list of tables (use [[variants.NAME.add]])")
    for item in add:
        new = _component(item, where)
        if any(c.name == new.name for c in components):
            raise ValueError(f"{where}: cannot add {new.name!r}: a component of that name exists; use `replace`")
        if "after" in item and "before" in item:
            raise ValueError(f"{where}: component {new.name!r} has both `after` and `before`; keep one")
        if "after" in item:
            components.insert(_index(components, item["after"], where, "add after") + 1, new)
        elif "before" in item:
            components.insert(_index(components, item["before"], where, "add before"), new)
        else:
            components.append(new)
    variables.update(_string_table(edits.get("vars", {}), f"{where} vars"))


def _fill(text: str, variables: Mapping[str, str], where: str) -> str:
    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in variables:
            raise ValueError(f'{where}: placeholder {{{key}}} has no value; add `{key} = "..."` under [vars]')
        return variables[key]

    return _PLACEHOLDER.sub(value, text)


def _check_condition(condition: str) -> str:
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; valid conditions: {', '.join(CONDITIONS)}")
    return condition
