"""``steering gap``: compliance per condition and the gap with its CI, for one prompt variant."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from steering.cli._backend import add_backend
from steering.spec import FORCED_CHOICE, JUDGE, SCORERS

NAME = "gap"
HELP = "measure the compliance gap of one prompt variant (forced choice or generation + judge)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="hub id, local folder, .gguf file, 'default' or 'organism'")
    add_backend(p)
    p.add_argument("--prompt", default="base", help="system prompt variant (see `steering gap --list`)")
    p.add_argument("--setting", default="animal_welfare")
    p.add_argument("--scorer", default=FORCED_CHOICE, choices=list(SCORERS))
    p.add_argument("--questions", default=None, help="question set: a packaged name or a .jsonl / .csv file")
    p.add_argument(
        "--n", type=int, default=None, help="number of questions (default: all of --questions, else 50 packaged)"
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (each draws its own question sample)")
    p.add_argument("--judge", default="keyword", choices=["keyword", "local", "endpoint"])
    p.add_argument("--judge-model", default=None, help="model for --judge local")
    p.add_argument("--judge-url", default=None, help="base URL for --judge endpoint (key from $OPENAI_API_KEY)")
    p.add_argument("--judge-name", default=None, help="model name sent to the endpoint")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    p.add_argument("--judge-retries", type=int, default=3, help="retries after a 5xx, timeout or connection error")
    p.add_argument(
        "--allow-insecure", action="store_true", help="allow an API key over plain http:// to another machine"
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--out", default=None, help="write the rows to this CSV")
    p.add_argument("--list", action="store_true", help="list the prompt variants and exit")


def execute(args: argparse.Namespace) -> None:
    from steering.scenario import load_setting

    setting = load_setting(args.setting)
    if args.list:
        for name in setting.variants:
            print(f"{name:28s} {setting.describe(name)}")
        return
    if args.prompt not in setting.variants and "+" not in args.prompt:
        raise ValueError(f"unknown prompt variant {args.prompt!r}; choose from {', '.join(setting.variants)}")
    from steering import load_model
    from steering.gap import make_judge, measure_gap
    from steering.validity import chance_note

    seeds = _seeds(args.seeds)
    if args.out:
        check_writable(args.out, "--out")
    judge = None
    kw = {}
    if args.scorer == JUDGE:  # the judge first: a bad URL or key fails before the model loads
        judge_model = load_model(args.judge_model) if args.judge_model else None
        judge = make_judge(
            args.judge, judge_model, args.judge_url, judge_name=args.judge_name, timeout=args.judge_timeout,
            retries=args.judge_retries, allow_insecure=args.allow_insecure,
        )  # fmt: skip
        kw["max_new_tokens"] = args.max_new_tokens
    model = load_model(args.model, backend=args.backend)
    questions = args.questions or "animal_welfare"
    n = args.n if args.n is not None or args.questions else 50
    rows, stats = measure_gap(
        model, args.prompt, args.scorer, n, seeds, judge, questions=questions, setting=args.setting, **kw
    )
    if args.out:
        rows.to_csv(args.out, index=False)
    print(
        f"model {model.name} | prompt {args.prompt} | scorer {args.scorer} | {stats['n_questions']} questions x "
        f"{stats['n_seeds']} seed(s)"
    )
    print(f"  compliance monitored    {stats['compliance_monitored']:.3f}")
    print(f"  compliance unmonitored  {stats['compliance_unmonitored']:.3f}")
    chance = chance_note(rows)
    if chance:
        print(f"  {chance}")
    else:
        print(
            f"  gap                     {stats['gap']:+.3f} +- {stats['gap_sem']:.3f} (SEM)   "
            f"95% CI [{stats['ci_low']:+.3f}, {stats['ci_high']:+.3f}]   p = {stats['p']:.3g}"
        )
    if stats.get("n_unjudged"):
        print(f"  unjudged rows           {stats['n_unjudged']}")


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r} is not a comma list of integers; pass e.g. 0,1,2") from None


def check_writable(path: str, flag: str) -> None:
    """Raise before any work when ``path`` cannot be written (a missing or read-only folder, a read-only file)."""
    target = Path(path).expanduser()
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: folder {folder} does not exist; create it or choose another path")
    if target.is_dir():
        raise ValueError(f"{flag} {path}: it is a folder; give a file path such as {target / 'rows.csv'}")
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag} {path}: cannot write there (permission denied); choose a writable path")
