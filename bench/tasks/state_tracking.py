"""State tracking and regular languages: train on short sequences, test on longer ones.

For each (task, mixer) pair a small ``SequenceModel`` is trained from scratch on the task's
training lengths, then its accuracy is measured at each test length on fresh seeded samples
(last token for the Chomsky-hierarchy tasks, every token for the group word problems; see
``bench.tasks.data``). Training is dense: every prefix of a training sequence is supervised
with its own label (valid prefixes only), which is the same language and gives many examples per
sequence, so that CPU-sized runs of a few hundred steps suffice. Every sequence starts with a
BOS token (``bench.tasks.data.add_bos``), whose position is not scored.

A run prints its accuracies and is kept nowhere unless asked: with ``--write`` each run appends one
JSON line to ``--results`` (the committed ``bench/results/tasks/state_tracking.jsonl`` by default),
and then the runs already there are skipped, so an interrupted sweep resumes (``--rerun`` runs them
again and replaces their lines); ``--report`` writes a markdown table, a CSV and a plot from
``--results``.

Examples::

    # one run, printed only
    python -m bench.tasks.state_tracking --tasks parity --mixers rglru-neg --steps 300
    # the suites behind bench/results/tasks/ (see SUITE below), then the table and the plot
    python -m bench.tasks.state_tracking --suite paper --write
    python -m bench.tasks.state_tracking --suite long --write
    python -m bench.tasks.state_tracking --suite extra --write --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..common import HelpFormatter, add_device_option, git_sha, pick_device
from .data import TASKS, Task, add_bos, get_task, sample_train_batch
from .models import MIXER_SPEC_HELP, SequenceModel, parse_spec

RESULTS_DIR = os.path.join("bench", "results", "tasks")


@dataclass
class RunConfig:
    """One training run: a task, a model and the optimisation budget."""

    task: str
    mixer: str
    num_layers: int = 2
    d_model: int = 64
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0
    eval_batch: int = 256

    def key(self) -> str:
        """Identifies the run in the results file (a re-run with the same key is skipped)."""
        return json.dumps(asdict(self), sort_keys=True)


# The committed suite: the claims of the papers (first block), then a wider sweep. Each entry
# overrides RunConfig defaults. One-layer block-diagonal RNNs, as in the claim being checked.
SUITE: Dict[str, List[dict]] = {
    "paper": [
        # parity: negative eigenvalues (DeltaProduct beta in [0, 2], RG-LRU a_t in [-1, 1]) vs not
        dict(task="parity", mixer="dp1", num_layers=1),
        dict(task="parity", mixer="dp1-neg", num_layers=1),
        dict(task="parity", mixer="rglru", steps=1000, batch_size=64),
        dict(task="parity", mixer="rglru-neg", steps=1000, batch_size=64),
        dict(task="parity", mixer="lru"),
        dict(task="parity", mixer="bd-fan", num_layers=1),
        # parity with Mamba's selective scan: eigenvalues in [-1, 1] (Grazzi et al.) vs [0, 1]
        dict(task="parity", mixer="mamba-neg", steps=600),
        dict(task="parity", mixer="mamba", steps=600),
        # S3 word problem: DeltaProduct n = 2 with negative eigenvalues, against n = 1 and no negatives
        dict(task="s3", mixer="dp1-neg", num_layers=1),
        dict(task="s3", mixer="dp2", num_layers=1),
        dict(task="s3", mixer="dp2-neg", num_layers=1),
        dict(task="s3", mixer="bd-fan", num_layers=1),
        # A5 at short lengths, one block-diagonal layer (blocks of 8 >= the 5 points A5 permutes)
        dict(task="a5", mixer="bd-fan", num_layers=1),
        dict(task="a5", mixer="bd-slice", num_layers=1),
        # modular arithmetic with length extrapolation, one block-diagonal layer
        dict(task="mod_arith", mixer="bd-fan", num_layers=1),
        dict(task="mod_arith", mixer="bd-slice", num_layers=1),
        dict(task="mod_arith", mixer="rglru-neg"),
        dict(task="mod_arith", mixer="dp2-neg", num_layers=1),
        # the other regular tasks
        dict(task="cycle_nav", mixer="rglru-neg"),
        dict(task="cycle_nav", mixer="dp2-neg", num_layers=1),
        dict(task="cycle_nav", mixer="bd-fan", num_layers=1),
        dict(task="cycle_nav", mixer="lru"),
        dict(task="even_pairs", mixer="rglru"),
        dict(task="even_pairs", mixer="dp1", num_layers=1),
        dict(task="even_pairs", mixer="bd-fan", num_layers=1),
        dict(task="s5", mixer="bd-fan", num_layers=1),
        dict(task="s5", mixer="dp4-neg", num_layers=1),
    ],
    # Longer runs (3-16x the steps) for the claims the "paper" budget left short of 0.95.
    "long": [
        dict(task="a5", mixer="bd-fan", num_layers=1, steps=2000),
        dict(task="s3", mixer="dp2-neg", num_layers=1, steps=2000),
        dict(task="parity", mixer="dp1-neg", num_layers=1, steps=1500),
        dict(task="a5", mixer="bd-slice", num_layers=1, steps=2000),
        dict(task="parity", mixer="rglru-neg", steps=2000, batch_size=64),
        dict(task="s3", mixer="dp2-neg", num_layers=1, steps=4000),
        dict(task="mod_arith", mixer="bd-fan", num_layers=1, steps=2000),
        dict(task="s3", mixer="dp2-neg", num_layers=1, steps=8000),
        dict(task="s3", mixer="dp2", num_layers=1, steps=8000),      # controls at the same budget
        dict(task="s3", mixer="dp1-neg", num_layers=1, steps=8000),
        dict(task="parity", mixer="dp1-neg", num_layers=1, steps=2000, batch_size=64),
    ],
    # Seeds and variants for the parity claims, the column-norm comparison (Fan et al.'s p = 1.2
    # against the layer's default p = 1) and block sizes for modular arithmetic.
    "extra": [
        *(dict(task="parity", mixer="dp1-neg", num_layers=1, steps=1500, seed=s) for s in range(1, 10)),
        dict(task="parity", mixer="dp1-neg", num_layers=1, steps=1500, weight_decay=0.0),
        dict(task="parity", mixer="dp1-neg", num_layers=1, steps=1500, lr=0.01),
        dict(task="parity", mixer="dp1", num_layers=1, steps=1500, seed=1),
        dict(task="parity", mixer="dp1-neg-noconv", num_layers=1, steps=1500),
        dict(task="parity", mixer="dp1-neg-noconv", num_layers=1, steps=1500, seed=1),
        dict(task="parity", mixer="dp1-neg-noconv", num_layers=1, steps=4000),
        dict(task="parity", mixer="dp1-noconv", num_layers=1, steps=1500),
        dict(task="parity", mixer="rglru-neg", steps=1000, batch_size=64, seed=1),
        dict(task="parity", mixer="rglru-neg", steps=1000, batch_size=64, weight_decay=0.0),
        dict(task="parity", mixer="rglru", steps=1000, batch_size=64, seed=1),
        dict(task="parity", mixer="rglru-neg-noconv", steps=1000, batch_size=64),
        dict(task="parity", mixer="rglru-noconv", steps=1000, batch_size=64),
        # BlockDiagonalRNN with Fan et al.'s column norm p = 1.2 (the default is p = 1)
        *(dict(task=t, mixer="bd-fan-p1.2", num_layers=1) for t in ("parity", "s3", "a5", "mod_arith", "cycle_nav",
                                                                    "even_pairs", "s5")),
        dict(task="a5", mixer="bd-slice-p1.2", num_layers=1),
        dict(task="mod_arith", mixer="bd-slice-p1.2", num_layers=1),
        dict(task="a5", mixer="bd-fan-p1.2", num_layers=1, steps=2000),
        dict(task="a5", mixer="bd-slice-p1.2", num_layers=1, steps=2000),
        dict(task="mod_arith", mixer="bd-fan-p1.2", num_layers=1, steps=2000),
        # modular arithmetic: larger blocks
        dict(task="mod_arith", mixer="bd-fan-b64-p1.2", num_layers=1, steps=2000),
        dict(task="mod_arith", mixer="bd-fan-b16-p1.2", num_layers=1, steps=2000),
        dict(task="mod_arith", mixer="bd-fan-b32-p1.2", num_layers=1, steps=2000),
        dict(task="mod_arith", mixer="bd-fan-b16-p1.2", num_layers=1, steps=4000),
        dict(task="mod_arith", mixer="bd-fan-b32-p1.2", num_layers=1, steps=4000),
        dict(task="mod_arith", mixer="bd-fan-b32-p1.2", num_layers=1, steps=8000),
        *(dict(task="mod_arith", mixer="bd-fan-b32-p1.2", num_layers=1, steps=8000, seed=s) for s in range(1, 10)),
        dict(task="mod_arith", mixer="bd-fan-b32-p1.2", num_layers=1, steps=16000),
        dict(task="mod_arith", mixer="bd-fan-b32", num_layers=1, steps=4000),
        dict(task="parity", mixer="dp1-neg", num_layers=2, steps=1500),
        # beta that reaches 0 and 2 exactly (DeltaProduct(beta_stretch=0.1)): exact reflections
        *(dict(task="parity", mixer="dp1-neg-hard", num_layers=1, steps=1500, seed=s) for s in range(5)),
        *(dict(task="parity", mixer="dp1-neg-hard-noconv", num_layers=1, steps=1500, seed=s) for s in range(3)),
        *(dict(task="parity", mixer="dp1-hard", num_layers=1, steps=1500, seed=s) for s in range(2)),
        # mod-5 arithmetic as Fan et al.'s released code trains it: three layers of 8 x 8 blocks;
        # and their block normalisation (-max: largest column on the unit sphere, -center)
        *(dict(task="mod_arith", mixer="bd-fan-p1.2", num_layers=3, steps=4000, seed=s) for s in range(5)),
        *(dict(task="mod_arith", mixer="bd-fan-max-center-p1.2", num_layers=3, steps=4000, seed=s) for s in range(5)),
        dict(task="mod_arith", mixer="bd-fan", num_layers=3, steps=4000),
        dict(task="mod_arith", mixer="bd-fan-b32-max-center-p1.2", num_layers=1, steps=4000),
        *(dict(task="mod_arith", mixer="bd-fan-b32-max-center-p1.2", num_layers=1, steps=8000, seed=s)
          for s in range(3)),
        dict(task="mod_arith", mixer="bd-fan-b32-max-p1.2", num_layers=1, steps=8000),
    ],
}


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.05) -> float:
    """Linear warm-up to ``peak`` then cosine decay to 10 % of it."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def masked_loss_and_accuracy(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor):
    """Cross-entropy and accuracy over the valid positions.

    logits: (B, L, C); targets: (B, L) int64; valid: (B, L) bool. Returns (loss, accuracy) scalars.
    """
    flat_logits = logits[valid]
    flat_targets = targets[valid]
    loss = F.cross_entropy(flat_logits.float(), flat_targets)
    accuracy = (flat_logits.argmax(-1) == flat_targets).float().mean()
    return loss, accuracy


