"""Pictures of what compressed ViTs keep, from the command line.

    python tools/visualize.py tokens --arch vit_small_patch16_224 --pool_k 10 --out tokens.png
    python tools/visualize.py grid --checkpoint out_tk/best.pt --checkpoint out_tome/best.pt --out grid.png
    python tools/visualize.py grid --checkpoint short=out/a/best.pt --checkpoint long=out/b/best.pt --out grid.png

``tokens`` plots the tokens left after every block for every method; ``grid`` draws what each
main.py checkpoint keeps of the first test images of its dataset, every checkpoint in columns of its
own, titled with its label (``LABEL=PATH``, or else the file name, with as many parent folders as it
takes to tell the checkpoints apart) and its method. The drawing is ``pruning.visualize``; loading
checkpoints and test images is here. Bad input (a missing or unreadable checkpoint, an unknown arch)
ends as one line on stderr (``visualize.py: error: ...``) and exit code 2.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``python tools/visualize.py`` puts tools/ first on the path, not the repo
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import data  # noqa: E402
from engine.errors import BAD_INPUT, CLIError, first_line, report_error  # noqa: E402
from engine.model import backbone_of, create_model, load_trained  # noqa: E402,F401  (load_trained: a checkpoint's)
from engine.options import ArgumentParser, int_at_least  # noqa: E402
from pruning import METHOD_NAMES  # noqa: E402
from pruning.patch import methods_for, model_shape  # noqa: E402
from pruning.visualize import save_token_grid_comparison, save_tokens_per_block_plot  # noqa: E402

PROG = "visualize.py"


def _int_list(text: str) -> List[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise ValueError(text)
    return values


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    tokens = commands.add_parser("tokens", help="plot tokens left vs. block for every method")
    tokens.add_argument("--arch", default=None,
                        help="model to read the token count and depth from, as main.py's --arch: a timm name, "
                             "hf:FOLDER_OR_HUB_ID or open_clip:NAME (default: none; then give --num_tokens and "
                             "--depth)")
    tokens.add_argument("--num_tokens", type=int_at_least(1), default=None,
                        help="tokens entering block 0, without --arch (default: none)")
    tokens.add_argument("--depth", type=int_at_least(1), default=None, help="blocks, without --arch (default: none)")
    tokens.add_argument("--num_prefix_tokens", type=int, default=1,
                        help="class and register tokens, without --arch (default: %(default)s)")
    tokens.add_argument("--pool_k", type=_int_list, required=True,
                        help="tokens removed per block: an int, or a comma list with one per block (required)")
    tokens.add_argument("--out", required=True, help="PNG file to write (required)")
    grid = commands.add_parser("grid", help="token grid of main.py checkpoints side by side")
    grid.add_argument("--checkpoint", action="append", required=True, metavar="[LABEL=]PATH",
                      help="a main.py checkpoint; repeat to compare, each gets its own columns (label default: "
                           "the file name, with parent folders where file names repeat)")
    grid.add_argument("--images", type=int_at_least(1), default=4, help="first N test images (default: %(default)s)")
    grid.add_argument("--blocks", type=_int_list, default=None,
                      help="0-based block indices, comma separated (default: a few spread over the depth)")
    grid.add_argument("--data_root", default=None, help="dataset folder (default: the first checkpoint's)")
    grid.add_argument("--out", required=True, help="PNG file to write (required)")
    return parser


# --- checkpoints ---------------------------------------------------------------------------------

def split_label(spec: str) -> Tuple[Optional[str], str]:
    """``LABEL=PATH`` -> (LABEL, PATH); a plain path (even one holding ``=``, if it exists) -> (None, PATH)."""
    if "=" in spec and not os.path.exists(spec):
        label, path = spec.split("=", 1)
        return (label or None), path
    return None, spec


def checkpoint_labels(specs: Sequence[str]) -> List[Tuple[str, str]]:
    """(label, path) for every ``--checkpoint``: the given label, else the file name with as many parent
    folders as it takes for all labels to differ; CLIError if they cannot."""
    split = [split_label(spec) for spec in specs]
    parts = [Path(os.path.normpath(path)).parts for _, path in split]
    longest = max(len(p) for p in parts)
    for depth in range(1, longest + 1):
        labels = [label if label is not None else "/".join(p[-depth:]) for (label, _), p in zip(split, parts)]
        if len(set(labels)) == len(labels):
            return list(zip(labels, (path for _, path in split)))
    repeated = next(label for label in labels if labels.count(label) > 1)
    raise CLIError(f"--checkpoint: two checkpoints are both labelled {repeated!r}; "
                    f"give each its own label as LABEL=PATH")


def load_test_images(settings: Dict, count: int, data_root: Optional[str] = None) -> Tuple[Tensor, Sequence, Sequence]:
    """The first ``count`` test images of the checkpoint's dataset, as the model sees them; (images, mean, std)."""
    root = data_root or settings.get("data_root")
    try:
        splits = data.build_dataset(settings["data_name"], root, download=False)
        splits.set_transforms(settings["img_size"], settings.get("augment"))
        images = torch.stack([splits.test[i][0] for i in range(min(count, len(splits.test)))])
    except (OSError, RuntimeError, KeyError, TypeError) as err:
        raise CLIError(f"--data_root: the test images of {settings.get('data_name')!r} cannot be read "
                        f"from {root}: {first_line(err)}") from None
    return images, splits.spec.mean, splits.spec.std


