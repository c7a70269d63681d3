"""The one-pass feature scan (interpret/scan.py) and its sources (interpret/sources.py) against a
brute-force computation over all activations at once."""

import math
from collections import Counter

import pytest
import torch

from saelab.errors import ConfigError, DataError
from saelab.interpret.scan import ScanConfig, scan_features
from saelab.interpret.sources import (ContextBatch, active_features, context_batches, example_acts,
                                      feature_acts, nonzero_acts)
from saelab.interpret.sampling import (first_per_group, fine_bin, hash_keys,
                                       pow2_exponent)
from saelab.sae import SAE

N_CTX, SEQ, D_IN, D_SAE, VOCAB = 30, 12, 8, 16, 20


def _splitmix_ref(x: int) -> int:
    m = (1 << 64) - 1
    x &= m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def _hash_ref(values, seed):
    x = _splitmix_ref(seed)
    for v in values:
        x = _splitmix_ref(x + v * 0x9E3779B97F4A7C15)
    return min(x & ((1 << 63) - 1), (1 << 63) - 2)


def test_hash_keys_match_python_splitmix():
    a, b = torch.tensor([0, 1, 5, 123456789]), torch.tensor([3, 0, 7, 2])
    got = hash_keys(a, b, seed=11).tolist()
    assert got == [_hash_ref((x, y), 11) for x, y in zip(a.tolist(), b.tolist())]
    assert hash_keys(a, b, seed=12).tolist() != got


def test_first_per_group_against_sorting():
    g = torch.tensor([2, 0, 2, 1, 0, 2, 2, 0])
    o = torch.tensor([5, 3, 1, 9, 4, 7, 2, 8])
    idx, rank = first_per_group(g, o, 2)
    got = sorted(zip(g[idx].tolist(), rank.tolist(), o[idx].tolist()))
    assert got == [(0, 0, 3), (0, 1, 4), (1, 0, 9), (2, 0, 1), (2, 1, 2)]


def test_pow2_exponent_and_bins():
    x = torch.tensor([0.3, 0.5, 1.0, 1.5, 4.0, 5.0])
    assert pow2_exponent(x).tolist() == [math.ceil(math.log2(v)) for v in x.tolist()]
    e = torch.tensor([2] * 4)  # R = 4, bins (0,1], (1,2], (2,3], (3,4]
    assert fine_bin(torch.tensor([0.5, 1.0, 1.01, 4.0]), e, 4).tolist() == [0, 0, 1, 3]


def _data(seed=0):
    torch.manual_seed(seed)
    sae = SAE(D_IN, D_SAE, arch="relu")
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.fill_(-1.5)  # sparse: most activations zero
    sae.cfg.hook_name = "blocks.0.hook_resid_post"
    acts = torch.randn(N_CTX, SEQ, D_IN)
    tokens = torch.randint(0, VOCAB, (N_CTX, SEQ))
    return sae, acts, tokens


def _batches(acts, tokens, bs):
    for s in range(0, N_CTX, bs):
        yield ContextBatch(tokens[s:s + bs], torch.arange(s, min(s + bs, N_CTX)), acts[s:s + bs])