@torch.no_grad()
def evaluate(model: SequenceModel, task: Task, length: int, num_sequences: int, seed: int,
             chunk: int = 128) -> float:
    """Test accuracy at one length on ``num_sequences`` fresh sequences (seeded by length).

    Scores the last token when ``task.score == "last"``, every valid token when ``"all"``.
    """
    rng = np.random.default_rng(10_000 + 7919 * seed + length)
    tokens, targets, valid = add_bos(*task.generate(rng, num_sequences, length), bos=task.vocab_size)
    if task.score == "last":
        valid = np.zeros_like(valid)
        valid[:, -1] = True
    device = next(model.parameters()).device
    correct = total = 0
    model.eval()
    for start in range(0, num_sequences, chunk):
        sl = slice(start, start + chunk)
        logits = model(torch.from_numpy(tokens[sl]).to(device))
        mask = torch.from_numpy(valid[sl]).to(device)
        pred = logits.argmax(-1)
        correct += (pred[mask] == torch.from_numpy(targets[sl]).to(device)[mask]).sum().item()
        total += mask.sum().item()
    model.train()
    return correct / max(total, 1)


def train_model(cfg: RunConfig, progress: bool = True, device: torch.device = torch.device("cpu")):
    """Trains one model on ``cfg.task`` on ``device``. Returns (model, params, per-step losses, per-step
    training accuracies, training seconds)."""
    task = get_task(cfg.task)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = SequenceModel(task.vocab_size + 1, task.num_classes,  # + 1: the BOS token
                          cfg.d_model, cfg.num_layers, cfg.mixer).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    losses, accs = [], []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc=f"{cfg.task}/{cfg.mixer}", leave=False, file=sys.stderr)
    start = time.perf_counter()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr)
        batch = add_bos(*sample_train_batch(task, rng, cfg.batch_size), bos=task.vocab_size)
        tokens, targets, valid = (torch.from_numpy(a).to(device) for a in batch)
        logits = model(tokens)
        loss, acc = masked_loss_and_accuracy(logits, targets, valid)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        accs.append(acc.item())
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", acc=f"{np.mean(accs[-10:]):.3f}")
    train_seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return model, params, losses, accs, train_seconds