# --- the commands --------------------------------------------------------------------------------

def plot_tokens(args: argparse.Namespace) -> str:
    pool_k = args.pool_k[0] if len(args.pool_k) == 1 else args.pool_k
    methods = METHOD_NAMES
    if args.arch:
        with torch.device("meta"):  # its shape is all that is read
            module = backbone_of(create_model(args.arch, None, None)).module
        shape = model_shape(module)  # the library's sizes, whatever the family
        num_tokens, depth, prefix, name = shape.num_tokens, shape.depth, shape.num_prefix, f"{args.arch}: "
        methods = methods_for(module)  # without a class token, the methods reading its attention do not run
    elif args.num_tokens and args.depth:
        num_tokens, depth, prefix, name = args.num_tokens, args.depth, args.num_prefix_tokens, ""
    else:
        raise CLIError("tokens: give --arch, or --num_tokens and --depth")
    title = f"{name}{num_tokens} tokens, {depth} blocks, pool_k={pool_k}"
    return save_tokens_per_block_plot(args.out, num_tokens, depth, pool_k, num_prefix_tokens=prefix, title=title,
                                      method_names=methods)


def draw_grid(args: argparse.Namespace) -> str:
    trained: Dict[str, torch.nn.Module] = {}
    first: Optional[Dict] = None
    for label, path in checkpoint_labels(args.checkpoint):
        model, settings = load_trained(path)
        if first is not None and any(settings.get(key) != first.get(key) for key in ("data_name", "img_size")):
            raise CLIError(f"--checkpoint: {path} was trained on {settings.get('data_name')} at "
                            f"{settings.get('img_size')} px, unlike the first ({first.get('data_name')} at "
                            f"{first.get('img_size')} px)")
        first = first or settings
        trained[label] = model
    images, mean, std = load_test_images(first, args.images, args.data_root)
    return save_token_grid_comparison(trained, images, args.out, blocks=args.blocks, mean=mean, std=std)


def run(args: argparse.Namespace) -> str:
    try:
        return plot_tokens(args) if args.command == "tokens" else draw_grid(args)
    except ValueError as err:  # the library names the argument: blocks, pool_k, ...
        raise CLIError(f"--{first_line(err)}") from None
    except OSError as err:  # the PNG cannot be written
        raise CLIError(f"--out: {args.out}: {err.strerror or first_line(err)}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: bad input ends as one line on stderr and exit code 2, never a traceback."""
    try:
        print(run(build_parser().parse_args(argv)))
    except BAD_INPUT as err:
        return report_error(PROG, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
