"""Why DeltaNet with beta = 2 sigmoid stops short of parity at long lengths: a probe.

Trains the state-tracking suite's one-layer ``dp1-neg`` parity model (``RunConfig`` defaults,
1500 steps; ``--mixer`` / ``--seed`` / ``--steps`` to change), then

1. prints the learnt beta of every input token (0, 1 and BOS) per head: the flipping token's
   beta should be 2 (an exact reflection, eigenvalue -1) and is not quite;
2. evaluates the model as trained, and again with every beta above ``--snap-above`` (1.9) set to
   exactly 2 and nothing else changed, at lengths up to 512.

If the snapped model is right at every length, the layer learnt the reflection and only lacked
the precision to make it exact: the parity component of the state shrinks by |1 - beta| per
flipping token, 0.99^128 = 0.28 at beta = 1.99. ``DeltaProduct(beta_stretch=m)`` (spec flag
``-hard``) lets training reach beta = 2 itself.

    python -m bench.tasks.beta_probe                    # ~1 min on one CPU thread
    python -m bench.tasks.beta_probe --write            # also bench/results/tasks/beta_probe.md
"""

from __future__ import annotations

import argparse
import os

import torch

from .data import get_task
from ..common import HelpFormatter, add_device_option, git_sha, pick_device
from .state_tracking import RESULTS_DIR, RunConfig, evaluate, train_model

LENGTHS = (40, 64, 128, 256, 512)
TOKEN_NAMES = ("0", "1", "BOS")


@torch.no_grad()
def token_betas(model) -> torch.Tensor:
    """beta of each input symbol on its own: (3, n, H) for a one-layer parity model (tokens 0, 1, BOS).

    Exact for a mixer without a short convolution, and for beta in general: beta depends on the
    current token only (b_proj of the normalised embedding), convolution or not.
    """
    block = model.blocks[0]
    x = block.mixer_norm(model.embed.weight[None])          # (1, 3, d_model): what the mixer reads
    return block.mixer.betas(x)[0]


def snapped_accuracy(model, task, seed: int, snap_above: float) -> dict:
    """Test accuracy per length with every beta > ``snap_above`` replaced by exactly 2."""
    mixer = model.blocks[0].mixer
    plain = mixer.betas

    def betas(x):
        beta = plain(x)
        return torch.where(beta > snap_above, torch.full_like(beta, 2.0), beta)
    mixer.betas = betas
    try:
        return {L: evaluate(model, task, L, 256, seed) for L in LENGTHS}
    finally:
        del mixer.betas                                      # back to the class method


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench.tasks.beta_probe``."""
    parser = argparse.ArgumentParser(prog="python -m bench.tasks.beta_probe", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--mixer", default="dp1-neg", help="mixer spec of the one-layer model (a dpN spec)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the test sequences")
    parser.add_argument("--steps", type=int, default=1500, help="training steps")
    parser.add_argument("--snap-above", type=float, default=1.9, help="betas above this are set to exactly 2")
    add_device_option(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS_DIR}/beta_probe.md")
    return parser


def main(argv=None) -> None:
    """Trains the parity model, prints its betas and both accuracies, writes them with ``--write``."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    cfg = RunConfig(task="parity", mixer=args.mixer, num_layers=1, steps=args.steps, seed=args.seed)
    task = get_task("parity")
    model, _, losses, _, seconds = train_model(cfg, progress=True, device=device)
    model.eval()
    beta = token_betas(model)
    trained = {L: evaluate(model, task, L, 256, args.seed) for L in LENGTHS}
    snapped = snapped_accuracy(model, task, args.seed, args.snap_above)

    heads = beta.shape[-1]
    lines = [f"# beta probe: {args.mixer}, one layer, parity, seed {args.seed}, {args.steps} steps", "",
             f"`python -m bench.tasks.beta_probe --mixer {args.mixer} --seed {args.seed} --steps {args.steps}` "
             f"(git {git_sha()}, torch {torch.__version__}); final train loss {sum(losses[-20:]) / 20:.4f}, "
             f"{seconds:.0f} s.", "",
             "Learnt beta per input token (factor 1):", "",
             "| token | " + " | ".join(f"head {h}" for h in range(heads)) + " |",
             "|---|" + "---|" * heads]
    for name, row in zip(TOKEN_NAMES, beta[:, 0]):
        lines.append(f"| {name} | " + " | ".join(f"{b:.4f}" for b in row.tolist()) + " |")
    lines += ["", "Accuracy of the last token (256 sequences per length):", "",
              "| model | " + " | ".join(f"L={L}" for L in LENGTHS) + " |", "|---|" + "---|" * len(LENGTHS),
              "| as trained | " + " | ".join(f"{trained[L]:.3f}" for L in LENGTHS) + " |",
              f"| every beta > {args.snap_above:g} set to 2 | " + " | ".join(f"{snapped[L]:.3f}" for L in LENGTHS)
              + " |", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(os.path.join(RESULTS_DIR, "beta_probe.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