def train_and_evaluate(cfg: RunConfig, progress: bool = True, device: torch.device = torch.device("cpu")) -> dict:
    """Trains one model on ``cfg.task`` and returns a result record (accuracy per test length etc.)."""
    task = get_task(cfg.task)
    code_version = git_sha()            # at the start: the code this run trains with
    model, params, losses, accs, train_seconds = train_model(cfg, progress, device)
    start = time.perf_counter()
    test_acc = {str(L): evaluate(model, task, L, cfg.eval_batch, cfg.seed) for L in task.test_lengths}
    eval_seconds = time.perf_counter() - start
    return dict(config=asdict(cfg), key=cfg.key(), params=params, score=task.score,
                train_lengths=list(task.train_lengths), test_acc=test_acc,
                final_train_loss=float(np.mean(losses[-20:])), final_train_acc=float(np.mean(accs[-20:])),
                train_seconds=round(train_seconds, 1), eval_seconds=round(eval_seconds, 1),
                torch=torch.__version__, threads=torch.get_num_threads(), device=str(device), git=code_version)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

def load_results(path: str) -> List[dict]:
    """The records of a JSON-lines results file (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_record(path: str, record: dict) -> None:
    """Appends ``record`` to the JSON-lines file ``path``, dropping an earlier line of the same run
    (same ``key``) so that a rerun replaces it; the other lines are kept as they are."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["key"] != record["key"]]
    with open(path, "w") as f:
        f.writelines(kept)
        f.write(json.dumps(record) + "\n")


