"""Tests for the end-to-end task benchmarks in ``bench/tasks``.

* the state-tracking generators' labels agree with a direct computation (bit loops, Python's
  own evaluation of the arithmetic expressions, products of permutation matrices);
* padding masks turn into the right ``cu_seqlens`` and packing round-trips;
* a tiny model over each linrec layer gives the same outputs packed (``cu_seqlens``) as one
  sequence at a time, trains for a few steps with its loss going down, and generates the same
  bytes by stateful decoding as by recomputing the whole prefix.
"""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `bench`

from bench.tasks import data  # noqa: E402
from bench.tasks.lm import (BOS, check_decode, generate_decode, generate_recompute, lm_loss,  # noqa: E402
                            sample_segments, segments_to_padded)
from bench.tasks.models import (SequenceModel, build_mixer, lengths_to_cu_seqlens,  # noqa: E402
                                mask_to_cu_seqlens, pack_padded, unpack_to_padded)

MIXERS = ["rglru", "rglru-neg", "lru", "dp2-neg", "dp1-gate", "bd-fan", "bd-slice", "mamba-neg"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest (and does not thrash shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------

def test_parity_matches_direct_xor():
    tokens, targets, valid = data.gen_parity(np.random.default_rng(0), 16, 50)
    assert valid.all()
    for row, labels in zip(tokens, targets):
        acc = 0
        for t, bit in enumerate(row):
            acc ^= int(bit)
            assert labels[t] == acc


def test_even_pairs_counts_substrings():
    tokens, targets, _ = data.gen_even_pairs(np.random.default_rng(1), 16, 30)
    for row, labels in zip(tokens, targets):
        s = "".join("ab"[b] for b in row)
        for t in range(len(s)):
            prefix = s[:t + 1]
            pairs = sum(prefix[i:i + 2] in ("ab", "ba") for i in range(len(prefix) - 1))
            assert labels[t] == int(pairs % 2 == 0)


def test_cycle_navigation_walks_the_cycle():
    tokens, targets, _ = data.gen_cycle_nav(np.random.default_rng(2), 16, 40)
    for row, labels in zip(tokens, targets):
        pos = 0
        for t, move in enumerate(row):
            pos = (pos + {0: 0, 1: 1, 2: -1}[int(move)]) % 5
            assert labels[t] == pos


def test_mod_arith_matches_python_eval():
    """Labels equal Python's evaluation (usual precedence) of every complete prefix, mod 5."""
    tokens, targets, valid = data.gen_mod_arith(np.random.default_rng(3), 24, 20)
    assert tokens.shape[1] == 21  # even lengths are rounded up to a complete expression
    symbols = {data.OP_PLUS: "+", data.OP_MINUS: "-", data.OP_TIMES: "*"}
    for row, labels, ok in zip(tokens, targets, valid):
        text = "".join(symbols.get(int(tok), str(int(tok))) for tok in row)
        for t in range(len(row)):
            assert ok[t] == (t % 2 == 0)
            if ok[t]:
                assert labels[t] == eval(text[:t + 1]) % 5  # noqa: S307 - digits and + - * only


@pytest.mark.parametrize("name,order", [("s3", 6), ("s5", 120), ("a5", 60)])
def test_group_word_problem_is_product_of_permutation_matrices(name, order):
    group = data.get_group(name)
    assert len(group) == order and group.elements[0] == tuple(range(group.n))
    if name == "a5":
        assert all(data.permutation_parity(p) == 0 for p in group.elements)
    tokens, targets, _ = data.make_group_generator(name)(np.random.default_rng(4), 8, 25)
    for row, labels in zip(tokens, targets):
        product = np.eye(group.n, dtype=np.int64)
        for t, g in enumerate(row):
            product = product @ group.matrix(int(g))
            assert np.array_equal(product, group.matrix(int(labels[t])))


def test_train_batch_lengths_and_bos():
    task = data.get_task("parity")
    tokens, targets, valid = data.sample_train_batch(task, np.random.default_rng(5), 64)
    lengths = valid.sum(1)
    assert lengths.min() >= task.train_lengths[0] and lengths.max() <= task.train_lengths[1]
    assert all(valid[i, :n].all() and not valid[i, n:].any() for i, n in enumerate(lengths))
    tokens2, targets2, valid2 = data.add_bos(tokens, targets, valid, bos=task.vocab_size)
    assert (tokens2[:, 0] == task.vocab_size).all() and not valid2[:, 0].any()
    assert np.array_equal(tokens2[:, 1:], tokens) and np.array_equal(valid2[:, 1:], valid)


# --------------------------------------------------------------------------------------------
# Padding masks and packing
# --------------------------------------------------------------------------------------------

def test_mask_to_cu_seqlens_right_left_and_empty_rows():
    mask = torch.tensor([[1, 1, 1, 0, 0],     # right padded, 3
                         [0, 0, 1, 1, 1],     # left padded, 3
                         [0, 0, 0, 0, 0],     # empty: dropped
                         [1, 1, 1, 1, 1]], dtype=torch.bool)
    cu = mask_to_cu_seqlens(mask)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 6, 11]
    x = torch.arange(20).view(4, 5)
    packed, cu2 = pack_padded(x, mask)
    assert torch.equal(cu2, cu)
    assert packed.tolist() == [[0, 1, 2, 7, 8, 9, 15, 16, 17, 18, 19]]
    back = unpack_to_padded(packed, mask, fill=-1)
    assert torch.equal(back, torch.where(mask, x, torch.full_like(x, -1)))
    assert lengths_to_cu_seqlens([3, 3, 5]).tolist() == [0, 3, 6, 11]
    with pytest.raises(ValueError):
        mask_to_cu_seqlens(mask.long())


# --------------------------------------------------------------------------------------------
# Models over linrec layers
# --------------------------------------------------------------------------------------------

def tiny_lm(mixer: str, seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel(257, 256, d_model=16, num_layers=2, mixer=mixer)


@pytest.mark.parametrize("mixer", MIXERS)
def test_packed_batch_equals_separate_sequences(mixer):
    model = tiny_lm(mixer)
    rng = np.random.default_rng(6)
    segments = [rng.integers(0, 256, size=n).astype(np.uint8) for n in (7, 2, 12)]
    inputs, targets, mask = segments_to_padded(segments)
    tokens, cu_seqlens = pack_padded(inputs, mask)
    with torch.no_grad():
        packed_logits = unpack_to_padded(model(tokens, cu_seqlens=cu_seqlens), mask)
        for i, seg in enumerate(segments):
            alone = model(inputs[i:i + 1, :len(seg)])
            torch.testing.assert_close(packed_logits[i, :len(seg)], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mixer", MIXERS)
def test_tiny_model_loss_drops(mixer):
    """A few AdamW steps on a fixed packed batch of text lower the loss."""
    model = tiny_lm(mixer)
    text = np.frombuffer(open(data.__file__, "rb").read()[:4000], dtype=np.uint8)
    segments = sample_segments([text], np.random.default_rng(7), 256, 16, 64)
    inputs, targets, mask = segments_to_padded(segments)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = lm_loss(model, inputs, targets, mask, packed=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_equals_recompute(mixer):
    """Sampling (temperature 1) and greedy decoding with the carried state match recomputation."""
    model = tiny_lm(mixer, seed=1)
    prompt = b"import os\n"
    out_dec, logits_dec, sizes = generate_decode(model, prompt, 8, temperature=1.0, seed=3)
    out_full, logits_full = generate_recompute(model, prompt, 8, temperature=1.0, seed=3)
    assert out_dec == out_full
    torch.testing.assert_close(logits_dec, logits_full, atol=1e-4, rtol=1e-4)
    assert len(set(sizes)) == 1 and sizes[0] > 0  # constant memory per token
    greedy = check_decode(model, prompt, 4, temperature=0.0)
    assert greedy["same_bytes"] and greedy["max_abs_logit_diff"] < 1e-4 and greedy["state_numel_constant"]


def test_mixer_specs_set_the_layer_options():
    dp = build_mixer("dp3-neg-gate-h4-noconv", 32)
    assert (dp.num_householder, dp.num_heads, dp.head_dim, dp.allow_neg_eigval, dp.use_gate, dp.conv_size) == \
        (3, 4, 8, True, True, 0)
    assert build_mixer("dp1", 32).conv_size == 4 and not build_mixer("dp1", 32).allow_neg_eigval
    rg = build_mixer("rglru-neg-noconv", 32)
    assert rg.allow_neg_eigval and rg.conv is None
    bd = build_mixer("bd-slice-b4-p1", 32)
    assert (bd.parameterization, bd.block_size, bd.num_blocks, bd.p) == ("slice", 4, 8, 1.0)
    assert build_mixer("bd-fan", 32).p == 1.0 and build_mixer("bd-fan-p1.2", 32).p == 1.2
    bd = build_mixer("bd-fan-max-center-p1.2", 32)
    assert (bd.column_norm, bd.center_columns, bd.p) == ("max", True, 1.2)
    assert (build_mixer("bd-fan", 32).column_norm, build_mixer("bd-fan", 32).center_columns) == ("clamp", False)
    assert build_mixer("dp1-neg-hard", 32).beta_stretch == 0.1 and build_mixer("dp1-neg", 32).beta_stretch == 0.0
    mamba = build_mixer("mamba-neg-s8-noconv", 32)
    assert mamba.negative_eigenvalues and mamba.d_state == 8 and mamba.d_conv == 0
    assert not build_mixer("mamba", 32).negative_eigenvalues and build_mixer("mamba", 32).d_state == 16
    for spec in ("dp2-fast", "rglru-hard", "lru-neg", "bd-fan-noconv"):
        with pytest.raises(ValueError, match="do not apply"):
            build_mixer(spec, 32)
    with pytest.raises(ValueError, match="divisible"):
        build_mixer("bd-fan-b5", 32)


def test_claims_report_picks_the_best_run_of_the_layer_and_its_variants():
    from bench.tasks.state_tracking import RunConfig, claim_lines, is_variant

    assert is_variant("dp1-neg-noconv", "dp1-neg") and is_variant("bd-fan-b64", "bd-fan")
    assert is_variant("bd-fan-max-center-p1.2", "bd-fan")
    assert not is_variant("dp1", "dp1-neg") and not is_variant("dp1-neg-gate", "dp1-neg")
    assert not is_variant("dp1-neg-hard", "dp1-neg")     # another beta map: its own row of the claim

    def record(mixer, seed, accs, layers=1):
        cfg = RunConfig(task="parity", mixer=mixer, num_layers=layers, steps=100, seed=seed)
        return dict(config=cfg.__dict__, test_acc=dict(zip(("40", "64", "128", "256"), accs)))

    records = [record("dp1-neg", 0, (1.0, 1.0, 0.9, 0.6)), record("dp1-neg-noconv", 1, (1.0, 1.0, 1.0, 0.97)),
               record("dp1", 0, (0.5, 0.5, 0.5, 0.5))]
    rows = [line for line in claim_lines(records, 0.95) if line.startswith("| parity: DeltaProduct") or
            line.startswith("|  | dp1 x1")]
    assert "dp1-neg-noconv x1 | 2 | 100 | 1 | 0.970 |" in rows[0] and rows[0].endswith("| solved | yes |")
    assert rows[1].endswith("| not solved | yes |")


def test_sample_segments_fill_the_budget_exactly():
    docs = [np.arange(n, dtype=np.uint8) for n in (2, 3, 50, 400)]
    for seed in range(20):
        segments = sample_segments(docs, np.random.default_rng(seed), 301, 2, 64)
        assert sum(s.size for s in segments) == 301 and all(s.size >= 1 for s in segments)


def test_bos_prefix_is_in_inputs():
    inputs, targets, mask = segments_to_padded([np.array([10, 20, 30], dtype=np.uint8)])
    assert inputs[0].tolist() == [BOS, 10, 20] and targets[0].tolist() == [10, 20, 30] and mask.all()


def test_beta_probe_reads_token_betas_and_restores_the_layer():
    from bench.tasks.beta_probe import snapped_accuracy, token_betas

    torch.manual_seed(0)
    task = data.get_task("parity")
    model = SequenceModel(task.vocab_size + 1, task.num_classes, 16, 1, "dp1-neg-noconv").eval()
    beta = token_betas(model)
    assert beta.shape == (3, 1, 2) and ((beta > 0) & (beta < 2)).all()
    mixer = model.blocks[0].mixer
    x = torch.randn(1, 5, 16)
    before = mixer.betas(x)
    accs = snapped_accuracy(model, task, seed=0, snap_above=0.0)     # every beta set to 2 while scoring
    assert set(accs) == {40, 64, 128, 256, 512} and all(0.0 <= a <= 1.0 for a in accs.values())
    assert "betas" not in vars(mixer) and torch.equal(mixer.betas(x), before)


def test_state_tracking_saves_runs_only_with_write_and_reruns_when_asked(tmp_path, monkeypatch, capsys):
    """Without ``--write`` nothing is saved and every run runs; with it a run already in the file is
    skipped (saying how to force it) and ``--rerun`` replaces its line. Training is stubbed out:
    this checks the command line, not the model."""
    import bench.common
    from bench.tasks import state_tracking

    assert state_tracking.git_sha is bench.common.git_sha      # one git-SHA helper
    trained = []

    def fake_train_and_evaluate(cfg, progress=True, device=None):
        trained.append((cfg.key(), device))
        return dict(key=cfg.key(), config=cfg.__dict__, test_acc={"40": 1.0}, final_train_loss=0.1,
                    final_train_acc=1.0, train_seconds=0.0, attempt=len(trained))

    monkeypatch.setattr(state_tracking, "train_and_evaluate", fake_train_and_evaluate)
    results = tmp_path / "runs.jsonl"
    argv = ["--tasks", "parity", "--mixers", "lru", "--steps", "3", "--results", str(results), "--device", "cpu"]

    state_tracking.main(argv)
    state_tracking.main(argv)
    assert len(trained) == 2 and trained[0][1] == torch.device("cpu")
    assert not results.exists() and "--write" in capsys.readouterr().out

    state_tracking.main(argv + ["--write"])
    assert [r["attempt"] for r in state_tracking.load_results(str(results))] == [3]
    state_tracking.main(argv + ["--write"])
    assert len(trained) == 3 and "--rerun" in capsys.readouterr().out
    state_tracking.main(argv + ["--write", "--rerun"])
    assert len(trained) == 4 and [r["attempt"] for r in state_tracking.load_results(str(results))] == [4]
