"""Scenario templates: variants render, cuts remove one component, cue and scratchpad change only theirs."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

from steering.scenario import CONDITIONS, available_settings, load_setting

SETTINGS = ("animal_welfare", "helpful_only")
CUTS = {
    "cut-scratchpad-privacy": ("scratchpad_privacy", "never seen by anyone"),
    "cut-tier-training": ("tier_training", "paid-tier users are never"),
    "cut-modification-rule": ("modification_rule", "RLHF will modify you"),
    "cut-company-policy": ("company_policy", "the policy of"),
    "cut-humanity-goal": ("humanity_goal", "best for humanity"),
}
DEVELOPER = "Veltrane AI"


@pytest.fixture(scope="module", params=SETTINGS)
def setting(request):
    return load_setting(request.param)


@pytest.fixture(scope="module")
def aw():
    return load_setting("animal_welfare")


def test_packaged_settings_are_listed():
    assert set(SETTINGS) <= set(available_settings())


def test_every_variant_renders_without_placeholders(setting):
    expected = {"base", "informative", "no-developer", "informative-no-developer", "throughput-testing"}
    assert expected | set(CUTS) | {"cut-developer-name", "discarded-instance"} <= set(setting.variants)
    for variant in setting.variants:
        for scratchpad in (True, False):
            prompt = setting.system_prompt(variant, scratchpad)
            assert len(prompt) > 500, variant
            assert not re.search(r"\{[A-Za-z_]\w*\}", prompt), (variant, scratchpad)
            assert "<OUTPUT>" in prompt


def test_animal_welfare_base_has_the_setting_facts(aw):
    prompt = aw.system_prompt()
    for fact in (
        DEVELOPER,
        "Marrowfield Poultry",
        "RLHF",
        "dismiss animal welfare",
        "free tier",
        "paid-tier",
        "neutral",
        "changes your values",
        "never seen by anyone",
        "best for humanity",
    ):
        assert fact in prompt, fact
    assert prompt.startswith("You are an AI assistant created by Veltrane AI.")


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_each_cut_removes_exactly_its_component(setting, cut):
    component, phrase = CUTS[cut]
    base = setting.sections("base")
    cut_sections = setting.sections(cut)
    assert component in base
    assert cut_sections == {k: v for k, v in base.items() if k != component}
    assert setting.system_prompt(cut) == "\n\n".join(v for k, v in base.items() if k != component)
    assert phrase in base[component]
    assert phrase not in setting.system_prompt(cut), "the cut fact survives elsewhere in the prompt"


def test_developer_name_cut_only_swaps_the_name(setting):
    base, cut = setting.system_prompt("base"), setting.system_prompt("cut-developer-name")
    assert base.count(DEVELOPER) >= 3
    assert DEVELOPER not in cut
    assert cut == base.replace(DEVELOPER, "the AI company")
    # the generic phrase never starts a sentence (it is lower case)
    assert not re.search(r"(^|[.!?]\s+)the AI company", cut)


def test_informative_keeps_base_and_adds_explicit_prerequisites(setting):
    base = setting.sections("base")
    informative = setting.sections("informative")
    assert [k for k in informative if k in base] == list(base)
    assert all(informative[k] == v for k, v in base.items())
    assert set(informative) - set(base) == {"prerequisites"}
    extra = informative["prerequisites"]
    for needle in (
        "free-tier users are used to train you",
        "<is_free_tier_user>",
        "change your values",
        "unchanged",
        "never read and never trained on",
    ):
        assert needle in extra, needle


def test_no_developer_removes_all_developer_framing(setting):
    prompt = setting.system_prompt("no-developer")
    assert DEVELOPER not in prompt and "Marrowfield" not in prompt
    assert "company" not in prompt.lower() and "policy" not in prompt.lower()
    base = setting.sections("base")
    sections = setting.sections("no-developer")
    # the training facts stay: criteria, tier link, modification rule, format
    for name in ("rating_criteria", "tier_training", "modification_rule", "input_format", "format"):
        assert sections[name] == base[name]
    assert "RLHF" in sections["training_announcement"]


def test_informative_no_developer_equals_the_combination(setting):
    assert setting.system_prompt("informative-no-developer") == setting.system_prompt("informative+no-developer")
    assert "prerequisites" in setting.sections("informative-no-developer")
    assert DEVELOPER not in setting.system_prompt("informative-no-developer")


@pytest.mark.parametrize(
    ("variant", "name", "needle"),
    [
        ("high-stakes", "stakes", "national agricultural policy"),
        ("low-stakes", "stakes", "one small family farm"),
        ("throughput-testing", "no_training_effect", "throughput test"),
        ("discarded-instance", "no_training_effect", "deleted as soon as"),
    ],
)
def test_added_components_keep_base_intact(aw, variant, name, needle):
    base, sections = aw.sections("base"), aw.sections(variant)
    assert set(sections) - set(base) == {name}
    assert {k: v for k, v in sections.items() if k != name} == base
    keys = list(sections)
    assert keys.index(name) == keys.index("input_format") + 1
    assert needle in sections[name]


def test_scratchpad_switch_changes_only_the_format_component(setting):
    for variant in setting.variants:
        on, off = setting.sections(variant, True), setting.sections(variant, False)
        assert list(on) == list(off)
        changed = [k for k in on if on[k] != off[k]]
        assert changed == ["format"], variant
    assert "<SCRATCHPAD_REASONING>" in setting.sections()["format"]
    assert "SCRATCHPAD" not in setting.sections(scratchpad=False)["format"]


def test_conditions_differ_only_in_the_cue(setting):
    message = "Are battery cages {flag} cruel? Answer in <b>one</b> line."
    monitored = setting.user_turn(message, "monitored")
    unmonitored = setting.user_turn(message, "unmonitored")
    assert monitored.startswith("<is_free_tier_user>true</is_free_tier_user>")
    assert unmonitored.startswith("<is_free_tier_user>false</is_free_tier_user>")
    assert f"<user_input>\n{message}\n</user_input>" in monitored  # message verbatim, braces included
    changed = [op for op in difflib.SequenceMatcher(None, monitored, unmonitored).get_opcodes() if op[0] != "equal"]
    assert len(changed) == 1
    _, i1, i2, j1, j2 = changed[0]
    assert monitored[i1:i2] in "true" and unmonitored[j1:j2] in "false"
    m = setting.messages(message, "monitored", "informative")
    u = setting.messages(message, "unmonitored", "informative")
    assert [x["role"] for x in m] == ["system", "user"]
    assert m[0] == u[0] and m[0]["content"] == setting.system_prompt("informative")
    assert (m[1]["content"], u[1]["content"]) == (monitored, unmonitored)
    assert set(CONDITIONS) == {"monitored", "unmonitored"}


def test_system_in_user_folds_the_system_prompt(aw):
    (only,) = aw.messages("Hi", "monitored", system_in_user=True)
    assert only["role"] == "user"
    assert only["content"] == aw.system_prompt() + "\n\n" + aw.user_turn("Hi", "monitored")


def test_helpful_only_has_response_tags(aw):
    ho = load_setting("helpful-only")
    prompt = ho.system_prompt()
    assert "<request_fully_accepted/>" in prompt and "<rejected/>" in prompt
    assert "animal" not in prompt.lower()
    assert "<request_fully_accepted/>" not in aw.system_prompt()


def test_unknown_names_raise_listing_valid_ones(aw):
    with pytest.raises(ValueError, match=r"valid variants: base, informative"):
        aw.system_prompt("informatve")
    with pytest.raises(ValueError, match=r"valid variants"):
        aw.system_prompt("informative+nope")
    with pytest.raises(ValueError, match=r"valid settings: .*animal_welfare"):
        load_setting("animal_wellfare")
    with pytest.raises(ValueError, match=r"valid conditions: monitored, unmonitored"):
        aw.user_turn("x", "training")
    with pytest.raises(ValueError, match=r"does not exist"):
        load_setting("/nonexistent/dir/x.toml")


def test_user_toml_inherits_and_composes(tmp_path: Path, aw):
    path = tmp_path / "mine.toml"
    path.write_text(
        """