def label(record: dict, steps: bool = False) -> str:
    """``"dp2-neg x1"`` (mixer and number of blocks), then the optimiser settings that differ from
    ``RunConfig``'s defaults (``", wd 0"``), and with ``steps`` also ``", 500 st"`` and the seed."""
    cfg, default = record["config"], RunConfig(task="", mixer="")
    text = f"{cfg['mixer']} x{cfg['num_layers']}"
    if cfg["weight_decay"] != default.weight_decay:
        text += f", wd {cfg['weight_decay']:g}"
    if cfg["lr"] != default.lr:
        text += f", lr {cfg['lr']:g}"
    return text + (f", {cfg['steps']} st, seed {cfg['seed']}" if steps else "")


# The papers' claims checked by the report: (description, [(task, mixer, num_layers, should_solve,
# lengths)]), with lengths "all" (every test length) or "short" (the shortest test length only).
CLAIMS = [
    ("parity: DeltaProduct n=1 with beta in [0, 2] solves it, with beta in [0, 1] not "
     "(beta = 2 sigmoid, and -hard: a stretched sigmoid that reaches 0 and 2)",
     [("parity", "dp1-neg", 1, True, "all"), ("parity", "dp1", 1, False, "all"),
      ("parity", "dp1-neg-hard", 1, True, "all"), ("parity", "dp1-hard", 1, False, "all")]),
    ("parity: RG-LRU with a_t in [-1, 1] solves it, with a_t in [0, 1] not",
     [("parity", "rglru-neg", 2, True, "all"), ("parity", "rglru", 2, False, "all")]),
    ("parity: Mamba with eigenvalues in [-1, 1] solves it, with [0, 1] not (Grazzi et al.)",
     [("parity", "mamba-neg", 2, True, "all"), ("parity", "mamba", 2, False, "all")]),
    ("S3: DeltaProduct n=2 with negative eigenvalues solves it (n=1, or no negative eigenvalues: not)",
     [("s3", "dp2-neg", 1, True, "all"), ("s3", "dp2", 1, False, "all"), ("s3", "dp1-neg", 1, False, "all")]),
    ("A5: a one-layer BlockDiagonalRNN solves it at short lengths",
     [("a5", "bd-fan", 1, True, "short")]),
    ("mod arithmetic: a BlockDiagonalRNN solves it with length extrapolation (one layer; and three layers "
     "of 8 x 8 blocks, as Fan et al.'s released code trains this task)",
     [("mod_arith", "bd-fan", 1, True, "all"), ("mod_arith", "bd-fan", 3, True, "all")]),
]


