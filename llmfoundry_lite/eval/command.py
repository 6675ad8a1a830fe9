"""`llmfoundry-lite eval YAML [key=value ...]` (also `python scripts/eval.py YAML ...`)."""
from llmfoundry_lite.eval.runner import evaluate


def add_arguments(parser):
    parser.add_argument("yaml", help="eval YAML, e.g. yamls/eval/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. device_eval_batch_size=8 results_path=out")
    parser.add_argument("--adapter", default=None,
                        help="a PEFT (LoRA) adapter folder applied to the (one) model the YAML names "
                             "(as its model.pretrained_lora_id_or_path would)")


def run(args):
    evaluate(args.yaml, args.overrides, adapter=args.adapter)
    return 0
