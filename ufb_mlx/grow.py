"""Progressive stacking: a deeper masked-language model from a trained shallow one.

    python -m ufb_mlx.grow --model demo --layers 8 --out OUT
    python -m ufb_mlx.pretrain --model OUT --corpus texts/ --out RUN ...

Gong et al. 2019 ("Efficient Training of BERT by Progressively Stacking") found that the
attention of a trained BERT's upper layers looks much like its lower layers', and that a
2L-layer model started from an L-layer one with its layers stacked twice (layer L + i a
copy of layer i) trains to the quality of a 2L-layer model from scratch in a fraction of
the time. Here the stack is repeated until ``--layers`` (a multiple of the model's depth):
layer i of the new model is a copy of layer i mod L, tree and all; the embeddings, final
norm and the tied decoder are kept. The copy is not the same function (each layer reads
what the one below wrote), so continued pretraining (``ufb_mlx.pretrain --model OUT``)
has to follow: on the demo model, held-out accuracy fell to 18 % at the copy and was back
above 40 % within 1000 steps (docs/demo_model.md).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mlx.utils import tree_flatten

from ufb_ref.checkpoint import resolve
from ufb_ref.errors import ArgumentParser, UFBError, command_name

from .entry import console
from .loading import check_new_folder, save_derived, load, model_location
from .model import ModelArgs

LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def stack(weights: dict, args: ModelArgs, layers: int) -> tuple[dict, ModelArgs]:
    """The weights and config of a ``layers``-deep model whose layer i is ``weights``'
    layer i mod ``args.num_layers``."""
    if args.task != "mlm":
        raise UFBError("--model is a classifier; grow the masked-language model it came from")
    depth = args.num_layers
    if layers <= depth or layers % depth:
        raise UFBError(f"--layers must be a multiple of the model's {depth} layers ({2 * depth}, {3 * depth}, ...), "
                       f"got {layers}")
    out = {}
    for key, value in weights.items():
        m = LAYER_KEY.fullmatch(key)
        if m is None:
            out[key] = value
            continue
        i, rest = int(m.group(1)), m.group(2)
        for copy in range(layers // depth):
            out[f"encoder.layers.{i + copy * depth}.{rest}"] = value
    return out, ModelArgs.from_dict(dict(args.to_dict(), num_layers=layers))


def main(argv=None) -> int:
    p = ArgumentParser(prog=command_name("ufb_mlx.grow"), description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="masked-language model: folder, Hub id or 'demo'")
    p.add_argument("--layers", type=int, required=True, help="depth of the new model: a multiple of the model's")
    p.add_argument("--out", required=True, help="new model folder")
    p.add_argument("--force", action="store_true", help="replace --out if it is a model folder this project wrote")
    a = p.parse_args(argv)
    out = Path(a.out)
    check_new_folder(out, a.force, [resolve(model_location(a.model))])
    model, tok = load(a.model, fff_mode="dense")
    weights, args = stack(dict(tree_flatten(model.parameters())), model.args, a.layers)
    save_derived(out, weights, args, Path(tok.path).parent, a.force, grown_from=str(a.model),
                 stacked_layers=f"{model.args.num_layers} -> {a.layers}")
    print(f"stacked {model.args.num_layers} layers into {a.layers} (layer i is a copy of layer i mod "
          f"{model.args.num_layers})")
    print(f"wrote {out}")
    return 0


cli = console(main)  # the console script (pyproject.toml)

if __name__ == "__main__":
    cli()