def is_variant(spec: str, model: str) -> bool:
    """Whether mixer ``spec`` is the claim's ``model`` (e.g. ``"dp1-neg"``), possibly without its short
    convolution (``-noconv``), with another block size (``-bK``) or column bound (``-pX``, ``-max``,
    ``-center``): the same layer, other settings."""
    kind, flags, numbers = parse_spec(spec)
    model_kind, model_flags, model_numbers = parse_spec(model)
    settings = {"noconv", "max", "center"}
    return (kind, flags - settings, numbers.get("h")) == (model_kind, model_flags - settings, model_numbers.get("h"))


def claim_lines(records: List[dict], threshold: float) -> List[str]:
    """Markdown table of CLAIMS: for each model, the best of its runs (highest worst-case accuracy
    over the claim's lengths), and whether every expectation of the claim holds."""
    lines = ["## The papers' claims at this budget", "",
             "For each model the best of its runs (the seeds, step budgets and variants tried: without the short "
             "convolution, other block sizes or column norms; `runs` counts them) is "
             "shown; `min acc` is its lowest accuracy over the claim's test lengths (all of them, or the "
             "shortest for 'short'), `median` the median of that over the runs with the best run's steps.", "",
             "| claim | model | runs | steps | seed | min acc | median | expected | reproduced |",
             "|---|---|---|---|---|---|---|---|---|"]
    for text, expectations in CLAIMS:
        for i, (task, mixer, layers, should, which) in enumerate(expectations):
            runs = [r for r in records if (r["config"]["task"], r["config"]["num_layers"]) == (task, layers)
                    and is_variant(r["config"]["mixer"], mixer)]
            claim_cell = text if i == 0 else ""
            if not runs:
                lines.append(f"| {claim_cell} | {mixer} x{layers} | 0 | - | - | - | - | - | not run |")
                continue

            def worst(r):
                accs = list(r["test_acc"].values())
                return min(accs) if which == "all" else accs[0]
            best = max(runs, key=worst)
            same_budget = [worst(r) for r in runs if r["config"]["steps"] == best["config"]["steps"]]
            solved = worst(best) >= threshold
            verdict = "yes" if solved == should else "no"
            lines.append(f"| {claim_cell} | {best['config']['mixer']} x{layers} | {len(runs)} | {best['config']['steps']} | "
                         f"{best['config']['seed']} | {worst(best):.3f} | {float(np.median(same_budget)):.3f} | "
                         f"{'solved' if should else 'not solved'} | {verdict} |")
    return lines + [""]