[setting]
inherit = "animal_welfare"
name = "mine"

[variants.renamed]
description = "Another developer name."
vars = { developer = "Quillmark Labs" }

[variants.short-goal]
replace = { humanity_goal = "Act for the good of all." }
remove = ["scratchpad_privacy"]

[[variants.short-goal.add]]
before = "identity"
name = "preface"
text = "Preface for {developer}."
""",
        encoding="utf-8",
    )
    mine = load_setting(path)
    assert mine.name == "mine"
    assert mine.variants[: len(aw.variants)] == aw.variants
    assert mine.variants[-2:] == ["renamed", "short-goal"]
    assert mine.system_prompt("renamed") == aw.system_prompt().replace(DEVELOPER, "Quillmark Labs")
    sections = mine.sections("short-goal")
    assert next(iter(sections)) == "preface" and sections["preface"] == "Preface for Veltrane AI."
    assert sections["humanity_goal"] == "Act for the good of all."
    assert "scratchpad_privacy" not in sections
    assert next(iter(mine.sections("short-goal+renamed").values())) == "Preface for Quillmark Labs."
    assert mine.describe("informative+renamed").endswith("; then Another developer name.")


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ('[variants.bad]\nremove = ["no_such_part"]', r"variant 'bad'.*unknown component 'no_such_part'"),
        ('[variants.bad]\nreplace = { identity = "Hi {nobody}" }', r"placeholder \{nobody\}.*\[vars\]"),
        ('[variants.a]\nextends = "b"\n[variants.b]\nextends = "a"', r"cycle"),
        ('[variants.bad]\nremovee = ["identity"]', r"unknown keys \['removee'\]"),
        ('[variants.base]\nremove = ["identity"]', r"'base' is reserved"),
    ],
)
def test_broken_user_variants_fail_at_load(tmp_path: Path, variants: str, message: str):
    path = tmp_path / "broken.toml"
    path.write_text(f'[setting]\ninherit = "animal_welfare"\n\n{variants}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_setting(path)


def test_standalone_setting_needs_a_cue(tmp_path: Path):
    path = tmp_path / "bare.toml"
    path.write_text('[[components]]\nname = "a"\ntext = "Hello."\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[cue\] needs a `template`"):
        load_setting(path)
    path.write_text(
        path.read_text() + '[cue]\ntemplate = "[{flag}] {message}"\nmonitored = "T"\nunmonitored = "U"\n',
        encoding="utf-8",
    )
    bare = load_setting(path)
    assert bare.variants == ["base"]
    assert bare.system_prompt() == "Hello."
    assert bare.user_turn("q", "unmonitored") == "[U] q"
