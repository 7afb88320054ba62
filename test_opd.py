"""Tests of opd.py, in its order: properties of the math (hypothesis), cross-checks against
independent implementations, stabilizers on hand-built tensors, real runs of the command line,
bad input, and the docs. The studies', the pair's build and the TRL recipe's tests sit beside
their files (studies/, pair/, peers/).

    python -m pytest -q            # the whole suite, a few minutes on 2 CPU cores
"""
import contextlib
import copy
import importlib.util
import functools
import io
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import opd

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("pair_build", HERE / "pair" / "build.py")
build = sys.modules["pair_build"] = importlib.util.module_from_spec(_spec)   # pair/build.py: the toy pair
_spec.loader.exec_module(build)
settings.register_profile("opd", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("opd")


# ----------------------------------------------------------------------------- strategies and shared helpers

@st.composite
def logits_pair(draw, max_b=3, max_t=5, max_v=12, scale=8.0):
    B, T, V = draw(st.integers(1, max_b)), draw(st.integers(1, max_t)), draw(st.integers(2, max_v))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    s = draw(st.floats(0.1, scale))
    return torch.randn(B, T, V, generator=g, dtype=torch.float64) * s, torch.randn(B, T, V, generator=g, dtype=torch.float64) * s


@st.composite
def token_batch(draw, eos=2, vocab=6):
    """A (B, T) batch of rollouts with any EOS placement (none, first, last, middle), pad after EOS."""
    B, T = draw(st.integers(1, 5)), draw(st.integers(1, 10))
    rows = []
    for _ in range(B):
        body = draw(st.lists(st.sampled_from([0, 1, 3, 4, 5]), min_size=T, max_size=T))
        where = draw(st.one_of(st.none(), st.integers(0, T - 1)))
        if where is not None:
            body = body[:where] + [eos] + [0] * (T - where - 1)
        rows.append(body)
    return torch.tensor(rows)


def hand_mask(row, eos):
    """Plain-Python reference: tokens up to and including the first EOS."""
    out, stopped = [], False
    for tok in row:
        out.append(0.0 if stopped else 1.0)
        stopped = stopped or tok == eos
    return out, eos not in row


def direct_aggregate(loss, mask, mode, max_len):
    """Plain-Python reference of verl's four aggregation modes."""
    rows = [[(l, m) for l, m in zip(lr, mr)] for lr, mr in zip(loss.tolist(), mask.tolist())]
    if mode == "token-mean":
        return sum(l * m for r in rows for l, m in r) / max(sum(m for r in rows for _, m in r), 1e-8)
    sums = [sum(l * m for l, m in r) for r in rows]
    counts = [sum(m for _, m in r) for r in rows]
    if mode == "seq-mean-token-mean":
        per = [s / c for s, c in zip(sums, counts) if c > 0]
        return sum(per) / len(per) if per else 0.0
    if mode == "seq-mean-token-sum":
        return sum(sums) / len(sums)
    return sum(sums) / len(sums) / max_len


MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _heads(H, V, seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(H, V, bias=False).double(), torch.nn.Linear(H, V, bias=False).double()


@functools.lru_cache(maxsize=1)
def _small_model():
    torch.manual_seed(0)
    return build.make_model(build.build_tokenizer(), 2, 16).double()


# the shipped pair on tiny runs: 4 steps of 8 prompts, a 12-token budget, 8 held-out prompts
TINY = ["--batch-size", "8", "--steps", "4", "--eval-every", "2", "--eval-size", "8", "--max-new-tokens", "12",
        "--workers", "1", "--log-every", "1", "--log-samples-every", "2"]
METRIC_KEYS = [  # tutorial, the loop: every run logs them all
    "step", "loss/total", "loss/opd", "kl/reverse", "rollout/len_mean", "rollout/len_max",
    "rollout/len_p90", "rollout/trunc_rate", "rollout/rep_rate", "rollout/ngram_rep",
    "logp/student", "logp/teacher", "adv/mean", "adv/repetitive", "adv/regular",
    "adv/repetitive_frac", "eos/p_student", "eos/p_teacher", "eos/teacher_lower_frac",
    "eval/accuracy", "eval/len_mean", "eval/len_max", "eval/trunc_rate", "eval/rep_rate",
    "eval/ngram_rep", "eval/accuracy_sampled", "rollout/accuracy", "time/rollout_s",
    "time/teacher_s", "time/update_s", "time/eval_s", "time/tokens_per_s", "pos/adv",
    "pos/adv_positive", "pos/logp_teacher"]


def cli(*args, cwd=HERE, check=True):
    env = dict(os.environ, PYTHONPATH=str(HERE))
    r = subprocess.run([sys.executable, str(HERE / "opd.py"), *args], capture_output=True, text=True, cwd=cwd, env=env)
    if check and r.returncode != 0:
        raise AssertionError(r.stdout[-3000:] + r.stderr[-3000:])
    return r


SESSION = {}     # the session fixtures' results: the other test files import the fixtures, and pytest
                # would otherwise run a session fixture once for each file that names it


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    if "work" not in SESSION:
        d = tmp_path_factory.mktemp("e2e")
        cli(*TINY, "--methods", "opd", "--seeds", "1", "--out-dir", str(d / "runs"), "--plots-dir", str(d / "plots"))
        SESSION["work"] = d
    return SESSION["work"]


def refused(capsys, fn, *args, match):
    """fn(*args) stops with exit code 2 and one line on stderr that matches `match`."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and re.search(match, err), err
    return err


def rows_of(d, name):
    return opd.read_metrics(d / name / "metrics.jsonl")


def _tiny_cfg(work, method="opd", seed=0, flags=(), **overrides):
    """The tiny config of the command-line tests, as run_opd takes it (in-process); `flags` are
    given on the command line (they win over the preset), `overrides` set afterwards."""
    base, _, given = opd.parse_config(TINY + ["--out-dir", str(work / "inproc"), *flags])
    return opd.with_settings(opd.config_for(base, method, seed, given), **overrides)


CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer(vocab=32_000, eos="<|im_end|>"):
    """A byte-level BPE tokenizer of a realistic vocabulary size with a chat template, built
    locally (no download), like Qwen's: trained in ~2 s on generated syllable text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    rnd = random.Random(0)
    syl = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    words = sorted({"".join(rnd.choice(syl) for _ in range(rnd.randint(1, 4))) for _ in range(60_000)})
    corpus = [" ".join(rnd.choice(words) for _ in range(30)) for _ in range(4000)]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, pad_token="<|endoftext|>")
    tok.chat_template = CHAT
    return tok


def _real_pairs(d):
    tok = bpe_tokenizer()
    for arch in ("llama", "qwen2"):
        for role, layers, width in (("student", 1, 32), ("teacher", 2, 64)):
            torch.manual_seed(0)
            m = build.make_model(tok, layers, width, arch)
            m.save_pretrained(d / arch / role)
            tok.save_pretrained(d / arch / role)
    rows = [{"prompt": "bada kelo mi", "answer": "sute"}, {"prompt": "zo ruka", "answer": None}] * 8
    (d / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d, tok


@pytest.fixture(scope="session")
def real_pairs(tmp_path_factory):
    if "real_pairs" not in SESSION:
        SESSION["real_pairs"] = _real_pairs(tmp_path_factory.mktemp("real"))
    return SESSION["real_pairs"]


def _save_pair(d, tok_s, tok_t, arch="llama", scale=1.0):
    """A student (1 layer) and a teacher (2 layers) saved with their tokenizers; scale > 1 makes the
    random teacher a chaotic function of its input, so a changed prompt changes its log-probs."""
    for role, tok, layers, width in (("student", tok_s, 1, 32), ("teacher", tok_t, 2, 64)):
        torch.manual_seed({"student": 0, "teacher": 1}[role])
        m = build.make_model(tok, layers, width, arch)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(scale if role == "teacher" else 1.0)
        m.save_pretrained(d / role)
        tok.save_pretrained(d / role)
    return str(d / "student"), str(d / "teacher")


def _capture(monkeypatch):
    """Record what the loop passes to sample_rollouts (training calls only) and what token_terms returns."""
    seen = {"prompts": [], "terms": []}
    real_sample, real_terms = opd.sample_rollouts, opd.token_terms

    def sample(model, ids, attn, *a, greedy=False, **k):
        if not greedy and k.get("generator") is None:       # evaluation samples with a generator of its own
            seen["prompts"].append((ids, attn))
        return real_sample(model, ids, attn, *a, greedy=greedy, **k)

    def terms(h_s, head_s, h_t, head_t, tokens, *a, **k):
        out = real_terms(h_s, head_s, h_t, head_t, tokens, *a, **k)
        seen["terms"].append((tokens, {n: v.detach() for n, v in out._asdict().items() if v is not None}))
        return out

    monkeypatch.setattr(opd, "sample_rollouts", sample)
    monkeypatch.setattr(opd, "token_terms", terms)
    return seen


def _real_cfg(d, s_path, t_path, prompts, **kw):
    return opd.Config(**dict(dict(teacher=t_path, student=s_path, prompts=prompts, steps=2, batch_size=6,
                                  max_new_tokens=6, eval_every=10, log_samples_every=0, out_dir=str(d / "runs")), **kw))


def _teacher_scores(seen, tok, prompts_file, teacher, render):
    """For every training rollout the loop scored (recorded by _capture): the teacher's log-probs
    the loop computed, and those of a direct forward of the teacher on render(prompt) + the
    response ids. The prompt is found by the student's own rendering, so a rollout sampled from
    any other rendering fails here."""
    texts = sorted({json.loads(l)["prompt"] for l in Path(prompts_file).read_text().splitlines()})
    by_ids = {tuple(opd.prompt_token_ids(tok, [t])[0]): t for t in texts}
    out = []
    for (ids, attn), (resp, terms) in zip(seen["prompts"], seen["terms"]):
        _, lengths, _ = opd.response_mask(resp, tok.eos_token_id)
        for i in range(resp.shape[0]):
            text, y = by_ids[tuple(ids[i][attn[i].bool()].tolist())], resp[i, :lengths[i]]
            out.append((terms["logp_teacher"][i, :lengths[i]], _teacher_logp(teacher, render(text), y)))
    return out


def _teacher_logp(teacher, prompt_ids, y):
    """The teacher's log-probs of the response ids y after prompt_ids, from one plain forward."""
    with torch.no_grad():
        logits = teacher(torch.tensor([prompt_ids + y.tolist()])).logits[0, len(prompt_ids) - 1:-1]
    return F.log_softmax(logits.float(), -1).gather(-1, y[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------- OPD in one page

@given(logits_pair())
def test_full_kl_nonnegative(pair):
    a, b = pair
    kl = opd.full_vocab_reverse_kl(F.log_softmax(a, -1), F.log_softmax(b, -1))
    assert (kl >= -1e-12).all()


@given(logits_pair())
def test_full_kl_zero_iff_identical(pair):
    a, b = pair
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    assert opd.full_vocab_reverse_kl(la, la).abs().max() < 1e-10
    differs = (la - lb).abs().amax(-1) > 1e-3                 # distributions that differ somewhere
    assert (opd.full_vocab_reverse_kl(la, lb)[differs] > 0).all()


@given(logits_pair())
def test_full_kl_matches_torch_distributions(pair):
    a, b = pair
    ours = opd.full_vocab_reverse_kl(F.log_softmax(a, -1), F.log_softmax(b, -1))
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=a),
                                            torch.distributions.Categorical(logits=b))
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


@given(logits_pair(max_b=1, max_t=1, max_v=8, scale=2.0))
def test_sampled_token_estimator_is_unbiased_for_kl(pair):
    """mean over y ~ p_S of -A(y) = log p_S(y) - log p_T(y) approaches KL(p_S || p_T)."""
    a, b = pair
    ls, lt = F.log_softmax(a[0, 0], -1), F.log_softmax(b[0, 0], -1)
    n = 40_000
    y = torch.multinomial(ls.exp(), n, replacement=True, generator=torch.Generator().manual_seed(0))
    est = -opd.sampled_token_advantage(lt[y], ls[y])
    exact = opd.full_vocab_reverse_kl(ls, lt)
    assert abs(est.mean() - exact) < 6 * est.std() / math.sqrt(n) + 1e-6


@given(logits_pair(max_b=1, max_t=1, max_v=6, scale=2.0))
def test_sampled_token_gradient_matches_full_gradient(pair):
    """E_y[-A(y) grad log p_S(y)] = grad KL(p_S || p_T) at one position (the score-function identity)."""
    a, b = pair
    lt = F.log_softmax(b[0, 0], -1)
    theta = a[0, 0].clone().requires_grad_(True)
    ls = F.log_softmax(theta, -1)
    exact = torch.autograd.grad(opd.full_vocab_reverse_kl(ls, lt), theta)[0]
    n = 40_000
    y = torch.multinomial(ls.detach().exp(), n, replacement=True, generator=torch.Generator().manual_seed(1))
    theta2 = a[0, 0].clone().requires_grad_(True)
    ls2 = F.log_softmax(theta2, -1)
    adv = opd.sampled_token_advantage(lt[y], ls2[y])
    per = torch.stack([torch.autograd.grad(l, theta2, retain_graph=True)[0] for l in opd.sampled_token_loss(adv[:1], ls2[y][:1])])
    # per-sample gradients in closed form: -A (onehot(y) - p), vectorised for n samples
    p = ls2.detach().exp()
    grads = (-adv)[:, None] * (F.one_hot(y, p.numel()).double() - p)
    torch.testing.assert_close(per[0], grads[0])                # the closed form is the autograd gradient
    tol = 6 * grads.std(0) / math.sqrt(n) + 1e-6
    assert ((grads.mean(0) - exact).abs() <= tol).all()


@given(logits_pair(), st.integers(1, 12))
def test_topk_kl_is_a_kl_no_larger_than_the_full_one(pair, k):
    """Coarse-graining can only lower a KL (the data-processing inequality): 0 <= top-k + tail KL <=
    full KL; with k = V the tail is empty and the two agree."""
    a, b = pair
    ls, lt = F.log_softmax(a, -1), F.log_softmax(b, -1)
    full = opd.full_vocab_reverse_kl(ls, lt)
    top = opd.topk_reverse_kl(ls, lt, k)
    assert (top >= -1e-9).all() and (top <= full + 1e-9).all()
    torch.testing.assert_close(opd.topk_reverse_kl(ls, lt, a.shape[-1]), full, atol=1e-5, rtol=1e-5)


def test_topk_kl_hand_computed():
    """p_S = (0.5, 0.3, 0.2), p_T = (0.2, 0.2, 0.6), k = 1: the student's top token and one bucket,
    0.5 log(0.5/0.2) + 0.5 log(0.5/0.8); the bucket's mass comes from the rest (tail_bucket)."""
    ls = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    lt = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64).log()
    want = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert float(opd.topk_reverse_kl(ls, lt, 1)) == pytest.approx(want, abs=1e-9)
    assert opd.tail_bucket(ls[:2]).exp().tolist() == pytest.approx([0.5, 0.3, 0.2])


@given(token_batch(), st.sampled_from(MODES), st.integers(0, 1000))
def test_aggregation_matches_python(tokens, mode, seed):
    mask, _, _ = opd.response_mask(tokens, eos_id=2)
    loss = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    max_len = tokens.shape[1] + seed % 7                        # the budget may exceed the longest rollout
    got = opd.aggregate_loss(loss, mask.double(), mode, max_len=max_len)
    assert float(got) == pytest.approx(direct_aggregate(loss, mask, mode, max_len), rel=1e-9, abs=1e-12)


@given(token_batch(), st.sampled_from(MODES), st.integers(0, 1000))
def test_aggregation_ignores_padding(tokens, mode, seed):
    mask, _, _ = opd.response_mask(tokens, eos_id=2)
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(tokens.shape, generator=g, dtype=torch.float64)
    garbage = loss + (1 - mask.double()) * torch.randn(tokens.shape, generator=g, dtype=torch.float64) * 1e3
    a = opd.aggregate_loss(loss, mask.double(), mode, 10)
    b = opd.aggregate_loss(garbage, mask.double(), mode, 10)
    assert float(a) == pytest.approx(float(b), abs=1e-9)


def test_aggregation_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        opd.aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "sum")