def _brute_quantiles(v, r, p, j, mx, cfg):
    """Uniform examples per final bin, computed directly from the formula in sampling.py."""
    exp = math.ceil(math.log2(mx))
    width = 2.0 ** exp / cfg.n_fine
    m = math.ceil(mx / width)
    out = [[] for _ in range(cfg.n_quantiles)]
    keys = hash_keys(r, p, torch.full_like(r, j), seed=cfg.seed)
    for val, row, pos, key in zip(v.tolist(), r.tolist(), p.tolist(), keys.tolist()):
        fine = max(math.ceil(val / width) - 1, 0)
        out[min(fine * cfg.n_quantiles // m, cfg.n_quantiles - 1)].append((key, val, row, pos))
    return [sorted(b)[:cfg.per_quantile] for b in out]


@pytest.mark.parametrize("batch_size,table_max,capacity", [
    (7, 10**9, 64),  # dense token table
    (1, 0, 64),  # token slots, never full: exact
    (30, 0, 3),  # token slots, full: counts are lower bounds
])
def test_scan_matches_brute_force(batch_size, table_max, capacity):
    sae, acts, tokens = _data()
    cfg = ScanConfig(top_k=4, n_quantiles=3, per_quantile=2, n_fine=16, seed=5,
                     token_table_max=table_max, token_capacity=capacity)
    scan = scan_features(_batches(acts, tokens, batch_size), sae, config=cfg, vocab_size=VOCAB)
    with torch.no_grad():
        f = sae.encode(acts)  # (N_CTX, SEQ, D_SAE)
    assert scan.n_tokens == N_CTX * SEQ
    torch.testing.assert_close(scan.density, (f > 0).double().mean((0, 1)))
    torch.testing.assert_close(scan.max_act, f.amax((0, 1)))
    q = scan.quantiles()
    for j in range(D_SAE):
        fj = f[..., j]
        r, p = torch.nonzero(fj > 0, as_tuple=True)
        v = fj[r, p]
        if v.numel() == 0:
            assert scan.top_examples(j) == [] and scan.act_hist(j) == ([], [])
            continue
        assert scan.mean_act[j].item() == pytest.approx(v.double().mean().item())
        ctx_max, argpos = fj.max(1)
        want = sorted(((ctx_max[i].item(), i, argpos[i].item()) for i in range(N_CTX)
                       if ctx_max[i] > 0), reverse=True)[:4]
        assert scan.top_examples(j) == want
        edges, counts = scan.act_hist(j)
        want_counts, _ = torch.histogram(v.double(), torch.tensor(edges, dtype=torch.float64))
        assert counts == want_counts.long().tolist() and sum(counts) == v.numel()
        assert edges[-2] < v.max().item() <= edges[-1]
        for (lo, hi, items), want_bin in zip(q.of(j), _brute_quantiles(v, r, p, j, v.max().item(), cfg)):
            assert sorted(items) == sorted((b, c, d) for _, b, c, d in want_bin)
            assert all(lo < a <= hi for a, _, _ in items)
        counter = Counter(tokens[r, p].tolist())
        top = scan.top_tokens(j, 3)
        if capacity >= VOCAB:  # exact: counts and mean activation per token id
            assert [c for _, c, _ in top] == sorted(counter.values(), reverse=True)[:3]
            for tok, c, mean in top:
                assert c == counter[tok]
                assert mean == pytest.approx(v[tokens[r, p] == tok].double().mean().item())
        else:  # capped: counts never exceed the truth
            assert all(c <= counter[tok] for tok, c, _ in top)


def test_quantile_bins_cover_range_and_sample_uniformly():
    """One feature, many tokens: every bin is filled and the edges partition [0, max]."""
    torch.manual_seed(1)
    sae = SAE(1, 1, arch="relu")
    with torch.no_grad():
        sae.W_enc.fill_(1.0), sae.b_enc.zero_(), sae.b_dec.zero_()
    acts = torch.rand(50, 40, 1) * 3.0
    cfg = ScanConfig(n_quantiles=6, per_quantile=4)
    scan = scan_features([ContextBatch(acts.new_zeros(50, 40).long(), None, acts)], sae,
                         config=cfg, vocab_size=2)
    bins = scan.quantiles().of(0)
    assert bins[0][0] == 0.0 and bins[-1][1] == pytest.approx(acts.max().item())
    assert all(a[1] == b[0] for a, b in zip(bins, bins[1:]))
    widths = [hi - lo for lo, hi, _ in bins]
    assert max(widths) - min(widths) <= 2 * 4.0 / 64  # equal to within a fine bin (R = 4)
    assert all(len(items) == 4 for _, _, items in bins)
    for lo, hi, items in bins:
        for act, row, pos in items:
            assert acts[row, pos, 0].item() == pytest.approx(act)


def test_rows_default_to_running_count_and_errors():
    sae, acts, tokens = _data()
    scan = scan_features((ContextBatch(tokens[s:s + 8], None, acts[s:s + 8])
                          for s in range(0, N_CTX, 8)), sae, vocab_size=VOCAB)
    rows = {r for j in range(D_SAE) for _, r, _ in scan.top_examples(j)}
    assert rows and max(rows) < N_CTX
    with pytest.raises(ConfigError, match="vocab_size"):
        scan_features([], sae)
    with pytest.raises(DataError, match="NaN"):
        bad = acts[:2].clone()
        bad[0, 0, 0] = float("nan")
        scan_features([ContextBatch(tokens[:2], None, bad)], sae, vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="n_quantiles"):
        ScanConfig(n_quantiles=40, n_fine=64).validate()


def test_example_acts_windows():
    sae, acts, tokens = _data()
    with torch.no_grad():
        f = sae.encode(acts)
    calls = []

    def encode_rows(rows):
        calls.append(rows.tolist())
        return f[rows]

    rows, pos, feat = torch.tensor([3, 0, 3, 29]), torch.tensor([0, 5, 11, 6]), torch.tensor([1, 2, 3, 4])
    got = example_acts(encode_rows, rows, pos, feat, window=(2, 1), batch_size=2)
    assert calls == [[0, 3], [29]]  # each context encoded once
    want_starts = [0, 3, 9, 4]
    for (start, a), r, p, j, s in zip(got, rows, pos, feat, want_starts):
        assert start == s
        torch.testing.assert_close(a, f[r, s:min(SEQ, p + 2), j])
    full = example_acts(encode_rows, rows, pos, feat)
    torch.testing.assert_close(full[1][1], f[0, :, 2])


def test_live_scan_equals_precomputed(tiny_hf_model_dirs):
    from saelab.lm.hooked import HookedLM

    lm = HookedLM.load(tiny_hf_model_dirs["gpt_neox"])
    hook = "blocks.1.hook_resid_post"
    torch.manual_seed(0)
    sae = SAE(lm.hook_dim(hook), 24, arch="topk", k=4, hook_name=hook)
    contexts = torch.randint(0, 64, (10, 16))
    live = scan_features(context_batches(contexts, 4), sae, lm)
    acts = lm.run_with_cache(contexts, [hook])[hook]
    pre = scan_features(_batches_of(contexts, acts), sae, vocab_size=lm.W_E.shape[0])
    torch.testing.assert_close(live.density, pre.density)
    assert [live.top_examples(j) for j in range(24)] == [pre.top_examples(j) for j in range(24)]
    torch.testing.assert_close(feature_acts(sae, lm, contexts), sae.encode(acts))


def _batches_of(contexts, acts):
    yield ContextBatch(contexts, torch.arange(len(contexts)), acts)


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_active_features_equal_the_dense_encoding(arch):
    """The sparse path (topk's values and indices) lists exactly the nonzero entries of encode."""
    torch.manual_seed(0)
    sae = SAE(16, 40, arch=arch, k=5 if arch == "topk" else None).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)  # some negative pre-activations: topk keeps relu'd zeros out
        x = torch.randn(3, 7, 16)
        got, want = active_features(sae, x), nonzero_acts(sae.encode(x).reshape(21, 40))
    order = torch.argsort(got.tok_i * 40 + got.feat)
    assert torch.equal(got.tok_i[order], want.tok_i) and torch.equal(got.feat[order], want.feat)
    assert torch.equal(got.value[order], want.value) and len(want.value) > 0


def test_quantile_bins_count_every_active_token_once():
    sae, acts, tokens = _data()
    cfg = ScanConfig(n_quantiles=3, n_fine=16)
    scan = scan_features(_batches(acts, tokens, 7), sae, config=cfg, vocab_size=VOCAB)
    with torch.no_grad():
        f = sae.encode(acts)
    q = scan.quantiles()
    for j in range(D_SAE):
        v = f[..., j][f[..., j] > 0]
        counts = q.counts_of(j)
        assert sum(counts) == v.numel() == int(scan.count[j])
        for (lo, hi, _), n in zip(q.of(j), counts):
            if v.numel():
                assert n == int(((v > lo) & (v <= hi)).sum()), (j, lo, hi)


def test_token_pairs_are_every_ordered_pair_on_a_token():
    from saelab.interpret.scan import token_pairs

    tok_i = torch.tensor([0, 0, 0, 2, 5, 5])
    a, b = token_pairs(tok_i)
    want = {(x, y) for x in range(6) for y in range(6) if x != y and tok_i[x] == tok_i[y]}
    assert set(zip(a.tolist(), b.tolist())) == want and len(a) == len(want)
    tracked = torch.tensor([False, True, False, False, True, False])
    a, b = token_pairs(tok_i, tracked)
    assert set(zip(a.tolist(), b.tolist())) == {(x, y) for x, y in want if tracked[x]}
    assert [t.numel() for t in token_pairs(tok_i[:0])] == [0, 0]


@pytest.mark.parametrize("table_max,capacity", [(10**9, 32), (0, D_SAE)])  # dense table; slots that never fill
def test_coactive_partners_are_the_features_most_correlated(table_max, capacity):
    sae, acts, tokens = _data(3)
    tracked = [0, 5, 11]
    cfg = ScanConfig(coactive_table_max=table_max, coactive_capacity=capacity)
    scan = scan_features(_batches(acts, tokens, 7), sae, config=cfg, vocab_size=VOCAB, coactive=torch.tensor(tracked))
    with torch.no_grad():
        fires = (sae.encode(acts) > 0).reshape(-1, D_SAE).double()  # (tokens, d_sae)
    corr = torch.corrcoef(fires.T)  # Pearson correlation of the indicators: phi
    together = fires.T @ fires
    for j in range(D_SAE):
        got = scan.coactive_partners(j, n=4)
        if j not in tracked:
            assert got == []
            continue
        want = sorted(((-corr[j, b].item(), b) for b in range(D_SAE)
                       if b != j and corr[j, b] > 0 and not torch.isnan(corr[j, b])))[:4]
        assert [b for b, _, _ in got] == [b for _, b in want]
        for b, n, phi in got:
            assert n == int(together[j, b]) and phi == pytest.approx(corr[j, b].item(), rel=1e-6)
    assert scan_features(_batches(acts, tokens, 7), sae, vocab_size=VOCAB).coactive_partners(0) == []


def test_coactivation_over_budget_counts_a_regular_sample_of_tokens():
    from saelab.interpret.scan import CoActivation

    # 6 positions; features active per position: 0:{0,1,2} 1:{0,1} 2:{1,2} 3:{0,2} 4:{0,1,2} 5:{}
    active = {0: [0, 1, 2], 1: [0, 1], 2: [1, 2], 3: [0, 2], 4: [0, 1, 2]}
    tok_i = torch.tensor([t for t, fs in active.items() for _ in fs])
    feat = torch.tensor([f for fs in active.values() for f in fs])
    kept = torch.ones(6, dtype=torch.bool)
    full = CoActivation(torch.tensor([0]), 3, ScanConfig())
    full.update(tok_i, feat, kept)
    assert full.n_tokens == 6 and full.count.tolist() == [4, 4, 4]
    assert sorted(full.counts.top(0, 3)) == [(1, 3, 1.0), (2, 3, 1.0)]
    # tracked feature 0 has 4 entries on tokens of sizes 3, 2, 2, 3: 10 pairs; a budget of 4 takes every 3rd token
    sampled = CoActivation(torch.tensor([0]), 3, ScanConfig(coactive_max_pairs=4))
    sampled.update(tok_i, feat, kept)
    assert sampled.n_tokens == 2 and sampled.count.tolist() == [2, 1, 2]  # positions 0 and 3 only
    assert sorted(sampled.counts.top(0, 3)) == [(1, 1, 1.0), (2, 2, 1.0)]
