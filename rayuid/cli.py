"""``rayuid`` command line: extract, train, signal, export, config schema."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_CASES = "../shared/data/external/sdpo_signal_cases/signal_analysis_cases.json"


def _extract(args: argparse.Namespace) -> int:
    from rayuid.data.extract import ExtractConfig, run_extract

    config = ExtractConfig(max_user_chars=None if args.no_user_limit else 4096,
                           languages=args.language or None)
    from rayuid.data.readers import with_revision

    inputs = [with_revision(source, args.revision) for source in args.inputs]
    report = run_extract(inputs, args.out, args.report, config)
    print(report.summary())
    print(f"interactions -> {args.out}" + (f"; report -> {args.report}" if args.report else ""))
    return 0


def _train(args: argparse.Namespace) -> int:
    from rayuid.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        import yaml

        from rayuid.precision import decide_all, describe

        print(f"# {args.config} validated; every `auto` decided for this machine ({describe()})")
        print(yaml.safe_dump(decide_all(cfg).model_dump(mode="json"), sort_keys=False), end="")
        return 0
    if cfg.ray is None:
        from rayuid.offline.trainer import train

        summary = train(cfg)
        keys = ("steps_done", "interactions_trained", "first_loss", "final_loss", "tokens_per_s", "teacher_time_share")
    else:
        from rayuid.system.driver import run  # single-policy and per-user runs alike

        summary = run(cfg)
        keys = ("mode", "steps_done", "interactions_trained", "first_loss", "final_loss", "final_version",
                "interactions_per_s", "seconds_per_phase")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    if summary.get("results_table"):
        print("\n" + summary["results_table"] + f"\n\nresults: {summary['run_dir']}/results.{{json,csv,png}}")
    if summary.get("eval_table"):
        print("\n" + summary["eval_table"] + f"\n\nheld-out curve: {summary['eval_curve']}")
    print(f"\nresults: {summary['run_dir']}\n  summary    {summary['run_dir']}/summary.json\n"
          f"  metrics    {summary['metrics']}\n  plot       {summary['plot']}\n  checkpoint {summary['checkpoint']}")
    return 0


def _signal(args: argparse.Namespace) -> int:
    from rayuid.offline.signal import run_signal

    summary = run_signal(args.cases, args.out, args.model, args.template, args.max_new_tokens, args.seed, args.limit)
    for row in summary["cases"]:
        print(f"{row['id']:<34} feedback |A| {row['mean_abs_adv_feedback']:.3f}   "
              f"unrelated |A| {row['mean_abs_adv_unrelated']:.3f}")
    print(f"mean |A|: feedback {summary['mean_abs_adv_feedback']:.3f}, unrelated {summary['mean_abs_adv_unrelated']:.3f}"
          f" ({summary['cases_feedback_stronger']}/{summary['num_cases']} cases feedback > unrelated)")
    print(f"heatmaps and summary.json in {args.out}")
    return 0


def _config_schema(args: argparse.Namespace) -> int:
    """One line per job-config field: ``dotted.path  type  default  — description`` (no Ray, no models)."""
    from rayuid.config import field_docs

    rows = field_docs()
    width = max(len(path) for path, *_ in rows)
    for path, kind, default, doc in rows:
        print(f"{path:<{width}}  {kind}  {default}  — {doc}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from rayuid.offline.export import export

    out = export(args.run_dir, args.to, args.step, args.user, args.merge_lora)
    print(f"exported to {out} (load it with transformers, peft or vLLM)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayuid", description="SDPO from user interactions")
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="show every log line (vLLM, Ray, progress bars of each actor) and tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", default=False, help=verbose._actions[0].help)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", parents=[verbose], help="chat logs -> (context, response, followup) interactions")
    ex.add_argument("inputs", nargs="+", help=".jsonl/.json/.parquet files, dataset folders or HF dataset names "
                    "(NAME, NAME:SPLIT or NAME:CONFIG:SPLIT)")
    ex.add_argument("--revision", help="branch, tag or commit of the HF datasets named (e.g. refs/convert/parquet)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--report")
    ex.add_argument("--language", action="append", help="keep only these `language` values (repeatable)")
    ex.add_argument("--no-user-limit", action="store_true", help="drop the 4,096-char user-message filter")
    ex.set_defaults(func=_extract)
    tr = sub.add_parser("train", parents=[verbose], help="run a job config (YAML) with optional key=value overrides")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*")
    tr.add_argument("--dry-run", action="store_true",
                    help="validate, decide every `auto` for this machine, print the resolved config as YAML, exit")
    tr.set_defaults(func=_train)
    sg = sub.add_parser("signal", parents=[verbose], help="per-token hindsight advantage heatmaps (paper §6.8)")
    sg.add_argument("--cases", default=DEFAULT_CASES)
    sg.add_argument("--out", required=True)
    sg.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    sg.add_argument("--template", default="offline")
    sg.add_argument("--max-new-tokens", type=int)
    sg.add_argument("--seed", type=int, default=123)
    sg.add_argument("--limit", type=int, help="only the first N cases")
    sg.set_defaults(func=_signal)
    xp = sub.add_parser("export", parents=[verbose], help="a run's weights as an HF folder for serving")
    xp.add_argument("run_dir")
    xp.add_argument("--to", required=True, help="the folder to write (replaced if it exists)")
    xp.add_argument("--step", type=int, help="this checkpoint (default: the newest complete one)")
    xp.add_argument("--user", help="per-user runs: this user's adapter")
    xp.add_argument("--merge-lora", action="store_true", help="fold a LoRA adapter into its base: a full model")
    xp.set_defaults(func=_export)

    cf = sub.add_parser("config", parents=[verbose], help="describe the job config (YAML) format")
    schema = cf.add_subparsers(dest="action", required=True).add_parser(
        "schema", parents=[verbose], help="every config field, one per line: dotted path, type, default, meaning")
    schema.set_defaults(func=_config_schema)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can expect (bad input, config, cluster, model), each raised with what to fix."""
    from rayuid.config import ConfigError
    from rayuid.sdpo.models import ModelNotFoundError
    from rayuid.system.actors.spawn import ClusterError
    from rayuid.system.engine import EngineStartError
    from rayuid.system.learner import DistributedSetupError
    from rayuid.system.sync import SyncError

    return (ConfigError, ClusterError, EngineStartError, DistributedSetupError, ModelNotFoundError, SyncError,
            FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)


def main(argv: list[str] | None = None) -> int:
    """Run a command; an expected error is one ``error: …`` line and exit code 2 (``-v``: the traceback too)."""
    args = build_parser().parse_args(argv)
    from rayuid import logs

    logs.configure(args.verbose)
    try:
        return args.func(args)
    except Exception as err:  # noqa: BLE001 - sorted below: expected errors get one line, bugs a traceback
        cause = getattr(err, "cause", None) or err  # an error raised inside a Ray actor carries the original
        if args.verbose or not isinstance(cause, _user_errors()):
            raise
        print(f"error: {str(cause).strip()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