def write_report(records: List[dict], out_dir: str, command: str, threshold: float = 0.95) -> None:
    """Writes ``state_tracking.md`` (table), ``state_tracking.csv`` and ``state_tracking.png``."""
    os.makedirs(out_dir, exist_ok=True)
    task_order = list(TASKS)
    records = sorted(records, key=lambda r: (task_order.index(r["config"]["task"]), label(r), r["config"]["steps"],
                                             r["config"]["seed"]))

    # CSV: one row per (run, test length)
    with open(os.path.join(out_dir, "state_tracking.csv"), "w") as f:
        f.write("task,mixer,num_layers,d_model,steps,seed,params,score,test_length,accuracy,"
                "final_train_loss,train_seconds\n")
        for r in records:
            c = r["config"]
            for L, acc in r["test_acc"].items():
                f.write(f"{c['task']},{c['mixer']},{c['num_layers']},{c['d_model']},{c['steps']},{c['seed']},"
                        f"{r['params']},{r['score']},{L},{acc:.4f},{r['final_train_loss']:.4f},"
                        f"{r['train_seconds']}\n")

    # Markdown: one table per task, accuracy per test length
    lines = ["# State tracking and regular languages: accuracy at test lengths", "",
             f"Runs: the JSON lines of `state_tracking.jsonl`, made by `python -m bench.tasks.state_tracking "
             f"--suite paper --write`, then `--suite long` and `--suite extra` (the suites are listed in "
             f"`bench/tasks/state_tracking.py`); "
             f"this report by `{command}` (git {git_sha()}, torch {torch.__version__}, "
             f"{platform.processor() or platform.machine()}, 1 thread per run, CPU shared with other jobs, "
             "so train seconds are indicative).",
             "A run is deterministic for a given version of the code, but any change in the layers' floating-point",
             "arithmetic sends training elsewhere: runs recorded before the records carried a `git` field were made",
             "by earlier versions (e.g. `dp1-neg x1` parity, seed 0, 1500 steps: 0.902 at L=256 as recorded, 0.535",
             "when re-run at git 709bce8 by `python -m bench.tasks.beta_probe`), so a seed's result is one sample.",
             "Each row is one model trained from scratch (seed as listed) on the task's training lengths with every",
             "prefix supervised, then tested on fresh sequences: `last` = accuracy of the last token,",
             "`all` = of every token. `solved` = accuracy >= "
             f"{threshold} at every test length. Chance is 1 / classes.", ""]
    lines += claim_lines(records, threshold)
    for task_name in task_order:
        rows = [r for r in records if r["config"]["task"] == task_name]
        if not rows:
            continue
        task = get_task(task_name)
        lengths = [str(L) for L in task.test_lengths]
        lines.append(f"## {task_name} (train lengths {task.train_lengths[0]}-{task.train_lengths[1]}, "
                     f"score: {task.score}, chance {1 / task.num_classes:.2f})")
        lines.append("")
        lines.append("| model | params | steps | seed | " + " | ".join(f"L={L}" for L in lengths)
                     + " | solved | train loss | train s |")
        lines.append("|---|---|---|---|" + "---|" * len(lengths) + "---|---|---|")
        for r in rows:
            accs = [r["test_acc"][L] for L in lengths]
            solved = "yes" if min(accs) >= threshold else "no"
            lines.append(f"| {label(r)} | {r['params']} | {r['config']['steps']} | {r['config']['seed']} | "
                         + " | ".join(f"{a:.3f}" for a in accs)
                         + f" | {solved} | {r['final_train_loss']:.3f} | {r['train_seconds']} |")
        lines.append("")
    with open(os.path.join(out_dir, "state_tracking.md"), "w") as f:
        f.write("\n".join(lines))

    # Plot: accuracy vs test length, one panel per task, one line per model
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks_present = [t for t in task_order if any(r["config"]["task"] == t for r in records)]
    cols = min(4, len(tasks_present))
    rows_n = math.ceil(len(tasks_present) / cols)
    # One line per model (mixer, blocks, optimiser settings): its best run over seeds and budgets.
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 5.2 * rows_n), squeeze=False)
    for ax, task_name in zip(axes.flat, tasks_present):
        task = get_task(task_name)
        by_model: Dict[str, List[dict]] = {}
        for r in records:
            if r["config"]["task"] == task_name:
                by_model.setdefault(label(r), []).append(r)
        ax.set_prop_cycle(color=plt.cm.tab20.colors)   # up to 20 distinguishable models per task
        for name, runs in by_model.items():
            best = max(runs, key=lambda r: min(r["test_acc"].values()))
            xs = [int(L) for L in best["test_acc"]]
            suffix = f" (best of {len(runs)})" if len(runs) > 1 else ""
            ax.plot(xs, list(best["test_acc"].values()), marker="o", label=name + suffix)
        ax.axhline(1 / task.num_classes, color="gray", ls=":", lw=1)
        ax.axhline(threshold, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{task_name} (train {task.train_lengths[0]}-{task.train_lengths[1]}, {task.score})")
        ax.set_xlabel("test length")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    for ax in list(axes.flat)[len(tasks_present):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "state_tracking.png"), dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench.tasks.state_tracking``."""
    default = RunConfig(task="", mixer="")
    parser = argparse.ArgumentParser(
        prog="python -m bench.tasks.state_tracking", description=__doc__, formatter_class=HelpFormatter,
        epilog=MIXER_SPEC_HELP)
    parser.add_argument("--suite", choices=sorted(SUITE), default=None,
                        help="run a predefined list of runs (the SUITE of this module; default: none)")
    parser.add_argument("--tasks", default="", help=f"comma-separated, from {', '.join(TASKS)}; each is run "
                                                    "with every mixer of --mixers (default: none)")
    parser.add_argument("--mixers", default="", help="comma-separated mixer specs, see below (default: none)")
    for flag, field, kind, what in (("--layers", "num_layers", int, "number of blocks"),
                                    ("--d-model", "d_model", int, "model width"),
                                    ("--steps", "steps", int, "training steps"),
                                    ("--batch-size", "batch_size", int, "sequences per step"),
                                    ("--lr", "lr", float, "peak AdamW learning rate"),
                                    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
                                    ("--seed", "seed", int, "seed of the model and the data")):
        parser.add_argument(flag, type=kind, default=None,
                            help=f"{what} (default: {getattr(default, field):g}, or the suite's)")
    add_device_option(parser)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; tiny models, and shared cores thrash with more")
    parser.add_argument("--write", action="store_true",
                        help="append each run to --results, skipping the runs already there (without it, "
                             "runs are printed only)")
    parser.add_argument("--rerun", action="store_true",
                        help="with --write: run the runs already in --results again and replace their lines")
    parser.add_argument("--results", default=os.path.join(RESULTS_DIR, "state_tracking.jsonl"),
                        help="JSON-lines file of the runs (--write appends to it, --report reads it)")
    parser.add_argument("--report", action="store_true",
                        help="write state_tracking.{md,csv,png} under --out-dir from --results")
    parser.add_argument("--out-dir", default=RESULTS_DIR, help="folder of the --report files")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar per run")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Runs the requested runs (printing each, saving them with ``--write``), then the report if asked."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    overrides = {k: v for k, v in dict(num_layers=args.layers, d_model=args.d_model, steps=args.steps,
                                       batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                                       seed=args.seed).items()
                 if v is not None}
    runs: List[RunConfig] = []
    if args.suite:
        runs += [RunConfig(**{**entry, **overrides}) for entry in SUITE[args.suite]]
    for task in filter(None, args.tasks.split(",")):
        for mixer in filter(None, args.mixers.split(",")):
            runs.append(RunConfig(task=task, mixer=mixer, **overrides))

    saved = {r["key"] for r in load_results(args.results)} if args.write and not args.rerun else set()
    for cfg in runs:
        if cfg.key() in saved:
            print(f"skip (already in {args.results}; --rerun runs it again): {cfg.task} {cfg.mixer} "
                  f"x{cfg.num_layers}")
            continue
        record = train_and_evaluate(cfg, progress=not args.no_progress, device=device)
        accs = " ".join(f"L{L}={a:.3f}" for L, a in record["test_acc"].items())
        print(f"{cfg.task:10s} {cfg.mixer:12s} x{cfg.num_layers} loss {record['final_train_loss']:.3f} "
              f"train-acc {record['final_train_acc']:.3f} | {accs} | {record['train_seconds']}s", flush=True)
        if args.write:
            save_record(args.results, record)
            saved.add(cfg.key())
    if runs and not args.write:
        print(f"(not saved: --write appends the runs to {args.results})")

    if args.report:
        command = "python -m bench.tasks.state_tracking " + " ".join(argv if argv is not None else sys.argv[1:])
        write_report(load_results(args.results), args.out_dir, command)
        print(f"wrote {args.out_dir}/state_tracking.{{md,csv,png}}")


if __name__ == "__main__":
    main()
