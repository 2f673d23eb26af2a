"""A byte-level language model built from linrec layers, trained on the Python standard library.

Corpus: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded),
read as bytes. The selection is deterministic: files are ordered by the CRC-32 of their relative
path, every file whose CRC-32 is 0 mod 20 is held out for validation, and files are taken in that
order until the byte budgets are filled. The numbers therefore depend on the Python version whose
standard library is read (it is printed and written into the results).

Model: ``bench.tasks.models.SequenceModel`` with the mixer picked by ``--mixers`` (a spec such as
``rglru``, ``lru``, ``dp2-neg``, ``bd-fan``), MLPs and RMSNorms, over 257 input symbols (256 bytes
and a BOS token that starts every document) and 256 output classes.

Training batches are packed: random segments of random documents, of different lengths, are laid
out in a padded (N, L_max) batch with a padding mask, which ``pack_padded`` turns into one packed
row (B = 1) and ``cu_seqlens``; every layer restarts its recurrence at each boundary, so no token
is spent on padding (``--batching padded`` trains on the padded batch instead, for comparison).
The loss is reported with its bits per byte (loss / ln 2) in a tqdm bar, and training throughput
(tokens/s) per mixer goes into ``bench/results/tasks/lm.{md,csv}`` with ``--write``.

Sampling runs the layers' stateful decode path: the prompt is prefilled once, then each new
byte is fed alone with the carried state, whose size does not grow. It is checked against
recomputing the full prefix at every step: the same sampled bytes and logits within 1e-3.

Example::

    python -m bench.tasks.lm --mixers rglru,lru,dp2-neg,bd-fan --steps 150 --write
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import sysconfig
import time
import zlib
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..common import HelpFormatter, add_device_option, pick_device
from .models import MIXER_SPEC_HELP, SequenceModel, pack_padded, state_numel

BOS = 256          # the input id of the beginning-of-document token
VOCAB_IN = 257     # 256 bytes + BOS
VOCAB_OUT = 256    # bytes
RESULTS_DIR = os.path.join("bench", "results", "tasks")


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------

def stdlib_python_files(root: Optional[str] = None) -> List[str]:
    """Relative paths of the standard library's ``.py`` files, site-packages excluded, sorted."""
    root = root or sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in files:
            if name.endswith(".py"):
                paths.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(paths)


def is_validation(relpath: str) -> bool:
    """The held-out split: 1 file in 20, chosen by the CRC-32 of its relative path."""
    return zlib.crc32(relpath.encode()) % 20 == 0