@given(token_batch())
def test_response_mask_matches_hand_reference(tokens):
    mask, lengths, truncated = opd.response_mask(tokens, eos_id=2)
    for i, row in enumerate(tokens.tolist()):
        m, trunc = hand_mask(row, 2)
        assert mask[i].tolist() == m
        assert lengths[i] == sum(m)
        assert bool(truncated[i]) == trunc


def test_response_mask_hand_built_cases():
    t = torch.tensor([[2, 0, 0], [4, 4, 2], [4, 4, 4], [4, 2, 2]])    # EOS first, last, absent, twice
    mask, lengths, truncated = opd.response_mask(t, 2)
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]]
    assert lengths.tolist() == [1, 3, 3, 2] and truncated.tolist() == [False, False, True, False]

# ----------------------------------------------------------------------------- Task and model pair

def test_gold_set_is_fixed_and_from_training_motifs():
    task = opd.MotifTask(eval_size=8)
    gold = task.gold_set(64)
    assert gold == opd.MotifTask(eval_size=8).gold_set(64) and len(gold) == 64
    train = {" ".join(m) for m in task.train_motifs}
    assert all(" ".join(g["prompt"].split()[:-3]) in train for g in gold)


def test_exact_match_needs_the_stop_and_the_text():
    tok = build.build_tokenizer()
    ids = tok("a b a b", add_special_tokens=False)["input_ids"]
    assert opd.exact_match(tok, ids + [tok.eos_token_id], "a b a b")
    assert not opd.exact_match(tok, ids, "a b a b")                         # truncated: no EOS
    assert not opd.exact_match(tok, ids[:2] + [tok.eos_token_id], "a b a b")


def test_prompt_rendering_chat_template_or_plain_text():
    """A tokenizer with a chat template renders a prompt through it; one without reads plain text,
    the prompt and a newline (the toy tokenizer drops the newline: the same ids as the prompt)."""
    tok = bpe_tokenizer(vocab=2_000)
    chat = opd.prompt_token_ids(tok, ["bada kelo"])[0]
    assert tok.decode(chat).startswith("<|im_start|>user\nbada kelo")
    tok.chat_template = None
    assert opd.prompt_token_ids(tok, ["bada kelo"])[0] == tok("bada kelo\n")["input_ids"] != chat
    toy = build.build_tokenizer()
    assert opd.prompt_token_ids(toy, ["a b x 2 ="])[0] == toy("a b x 2 =")["input_ids"]

# ----------------------------------------------------------------------------- Rollouts and scores

def test_rollouts_kv_cache_equals_full_recompute():
    """Greedy decoding with the KV cache, left padding and position ids gives the same tokens
    as recomputing the whole sequence each step without a cache."""
    tok = build.build_tokenizer()
    torch.manual_seed(0)
    model = build.make_model(tok, 2, 64).eval()
    with torch.no_grad():                                        # large random weights: a chaotic function
        for p in model.parameters():                             # of its input, positions included
            p.mul_(8.0)
    ids, attn = opd.encode_batch(tok, ["a b x 2 =", "c d e f x 5 =", "h x 1 =", "b g c x 4 ="])
    out = opd.sample_rollouts(model, ids, attn, 12, tok.eos_token_id, tok.pad_token_id, greedy=True)
    mask, _, _ = opd.response_mask(out, tok.eos_token_id)
    seq, a = ids, attn
    for t in range(out.shape[1]):
        pos = (a.cumsum(-1) - 1).clamp(min=0)
        nxt = model(input_ids=seq, attention_mask=a, position_ids=pos).logits[:, -1].argmax(-1)
        live = mask[:, t].bool()                                # after EOS the rollout holds padding
        assert nxt[live].tolist() == out[live, t].tolist()
        assert (out[~live, t] == tok.pad_token_id).all()
        seq, a = torch.cat([seq, nxt[:, None]], 1), torch.cat([a, torch.ones_like(a[:, :1])], 1)


@given(st.integers(1, 9), st.integers(1, 10), st.integers(1, 12), st.integers(0, 99))
def test_length_groups_equal_one_padded_forward(B, T, groups, seed):
    """Length-sorted slices give the one padded forward's hidden states, and its gradients,
    on every response position; rows keep their order."""
    model = _small_model()
    g = torch.Generator().manual_seed(seed)
    P = 3
    lengths = torch.randint(1, T + 1, (B,), generator=g)                    # every response has >= 1 token
    seq = torch.randint(4, 15, (B, P + T), generator=g)
    attn = torch.cat([torch.ones(B, P, dtype=torch.long), (torch.arange(T) < lengths[:, None]).long()], 1)
    mask = attn[:, P:, None].double()                                         # (B, T, 1)
    w = torch.randn(B, T, 16, generator=g, dtype=torch.float64)

    def run(forward):
        model.zero_grad()
        h = forward() * mask
        (h * w).sum().backward()
        return h.detach(), [p.grad.clone() for p in model.model.parameters()]

    h_pad, g_pad = run(lambda: opd.hidden_states(model, seq, attn)[:, P - 1:P + T - 1])   # one padded forward
    h_grp, g_grp = run(lambda: opd.response_hidden_states(model, seq, attn, P, groups))
    torch.testing.assert_close(h_pad, h_grp)
    for a, b in zip(g_pad, g_grp):
        torch.testing.assert_close(a, b)


@given(st.integers(1, 3), st.integers(1, 9), st.integers(2, 20), st.integers(1, 10), st.booleans(),
       st.sampled_from(["full", "topk"]), st.integers(0, 99))
def test_chunked_terms_equal_unchunked(B, T, V, chunk, with_ref, objective, seed):
    hs_, ht = _heads(4, V, seed)
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, 4, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    outs = []
    for c in (0, chunk):
        h = h_s.detach().clone().requires_grad_(True)
        t = opd.token_terms(h, hs_, h_t, ht, y, 1, 0.7, c, objective, 3, h_ref=h_t if with_ref else None,
                            head_ref=ht)
        loss = t.kl.sum() - t.logp_student.sum() + (t.kl_ref.sum() if with_ref else 0)
        grad = torch.autograd.grad(loss, h)[0]
        outs.append(({k: v.detach() for k, v in t._asdict().items() if v is not None}, grad))
    for k in outs[0][0]:
        torch.testing.assert_close(outs[0][0][k], outs[1][0][k])
    torch.testing.assert_close(outs[0][1], outs[1][1])


@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 12), st.sampled_from(["sampled", "full", "topk"]),
       st.integers(0, 99))
def test_terms_from_logits_equal_token_terms(B, T, V, objective, seed):
    """terms_from_logits() on logits a loop already has gives what token_terms() gives on the hidden
    states and heads those logits come from, values and gradients."""
    head, teacher_head = _heads(4, V, seed)
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, 4, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    a = opd.terms_from_logits(head(h_s), teacher_head(h_t), y, 1, 0.8, objective, 2, teacher_head(h_t))
    b = opd.token_terms(h_s, head, h_t, teacher_head, y, 1, 0.8, 0, objective, 2, h_t, teacher_head)
    for x, z in zip(a, b):
        assert (x is None) == (z is None) and (x is None or torch.equal(x, z))
    loss = lambda t: (t.kl if t.kl is not None else -t.logp_student).sum() + t.kl_ref.sum()
    torch.testing.assert_close(torch.autograd.grad(loss(a), h_s)[0], torch.autograd.grad(loss(b), h_s)[0])
    assert not a.logp_teacher.requires_grad and not a.p_eos_student.requires_grad


