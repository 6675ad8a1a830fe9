"""`llmfoundry-lite eval YAML [key=value ...]` (also `python scripts/eval.py YAML ...`)."""


def add_arguments(parser):
    parser.add_argument("yaml", help="eval YAML, e.g. yamls/eval/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. device_eval_batch_size=8 results_path=out")


def run(args):
    from llmfoundry_lite.eval.runner import evaluate
    evaluate(args.yaml, args.overrides)
    return 0