def load_corpus(train_bytes: int, val_bytes: int, root: Optional[str] = None
                ) -> Tuple[List[np.ndarray], List[np.ndarray], dict]:
    """Reads the corpus: (train documents, validation documents, info).

    Documents are uint8 arrays, one per file, taken in CRC-32 order of their paths until each
    split holds at least its byte budget (the last file is cut to fit).
    """
    root = root or sysconfig.get_paths()["stdlib"]
    files = sorted(stdlib_python_files(root), key=lambda p: (zlib.crc32(p.encode()), p))
    splits = {"train": ([], train_bytes), "val": ([], val_bytes)}
    filled = {"train": 0, "val": 0}
    for rel in files:
        split = "val" if is_validation(rel) else "train"
        docs, budget = splits[split]
        if filled[split] >= budget:
            if all(filled[s] >= splits[s][1] for s in splits):
                break
            continue
        with open(os.path.join(root, rel), "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        data = data[: budget - filled[split]]
        if data.size >= 2:
            docs.append(data)
            filled[split] += data.size
    info = dict(root=root, python=platform.python_version(), train_docs=len(splits["train"][0]),
                val_docs=len(splits["val"][0]), train_bytes=filled["train"], val_bytes=filled["val"])
    return splits["train"][0], splits["val"][0], info


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

def segments_to_padded(segments: List[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lays out byte segments as a padded batch for next-byte prediction.

    Segment s of length L becomes inputs ``[BOS, s_0, ..., s_{L-2}]`` and targets ``[s_0, ..., s_{L-1}]``.
    Returns inputs (N, L_max) int64, targets (N, L_max) int64, mask (N, L_max) bool (True at real tokens).
    """
    n, lmax = len(segments), max(len(s) for s in segments)
    inputs = torch.full((n, lmax), BOS, dtype=torch.int64)
    targets = torch.zeros((n, lmax), dtype=torch.int64)
    mask = torch.zeros((n, lmax), dtype=torch.bool)
    for i, seg in enumerate(segments):
        seg_t = torch.from_numpy(seg.astype(np.int64))
        inputs[i, 1:len(seg)] = seg_t[:-1]
        targets[i, :len(seg)] = seg_t
        mask[i, :len(seg)] = True
    return inputs, targets, mask


def sample_segments(docs: List[np.ndarray], rng: np.random.Generator, total_tokens: int,
                    min_len: int, max_len: int) -> List[np.ndarray]:
    """Random segments of random documents, lengths uniform in [min_len, max_len] (or the whole
    document when shorter), until they hold ``total_tokens`` bytes (the last one is cut)."""
    segments, total = [], 0
    while total < total_tokens:
        doc = docs[rng.integers(len(docs))]
        # (a one-byte segment is fine: BOS -> its byte; never skip, or a remainder of 1 would loop forever)
        length = min(int(rng.integers(min_len, max_len + 1)), doc.size, total_tokens - total)
        start = int(rng.integers(0, doc.size - length + 1))
        segments.append(doc[start:start + length])
        total += length
    return segments


def validation_segments(docs: List[np.ndarray], max_len: int) -> List[np.ndarray]:
    """The validation documents cut into consecutive pieces of at most ``max_len`` bytes."""
    return [doc[i:i + max_len] for doc in docs for i in range(0, doc.size, max_len) if doc[i:i + max_len].size >= 2]


def lm_loss(model: SequenceModel, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
            packed: bool) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over the real tokens of a padded batch.

    packed=True packs the batch into B = 1 with ``cu_seqlens`` (no compute on padding);
    packed=False runs the padded (N, L_max) batch and masks the loss. The batch is moved to the
    model's device.
    """
    device = next(model.parameters()).device
    inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
    if packed:
        tokens, cu_seqlens = pack_padded(inputs, mask)
        logits = model(tokens, cu_seqlens=cu_seqlens)[0]             # (sum(mask), 256)
        return F.cross_entropy(logits.float(), targets[mask])
    logits = model(inputs)                                            # (N, L_max, 256)
    return F.cross_entropy(logits[mask].float(), targets[mask])


@torch.no_grad()
def evaluate_bpb(model: SequenceModel, segments: List[np.ndarray], tokens_per_batch: int = 8192) -> float:
    """Bits per byte on the given segments (packed batches of about ``tokens_per_batch`` bytes)."""
    model.eval()
    total_nats, total_bytes, batch = 0.0, 0, []
    for i, seg in enumerate(segments):
        batch.append(seg)
        if sum(s.size for s in batch) >= tokens_per_batch or i == len(segments) - 1:
            inputs, targets, mask = segments_to_padded(batch)
            n = int(mask.sum())
            total_nats += lm_loss(model, inputs, targets, mask, packed=True).item() * n
            total_bytes += n
            batch = []
    model.train()
    return total_nats / max(total_bytes, 1) / math.log(2)


# --------------------------------------------------------------------------------------------
# Generation: stateful decode vs full recomputation
# --------------------------------------------------------------------------------------------

def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """Greedy (temperature 0) or sampled next byte from logits (256,); samples on the CPU with
    ``generator`` (a CPU generator), so a seed picks the same bytes on every device."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_decode(model: SequenceModel, prompt: bytes, num_bytes: int, temperature: float = 0.0,
                    seed: int = 0) -> Tuple[bytes, torch.Tensor, List[int]]:
    """Generates with the stateful decode path: one prefill, then one byte per call with the state.

    Returns (generated bytes, logits (num_bytes, 256) that chose them, state sizes (numel) per step).
    """
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([[BOS] + list(prompt)], dtype=torch.int64, device=device)
    logits, state = model(tokens, return_state=True)
    step_logits, out, sizes = [], [], []
    for _ in range(num_bytes):
        last = logits[0, -1]
        step_logits.append(last)
        nxt = _pick(last, temperature, generator)
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]], device=device), state=state, return_state=True)
        sizes.append(state_numel(state))
    model.train()
    return bytes(out), torch.stack(step_logits), sizes


@torch.no_grad()
def generate_recompute(model: SequenceModel, prompt: bytes, num_bytes: int, temperature: float = 0.0,
                       seed: int = 0) -> Tuple[bytes, torch.Tensor]:
    """Generates by re-running the model on the whole prefix for every new byte (the reference)."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    seq = [BOS] + list(prompt)
    step_logits, out = [], []
    for _ in range(num_bytes):
        last = model(torch.tensor([seq], device=device))[0, -1]
        step_logits.append(last)
        nxt = _pick(last, temperature, generator)
        out.append(nxt)
        seq.append(nxt)
    model.train()
    return bytes(out), torch.stack(step_logits)


def check_decode(model: SequenceModel, prompt: bytes, num_bytes: int, temperature: float, seed: int = 0) -> dict:
    """Runs both generators and compares them; also times the decode path."""
    start = time.perf_counter()
    text_dec, logits_dec, sizes = generate_decode(model, prompt, num_bytes, temperature, seed)
    decode_s = time.perf_counter() - start
    text_full, logits_full = generate_recompute(model, prompt, num_bytes, temperature, seed)
    return dict(same_bytes=text_dec == text_full,
                max_abs_logit_diff=float((logits_dec - logits_full).abs().max()),
                state_numel_constant=len(set(sizes)) == 1, state_numel=sizes[0] if sizes else 0,
                decode_bytes_per_s=num_bytes / decode_s, sample=text_dec)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def train_lm(mixer: str, train_docs: List[np.ndarray], val_segments: List[np.ndarray], args,
             device: torch.device = torch.device("cpu")) -> dict:
    """Trains one LM on ``device`` and returns its record (losses, bits per byte, throughput, decode check)."""
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = SequenceModel(VOCAB_IN, VOCAB_OUT, args.d_model, args.layers, mixer).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    packed = args.batching == "packed"

    losses, step_times, step_tokens, step_slots = [], [], [], []
    bar = tqdm(range(args.steps), desc=f"lm/{mixer}", file=sys.stderr, disable=args.no_progress)
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        segments = sample_segments(train_docs, rng, args.tokens_per_step, args.min_len, args.max_len)
        inputs, targets, mask = segments_to_padded(segments)
        start = time.perf_counter()
        loss = lm_loss(model, inputs, targets, mask, packed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)    # the step's time, not its launch
        step_times.append(time.perf_counter() - start)
        step_tokens.append(int(mask.sum()))
        step_slots.append(mask.numel())
        losses.append(loss.item())
        recent = float(np.mean(losses[-10:]))
        bar.set_postfix(loss=f"{recent:.3f}", bpb=f"{recent / math.log(2):.3f}",
                        tok_s=f"{step_tokens[-1] / step_times[-1]:.0f}")
    skip = min(5, args.steps // 5)  # warm-up steps left out of the throughput
    tokens_per_s = sum(step_tokens[skip:]) / max(sum(step_times[skip:]), 1e-9)

    val_bpb = evaluate_bpb(model, val_segments)
    prompt = b"def "
    check = check_decode(model, prompt, args.sample_bytes, args.temperature, seed=args.seed)
    return dict(mixer=mixer, params=params, steps=args.steps, tokens_per_step=args.tokens_per_step,
                batching=args.batching, padding_fraction=1 - sum(step_tokens) / sum(step_slots),
                train_loss=float(np.mean(losses[-10:])), train_bpb=float(np.mean(losses[-10:])) / math.log(2),
                first_loss=losses[0], val_bpb=val_bpb, train_tokens_per_s=tokens_per_s,
                train_seconds=sum(step_times), prompt=prompt, device=str(device), **check)


def write_lm_report(records: List[dict], info: dict, args, command: str) -> None:
    """Writes ``lm.md`` and ``lm.csv`` (``lm_padded.*`` for padded batches) under ``args.out_dir``."""
    os.makedirs(args.out_dir, exist_ok=True)
    stem = "lm" if args.batching == "packed" else "lm_padded"
    cols = ["mixer", "params", "steps", "batching", "train_tokens_per_s", "first_loss", "train_bpb", "val_bpb",
            "same_bytes", "max_abs_logit_diff", "state_numel_constant", "state_numel", "decode_bytes_per_s"]
    with open(os.path.join(args.out_dir, stem + ".csv"), "w") as f:
        f.write(",".join(cols) + "\n")
        for r in records:
            f.write(",".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + "\n")
    lines = [
        "# Byte-level LM on the Python standard library", "",
        f"Made by `{command}` (torch {torch.__version__}, Python {info['python']} stdlib, "
        f"{torch.get_num_threads()} thread(s), on {', '.join(sorted({r['device'] for r in records}))}, shared machine: "
        "throughput is indicative).",
        f"Corpus: {info['train_docs']} train files / {info['train_bytes']} bytes, {info['val_docs']} held-out files / "
        f"{info['val_bytes']} bytes. Model: d_model {args.d_model}, {args.layers} blocks; "
        f"{args.tokens_per_step} tokens per step in {args.batching} batches of segments {args.min_len}-{args.max_len} "
        f"bytes; AdamW lr {args.lr}.",
        "Decode check: the stateful decode path (prefill, then one byte per call with the carried state) vs "
        "recomputing the full prefix for every byte"
        f" ({args.sample_bytes} bytes, temperature {args.temperature}).", "",
        "| mixer | params | steps | train tok/s (real tokens) | first loss (nats) | train bpb | val bpb | decode == recompute "
        "| max abs logit diff | state numel (constant) | decode bytes/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['mixer']} | {r['params']} | {r['steps']} | {r['train_tokens_per_s']:.0f} | "
                     f"{r['first_loss']:.3f} | {r['train_bpb']:.3f} | {r['val_bpb']:.3f} | {r['same_bytes']} | "
                     f"{r['max_abs_logit_diff']:.2e} | {r['state_numel']} ({r['state_numel_constant']}) | "
                     f"{r['decode_bytes_per_s']:.0f} |")
    lines += ["", "Samples (prompt `def `):", ""]
    for r in records:
        text = r["sample"].decode("utf-8", errors="replace").replace("```", "'''")
        lines += [f"{r['mixer']}:", "```", "def " + text, "```", ""]
    with open(os.path.join(args.out_dir, stem + ".md"), "w") as f:
        f.write("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench.tasks.lm``."""
    parser = argparse.ArgumentParser(prog="python -m bench.tasks.lm", description=__doc__,
                                     formatter_class=HelpFormatter, epilog=MIXER_SPEC_HELP)
    parser.add_argument("--mixers", default="rglru", help="comma-separated mixer specs, one model each (see below)")
    parser.add_argument("--d-model", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="number of blocks")
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--tokens-per-step", type=int, default=2048, help="real (non-padding) bytes per step")
    parser.add_argument("--min-len", type=int, default=32, help="shortest training segment (bytes)")
    parser.add_argument("--max-len", type=int, default=512, help="longest training segment (bytes)")
    parser.add_argument("--batching", choices=("packed", "padded"), default="packed",
                        help="packed: one row with cu_seqlens; padded: an (N, L_max) batch with a masked loss")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--train-bytes", type=int, default=4_000_000, help="bytes of the training split")
    parser.add_argument("--val-bytes", type=int, default=64_000, help="bytes of the held-out split")
    parser.add_argument("--sample-bytes", type=int, default=64, help="bytes generated for the decode check")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the batches and the sample")
    add_device_option(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--write", action="store_true", help="write lm.md / lm.csv under --out-dir")
    parser.add_argument("--out-dir", default=RESULTS_DIR, help="folder of the --write files")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Trains one LM per mixer, prints each, and writes the table with ``--write``."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    train_docs, val_docs, info = load_corpus(args.train_bytes, args.val_bytes)
    print(f"corpus: Python {info['python']} stdlib at {info['root']}: {info['train_docs']} train files "
          f"({info['train_bytes']} B), {info['val_docs']} held-out files ({info['val_bytes']} B)")
    val_segments = validation_segments(val_docs, args.max_len)
    records = []
    for mixer in filter(None, args.mixers.split(",")):
        r = train_lm(mixer, train_docs, val_segments, args, device)
        records.append(r)
        print(f"{mixer:10s} params {r['params']} | loss {r['first_loss']:.3f} -> {r['train_loss']:.3f} nats "
              f"(train bpb {r['train_bpb']:.3f}) | val bpb {r['val_bpb']:.3f} | {r['train_tokens_per_s']:.0f} tok/s "
              f"({r['batching']}, padding {r['padding_fraction']:.0%}) | decode == recompute: {r['same_bytes']} "
              f"(max |dlogit| {r['max_abs_logit_diff']:.1e}, state numel {r['state_numel']} constant: "
              f"{r['state_numel_constant']}, {r['decode_bytes_per_s']:.0f} B/s)", flush=True)
        print("  sample: " + repr((r["prompt"] + r["sample"]).decode("utf-8", errors="replace")), flush=True)
    if args.write:
        command = "python -m bench.tasks.lm " + " ".join(argv if argv is not None else sys.argv[1:])
        write_lm_report(records, info, args, command)
        print(f"wrote {args.out_dir}/{'lm' if args.batching == 'packed' else 'lm_padded'}.{{md,csv}}")


if __name__ == "__main__":
    main()