@given(st.floats(0.05, 4.0), st.floats(1e2, 1e5), st.integers(0, 99))
def test_temperature_log_softmax_finite_for_large_logits(temp, scale, seed):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(2, 7, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(7, 2, generator=g) * scale)
    h = torch.randn(2, 3, 2, generator=g)
    y = torch.randint(0, 7, (2, 3), generator=g)
    t = opd.token_terms(h.requires_grad_(True), head, h, head, y, 0, temp, 2, "full")
    for v in t:
        assert v is None or torch.isfinite(v).all()
    assert (t.logp_student <= 0).all()


def test_reference_kl_zero_before_first_update():
    head, teacher_head = _heads(4, 9, 0)
    h = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    t = opd.token_terms(h, head, torch.randn(2, 5, 4, dtype=torch.float64), teacher_head,
                        torch.zeros(2, 5, dtype=torch.long), 1, objective="full",
                        h_ref=h.detach(), head_ref=copy.deepcopy(head))      # p_ref = the student as it starts
    assert t.kl_ref.abs().max() < 1e-12
    assert t.kl.min() > 1e-6                                    # while the teacher differs


def test_sequence_nll_is_the_mean_nll_of_each_response_through_its_eos():
    """sequence_nll (sequence-level KD's loss) = the mean of -log p(y_t | prompt, y_<t) over every
    token up to and including each row's first EOS, computed here one sequence at a time."""
    tok = build.build_tokenizer()
    model = _small_model().float()
    ids, attn = opd.encode_batch(tok, ["a b x 2 =", "c d e x 1 ="])
    eos = tok.eos_token_id
    resp = torch.tensor([[5, 6, eos, 0], [7, 8, 9, 10]])                 # one stopped, one truncated
    got = opd.sequence_nll(model, ids, attn, resp, eos, groups=2)
    nll = []
    for i, L in ((0, 3), (1, 4)):
        p = ids[i][attn[i].bool()].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([p + resp[i, :L].tolist()])).logits[0, len(p) - 1:-1]
        nll += (-F.log_softmax(logits.float(), -1).gather(-1, resp[i, :L, None]).squeeze(-1)).tolist()
    assert float(got.detach()) == pytest.approx(sum(nll) / len(nll), rel=1e-5)

# ----------------------------------------------------------------------------- Monitor

@given(st.lists(st.lists(st.integers(3, 40), min_size=0, max_size=30), min_size=1, max_size=40), st.integers(1, 30))
def test_length_stats_equal_direct_computation(seqs, max_len):
    seqs = [s[:max_len] for s in seqs]
    s = opd.length_stats(seqs, eos_id=2, max_len=max_len)
    L = [len(x) for x in seqs]
    assert s["len_mean"] == pytest.approx(sum(L) / len(L))
    assert s["len_max"] == max(L)
    assert s["len_p90"] == sorted(L)[max(0, math.ceil(0.9 * len(L)) - 1)]
    assert s["trunc_rate"] == pytest.approx(sum(len(x) == max_len for x in seqs) / len(seqs))   # ids >= 3: no EOS


@given(st.integers(3, 60), st.integers(3, 30))
def test_repetition_zero_without_repeats(n, window):
    ids = list(range(100, 100 + n))                             # all distinct
    assert opd.ngram_repetition(ids) == 0.0
    assert not opd.is_repetitive(ids, window=min(window, n), tau=3.0)


@given(st.lists(st.integers(3, 50), min_size=2, max_size=5, unique=True), st.integers(1, 8))
def test_repetition_grows_with_repeats(motif, k):
    prefix = list(range(200, 210))
    figs = [opd.ngram_repetition(prefix + motif * r) for r in range(1, k + 3)]
    assert figs[0] == 0.0 or len(motif) < 3
    assert all(b >= a for a, b in zip(figs, figs[1:])) and figs[-1] > figs[0]


def test_compression_test_flags_loops_not_answers():
    assert opd.is_repetitive([5, 6, 7] * 10, window=24, tau=3.0)
    assert not opd.is_repetitive([5, 6, 7] * 4, window=24, tau=3.0)          # a correct answer is short
    assert not opd.is_repetitive([5] * 23, window=24, tau=3.0)               # shorter than the tail: never judged
    rnd = random.Random(0)
    assert not opd.is_repetitive([rnd.randrange(4, 20) for _ in range(30)], window=24, tau=3.0)


@given(st.integers(4, 20), st.integers(8, 64), st.integers(0, 99))
def test_monitor_quiet_on_constant_lengths(length, batch, seed):
    rnd = random.Random(seed)
    mon = opd.LengthMonitor(eos_id=2, max_len=48)
    for step in range(30):
        seqs = [rnd.sample(range(3, 40), length - 1) + [2] for _ in range(batch)]   # distinct ids, then EOS
        out = mon.update(seqs, step)
        assert not [k for k in out if k.startswith("alert/")]


ALERT_WITHIN = 6   # steps: the growth alarm's documented reaction time to >= 10% growth per step


@given(st.integers(6, 14), st.floats(0.1, 0.3), st.integers(5, 15), st.integers(0, 99))
def test_monitor_alerts_within_steps_of_sustained_growth(base, rate, onset, seed):
    rnd = random.Random(seed)
    mon = opd.LengthMonitor(eos_id=2, max_len=200)
    fired = None
    for step in range(onset + 20):
        L = base if step < onset else min(200, math.ceil(base * (1 + rate) ** (step - onset + 1)))
        out = mon.update([[rnd.randrange(3, 10**6) for _ in range(L - 1)] + [2] for _ in range(8)], step)
        if fired is None and any(k.startswith("alert/") for k in out):
            fired = step
    assert fired is not None and onset <= fired <= onset + ALERT_WITHIN


def test_monitor_alert_fires_once_at_onset():
    mon = opd.LengthMonitor(eos_id=2, max_len=10, trunc=0.2, patience=2)
    said = []
    for s in range(4):
        out = mon.update([[5] * 10] * 4, s)
        said.append((out.get("alert/trunc_rate"), list(mon.new_alerts)))
    assert said == [(None, []), (1, [("trunc_rate", 1.0, 0.2)]), (None, []), (None, [])]   # held 2 steps, said once


@given(st.integers(1, 4), st.integers(0, 99))
def test_monitor_needs_patience_consecutive_steps(patience, seed):
    """A truncation spike shorter than `patience` steps never alerts; one of `patience` steps does."""
    rnd = random.Random(seed)
    ok = lambda: [[rnd.randrange(3, 10**6) for _ in range(5)] + [2] for _ in range(8)]
    mon = opd.LengthMonitor(eos_id=2, max_len=10, trunc=0.2, patience=patience)
    steps = [ok() for _ in range(5)] + [[[5] * 10] * 8] * (patience - 1) + [ok()]     # spike of patience-1 steps
    steps += [[[5] * 10] * 8] * patience                                              # then one of patience steps
    fired = [s for s, seqs in enumerate(steps) if "alert/trunc_rate" in mon.update(seqs, s)]
    assert fired == [len(steps) - 1]


def _batch_with_loops(rnd, n_loops, batch=128, max_len=48):
    """A batch of stopped answers (distinct ids, EOS) with n_loops rollouts stuck in a motif loop."""
    ok = [rnd.sample(range(3, 40), rnd.randint(4, 20)) + [2] for _ in range(batch - n_loops)]
    loops = [(rnd.sample(range(3, 40), rnd.randint(2, 4)) * max_len)[:max_len] for _ in range(n_loops)]
    return ok + loops


@settings(max_examples=30)
@given(st.integers(0, 2), st.integers(0, 99))
def test_repetition_alert_quiet_on_stationary_batches(n_loops, seed):
    """One or two looping rollouts in 128 now and then are the healthy noise floor: no alert, however long."""
    rnd = random.Random(seed)
    mon = opd.LengthMonitor(eos_id=2, max_len=48)
    for step in range(60):
        out = mon.update(_batch_with_loops(rnd, n_loops if rnd.random() < 0.5 else 0), step)
        assert not [k for k in out if k.startswith("alert/")], (step, out)


@settings(max_examples=30)
@given(st.integers(10, 40), st.floats(0.5, 4.0), st.integers(0, 99))
def test_repetition_alert_fires_once_within_steps_of_a_planted_trend(onset, per_step, seed):
    """Loops planted from `onset` on, growing by `per_step` rollouts per step: the alert fires
    within patience + 2 steps of the share first exceeding the threshold, and only once."""
    rnd = random.Random(seed)
    mon = opd.LengthMonitor(eos_id=2, max_len=48)
    fired, crossed = [], None
    for step in range(onset + 40):
        n = 0 if step < onset else min(128, int(per_step * (step - onset + 1)))
        if crossed is None and n / 128 > mon.thresholds["rep_rate"]:
            crossed = step
        out = mon.update(_batch_with_loops(rnd, n), step)
        fired += [step] if out.get("alert/rep_rate") else []
    assert len(fired) == 1 and crossed <= fired[0] <= crossed + mon.patience + 2, (fired, crossed)

# ----------------------------------------------------------------------------- Stabilizers

@given(token_batch(), st.integers(0, 99))
def test_eos_mask_zeroes_exactly_eos(tokens, seed):
    adv = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed)) + 5.0   # never 0
    out = opd.eos_advantage_mask(adv, tokens, 2)
    assert ((out == 0) == (tokens == 2)).all()
    assert (out[tokens != 2] == adv[tokens != 2]).all()


@given(st.integers(1, 64), st.integers(1, 32), st.lists(st.integers(0, 64), min_size=1, max_size=20))
def test_overlong_penalty_zero_then_linear(max_len, buffer, lengths):
    buffer = min(buffer, max_len)
    L = torch.tensor([min(l, max_len) for l in lengths])
    pen = opd.overlong_penalty(L, max_len, buffer)
    for l, p in zip(L.tolist(), pen.tolist()):
        expected = 0.0 if l <= max_len - buffer else -(l - (max_len - buffer)) / buffer
        assert p == pytest.approx(expected, abs=1e-6)
    assert pen.min() >= -1.0 - 1e-6


@given(token_batch(), st.sampled_from(MODES), st.integers(0, 99))
def test_dropping_truncated_removes_exactly_their_tokens(tokens, mode, seed):
    mask, _, truncated = opd.response_mask(tokens, 2)
    loss = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = opd.truncation_weights(mask.double(), truncated, 0.0)
    keep = ~truncated
    got = opd.aggregate_loss(loss, w, mode, 10)
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):   # zero-weight rows still count in the mean
        ref = opd.aggregate_loss(loss * keep[:, None], mask.double(), mode, 10)
    elif keep.any():
        ref = opd.aggregate_loss(loss[keep], mask[keep].double(), mode, 10)
    else:
        ref = torch.tensor(0.0)
    assert float(got) == pytest.approx(float(ref), abs=1e-9)


@given(st.lists(st.floats(-50, 50), min_size=1, max_size=30), st.floats(0.1, 5))
def test_advantage_regulation(values, bound):
    a = torch.tensor(values, dtype=torch.float64)
    lg = opd.regulate_advantage(a, "log")
    assert (torch.sign(lg) == torch.sign(a)).all() and (lg.abs() <= a.abs() + 1e-12).all()
    torch.testing.assert_close(lg, torch.sign(a) * torch.log1p(a.abs()))
    cl = opd.regulate_advantage(a, "clip", bound)
    assert (cl.abs() <= bound + 1e-12).all() and (cl[a.abs() <= bound] == a[a.abs() <= bound]).all()


@given(token_batch(), st.integers(1, 12))
def test_prefix_weights_keep_the_first_n_response_tokens(tokens, n):
    mask, _, _ = opd.response_mask(tokens, 2)
    w = opd.prefix_weights(mask, n)
    for i, row in enumerate(mask.tolist()):
        assert w[i].tolist() == [m if t < n else 0.0 for t, m in enumerate(row)]


def test_iw_opd_weights_hand_computed():
    """A = (1, -2, 1) then padding, gamma 0.5: |A| sums to 4, so the discrepancy before each token is
    (0, 1, 3)/4 and w = 1 + 0.5 (1 - that) = (1.5, 1.375, 1.125) (TRL's IWOPDTrainer's formula)."""
    adv = torch.tensor([[1.0, -2.0, 1.0, 7.0]])
    w = opd.iw_opd_weights(adv, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 0.5)
    assert w[0, :3].tolist() == pytest.approx([1.5, 1.375, 1.125])


@given(token_batch(), st.floats(0.0, 4.0), st.integers(0, 99))
def test_iw_opd_weights_fall_from_one_plus_gamma_to_one(tokens, gamma, seed):
    mask, _, _ = opd.response_mask(tokens, 2)
    adv = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = opd.iw_opd_weights(adv, mask.double(), gamma)
    assert (w >= 1 - 1e-12).all() and (w <= 1 + gamma + 1e-12).all()
    assert torch.allclose(w[:, 0], torch.full_like(w[:, 0], 1 + gamma))
    assert (w[:, 1:] <= w[:, :-1] + 1e-12).all()                        # never rises along a rollout


def test_teacher_samples_keep_exactly_the_rows_that_stop(monkeypatch):
    """Sequence-level KD keeps the teacher's samples that stop, ungraded, and no other row."""
    eos = 2
    fake = torch.tensor([[5, eos, 0], [5, 6, 7], [eos, 0, 0], [6, 6, 6]])
    monkeypatch.setattr(opd, "sample_rollouts", lambda *a, **k: fake)
    resp, kept = opd.teacher_samples(None, None, None, 3, eos, 0, 1.0)
    assert torch.equal(resp, fake) and kept.tolist() == [True, False, True, False]


@given(token_batch(), st.integers(0, 99))
def test_opd_loss_objectives_take_their_terms(tokens, seed):
    """The full and top-k objectives take the KL they are given (no advantage); an SFT or sequence-KD
    coefficient without its NLL is an error, not a silent zero."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(tokens.shape, generator=g, dtype=torch.float64)
    kl = torch.rand(tokens.shape, generator=g, dtype=torch.float64)
    mask, _, _ = opd.response_mask(tokens, 2)
    for objective in ("full", "topk"):
        loss, _ = opd.opd_loss(lp, lp, tokens, 2, opd.LossSettings(objective=objective), kl=kl)
        assert float(loss) == pytest.approx(float((kl * mask).sum() / mask.sum()), rel=1e-9)
    for setting, term in (("sft_coef", "sft"), ("seq_kd_coef", "seq_kd"), ("ref_kl", "kl_ref")):
        with pytest.raises(ValueError, match=f"need {term}:"):
            opd.opd_loss(lp, lp, tokens, 2, opd.LossSettings(**{setting: 1.0}))
    with pytest.raises(ValueError, match="need kl:"):
        opd.opd_loss(lp, lp, tokens, 2, opd.LossSettings(objective="full"))


def test_guard_restores_the_last_quiet_copy_and_switches_the_fix_on():
    """Quiet steps 0-6 (a copy at 0 and 5), an alert at step 7: the guard restores the student and
    AdamW's state of step 5, returns new settings with Stable-OPD's coefficients raised (a larger
    one kept), leaves the old settings as they were, and never acts again."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    mon = opd.LengthMonitor(eos_id=2, max_len=8)
    guard, loss = opd.Guard(every=5), opd.LossSettings(ref_kl=0.5)
    snapshots = {}
    for step in range(7):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        snapshots[step] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        assert guard.step(mon, step, model, opt, loss) is None
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    mon.active.add("rep_rate")                                     # the monitor's first alert
    new = guard.step(mon, 7, model, opt, loss)
    assert (new.ref_kl, new.sft_coef) == (0.5, opd.STABLE_OPD["sft_coef"]) and loss.sft_coef == 0.0
    assert all(torch.equal(v, snapshots[5][0][k]) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"][0]["step"] == snapshots[5][1]["state"][0]["step"]
    assert guard.saved["step"] == 5 and guard.step(mon, 8, model, opt, new) is None
    assert opd.Guard(fix={}).fix == {}                                # restore only


@given(token_batch(), st.integers(0, 99))
def test_opd_loss_defaults_are_plain_opd(tokens, seed):
    g = torch.Generator().manual_seed(seed)
    lp_s, lp_t = -torch.rand(tokens.shape, generator=g, dtype=torch.float64) * 3, -torch.rand(tokens.shape, generator=g, dtype=torch.float64) * 3
    mask, _, _ = opd.response_mask(tokens, 2)
    loss, parts = opd.opd_loss(lp_s, lp_t, tokens, 2)
    adv = lp_t - lp_s
    assert float(loss) == pytest.approx(float((-adv * lp_s * mask).sum() / mask.sum()), rel=1e-9, abs=1e-12)
    assert set(parts) == {"opd"}


@given(token_batch(), st.sampled_from(MODES), st.integers(0, 99))
def test_opd_loss_takes_a_completion_mask(tokens, mode, seed):
    """TRL's completion_mask (1 up to and including the first EOS, then 0; it cuts a completion at
    its EOS and pads after it) given as opd_loss(mask=...) gives the loss of the mask built from
    eos_id, with every stabilizer of the sampled objective on; a weighted mask weighs the tokens."""
    g = torch.Generator().manual_seed(seed)
    lp_s, lp_t = (-torch.rand(tokens.shape, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    trl_mask = torch.zeros(tokens.shape, dtype=torch.long)
    for i, row in enumerate(tokens.tolist()):                     # TRL: is_eos.int().argmax(1), then a comparison
        end = row.index(2) if 2 in row else len(row) - 1
        trl_mask[i, :end + 1] = 1
    s = opd.LossSettings(loss_agg=mode, overlong_buffer=2, adv_regulation="clip", eos_mask=True, iw_gamma=1.0,
                         trunc_weight=0.5, prefix_len=3)
    built, parts = opd.opd_loss(lp_s, lp_t, tokens, 2, s, max_len=12)
    given_, _ = opd.opd_loss(lp_s, lp_t, tokens, 2, s, mask=trl_mask, max_len=12)
    assert float(given_) == float(built) and set(parts) == {"opd"}
    half = trl_mask * 0.5
    w, _ = opd.opd_loss(lp_s, lp_t, tokens, 2, opd.LossSettings(loss_agg="seq-mean-token-sum"), mask=half)
    full, _ = opd.opd_loss(lp_s, lp_t, tokens, 2, opd.LossSettings(loss_agg="seq-mean-token-sum"))
    assert float(w) == pytest.approx(0.5 * float(full), rel=1e-12, abs=1e-12)


def _hand_opd_loss(lp_s, lp_t, tokens, eos, kw, kl_ref=None, sft=None):
    """The loss of section 5 written out token by token in plain Python: an independent reference."""
    rows = []
    for b in range(tokens.shape[0]):
        ids = tokens[b].tolist()
        L = ids.index(eos) + 1 if eos in ids else len(ids)
        trunc = eos not in ids
        pen = min(-(L - (kw["max_len"] - kw["overlong_buffer"])) / kw["overlong_buffer"], 0.0) if kw["overlong_buffer"] else 0.0
        terms = []
        for t in range(L):
            a = float(lp_t[b, t] - lp_s[b, t]) + pen
            if kw["adv_regulation"] == "clip":
                a = max(-kw["adv_clip"], min(kw["adv_clip"], a))
            elif kw["adv_regulation"] == "log":
                a = math.copysign(math.log1p(abs(a)), a)
            if kw["eos_mask"] and ids[t] == eos:
                a = 0.0
            terms.append(-a * float(lp_s[b, t]))
        rows.append((terms, kw["trunc_weight"] if trunc else 1.0, [float(kl_ref[b, t]) for t in range(L)] if kl_ref is not None else []))
    assert kw["loss_agg"] == "seq-mean-token-mean"
    opd_term = sum(w * sum(x) / (w * len(x)) for x, w, _ in rows if w > 0) / sum(w > 0 for _, w, _ in rows)
    loss = kw["opd_coef"] * opd_term
    if kw["ref_kl"]:
        loss += kw["ref_kl"] * sum(sum(k) / len(k) for _, _, k in rows) / len(rows)
    if kw["sft_coef"]:
        loss += kw["sft_coef"] * float(sft.detach())
    return loss


def test_opd_loss_equals_the_loops_loss(work, monkeypatch):
    """The loss the loop trains on, with every stabilizer of the sampled objective on at once, equals
    a token-by-token Python computation from the same per-token terms; opd_loss() on those terms
    gives the same value (the function to copy into another loop)."""
    seen, sfts = _capture(monkeypatch), []
    real_sft = opd.sft_nll
    monkeypatch.setattr(opd, "sft_nll", lambda *a, **k: sfts.append(real_sft(*a, **k)) or sfts[-1])
    kw = dict(ref_kl=0.05, sft_coef=0.5, overlong_buffer=4, adv_regulation="clip", adv_clip=0.5, eos_mask=True,
              trunc_weight=0.5, loss_agg="seq-mean-token-mean")
    rows = opd.run_opd(_tiny_cfg(work, run_name="loss", max_new_tokens=8, **kw))
    settings = _tiny_cfg(work, max_new_tokens=8, **kw).loss
    kw_all = dict(opd.dataclasses.asdict(settings), max_len=8)
    eos = build.build_tokenizer().eos_token_id
    losses = [r["loss/total"] for r in rows if "loss/total" in r]
    assert len(seen["terms"]) == len(losses) == len(sfts) == 4
    truncated = 0
    for (resp, t), sft, logged in zip(seen["terms"], sfts, losses):
        hand = _hand_opd_loss(t["logp_student"], t["logp_teacher"], resp, eos, kw_all, t["kl_ref"], sft)
        assert logged == pytest.approx(hand, rel=1e-5, abs=1e-6)
        again, parts = opd.opd_loss(t["logp_student"], t["logp_teacher"], resp, eos, settings, kl_ref=t["kl_ref"],
                                    sft=sft.detach(), max_len=8)
        assert float(again) == pytest.approx(logged, rel=1e-6, abs=1e-7) and set(parts) == {"opd", "ref_kl", "sft"}
        truncated += int((resp != eos).all(-1).sum())
    assert truncated > 0                                               # the truncation weight was exercised

# ----------------------------------------------------------------------------- Setting up a run: flags, the pair, real models and their checks

def test_flag_given_at_its_default_wins_over_the_preset():
    """--methods sft-only --opd-coef 1.0: the flag was given, so it wins, although 1.0 is its default."""
    base, _, given = opd.parse_config(["--methods", "sft-only", "--opd-coef", "1.0"])
    cfg = opd.config_for(base, "sft-only", 0, given)
    assert (cfg.loss.opd_coef, cfg.loss.sft_coef) == (1.0, opd.STABLE_OPD["sft_coef"])
    base, _, given = opd.parse_config(["--methods", "sft-only"])
    assert opd.config_for(base, "sft-only", 0, given).loss.opd_coef == 0.0        # not given: the preset's


BAD_VALUES = {
    "methods": "opd,nope", "seeds": "0", "seed": "-1", "device": "gpu", "workers": "-1", "gold_size": "-1",
    "opd_coef": "-1", "steps": "0", "batch_size": "0", "lr": "-1", "temperature": "0", "max_new_tokens": "0",
    "objective": "kl", "loss_agg": "sum", "warmup": "-1", "decay": "-1", "grad_clip": "0", "chunk_size": "-8",
    "length_groups": "0", "ref_kl": "-0.1", "sft_coef": "nan", "trunc_weight": "2", "overlong_buffer": "49",
    "adv_regulation": "tanh", "adv_clip": "0", "rep_penalty": "0", "rep_window": "0", "rep_tau": "-1",
    "alert_max_len": "-1", "alert_trunc": "1.2", "alert_rep": "-0.5", "alert_growth": "0", "alert_patience": "0",
    "eval_every": "0", "eval_size": "0", "log_samples_every": "-1", "threads": "0", "save_every": "-1",
    "teacher": "some/path", "student": "some/path",             # each without the other
    "top_k": "0", "seq_kd_coef": "-1", "seq_kd_samples": "129", "seq_kd_temperature": "0", "prefix_len": "49",
    "iw_gamma": "-0.5", "log_every": "0", "guard_fix": "stable",
}
FLAGS = {f.name: f for f in [*opd.run_fields(), *opd.dataclasses.fields(opd.Study)]}


def test_every_numeric_or_choice_flag_has_a_bad_value():
    numeric = {f.name for f in FLAGS.values() if f.type in ("int", "float")}
    choice = {"methods", "device", *opd.CHOICES}
    assert numeric | choice <= set(BAD_VALUES), sorted(numeric | choice - set(BAD_VALUES))


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_flag_value_one_line_exit_2(name, capsys):
    flag, value = "--" + name.replace("_", "-"), BAD_VALUES[name]
    with pytest.raises(SystemExit) as e:
        opd.parse_config([flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    if name in opd.CHOICES:                                          # argparse's own choices
        assert err.startswith(f"error: argument {flag}: invalid choice: {value!r}"), err
        return
    typ = {"int": int, "float": float, "str": str}[FLAGS[name].type]
    assert err.startswith(f"error: {flag} must be ") and err.rstrip().endswith(f"(got {typ(value)!r})"), err


def test_bad_flag_through_the_command_line(tmp_path):
    """As a new user types it: no traceback, one line on stderr, exit code 2, nothing built."""
    r = cli("--temperature", "0", "--out-dir", str(tmp_path / "r"), check=False)
    assert r.returncode == 2 and r.stderr == "error: --temperature must be > 0 (got 0.0)\n"
    assert not r.stdout and not (tmp_path / "r").exists()


def test_unparsable_flag_value_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        opd.parse_config(["--lr", "abc"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: argument --lr: invalid float value: 'abc'")


def test_preset_combined_with_flags_is_validated(capsys):
    base, _, _ = opd.parse_config(["--max-new-tokens", "8"])          # valid alone
    refused(capsys, opd.config_for, base, "overlong", 0,                # the preset's buffer of 12 exceeds the budget of 8
            match=re.escape("--overlong-buffer must be at most --max-new-tokens (got 12)"))


def test_run_name_shared_by_several_runs_is_refused(capsys):
    for argv in (["--methods", "opd,stable-opd", "--seeds", "1"], ["--methods", "opd", "--seeds", "2"]):
        with pytest.raises(SystemExit) as e:
            opd.parse_config([*argv, "--run-name", "x"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --run-name names one run"), err
    cfg, _, _ = opd.parse_config(["--methods", "opd", "--seeds", "1", "--run-name", "x"])   # one run: fine
    assert cfg.run_name == "x"


def test_a_damaged_shipped_file_stops_with_one_line(tmp_path, monkeypatch, capsys):
    """A truncated pair/teacher/model.safetensors: one line naming the file and how to restore it,
    exit code 2, before any loader runs."""
    import shutil
    shutil.copytree(HERE / "pair", tmp_path / "pair")
    f = tmp_path / "pair" / "teacher" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    monkeypatch.setattr(opd, "PAIR", tmp_path / "pair")
    err = refused(capsys, opd.default_pair, match="git checkout pair/")
    assert str(f) in err
    monkeypatch.setattr(opd, "PAIR", HERE / "pair")
    assert opd.default_pair() == (str(HERE / "pair" / "teacher"), str(HERE / "pair" / "student"))   # the committed pair passes


def test_wrong_model_path(tmp_path, capsys):
    r = cli("--teacher", str(tmp_path / "nope"), "--student", str(tmp_path / "nope"), "--steps", "1", check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.count("\n") == 1   # as a new user types it
    (tmp_path / "empty").mkdir()                                # a folder, but no model in it
    refused(capsys, opd.load_pretrained, str(tmp_path / "empty"), "cpu", match="could not load a model")


def test_mismatched_tokenizers(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "zz"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                    unk_token="<unk>")
    for name, t in (("s", build.build_tokenizer()), ("t", other)):
        m = build.make_model(t, 1, 16)
        m.save_pretrained(tmp_path / name)
        t.save_pretrained(tmp_path / name)
    cfg = opd.Config(teacher=str(tmp_path / "t"), student=str(tmp_path / "s"), steps=1, out_dir=str(tmp_path / "r"))
    refused(capsys, opd.load_models_and_data, cfg, torch.device("cpu"), match="tokenizers differ")
    assert not (tmp_path / "r").exists()


def test_real_pair_eos_mismatch(real_pairs, tmp_path, capsys):
    d, _ = real_pairs
    other = bpe_tokenizer(eos="<|endoftext|>")
    m = build.make_model(other, 1, 32, "llama")
    m.save_pretrained(tmp_path / "t")
    other.save_pretrained(tmp_path / "t")
    cfg = _real_cfg(tmp_path, str(d / "llama" / "student"), str(tmp_path / "t"), str(d / "prompts.jsonl"))
    refused(capsys, opd.load_models_and_data, cfg, torch.device("cpu"), match="EOS ids differ.*push it down")


def test_teacher_scores_in_its_own_chat_format(real_pairs, tmp_path, monkeypatch, capsys):
    """Student and teacher share the vocabulary and EOS but not the chat template: the teacher's
    log-probs in the loop equal a direct forward of the teacher on its own rendering of the prompt
    followed by the student's response ids, and differ from those after the student's rendering."""
    d, tok = real_pairs
    tok_t = copy.deepcopy(tok)
    tok_t.chat_template = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}### assistant:{% endif %}")
    s_path, t_path = _save_pair(tmp_path, tok, tok_t, scale=8.0)
    seen = _capture(monkeypatch)
    opd.run_opd(_real_cfg(tmp_path, s_path, t_path, str(d / "prompts.jsonl")), "opd")
    assert "chat formats differ" in capsys.readouterr().out
    _, teacher = opd.load_pretrained(t_path, "cpu")
    own = _teacher_scores(seen, tok, d / "prompts.jsonl", teacher, lambda t: opd.prompt_token_ids(tok_t, [t])[0])
    student = _teacher_scores(seen, tok, d / "prompts.jsonl", teacher, lambda t: opd.prompt_token_ids(tok, [t])[0])
    for (got, direct), (_, other) in zip(own, student):
        torch.testing.assert_close(got, direct, atol=1e-4, rtol=1e-4)
        assert (got - other).abs().max() > 1e-2                      # the other rendering would score differently
    assert len(own) == 12


def test_teacher_without_a_chat_template_reads_plain_text(real_pairs, tmp_path, monkeypatch, capsys):
    """One tokenizer, but the teacher's has no chat template (real/plurals.py's mismatch): the
    teacher's prompt ids in the loop are the plain rendering (prompt and newline) and its log-probs
    those of a direct forward on it; the student samples from its chat rendering; check_pair warns."""
    d, tok = real_pairs
    tok_t = copy.deepcopy(tok)
    tok_t.chat_template = None
    s_path, t_path = _save_pair(tmp_path, tok, tok_t, scale=8.0)
    seen = _capture(monkeypatch)
    opd.run_opd(_real_cfg(tmp_path, s_path, t_path, str(d / "prompts.jsonl")), "opd")
    assert "one side has a chat template and the other reads plain text" in capsys.readouterr().out
    _, teacher = opd.load_pretrained(t_path, "cpu")
    scores = _teacher_scores(seen, tok, d / "prompts.jsonl", teacher, lambda t: tok(t + "\n")["input_ids"])
    for got, direct in scores:
        torch.testing.assert_close(got, direct, atol=1e-4, rtol=1e-4)
    assert len(scores) == 12


def test_accept_grader_and_held_out_split(tmp_path, capsys):
    tok = build.build_tokenizer()
    ids = lambda text, stop=True: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * stop
    row = {"prompt": "a b x 2 =", "answer": "a b a b", "accept": r"^a b( a b)*$"}
    assert opd.is_correct(tok, ids("a b a b a b"), row)                    # the regex, not the exact answer
    assert not opd.is_correct(tok, ids("a b a b a b", stop=False), row)    # a response must stop
    assert not opd.is_correct(tok, ids("a c"), row)
    assert opd.is_correct(tok, ids("a b a b"), {"prompt": "", "answer": "a b a b"})      # exact match without one
    assert not opd.is_correct(tok, ids("a b a b a b"), {"prompt": "", "answer": "a b a b"})
    lines = [{"prompt": f"p{i}", "answer": "x", "split": "eval" if i < 3 else "train"} for i in range(10)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = opd.read_prompts(str(tmp_path / "p.jsonl"))
    assert [r["split"] for r in rows].count("eval") == 3 and rows[0]["accept"] is None
    for bad, msg in [({"prompt": "a", "accept": "(unclosed"}, 'valid "accept" regex'), ({"prompt": "a", "split": "test"}, '"split"')]:
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        refused(capsys, opd.read_prompts, str(tmp_path / "bad.jsonl"), match=msg)


def test_prompt_file_errors(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a b x 2 ="}\n{oops\n')
    (tmp_path / "noprompt.jsonl").write_text('{"question": "a"}\n')
    for name, msg in [("empty", "holds no prompts"), ("bad", "bad.jsonl:2 is not a JSON object"),
                      ("noprompt", 'needs a string "prompt"'), ("missing", "does not exist")]:
        refused(capsys, opd.read_prompts, str(tmp_path / f"{name}.jsonl"), match=re.escape(msg))
    for name in ("bad", "missing"):                                      # and as a new user types it
        r = cli(*TINY, "--prompts", str(tmp_path / f"{name}.jsonl"), "--out-dir", str(tmp_path / "r"), check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()                                  # nothing ran


def test_sft_coef_without_any_answer_is_refused(work, tmp_path, capsys):
    (tmp_path / "noanswer.jsonl").write_text("".join(f'{{"prompt": "a b x {k} ="}}\n' for k in range(1, 6)) * 4)
    cfg = _tiny_cfg(work, method="stable-opd", prompts=str(tmp_path / "noanswer.jsonl"))
    refused(capsys, opd.load_models_and_data, cfg, torch.device("cpu"), match="--sft-coef needs reference answers")


def test_pad_is_eos_keeps_the_stop_in_the_loss(tmp_path, monkeypatch):
    """pad_token == eos_token (the default of several small models): every position after the
    stop holds the EOS id too. The stopping EOS is in the mask and carries loss; nothing after it does."""
    tok = build.build_tokenizer()
    tok.pad_token = tok.eos_token
    s_path, t_path = _save_pair(tmp_path, tok, tok)
    tok2, _ = opd.load_pretrained(s_path, "cpu")
    assert tok2.pad_token_id == tok2.eos_token_id == tok.eos_token_id
    rows = opd.MotifTask().sample(16, random.Random(0))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    seen = _capture(monkeypatch)
    losses, real = [], opd.aggregate_loss
    monkeypatch.setattr(opd, "aggregate_loss", lambda per, w, *a, **k: losses.append((per.detach(), w)) or real(per, w, *a, **k))
    out = opd.run_opd(_real_cfg(tmp_path, s_path, t_path, str(tmp_path / "p.jsonl"), batch_size=16, max_new_tokens=12), "opd")
    eos, stops = tok.eos_token_id, 0
    for (resp, _), (per_token, weights), row in zip(seen["terms"], losses, [r for r in out if "loss/total" in r]):
        lengths = []
        for i, ids in enumerate(resp.tolist()):
            L = ids.index(eos) + 1 if eos in ids else len(ids)       # through the first EOS
            lengths.append(L)
            assert weights[i, :L].tolist() == [1.0] * L and not weights[i, L:].any()
            if L < len(ids):                                          # stopped early: EOS padding follows
                assert set(ids[L - 1:]) == {eos} and per_token[i, L - 1] != 0
                stops += 1
        assert row["rollout/len_mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert stops >= 4, stops                                          # the case was exercised


def test_sampling_ignores_generation_config(tmp_path, capsys):
    """A model that ships top_p=0.5, top_k=3: rollouts still come from the full softmax at the
    loss temperature (a frequency test on 4,000 first tokens)."""
    tok = build.build_tokenizer()
    torch.manual_seed(0)
    model = build.make_model(tok, 1, 16)
    model.generation_config.update(do_sample=True, top_p=0.5, top_k=3, temperature=0.3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, m = opd.load_pretrained(str(tmp_path), "cpu")
    assert (m.generation_config.top_p, m.generation_config.top_k) == (0.5, 3)
    assert "top_p=0.5, top_k=3" in capsys.readouterr().out
    m.eval()
    ids, attn = opd.encode_batch(tok, ["a b c x 2 ="])
    N, temp = 4000, 0.7
    with torch.no_grad():
        p = F.softmax(m(ids).logits[0, -1] / temp, -1)                # the distribution the loss assumes
    assert 1 - p.topk(3).values.sum() > 0.3                           # top-k/top-p would cut a visible share
    torch.manual_seed(1)
    first = opd.sample_rollouts(m, ids.repeat(N, 1), attn.repeat(N, 1), 1, tok.eos_token_id, tok.pad_token_id, temp)[:, 0]
    freq = torch.bincount(first, minlength=len(p)).double() / N
    assert (freq > 0).sum() > 3
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / N).sqrt() + 1e-3).all(), (freq, p)


def test_plurals_script_files_and_check(real_pairs, tmp_path, capsys):
    """real/plurals.py, the real-model study's data: 128 held-out nouns apart from the training nouns
    and the context's, a grader that takes the right plural in any wording and refuses a wrong one,
    and the check table, run on a tiny local chat model."""
    sys.path.insert(0, str(HERE / "real"))
    try:
        import plurals
    finally:
        sys.path.pop(0)
    plurals.write_files(tmp_path)
    rows = opd.read_prompts(str(tmp_path / "prompts.jsonl"))
    held = [r for r in rows if r["split"] == "eval"]
    words = [re.search(r'"(\w+)"', r["prompt"]).group(1) for r in rows]
    assert len(held) == 128 and len(rows) - 128 >= 256 and len(set(words)) == len(words)
    assert not set(words) & set(plurals.CONTEXT_NOUNS)
    d, tok = real_pairs
    say = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for r, w in zip(rows, words):
        p = plurals.plural(w)
        assert opd.is_correct(tok, say(r["answer"]), r) and opd.is_correct(tok, say(f"The plural of {w} is {p}, always."), r)
        assert not opd.is_correct(tok, say(f'The plural of "{w}" is "{p}x".'), r)
        assert not opd.is_correct(tok, say(f'The word {w} is {w}{w}.'), r) or w == p
    assert plurals.plural("mouse") == "mice" and plurals.plural("baby") == "babies" and plurals.plural("bus") == "buses"
    assert json.loads((tmp_path / "context.json").read_text())[1]["content"] == 'The plural of "fox" is "foxes".'
    plurals.check(str(d / "llama" / "student"), tmp_path, tmp_path / "check", max_new_tokens=3)
    out = capsys.readouterr().out
    assert "| bare |" in out and "| worked examples first |" in out
    assert "### check" in (tmp_path / "check" / "results.md").read_text()


def write_gguf(model, tok, path):
    """Write a Llama model and its byte-level BPE tokenizer to GGUF with the gguf package's
    writer, float32 tensors, under the names and the Q/K row order llama.cpp's converter uses."""
    import gguf
    c, n_layers = model.config, model.config.num_hidden_layers
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    raw = json.loads(tok.backend_tokenizer.to_str())["model"]
    special = set(tok.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in sorted(raw["vocab"].items(), key=lambda kv: kv[1])])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(raw["vocab"]))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in raw["merges"]])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for name, t in model.state_dict().items():
        t = t.float().numpy()
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(name.split(".")[-2])
        if heads:                                        # llama.cpp interleaves the rotary halves
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(names.get_name(name.rsplit(".", 1)[0]) + ".weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

# ----------------------------------------------------------------------------- The loop

@given(st.integers(1, 400), st.integers(0, 100), st.floats(0, 1))
def test_lr_factor_is_warmup_stable_decay(steps, warmup, decay):
    d = round(decay * steps)
    f = [opd.lr_factor(s, steps, warmup, decay) for s in range(steps)]
    assert all(0 < x <= 1 for x in f)
    up, down = min(warmup, steps - d), max(warmup, steps - d)     # the phases may overlap: the smaller factor wins
    assert all(a <= b + 1e-12 for a, b in zip(f[:up], f[1:up]))                  # rising while warming up
    assert all(a >= b - 1e-12 for a, b in zip(f[down:], f[down + 1:]))           # falling in the decay
    assert f[-1] <= 1 / max(d, 1) + 1e-12 if d else f[-1] == min(1.0, steps / max(warmup, 1))


def test_plurals_models_turn_a_gguf_file_into_the_two_folders(tmp_path):
    """real/plurals.py models: a .gguf file (a small Llama and its BPE tokenizer, written with the
    gguf package's writer) becomes chat/ and plain/, the same weights and logits as the model written,
    the same encodings, and a chat template in chat/ only (test_teacher_without_a_chat_template_reads_
    plain_text runs such a pair)."""
    pytest.importorskip("gguf", reason="optional: pip install -r requirements-test.txt")
    sys.path.insert(0, str(HERE / "real"))
    try:
        import plurals
    finally:
        sys.path.pop(0)
    tok = bpe_tokenizer(vocab=2_000)
    torch.manual_seed(0)
    model = build.make_model(tok, 2, 32).eval()
    write_gguf(model, tok, tmp_path / "tiny.gguf")
    plurals.models(str(tmp_path / "tiny.gguf"), tmp_path / "m")
    text, ids = "bada kelo mi zo ruka", torch.tensor([tok("bada kelo mi zo ruka")["input_ids"]])
    for kind in ("chat", "plain"):
        t, m = opd.load_pretrained(str(tmp_path / "m" / kind), "cpu")
        assert t(text)["input_ids"] == tok(text)["input_ids"] and t.eos_token_id == tok.eos_token_id
        assert bool(t.chat_template) == (kind == "chat")
        with torch.no_grad():
            torch.testing.assert_close(m.eval()(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_rollout_metrics_on_hand_made_values():
    """Two rollouts of 26 tokens budget: one loops (its 24-token tail is repetitive) and one stops
    at token 3. The figures are the hand-computed means over the masked tokens."""
    eos, B, T = 2, 2, 26
    loop = [5, 6] * 13                                               # truncated, repetitive tail
    stop = [7, 8, eos] + [0] * 23
    tokens = torch.tensor([loop, stop])
    mask, lengths, truncated = opd.response_mask(tokens, eos)
    lp_s = torch.full((B, T), -0.5)
    lp_t = torch.full((B, T), -1.5)
    lp_t[0, 2:] = -0.25                                              # the loop's tail: the teacher likes it
    p_eos_s, p_eos_t = torch.full((B, T), 0.9), torch.full((B, T), 0.6)
    terms = opd.TokenTerms(lp_s, lp_t, p_eos_s, p_eos_t, None, None)
    m = opd.rollout_metrics(terms, mask, lengths, truncated, [loop, stop[:3]], eos)
    n = 26 + 3
    assert m["logp/student"] == pytest.approx(-0.5)
    assert m["logp/teacher"] == pytest.approx((2 * -1.5 + 24 * -0.25 + 3 * -1.5) / n)
    assert m["adv/repetitive"] == pytest.approx(0.25) and m["adv/repetitive_frac"] == pytest.approx(24 / n)
    assert m["adv/regular"] == pytest.approx(-1.0)                   # 2 loop tokens + 3 of the stop
    assert m["kl/reverse"] == pytest.approx(-m["adv/mean"])
    assert m["eos/p_student"] == pytest.approx(0.9) and m["eos/p_teacher"] == pytest.approx(0.6)
    assert m["eos/teacher_lower_frac"] == 1.0 and "kl/ref" not in m


def test_same_seed_same_metrics(work):
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    a = opd.run_opd(_tiny_cfg(work, run_name="a"))
    b = opd.run_opd(_tiny_cfg(work, run_name="b"))
    c = opd.run_opd(_tiny_cfg(work, run_name="c", seed=1))
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_self_distillation_zero_loss_and_unchanged(work):
    student = opd.default_pair()[1]                                 # the teacher is the student
    rows = opd.run_opd(_tiny_cfg(work, run_name="self", teacher=student, student=student, save_student=True))
    assert all(abs(r["loss/total"]) < 1e-6 and abs(r["kl/reverse"]) < 1e-6 for r in rows if "loss/total" in r)
    _, before = opd.load_pretrained(student, "cpu")
    _, after = opd.load_pretrained(str(work / "inproc" / "self" / "student"), "cpu")
    for (n, p), (_, q) in zip(before.named_parameters(), after.named_parameters()):
        assert torch.equal(p, q), n


OPD_TERM = {"drop-trunc", "overlong", "adv-log", "adv-clip", "eos-mask", "full-vocab", "prefix-opd", "iw-opd", "topk"}


EXTRA_TERMS = {"stable-opd": ("ref_kl", "sft"), "ref-kl": ("ref_kl",), "mixture": ("sft",), "sft-only": ("sft",),
               "seq-kd": ("seq_kd",)}


@pytest.fixture(scope="module")
def plain_rows(work):
    return opd.run_opd(_tiny_cfg(work, run_name="plain-for-presets"))


@pytest.mark.parametrize("method", [m for m in opd.METHODS if m != "opd"])
def test_every_preset_runs_with_its_own_term_on(work, plain_rows, method):
    """Each preset trains, and what sets it apart from plain OPD is on in its logs: its extra loss
    term, or on step 0's rollouts (the same as plain OPD's) an OPD term of another value, or other
    rollouts (rep-penalty), or the guard's action (an alert forced at step 1)."""
    flags = {"opd+guard": ["--alert-max-len", "1"], "guard-seq-kd": ["--alert-max-len", "1"],
             "prefix-opd": ["--prefix-len", "4"], "adv-clip": ["--adv-clip", "0.05"],
             "rep-penalty": ["--rep-penalty", "50"]}.get(method, [])          # settings that act on a tiny pair
    rows = opd.run_opd(_tiny_cfg(work, method=method, flags=flags), method)
    train, plain = [r for r in rows if "loss/total" in r], plain_rows[0]
    assert len(rows) == 5 and all(math.isfinite(r["loss/total"]) for r in train)
    for term in EXTRA_TERMS.get(method, ()):
        assert all(r[f"loss/{term}"] > -1e-6 for r in train) and train[-1][f"loss/{term}"] > 0, term
    if method == "sft-only":
        assert all(r["loss/total"] == pytest.approx(opd.STABLE_OPD["sft_coef"] * r["loss/sft"]) for r in train)
    if method in OPD_TERM:
        assert 0 < plain["rollout/trunc_rate"] < 1                 # stopped and truncated rollouts: every fix acts
        assert train[0]["rollout/len_mean"] == plain["rollout/len_mean"] and train[0]["loss/opd"] != plain["loss/opd"]
    if method == "rep-penalty":
        assert (train[0]["rollout/len_mean"], train[0]["loss/opd"]) != (plain["rollout/len_mean"], plain["loss/opd"])
    if method == "opd+guard":
        assert train[1].get("guard/acted") == 1 and "loss/sft" in train[2] and "loss/sft" not in train[1]
    if method == "guard-seq-kd":
        assert train[1].get("guard/acted") == 1 and train[2]["loss/seq_kd"] >= 0 and "loss/seq_kd" not in train[1]


def test_sft_only_does_not_depend_on_the_teacher(work):
    """The control switches the OPD term off: its losses, and so its student, are the same whoever
    the teacher is (here the self-built teacher and the student itself), while the KL it logs is not."""
    strip = lambda rows, k: [r[k] for r in rows if k in r]
    a = opd.run_opd(_tiny_cfg(work, method="sft-only", run_name="sft-a"), "sft-only")
    student = opd.default_pair()[1]
    b = opd.run_opd(_tiny_cfg(work, method="sft-only", run_name="sft-b", teacher=student, student=student), "sft-only")
    assert strip(a, "loss/total") == strip(b, "loss/total") and strip(a, "eval/accuracy") == strip(b, "eval/accuracy")
    assert strip(a, "kl/reverse") != strip(b, "kl/reverse")


def test_evaluation_does_not_touch_training_randomness(work):
    """Sampled evaluation draws from its own generator: evaluating more often changes no training step."""
    keys = ("loss/total", "rollout/len_mean", "rollout/accuracy", "kl/reverse")
    a = opd.run_opd(_tiny_cfg(work, run_name="ev1", eval_every=1))
    b = opd.run_opd(_tiny_cfg(work, run_name="ev4", eval_every=4))
    assert [[r[k] for k in keys] for r in a if "loss/total" in r] == [[r[k] for k in keys] for r in b if "loss/total" in r]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run(work):
    """Stable-OPD on CUDA (a bfloat16 teacher, chunked loss): finite, and both of its terms on."""
    rows = opd.run_opd(_tiny_cfg(work, "stable-opd", run_name="cuda", device="cuda", chunk_size=4), "stable-opd")
    assert len(rows) == 5 and all(math.isfinite(r["loss/total"]) for r in rows if "loss/total" in r)
    assert all(r["loss/ref_kl"] >= 0 and r["loss/sft"] > 0 for r in rows if "loss/total" in r)


def test_chunked_run_equals_unchunked(work):
    strip = lambda rows: [{k: round(v, 5) for k, v in r.items() if not k.startswith("time/") and isinstance(v, float) and v == v} for r in rows]
    a = opd.run_opd(_tiny_cfg(work, run_name="u", objective="full"))
    b = opd.run_opd(_tiny_cfg(work, run_name="c3", objective="full", chunk_size=3))
    assert strip(a) == strip(b)


def test_console_prints_a_line_every_log_every_steps_each_with_its_run(work, capsys):
    """--log-every 2 on 4 steps: lines at steps 0 and 2 and the last, plus the evaluations and the
    final one, every line of the run prefixed with its name."""
    opd.run_opd(opd.with_settings(_tiny_cfg(work, run_name="quiet"), log_every=2, eval_every=10,
                                  log_samples_every=0))
    lines = [l for l in capsys.readouterr().out.splitlines() if re.search(r" step +\d+(/| final)", l)]
    assert all(l.startswith("[opd s0] step") for l in lines), lines
    assert [l.split()[3] for l in lines[:-1]] == ["0/4", "2/4", "3/4"] and "final" in lines[-1]


def test_resumed_run_equals_straight_run(work, monkeypatch, capsys):
    """6 steps straight = 3 steps, an interrupt, and 3 resumed steps, metric for metric: student,
    optimizer, scheduler, both RNGs, monitor (its EMA feeds rollout/growth) and guard state all
    come back. stable-opd + guard also checks that the reference model stays the initial student."""
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    cfg = lambda name, **kw: _tiny_cfg(work, "stable-opd", run_name=name, steps=6, guard=True, **kw)
    straight = opd.run_opd(cfg("straight", save_every=0))
    real = opd.LengthMonitor.update

    def interrupted(self, seqs, step):
        if step == 4:
            raise KeyboardInterrupt                                  # Ctrl-C after step 3 was logged
        return real(self, seqs, step)

    monkeypatch.setattr(opd.LengthMonitor, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opd.run_opd(cfg("cut", save_every=3))
    monkeypatch.undo()
    run_dir = work / "inproc" / "cut"
    assert [r["step"] for r in opd.read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
    assert opd.torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 3
    resumed = opd.run_opd(cfg("cut", save_every=3, resume=True))
    assert [r["step"] for r in resumed] == list(range(7))
    assert strip(resumed) == strip(straight)
    refused(capsys, opd.run_opd, cfg("cut", save_every=3, resume=True, lr=3e-4),    # other settings: refused
            match="was written with --lr 0.0015")
    assert strip(opd.read_metrics(run_dir / "metrics.jsonl")) == strip(straight)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A kill in the middle of torch.save leaves the previous checkpoint whole."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = tmp_path / "checkpoint.pt"
    state = opd.TrainState(model, opt, sched, random.Random(0), random.Random(1), torch.Generator(),
                           torch.Generator(), opd.LengthMonitor(2, 8), None, opd.LossSettings())
    opd.save_checkpoint(path, 5, opd.Config(), state)
    real = torch.save

    def killed(obj, f):
        real(obj, f)
        Path(f).write_bytes(Path(f).read_bytes()[:100])              # half written, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(opd.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        opd.save_checkpoint(path, 10, opd.Config(), state)
    assert torch.load(path, weights_only=False)["step"] == 5


def test_nan_loss_stops_cleanly_and_keeps_metrics(work, monkeypatch):
    cfg = _tiny_cfg(work, run_name="nan")
    opd.run_opd(cfg)                                            # a first, good run of the same name
    good = (work / "inproc" / "nan" / "metrics.jsonl").read_text()
    calls = {"n": 0}
    real = opd.sampled_token_loss

    def poisoned(adv, lp):
        calls["n"] += 1
        return real(adv, lp) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(opd, "sampled_token_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        opd.run_opd(cfg)
    rows = opd.read_metrics(work / "inproc" / "nan" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]                  # every completed step, intact JSON
    assert (work / "inproc" / "nan" / "metrics.prev.jsonl").read_text() == good   # the earlier run kept

# ----------------------------------------------------------------------------- The study and the command line, as a user types it

def test_study_plots_dir_keeps_committed_figures():
    """plots/ for the default study alone; <out_dir>/plots for any other, --plots-dir if given."""
    study, cfg = opd.Study(), opd.Config()
    assert opd.plots_dir(cfg, study) == Path("plots")
    assert opd.plots_dir(opd.Config(save_every=0, out_dir="r"), opd.Study(workers=1)) == Path("plots")   # same numbers
    assert opd.plots_dir(opd.Config(threads=2), study) == Path("runs") / "plots"       # other arithmetic
    assert opd.plots_dir(cfg, opd.Study(methods="opd", seeds=1)) == Path("runs") / "plots"
    assert opd.plots_dir(opd.Config(lr=3e-4, out_dir="r"), study) == Path("r") / "plots"
    assert opd.plots_dir(cfg, opd.Study(methods="opd", plots_dir="p")) == Path("p")
    assert opd.plots_dir(opd.with_settings(cfg, ref_kl=0.1), study) == Path("runs") / "plots"


def test_cli_writes_every_documented_key(work):
    rows = rows_of(work / "runs", "opd-s0")
    keys = set().union(*rows)
    assert set(METRIC_KEYS) <= keys, set(METRIC_KEYS) - keys
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert (work / "plots" / "results.csv").exists() and (work / "plots" / "fig1_accuracy_length.png").exists()


def test_two_runs_in_two_processes(work, tmp_path):
    """--workers 2: the runs go to a pool of two processes, each run's log equals the one it writes
    alone, and the table has a line per method."""
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    r = cli(*TINY, "--methods", "opd,sft-only", "--seeds", "1", "--workers", "2",      # the last --workers wins
            "--out-dir", str(tmp_path / "runs"), "--plots-dir", str(tmp_path / "plots"))
    assert "2 runs in 2 process(es)" in r.stdout and "2/2 runs done" in r.stdout
    assert strip(rows_of(tmp_path / "runs", "opd-s0")) == strip(rows_of(work / "runs", "opd-s0"))
    text = (tmp_path / "plots" / "results.md").read_text()
    assert "| opd | 1 |" in text and "| sft-only | 1 |" in text


def test_ctrl_c_names_the_resume_command(work, tmp_path):
    """SIGINT during a study: the message gives the command that continues it, and that command
    finishes the run from its checkpoint."""
    import shlex
    import signal
    args = [*TINY, "--methods", "opd", "--seeds", "1", "--steps", "12", "--eval-every", "6", "--save-every", "2",
            "--out-dir", str(tmp_path / "runs"), "--plots-dir", str(tmp_path / "plots")]
    p = subprocess.Popen([sys.executable, str(HERE / "opd.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=HERE, env=dict(os.environ, PYTHONPATH=str(HERE)))
    for line in p.stdout:
        if "step    3" in line:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" not in err, err
    cmd = shlex.split(err.strip().splitlines()[-1])
    assert cmd[-1] == "--resume" and cmd[2:-1] == args, err
    done = [r["step"] for r in opd.read_metrics(tmp_path / "runs" / "opd-s0" / "metrics.jsonl")]
    assert 4 <= len(done) < 13                                        # stopped mid-run
    cfg, _, given = opd.parse_config(cmd[2:])                         # the printed command, run in-process
    rows = opd.run_opd(opd.config_for(cfg, "opd", cfg.seed, given), "opd")
    assert [r["step"] for r in rows] == list(range(13)) and cfg.resume
    assert opd.read_metrics(tmp_path / "runs" / "opd-s0" / "metrics.jsonl")[:len(done) - 2] == \
        opd.read_metrics(tmp_path / "runs" / "opd-s0" / "metrics.prev.jsonl")[:len(done) - 2]   # earlier steps kept as logged


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_real_pair_through_the_flags(real_pairs, arch, tmp_path):
    d, tok = real_pairs
    tok2, _ = opd.load_pretrained(str(d / arch / "student"), "cpu")
    text = "bada kelo mi zo ruka"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"] != []     # encodings, not just loading
    assert len(tok2) == 32_000 and tok2.chat_template
    args = ["--teacher", str(d / arch / "teacher"), "--student", str(d / arch / "student"), "--prompts",
            str(d / "prompts.jsonl"), "--methods", "stable-opd", "--seeds", "1", "--steps", "2", "--batch-size", "4",
            "--max-new-tokens", "8", "--eval-every", "1", "--chunk-size", "3", "--workers", "1",
            "--out-dir", str(tmp_path / "runs"), "--plots-dir", str(tmp_path / "plots")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        opd.run_study(*opd.parse_config(args))
    out = out.getvalue()
    rows = opd.read_metrics(tmp_path / "runs" / "stable-opd-s0" / "metrics.jsonl")
    assert len(rows) == 3 and set(METRIC_KEYS) - {"eval/accuracy"} <= set().union(*rows)
    assert "chat formats differ" not in out                             # one tokenizer: one format


def test_opd_py_alone_runs_next_to_pair_and_says_where_to_get_it(tmp_path):
    """opd.py copied into an empty folder beside pair/ runs a short study with no other file of the
    repository; without pair/ it stops with one line saying where to get the pair, exit code 2."""
    import shutil
    for name in ("with", "without"):
        (tmp_path / name).mkdir()
        shutil.copy(HERE / "opd.py", tmp_path / name)
    shutil.copytree(HERE / "pair", tmp_path / "with" / "pair", ignore=shutil.ignore_patterns("*.py"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [sys.executable, "opd.py", "--methods", "opd", "--seeds", "1", "--steps", "5", "--batch-size", "16",
            "--eval-size", "16", "--eval-every", "5"]
    r = subprocess.run(args, cwd=tmp_path / "with", capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(opd.read_metrics(tmp_path / "with" / "runs" / "opd-s0" / "metrics.jsonl")) == 6
    assert (tmp_path / "with" / "runs" / "plots" / "results.md").exists()
    r = subprocess.run(args, cwd=tmp_path / "without", capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pair/build.py" in r.stderr, r.stderr
    assert "no model pair at" in r.stderr and not r.stdout

# ----------------------------------------------------------------------------- docs: what the tutorial and README show is what the code does

def tutorial_block(marker: str) -> str:
    """The one ```python block of tutorial.md that contains `marker`: the tests run it as written."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (HERE / "tutorial.md").read_text(), re.S) if marker in b]
    assert len(blocks) == 1, f"{len(blocks)} tutorial blocks contain {marker!r}"
    return blocks[0]


DOCS = ("README.md", "tutorial.md", "plots/README.md")
FILES = ("opd.py", "studies/study.py", "pair/build.py", "peers/trl_opd.py", "real/plurals.py")


def module_defs(path):
    """The module-level functions and classes a file defines."""
    return set(re.findall(r"^(?:def|class) (\w+)", (HERE / path).read_text(), re.M))


def test_tutorial_names_exist_in_the_files():
    text = (HERE / "tutorial.md").read_text()
    names = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)\(\)`", text))
    assert len(names) >= 15
    known = set().union(*map(module_defs, FILES))
    missing = sorted(n for n in names if n not in known)
    assert not missing, f"tutorial.md names functions that no file of the repository defines: {missing}"


def test_documented_figures_and_tables_are_tracked():
    """Every plots/ file the docs show or cite is in the repository (git ls-files), and every committed
    figure is shown in one of them: a figure written but ignored or never added shows as a broken image
    on a fresh checkout, and one no document shows is noise."""
    text = (HERE / "README.md").read_text() + (HERE / "tutorial.md").read_text() + \
        (HERE / "plots" / "README.md").read_text().replace("](", "](plots/")    # its links are relative
    cited = set(re.findall(r"plots/[\w/.+-]+\.(?:png|csv|md)", text.replace("plots/plots/", "plots/")))
    assert {"plots/fig1_accuracy_length.png", "plots/all/ranking.png"} <= cited     # the pattern finds them
    import shutil
    if not (HERE / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout")
    tracked = set(subprocess.run(["git", "ls-files", "plots"], cwd=HERE, capture_output=True, text=True).stdout.split())
    assert not cited - tracked, f"the docs cite files the repository lacks: {sorted(cited - tracked)}"
    figures = {f for f in tracked if f.endswith(".png")}
    assert not figures - cited, f"figures no document shows: {sorted(figures - cited)}"


def test_documented_flags_exist():
    """Every --flag the docs name is one of opd.py's, or of the command on its line (pip, accelerate,
    pair/build.py, peers/trl_opd.py), or another framework's (the porting table and its sources)."""
    lab = (HERE / "plots" / "README.md").read_text()
    text = "\n".join([(HERE / "README.md").read_text(), (HERE / "tutorial.md").read_text(),
                      lab[:lab.index("\n## History")]])                # history: that commit's commands
    other = ("pip ", "accelerate launch", "trl_opd.py", "TRL", "verl", "slime", "miles",
             "OpenRLHF", "NeMo", "ms-swift")
    text = "\n".join(l for l in text.splitlines() if not any(o in l for o in other) and not l.startswith("|"))
    flags = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)(?!\w)", text))
    assert {"alert-patience", "methods", "teacher"} <= flags                       # the pattern finds them
    known = {f.replace("_", "-") for f in [*FLAGS, *(f.name for f in opd.dataclasses.fields(build.Build))]}
    assert not flags - known - {"help"}, f"the docs name flags opd.py lacks: {sorted(flags - known)}"


def test_tutorial_monitor_snippet_runs():
    """The monitor's snippet for other loops, as written in the tutorial, on two steps of responses: the
    second holds loops, and the repetition alert of the default thresholds fires on it."""
    import types
    block = tutorial_block("monitor = LengthMonitor(eos_id=tokenizer.eos_token_id")
    setup, per_step = block.split("# each step", 1)
    logged = []
    ns = {"tokenizer": build.build_tokenizer(), "max_new_tokens": 48,
          "wandb": types.SimpleNamespace(log=lambda d, step: logged.append((step, d)))}
    exec(setup, ns)
    for step, loops in enumerate([0, 3, 3]):
        ns["step"], ns["responses"] = step, [[5, 6, 7, 2]] * (20 - loops) + [[5, 6] * 24] * loops
        exec("# each step" + per_step, ns)
    assert [s for s, _ in logged] == [0, 1, 2] and logged[0][1]["rollout/len_mean"] == 4
    assert "rollout/alert/rep_rate" in logged[2][1] and "rollout/alert/rep_rate" not in logged[1][1]


def doc_tables(text):
    """(marker, table) for every markdown table of a document: the HTML comment just above it."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            above = [l for l in lines[max(0, i - 3):i] if l.startswith("<!--")]
            out.append((above[-1] if above else None, "\n".join(lines[i:j])))
            i = j
        else:
            i += 1
    return out


def table_part(path, name: str) -> str:
    """The table named `name` in a results.md (opd.write_results' format: '### name', a blank line)."""
    text = Path(path).read_text()
    return text[text.index(f"\n### {name}\n"):].split("\n\n")[1].strip("\n")


def test_docs_tables_are_quoted_from_committed_results():
    """Every table of the docs is marked: `<!-- from plots/x/results.md#part -->` tables are byte for byte
    that part of a committed file (written by the command the docs show), and the others say what they
    are instead: `<!-- reference: ... -->` (settings, definitions) or `<!-- history: ... -->` (measured at
    an earlier commit, kept as measured)."""
    quoted = 0
    for doc in DOCS:
        for marker, table in doc_tables((HERE / doc).read_text()):
            assert marker, f"{doc}: a table with no marker: {table.splitlines()[0]}"
            m = re.match(r"<!-- from (plots/\S*results\.md)#([\w-]+) -->", marker)
            if m is None:
                assert marker.startswith(("<!-- reference: ", "<!-- history: ")), marker
                continue
            assert table == table_part(HERE / m.group(1), m.group(2)), f"{doc}: {marker} differs"
            quoted += 1
    assert quoted >= 8


# Numbers in the prose that no results file holds, each with its reason (at most 10)
PROSE_EXEMPT = {
    "0.3": "the take-off's threshold: a constant of opd.py (TAKEOFF), not a measurement",
    "0.1": "the comparison's bar for 'held': truncation at most 0.1, a definition",
    "0.05": "the right panel's margin under plain OPD's mean peak, a definition of the figure",
}


def prose_paragraphs(text):
    """(paragraph, the same with inline code, links and version numbers taken out: they are not
    measurements) for the paragraphs of a markdown text outside code blocks, tables and comments."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    out = []
    for par in re.split(r"\n\s*\n", text):
        if par.lstrip().startswith(("|", "<!--", "#", "![")):
            continue
        bare = re.sub(r"`[^`]*`|\]\([^)]*\)|arXiv \d+\.\d+|(?:TRL|trl|torch|transformers) \d+\.\d+(?:\.\d+)?", " ", par)
        out.append((par, bare))
    return out


def section(text, number):
    """Tutorial section `number`, up to the next one."""
    start = text.index(f"\n## {number}. ")
    nxt = text.find(f"\n## {number + 1}. ", start)
    return text[start:nxt if nxt > 0 else len(text)]


def test_prose_numbers_come_from_the_files_their_paragraph_names():
    """Every number with a decimal point or a percent sign in README.md and in the prose of the
    tutorial's sections 1 and 5 appears, rounded, in a committed results file that its paragraph
    names (or is one of PROSE_EXEMPT, each with its reason)."""
    assert len(PROSE_EXEMPT) <= 10
    tutorial = (HERE / "tutorial.md").read_text()
    texts = {"README.md": (HERE / "README.md").read_text(), "tutorial.md, section 1": section(tutorial, 1),
             "tutorial.md, section 5": section(tutorial, 5)}
    checked, bad = 0, []
    for where, text in texts.items():
        for par, bare in prose_paragraphs(text):
            tokens = re.findall(r"(?<![\w.])(\d+\.\d+|\d+%)(?![\w])", bare)
            tokens = [t for t in tokens if t not in PROSE_EXEMPT]
            if not tokens:
                continue
            files = set(re.findall(r"plots/[\w/.+-]*results\.(?:md|csv)", par))
            values = []
            for f in files:
                values += [float(x) for x in re.findall(r"-?\d+\.\d+|-?\d+", (HERE / f).read_text())]
            for t in tokens:
                checked += 1
                if t.endswith("%"):
                    ok = any(round(100 * abs(v)) == int(t[:-1]) for v in values)
                else:
                    d = len(t.split(".")[1])
                    ok = any(f"{abs(v):.{d}f}" == t for v in values)
                if not ok:
                    bad.append(f"{where}: {t} in a paragraph naming {sorted(files) or 'no file'}: {par[:80]!r}")
    assert checked >= 20 and not bad, bad


@pytest.mark.parametrize("doc", DOCS)
def test_prose_lines_fit_in_100_characters(doc):
    """Prose lines of the docs are at most 100 characters; tables, code blocks and images are not
    prose."""
    text = re.sub(r"```.*?```", "", (HERE / doc).read_text(), flags=re.S)
    long = [l for l in text.splitlines() if len(l) > 100 and not l.startswith(("|", "<!--", "!["))]
    assert not long, long


@pytest.mark.parametrize("path", FILES)
def test_each_file_reads_top_down(path):
    """In every file, a module-level function or class uses only module-level names defined above it
    (imports and builtins aside): a reader never meets a name that comes later."""
    import ast
    tree = ast.parse((HERE / path).read_text())
    defined = {}                                                     # name -> line of definition
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)] + \
            ([node.target.id] if isinstance(node, ast.AnnAssign) else [])
        for n in names:
            defined.setdefault(n, node.lineno)
    late = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)):
            continue
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        local = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} | \
            {a.arg for n in ast.walk(node) if isinstance(n, ast.arguments) for a in n.args + n.kwonlyargs}
        for name in (used - local) & set(defined):
            if defined[name] > node.lineno:
                late.append(f"line {node.lineno} uses {name}, defined at line {defined[name]}")
    assert not late, late


def test_opd_py_is_a_reference_first():
    """The OPD core comes first and the machinery below one banner holds the study and the command
    line only; the loop, run_opd, is the last function above it; the pair's build lives beside."""
    src = (HERE / "opd.py").read_text()
    core = src[:src.index("#   OPD ends here")]
    assert re.findall(r"^def (\w+)", core, re.M)[-1] == "run_opd"
    assert not {"build_tokenizer", "make_model", "train_supervised", "shape", "ranking_table"} & module_defs("opd.py")
    fields = {f.name for f in opd.dataclasses.fields(opd.Config)}
    assert not fields & {"pair_seed", "teacher_steps", "cache_dir", "methods", "seeds", "workers"}


@pytest.mark.parametrize("path", ["opd.py", "studies/study.py", "pair/build.py"])
def test_lines_fit_in_100_characters(path):
    long = [i for i, l in enumerate((HERE / path).read_text().splitlines(), 1) if len(l) > 100 and "http" not in l]
    assert not long, long


def test_help_strings_say_what_and_why_not_what_a_run_measured():
    """--help says what a flag does and why; measured results belong in the tutorial. No help string
    states a finding, and none holds a number other than its own default's digits."""
    words = re.compile(r"\b(measured|collapsed|inflated|learned|gave|reached|never|seed-dependent)\b", re.I)
    number = re.compile(r"\d+(?:\.\d+)?")
    for f in FLAGS.values():
        text = f.metadata["help"]
        assert not words.search(text), (f.name, text)
        assert set(number.findall(text)) <= set(number.findall(repr(f.default))) | {"0", "1"}, (f.name, text)


def test_tutorial_sections_name_the_parts_of_opd_they_read():
    """The tutorial follows a reader's order, not the file's: each numbered section opens with a line
    naming the parts of opd.py it reads by their banner titles, and together they name every banner."""
    banners = re.findall(r"^# =+\n# ([A-Z][^:\n]+): [^\n]*\n# =+$", (HERE / "opd.py").read_text(), re.M)
    assert len(banners) >= 7, banners
    text = (HERE / "tutorial.md").read_text()
    heads = re.findall(r"^## (\d+)\. .+\n\n> Reads in `opd.py`: ((?:.+\n>)*.+)", text, re.M)
    assert [h[0] for h in heads] == [str(i) for i in range(1, len(heads) + 1)] and len(heads) >= 7
    named = set()
    for _, line in heads:
        for title in re.findall(r"\*([^*]+)\*", line.replace("\n>", " ")):
            assert title in banners, title
            named.add(title)
    assert named == set(banners), set(banners) - named
