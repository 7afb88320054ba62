"""On-policy distillation (OPD) and its length inflation: a reference in one file.

The student samples responses to prompts, the frozen teacher scores the very tokens the
student sampled, and the student is trained to lower the reverse KL KL(p_S || p_T) on the
states it visits itself (GKD, Agarwal et al. 2024, arXiv 2306.13649). Luo et al. 2026
(arXiv 2604.08527) showed that this can fail abruptly: the rollouts grow until they fill
the length budget, turn repetitive, and accuracy falls ("length inflation"). This file runs
OPD on a small model pair on which it first teaches the student and then collapses, watches
the length of what the student writes, and runs the fixes proposed for it.

    python opd.py                                 # the study: opd, stable-opd, sft-only, opd+guard
    python opd.py --methods seq-kd --seeds 1      # one preset (METHODS), one seed
    python opd.py --methods opd --seeds 1 --ref-kl 0.1 --sft-coef 0.5        # your own mix
    python opd.py --teacher DIR --student DIR --prompts FILE --device cuda   # real models
    python opd.py --help                          # every flag, with its reason

Left out, compared with the paper's setup: no PPO/GRPO ratio or clipping (one update per
batch of rollouts, so the ratio is 1 and clipping is inert); one rollout per prompt (OPD's
advantage needs no group baseline); a synthetic task and a two-layer pair instead of math
problems and 1.5B/7B models; zlib's compression test scaled down from a 10,000-character
tail to a 24-token one.

The file reads top-down: every name is defined above its first use.
  OPD in one page        the objectives, the response mask, loss aggregation
  Task and model pair    the synthetic task, its grader, prompts and batches
  Rollouts and scores    sampling, hidden states, the per-token terms of the loss
  Monitor                length, truncation and repetition figures; alerts
  Stabilizers            one small function per fix, opd_loss() that composes them, the guard
  Setting up a run       Config, loading a pair through from_pretrained, the data
  The loop               evaluation, metrics, checkpoints, run_opd()
  ---- OPD ends here ----
  The study              the default study, its table and figure, the command line
Beside it: studies/study.py (every fix compared, the reports), pair/build.py (how the
shipped pair was built), peers/trl_opd.py (the fixes inside TRL).
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import re
import shlex
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch.utils.checkpoint import checkpoint

transformers.utils.logging.disable_progress_bar()       # the run's own lines are the log; no bars

# =============================================================================
# OPD in one page: the objectives, the response mask, loss aggregation
# =============================================================================

def response_mask(tokens: torch.Tensor, eos_id: int):
    """Mask of real response tokens: up to and including the first EOS.

    Returns (mask (B, T) float, lengths (B,), truncated (B,) bool). A rollout with no EOS
    within the budget is truncated and all its T tokens count.
    """
    is_eos = tokens == eos_id                                    # (B, T)
    before_eos = (is_eos.cumsum(-1) - is_eos.long()) == 0        # (B, T) nothing ended yet
    mask = before_eos.float()                                    # (B, T) EOS itself included
    truncated = ~is_eos.any(-1)                                  # (B,)
    return mask, mask.sum(-1).long(), truncated

def sampled_token_advantage(logp_teacher: torch.Tensor, logp_student: torch.Tensor):
    """A_t = log p_T(y_t|s_t) - log p_S(y_t|s_t), detached (Luo et al. 2026, Eq. 3)."""
    return (logp_teacher - logp_student).detach()

def sampled_token_loss(advantage: torch.Tensor, logp_student: torch.Tensor):
    """Per-token policy-gradient loss -A_t * log p_S(y_t): its expected gradient is that of
    KL(p_S || p_T) along the sampled sequence, with no discounting (each token its own A_t)."""
    return -advantage * logp_student

def full_vocab_reverse_kl(logp_student: torch.Tensor, logp_teacher: torch.Tensor):
    """KL(p_S || p_T)(s_t) = sum_v p_S(v) (log p_S(v) - log p_T(v)) per position.

    (..., V) log-probs in, (...) out. GKD with beta=1 (TRL's reverse KL); the gradient flows
    through p_S, the prefix s_t is not differentiated.
    """
    return (logp_student.exp() * (logp_student - logp_teacher)).sum(-1)

def reference_kl(logp_student, logp_ref):
    """KL(p_S || p_ref) per position, p_ref the frozen initial student: Stable-OPD's divergence
    constraint (Luo et al. 2026, Sec. 4; see Stabilizers). The formula of full_vocab_reverse_kl."""
    return full_vocab_reverse_kl(logp_student, logp_ref)

def tail_bucket(logp: torch.Tensor):
    """(..., k) log-probs of some tokens -> (..., k+1): one more category holding the rest of the
    mass, log(1 - sum p), so the k+1 values are a distribution again (clamped below 1)."""
    log_mass = torch.logsumexp(logp, -1, keepdim=True).clamp(max=-1e-7)       # (..., 1)
    return torch.cat([logp, torch.log(-torch.expm1(log_mass))], -1)           # (..., k+1)

def topk_reverse_kl(logp_student: torch.Tensor, logp_teacher: torch.Tensor, k: int):
    """KL(p_S || p_T) on the student's k likeliest tokens plus one tail bucket for the rest.

    (..., V) in, (...) out. The memory-saving objective of TRL (`loss_top_k` with
    `loss_add_tail`: the student's top-k for the reverse KL) and verl's tail-aware top-k KL:
    an exact KL between two (k+1)-category distributions, so never negative and never above
    the full KL. Without the tail the student could lower the loss by shrinking its own top-k
    mass (verl PR #5041). The support is chosen without gradient.
    """
    idx = logp_student.detach().topk(min(k, logp_student.shape[-1]), -1).indices   # (..., k)
    return full_vocab_reverse_kl(tail_bucket(logp_student.gather(-1, idx)),
                                 tail_bucket(logp_teacher.gather(-1, idx)))

LOSS_AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_len=None):
    """Reduce a (B, T) per-token loss over the response mask, with verl's mode names.

    token-mean              sum(l * m) / sum(m)               every token weighs the same
    seq-mean-token-mean     mean_b [sum_t l*m / sum_t m]      every sequence weighs the same
    seq-mean-token-sum      mean_b [sum_t l*m]                long sequences weigh more
    seq-mean-token-sum-norm mean_b [sum_t l*m] / max_len      (Dr. GRPO) a constant normaliser
    `mask` may hold weights in [0, 1] (down-weighted rollouts); 0 is padding.
    """
    masked = per_token * mask                                    # (B, T)
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1e-8)
    if mode == "seq-mean-token-mean":
        seq = masked.sum(-1) / mask.sum(-1).clamp(min=1e-8)      # (B,)
        has = mask.sum(-1) > 0                                   # (B,) rows with any weight
        return seq[has].mean() if has.any() else masked.sum() * 0
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).mean()
    if mode == "seq-mean-token-sum-norm":
        return masked.sum(-1).mean() / (max_len or per_token.shape[-1])
    raise ValueError(f"unknown loss_agg {mode!r}; use " + ", ".join(LOSS_AGG))

# =============================================================================
# Task and model pair: the synthetic task, its grader, prompts and batches
# =============================================================================
# Task "repeat the motif k times": prompt "c a f x 3 =", answer "c a f c a f c a f <eos>".
# Why this task: the answer is checkable, and its LENGTH is the hard part. Copying the
# motif is easy; knowing when to stop requires counting, which a 2-layer width-128 teacher
# learns and a width-64 student after a short warm-up only half learns. A student unsure
# where to stop is exactly where length inflation starts. (A task whose answer length is
# fixed by the prompt, e.g. reversal, did not inflate at all: see the tutorial.) The pair
# ships in pair/; pair/build.py says how it was trained.

LETTERS = list("abcdefgh")          # 8 motif symbols
COUNTS = [1, 2, 3, 4, 5]            # repeats; longest answer 4 * 5 = 20 tokens
MOTIF_LENS = [2, 3, 4]

class MotifTask:
    """Prompts and reference answers; held-out motifs never appear in training prompts."""

    def __init__(self, seed: int = 1234, eval_size: int = 128):
        rng = random.Random(seed)
        motifs = []
        for n in MOTIF_LENS:
            for _ in range(400):
                motifs.append(tuple(rng.sample(LETTERS, n)))
        motifs = sorted(set(motifs))
        rng.shuffle(motifs)
        n_eval = len(motifs) // 8                                # 1/8 of the motifs held out
        self.eval_motifs, self.train_motifs = motifs[:n_eval], motifs[n_eval:]
        ev = random.Random(seed + 1)
        self.eval_set = [self.example(ev.choice(self.eval_motifs), ev.choice(COUNTS))
                         for _ in range(eval_size)]

    @staticmethod
    def example(motif, k):
        return {"prompt": " ".join(motif) + f" x {k} =", "answer": " ".join(list(motif) * k)}

    def sample(self, n: int, rng: random.Random):
        return [self.example(rng.choice(self.train_motifs), rng.choice(COUNTS)) for _ in range(n)]

    def gold_set(self, n: int, seed: int = 7):
        """The fixed set of n reference solutions: the only gold data the student's warm-up,
        the rollout mixture and `sft-only` see (the teacher grades any prompt)."""
        return self.sample(n, random.Random(seed))

def exact_match(tokenizer, ids, answer) -> bool:
    """A response (token ids, EOS included if it stopped) equals the reference answer as text."""
    return bool(ids) and ids[-1] == tokenizer.eos_token_id and \
        tokenizer.decode(ids[:-1], skip_special_tokens=True).strip() == answer.strip()

def is_correct(tokenizer, ids, example) -> bool:
    """The grader: a response that stopped and matches the example's "accept" regex (the skill,
    whatever the wording), or else equals its "answer" (exact match, the toy task's grader)."""
    if example.get("accept") is not None:
        text = tokenizer.decode(ids[:-1], skip_special_tokens=True)
        return bool(ids) and ids[-1] == tokenizer.eos_token_id and \
            re.search(example["accept"], text) is not None
    return exact_match(tokenizer, ids, example["answer"])

def graded(example) -> bool:
    """Whether an example says what is correct (prompts without an answer are only trained on)."""
    return example.get("answer") is not None or example.get("accept") is not None

def prompt_token_ids(tokenizer, texts: list[str], context=()) -> list[list[int]]:
    """Token ids of each prompt, unpadded: through the tokenizer's chat template, after the
    `context` messages if any; a tokenizer without a template reads plain text, the prompt and a
    newline (whitespace, which the toy tokenizer drops)."""
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([*context, {"role": "user", "content": t}],
                                               tokenize=False, add_generation_prompt=True)
                 for t in texts]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer([t + "\n" for t in texts])["input_ids"]      # BOS if the tokenizer adds one

def left_pad(seqs: list[list[int]], pad: int, device="cpu"):
    """(B, T) ids left-padded with `pad` and the (B, T) attention mask: generation appends on
    the right."""
    T = max(len(x) for x in seqs)
    ids = torch.tensor([[pad] * (T - len(x)) + x for x in seqs], device=device)           # (B, T)
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in seqs], device=device)  # (B, T)
    return ids, mask

def position_ids(attn: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that start at 0 on each row's first real token: left padding takes none."""
    return (attn.cumsum(-1) - 1).clamp(min=0)

def encode_batch(tokenizer, texts: list[str], device="cpu", context=(), pad=None):
    """Left-padded prompt ids (B, P) and attention mask (B, P); `pad` defaults to the
    tokenizer's own."""
    ids = prompt_token_ids(tokenizer, texts, context)
    return left_pad(ids, tokenizer.pad_token_id if pad is None else pad, device)

def supervised_batch(tokenizer, examples, device="cpu"):
    """prompt + answer + EOS, left-padded, with labels only on answer tokens (incl. EOS)."""
    prompts = prompt_token_ids(tokenizer, [ex["prompt"] for ex in examples])
    answers = tokenizer([ex["answer"] for ex in examples], add_special_tokens=False)["input_ids"]
    answers = [a + [tokenizer.eos_token_id] * ex.get("eos", True)
               for a, ex in zip(answers, examples)]
    input_ids, attn = left_pad([p + a for p, a in zip(prompts, answers)], tokenizer.pad_token_id,
                               device)                                                     # (B, T)
    skips = [ex.get("skip", 0) for ex in examples]
    labels = [[-100] * (len(p) + s) + a[s:] for p, a, s in zip(prompts, answers, skips)]
    labels, _ = left_pad(labels, -100, device)                                           # (B, T)
    return input_ids, attn, labels

def sft_nll(model, tokenizer, examples, device="cpu"):
    """Mean NLL of the reference answers (the pair's build, and Stable-OPD's rollout mixture)."""
    input_ids, attn, labels = supervised_batch(tokenizer, examples, device)
    logits = model(input_ids=input_ids, attention_mask=attn,
                   position_ids=position_ids(attn)).logits.float()                     # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

# =============================================================================
# Rollouts and scores: sampling, hidden states, the per-token terms
# =============================================================================

# transformers renamed the KV cache's argument and output field from `past_key_values` to
# `cache` during 5.x; reading the name off the output class runs on releases on either side
_OUTPUT_FIELDS = transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__
CACHE = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"

@torch.no_grad()
def sample_rollouts(model, prompt_ids, prompt_mask, max_new_tokens: int, eos_id: int, pad_id: int,
                    temperature: float = 1.0, greedy: bool = False, rep_penalty: float = 1.0,
                    generator=None):
    """Sample responses with a KV cache: pure sampling at `temperature` (no top-k/top-p, so
    the samples come from the distribution the loss assumes). Returns (B, T<=max_new_tokens)
    tokens, padded with pad_id after EOS. `rep_penalty` > 1 is the CTRL penalty (off-policy).
    A row that has emitted EOS leaves the batch (and its KV cache): only live rows are computed."""
    B = prompt_ids.shape[0]
    attn = prompt_mask.clone()                                   # (b, P) b = live rows
    pos = position_ids(attn)                                     # (b, P) left padding aware
    out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    cache, logits = getattr(out, CACHE), out.logits[:, -1].float()   # (b, V)
    live = torch.arange(B, device=prompt_ids.device)             # (b,) batch index of each live row
    penalize = rep_penalty != 1.0
    seen = torch.zeros_like(logits, dtype=torch.bool) if penalize else None   # (b, V) generated
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
    t = -1
    for t in range(max_new_tokens):
        if penalize:
            penalized = torch.where(logits > 0, logits / rep_penalty, logits * rep_penalty)
            logits = torch.where(seen, penalized, logits)
        if greedy:
            nxt = logits.argmax(-1)                              # (b,)
        else:
            probs = F.softmax(logits / temperature, -1)          # (b, V)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)   # (b,)
        tokens[live, t] = nxt
        if penalize:
            seen[torch.arange(len(nxt), device=nxt.device), nxt] = True
        going = nxt != eos_id                                    # (b,)
        if not going.all():                                      # drop the rows that just ended
            keep = going.nonzero().squeeze(-1)
            live, nxt, attn, pos = live[keep], nxt[keep], attn[keep], pos[keep]
            seen = seen[keep] if penalize else None
            cache.batch_select_indices(keep)
        if len(live) == 0 or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)   # (b, P+t)
        pos = pos[:, -1:] + 1                                        # (b, 1)
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, use_cache=True,
                    **{CACHE: cache})
        cache, logits = getattr(out, CACHE), out.logits[:, -1].float()
    return tokens[:, :t + 1]                                     # (B, T)

def hidden_states(model, input_ids, attn):
    """Last hidden states (B, T, H) of a causal LM, without its vocabulary projection: the
    loss projects them chunk by chunk (token_terms)."""
    base = getattr(model, model.base_model_prefix)
    return base(input_ids=input_ids, attention_mask=attn,
                position_ids=position_ids(attn)).last_hidden_state

def response_hidden_states(model, seq, attn, P: int, groups: int = 1):
    """Hidden states (B, T, H) that predict the T response tokens of seq = prompt (P) + response.

    The rows are sorted by response length and the model runs on `groups` slices, each cut
    to its own longest response, so the padding after short responses is not computed
    (--length-groups). Rows come back in their order, zeros where a row has ended.
    """
    T = seq.shape[1] - P
    lengths = attn[:, P:].sum(-1)                                                     # (B,)
    order = lengths.argsort()
    parts = []
    for rows in order.chunk(groups):
        t = int(lengths[rows].max())
        h = hidden_states(model, seq[rows, :P + t], attn[rows, :P + t])[:, P - 1:P + t - 1]
        # h: (b, t, H)
        parts.append(F.pad(h, (0, 0, 0, T - t)))                                      # (b, T, H)
    return torch.cat(parts)[order.argsort()]                                          # (B, T, H)

class TokenTerms(NamedTuple):
    """The per-token quantities of one batch, each (B, T); token_terms() makes them."""
    logp_student: torch.Tensor         # log p_S(y_t), with grad for the sampled objective
    logp_teacher: torch.Tensor         # log p_T(y_t)
    p_eos_student: torch.Tensor        # p_S(EOS) at every position
    p_eos_teacher: torch.Tensor        # p_T(EOS) at every position
    kl: torch.Tensor | None            # the objective's KL, with grad: full or top-k (else None)
    kl_ref: torch.Tensor | None        # KL(p_S || p_ref), with grad, when a reference is given

def terms_from_logits(logits_s, logits_t, tokens, eos_id: int, temperature: float = 1.0,
                      objective: str = "sampled", top_k: int = 1, logits_ref=None) -> TokenTerms:
    """Every per-token quantity of the loss and the metrics, from the (B, T, V) logits that
    predict the (B, T) response `tokens`: the student's (with grad), the teacher's and, for
    --ref-kl, the initial student's. What a TRL or verl loop, which has the logits, calls."""
    lsm_s = F.log_softmax(logits_s.float() / temperature, -1)                       # (B, T, V)
    lsm_t = F.log_softmax(logits_t.float() / temperature, -1)                       # (B, T, V)
    # gather keeps its whole input for backward: give it a detached one unless this output is
    # in the loss, or token_terms' checkpointing keeps every chunk's (B, c, V) alive
    lsm_y = lsm_s if objective == "sampled" else lsm_s.detach()
    y = tokens[..., None]                                                           # (B, T, 1)
    # (the order of the uses of lsm_s below is the order its gradients are summed in)
    out = [lsm_y.gather(-1, y).squeeze(-1), lsm_t.gather(-1, y).squeeze(-1).detach(),
           lsm_s[..., eos_id].exp().detach(), lsm_t[..., eos_id].exp().detach()]   # (B, T) each
    out.append(full_vocab_reverse_kl(lsm_s, lsm_t) if objective == "full" else
               topk_reverse_kl(lsm_s, lsm_t, top_k) if objective == "topk" else None)
    out.append(None if logits_ref is None else
               reference_kl(lsm_s, F.log_softmax(logits_ref.float() / temperature, -1)))
    return TokenTerms(*out)

def token_terms(h_s, head_s, h_t, head_t, tokens, eos_id: int, temperature: float = 1.0,
                chunk: int = 0, objective: str = "sampled", top_k: int = 1, h_ref=None,
                head_ref=None) -> TokenTerms:
    """terms_from_logits() on hidden states (B, T, H) and the models' vocabulary heads, the
    memory-saving way: with chunk > 0 the projection and log-softmax run `chunk` positions at
    a time and are recomputed in the backward pass, so no (B, T, V) tensor is ever alive. With
    a 152k vocabulary, B=4 and T=1024, the unchunked float32 log-softmax alone is 2.5 GB."""
    def terms(hs, ht, hr, y):
        return tuple(terms_from_logits(head_s(hs), head_t(ht), y, eos_id, temperature, objective,
                                       top_k, None if hr is None else head_ref(hr)))

    T = tokens.shape[1]
    step = chunk if chunk > 0 else T
    parts = []
    for s in range(0, T, step):
        cut = slice(s, s + step)
        args = (h_s[:, cut], h_t[:, cut], None if h_ref is None else h_ref[:, cut], tokens[:, cut])
        if chunk > 0 and torch.is_grad_enabled() and h_s.requires_grad:
            parts.append(checkpoint(terms, *args, use_reentrant=False))
        else:
            parts.append(terms(*args))
    return TokenTerms(*[None if c[0] is None else torch.cat(c, 1) for c in zip(*parts)])

def sequence_nll(model, prompt_ids, prompt_attn, tokens, eos_id: int, groups: int = 1):
    """Mean NLL per token of given responses `tokens` (B, T) after the prompts (B, P), up to and
    including each row's first EOS: supervised training on token ids (sequence-level KD)."""
    mask = response_mask(tokens, eos_id)[0]                                           # (B, T)
    seq = torch.cat([prompt_ids, tokens], 1)                                          # (B, P+T)
    attn = torch.cat([prompt_attn, mask.long()], 1)                                   # (B, P+T)
    h = response_hidden_states(model, seq, attn, prompt_ids.shape[1], groups)         # (B, T, H)
    logp = F.log_softmax(model.get_output_embeddings()(h).float(), -1)                # (B, T, V)
    nll = -logp.gather(-1, tokens[..., None]).squeeze(-1)                             # (B, T)
    return (nll * mask).sum() / mask.sum().clamp(min=1)

# =============================================================================
# Monitor: length, truncation and repetition, with alerts
# =============================================================================
# Framework-free: token id lists in, plain numbers out. Paste it into a TRL or verl loop.

def compression_ratio(ids) -> float:
    """CompRatio = len(raw) / len(zlib(raw)) of a token-id sequence (Luo et al. 2026, Sec. 3.3)."""
    raw = b"".join(int(i).to_bytes(4, "little") for i in ids)   # 4 bytes/id: any vocabulary size
    return len(raw) / len(zlib.compress(raw, 9))

def is_repetitive(ids, window: int, tau: float) -> bool:
    """Repetitive if the last `window` tokens exist (the tail is long enough) and compress
    better than tau. The paper uses a 10,000-character tail and tau=10; a 24-token tail is
    96 bytes, where zlib's fixed overhead caps the ratio near 5, so tau is scaled to 3.0:
    loops of period 2-4 score 3.4-4.8, random tails 1.0-2.1 (test_opd.py checks both)."""
    return len(ids) >= window and compression_ratio(ids[-window:]) > tau

def strip_eos(ids, eos_id: int):
    """The response without its final EOS (a stopped rollout's last token): repetition looks
    at the text."""
    return ids[:-1] if ids and ids[-1] == eos_id else ids

def ngram_repetition(ids, n: int = 3) -> float:
    """Fraction of the sequence's n-grams that already occurred earlier in it (0: no repeats)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0

def length_stats(seqs, eos_id: int, max_len: int, window: int = 24, tau: float = 3.0) -> dict:
    """Length, truncation and repetition figures of a batch of generated id sequences.

    `seqs`: list of token id lists, each the response only (EOS included if it stopped).
    """
    lengths = sorted(len(s) for s in seqs)
    n = max(len(seqs), 1)
    trunc = [len(s) > 0 and s[-1] != eos_id and len(s) >= max_len for s in seqs]
    body = [strip_eos(s, eos_id) for s in seqs]
    p90 = lengths[min(len(lengths) - 1, math.ceil(0.9 * len(lengths)) - 1)] if lengths else 0
    return {
        "len_mean": sum(lengths) / n,
        "len_max": lengths[-1] if lengths else 0,
        "len_p90": p90,
        "trunc_rate": sum(trunc) / n,
        "rep_rate": sum(is_repetitive(b, window, tau) for b in body) / n,
        "ngram_rep": sum(ngram_repetition(b) for b in body) / n,
    }

class LengthMonitor:
    """Keeps the history of length_stats and raises each alert once, at onset.

    Alerts: max length over a threshold (the starter's check), truncation rate, repetition
    rate, and growth: mean length above its exponential moving average (EMA) by `growth`
    (so inflation is caught before it fills the budget). A condition must hold `patience`
    consecutive steps to fire, so one noisy batch is not an alarm. `update` returns the
    stats plus 'alert/<name>' = 1 for new alerts; `new_alerts` lists them as
    (name, value, threshold) for a caller to print or act on.
    """

    def __init__(self, eos_id: int, max_len: int, max_len_alert: int = 0, trunc: float = 0.2,
                 rep: float = 0.02, growth: float = 0.4, ema: float = 0.9, warmup: int = 3,
                 window: int = 24, tau: float = 3.0, patience: int = 2):
        self.eos_id, self.max_len, self.window, self.tau = eos_id, max_len, window, tau
        self.thresholds = {"max_len": max_len_alert or math.inf, "trunc_rate": trunc,
                           "rep_rate": rep, "growth": growth}
        self.ema_beta, self.warmup, self.patience = ema, warmup, patience
        self.ema, self.n, self.active, self.history, self.new_alerts = None, 0, set(), [], []
        self.streak = dict.fromkeys(self.thresholds, 0)         # consecutive steps each held

    def update(self, seqs, step: int) -> dict:
        s = length_stats(seqs, self.eos_id, self.max_len, self.window, self.tau)
        self.n += 1
        growth = 0.0 if self.ema is None else s["len_mean"] / max(self.ema, 1e-8) - 1.0
        values = {"max_len": s["len_max"], "trunc_rate": s["trunc_rate"],
                  "rep_rate": s["rep_rate"], "growth": growth}
        held = {k: v > self.thresholds[k] for k, v in values.items()}
        held["growth"] = held["growth"] and self.n > self.warmup
        out, self.new_alerts = dict(s, growth=growth), []
        for name in values:
            self.streak[name] = self.streak[name] + 1 if held[name] else 0
            fired = self.streak[name] >= self.patience
            if fired and name not in self.active:
                out[f"alert/{name}"] = 1
                self.new_alerts.append((name, values[name], self.thresholds[name]))
            if fired:
                self.active.add(name)
            else:
                self.active.discard(name)
        new = s["len_mean"] if self.ema is None else \
            self.ema_beta * self.ema + (1 - self.ema_beta) * s["len_mean"]
        self.ema = new
        self.history.append(out)
        return out

# =============================================================================
# Stabilizers: one function per fix, opd_loss() that composes them, the guard
# =============================================================================
# Each fix is one term of the loss or one change to the advantage, and all compose in
# opd_loss(): the function to copy into another training loop. The Guard switches a fix on
# mid-run when the monitor raises an alert. Which to use is measured in the tutorial.

def _f(default, why, neutral=False):
    """A settings field: its default and its one-line reason, which --help prints. `neutral`
    marks a flag that changes no number a run computes (where files go, how often to save): a
    checkpoint resumes with it changed."""
    return field(default=default, metadata={"help": why, "neutral": neutral})

@dataclass(frozen=True)
class LossSettings:
    """What opd_loss() computes: the objective and every stabilizer that is a term of the loss or
    a change to the advantage. The defaults are plain sampled-token OPD. The presets (METHODS)
    and the guard change these settings and nothing else of the loss."""
    objective: str = _f("sampled", "sampled: A_t = log p_T(y_t) - log p_S(y_t), loss -A_t log "
                        "p_S(y_t); full: KL(p_S||p_T) over the vocabulary; topk: that KL on the "
                        "student's top-k tokens and one bucket for the rest")
    top_k: int = _f(1, "k of --objective topk")
    loss_agg: str = _f("token-mean", "how per-token losses are averaged (verl's names)")
    opd_coef: float = _f(1.0, "weight of the OPD term; 0 with --sft-coef: the sft-only control")
    ref_kl: float = _f(0.0, "beta of beta*KL(p_S || p_ref), p_ref the initial student (Stable-OPD)")
    sft_coef: float = _f(0.0, "lambda of the NLL on reference solutions from the gold set "
                         "(Stable-OPD's rollout mixture)")
    seq_kd_coef: float = _f(0.0, "weight of the NLL on the teacher's own samples that stop "
                            "(sequence-level KD): SFT without gold data")
    trunc_weight: float = _f(1.0, "loss weight of truncated rollouts: 0 drops them (DAPO)")
    overlong_buffer: int = _f(0, "DAPO's soft overlong penalty over the last B tokens; 0: off")
    adv_regulation: str = _f("none", "log: sign(A) log(1 + |A|); clip: A clipped to +-adv_clip")
    adv_clip: float = _f(1.0, "bound for --adv-regulation clip")
    eos_mask: bool = _f(False, "zero the advantage on EOS: the teacher cannot train stopping away")
    prefix_len: int = _f(0, "the OPD term on the first N response tokens only (prefix OPD), where "
                         "the teacher's grades are most reliable; 0: every token")
    iw_gamma: float = _f(0.0, "IW-OPD: each token's advantage times 1 + gamma x the share of the "
                         "rollout's teacher-student discrepancy still ahead of it; 0: off")

def overlong_penalty(lengths, max_len: int, buffer: int):
    """DAPO's soft overlong penalty (Yu et al. 2025, arXiv 2503.14476, Eq. 13), added to
    every token's advantage: 0 up to max_len - buffer, then falling linearly to -1 at max_len."""
    return torch.clamp(-(lengths.float() - (max_len - buffer)) / buffer, max=0.0)

def regulate_advantage(adv, mode: str, bound: float = 1.0):
    """'log': sign(A) log(1 + |A|); 'clip': A clipped to [-bound, bound]
    ("Demystifying On-Policy Distillation: Roles, Pathologies, and Regulations",
    arXiv 2607.13399)."""
    if mode == "log":
        return torch.sign(adv) * torch.log1p(adv.abs())
    if mode == "clip":
        return adv.clamp(-bound, bound)
    raise ValueError(f"unknown adv_regulation {mode!r}; use none, log or clip")

def eos_advantage_mask(adv, tokens, eos_id: int):
    """Zero the advantage on EOS tokens, so the teacher's view of stopping cannot push the
    student's EOS probability down (SimpleOPD, arXiv 2608.14277; "When EOS Tokens Disagree")."""
    return torch.where(tokens == eos_id, torch.zeros_like(adv), adv)

def truncation_weights(mask, truncated, weight: float):
    """Loss weights: truncated rollouts' tokens times `weight` (0 drops them, DAPO's overlong
    filtering)."""
    return mask * torch.where(truncated, weight, 1.0)[:, None]

def prefix_weights(mask, n: int):
    """Prefix OPD (Zhang et al. 2026, "Fast and Effective On-policy Distillation from Reasoning
    Prefixes", arXiv 2602.15260): the OPD term on the first n response tokens of each rollout.
    The paper also stops sampling at n to save compute; here the whole rollout is still
    sampled, so the monitor sees what the student would write."""
    return mask * (torch.arange(mask.shape[-1], device=mask.device) < n)

def iw_opd_weights(adv, mask, gamma: float):
    """IW-OPD's token weights (Xie et al. 2026, "On the Position Bias of On-Policy
    Distillation", arXiv 2606.22600; TRL's IWOPDTrainer): w_t = 1 + gamma * (1 - D_<t / D),
    D_<t the summed |A| of the rollout's tokens before t and D its total. Early tokens, and
    tokens before the student and teacher have drifted apart, weigh up to 1 + gamma; a token
    after all the discrepancy weighs 1. (B, T) in and out, detached."""
    a = adv.abs() * mask                                          # (B, T)
    before = a.cumsum(-1) - a                                     # (B, T) discrepancy before t
    total = a.sum(-1, keepdim=True).clamp(min=1e-8)               # (B, 1)
    return (1.0 + gamma * (1.0 - before / total)).detach()

def mixture_batch(gold, batch, rng: random.Random):
    """The rollout mixture's reference solutions for one step (Luo et al. 2026, Sec. 4): one
    draw from the fixed gold set per prompt, or, without a gold set, the step's own prompts
    that have an answer."""
    if gold:
        return [rng.choice(gold) for _ in batch]
    return [e for e in batch if e.get("answer") is not None]

@torch.no_grad()
def teacher_samples(teacher, prompt_ids, prompt_attn, max_new_tokens: int, eos_id: int,
                    pad_id: int, temperature: float, generator=None):
    """Sequence-level KD's targets (Kim & Rush 2016, arXiv 1606.07947; TRL's GKD with
    seq_kd=True): the teacher answers the prompts, and the rows that stop are kept, with no
    grading, so no gold data is needed. Returns (responses (B, T), kept (B,) bool). Kim & Rush
    take the teacher's beam-search output; a sample at `temperature` keeps its spread."""
    resp = sample_rollouts(teacher, prompt_ids, prompt_attn, max_new_tokens, eos_id, pad_id,
                           temperature, generator=generator)                          # (B, T)
    return resp, ~response_mask(resp, eos_id)[2]

def opd_loss(logp_student, logp_teacher, tokens, eos_id: int, s: LossSettings = LossSettings(),
             *, mask=None, kl=None, kl_ref=None, sft=None, seq_kd=None, max_len=None):
    """The whole loss of one batch of rollouts: the objective with every stabilizer that `s`
    switches on. The default settings are plain sampled-token OPD.

    Inputs, (B, T) over the response tokens: logp_student (with grad) and logp_teacher of the
    sampled `tokens`. mask: the response tokens' weights, such as TRL's or verl's completion
    mask; None builds it from `eos_id` (response_mask); lengths and truncation always come from
    `tokens` and `eos_id`. kl: the objective's KL per position, with grad, for objective 'full'
    or 'topk'; kl_ref: KL(p_S || p_ref) per position, for ref_kl > 0; sft, seq_kd: the NLL of
    reference solutions and of the teacher's samples (scalars, with grad), for sft_coef and
    seq_kd_coef > 0. max_len: the length budget (overlong penalty, seq-mean-token-sum-norm).
    Returns (loss, parts), parts holding each term before its coefficient.
    """
    needed = {"kl": (s.objective != "sampled", kl), "kl_ref": (s.ref_kl > 0, kl_ref),
              "sft": (s.sft_coef > 0, sft), "seq_kd": (s.seq_kd_coef > 0, seq_kd)}
    missing = [name for name, (on, given) in needed.items() if on and given is None]
    if missing:                                   # a term switched on but not given: never a 0
        raise ValueError(f"these loss settings need {', '.join(missing)}: pass it to opd_loss")
    built, lengths, truncated = response_mask(tokens, eos_id)                # (B, T), (B,), (B,)
    mask = built if mask is None else mask.to(built.dtype)                   # (B, T)
    if s.objective == "sampled":
        raw = sampled_token_advantage(logp_teacher, logp_student)            # (B, T)
        adv = raw
        if s.overlong_buffer > 0:
            adv = adv + overlong_penalty(lengths, max_len, s.overlong_buffer)[:, None]
        if s.adv_regulation != "none":
            adv = regulate_advantage(adv, s.adv_regulation, s.adv_clip)
        if s.eos_mask:
            adv = eos_advantage_mask(adv, tokens, eos_id)
        if s.iw_gamma > 0:
            adv = adv * iw_opd_weights(raw, mask, s.iw_gamma)
        per_token = sampled_token_loss(adv, logp_student)                    # (B, T)
    else:
        per_token = kl                                                       # (B, T)
    weights = truncation_weights(mask, truncated, s.trunc_weight)            # (B, T)
    if s.prefix_len > 0:
        weights = prefix_weights(weights, s.prefix_len)
    parts = {"opd": aggregate_loss(per_token, weights, s.loss_agg, max_len)}
    loss = s.opd_coef * parts["opd"]
    if s.ref_kl > 0:                                     # Stable-OPD's divergence constraint
        parts["ref_kl"] = aggregate_loss(kl_ref, mask, s.loss_agg, max_len)
        loss = loss + s.ref_kl * parts["ref_kl"]
    for name, coef, term in (("sft", s.sft_coef, sft), ("seq_kd", s.seq_kd_coef, seq_kd)):
        if coef > 0:                                             # SFT on gold or teacher samples
            parts[name] = term
            loss = loss + coef * term
    return loss, parts

STABLE_OPD = {"ref_kl": 0.01, "sft_coef": 2.0}
SEQ_KD = {"seq_kd_coef": 2.0}
GUARD_FIXES = {"stable-opd": STABLE_OPD, "seq-kd": SEQ_KD, "none": {}}

def guard_fix(name: str, has_references: bool) -> dict:
    """--guard-fix as loss settings; 'auto': Stable-OPD when there are reference solutions, else
    sequence-level KD, which needs none."""
    if name == "auto":
        name = "stable-opd" if has_references else "seq-kd"
    return GUARD_FIXES[name]

class Guard:
    """Acts once, on the monitor's first alert: restores the last quiet student (a copy of the
    student and optimizer every `every` steps while no alert is active) and returns the loss
    settings to go on with: `fix` applied to them (Stable-OPD by default; {} restores only).
    After that the alerts are only reported."""

    def __init__(self, every: int = 5, fix: dict | None = None):
        self.every, self.saved, self.acted = every, None, False
        self.fix = dict(STABLE_OPD) if fix is None else dict(fix)

    def step(self, monitor: LengthMonitor, step: int, student, opt, loss: LossSettings):
        """None until the guard acts; then new loss settings (the old object is left as it was).
        A coefficient the fix names is raised to the fix's value, never lowered."""
        if self.acted:
            return None
        if not monitor.active:
            if step % self.every == 0:
                self.saved = {"step": step, "model": copy.deepcopy(student.state_dict()),
                              "opt": copy.deepcopy(opt.state_dict())}
            return None
        if self.saved is None:
            return None
        student.load_state_dict(self.saved["model"])
        opt.load_state_dict(self.saved["opt"])
        self.acted = True
        raised = {k: max(getattr(loss, k), v) for k, v in self.fix.items()}
        return dataclasses.replace(loss, **raised)

METHODS = {                # preset -> settings; a flag given on the command line wins over it
    "opd": {},
    "sft-only": {"opd_coef": 0.0, "sft_coef": STABLE_OPD["sft_coef"]},   # the control
    "stable-opd": dict(STABLE_OPD),
    "ref-kl": {"ref_kl": STABLE_OPD["ref_kl"]},
    "mixture": {"sft_coef": STABLE_OPD["sft_coef"]},
    "drop-trunc": {"trunc_weight": 0.0},
    "overlong": {"overlong_buffer": 12},          # last quarter of the 48-token budget
    "adv-log": {"adv_regulation": "log"},
    "adv-clip": {"adv_regulation": "clip"},
    "eos-mask": {"eos_mask": True},
    "rep-penalty": {"rep_penalty": 1.3},          # CTRL's 1.2-1.3 range
    "opd+guard": {"guard": True},                 # the guard's fix: Stable-OPD (gold data)
    "full-vocab": {"objective": "full"},
    # fixes that need no gold data; settings chosen by the search in plots/README.md
    "seq-kd": dict(SEQ_KD),
    "prefix-opd": {"prefix_len": 16},
    "iw-opd": {"iw_gamma": 5.0},
    "topk": {"objective": "topk", "top_k": 1},
    "guard-seq-kd": {"guard": True, "guard_fix": "seq-kd"},   # the guard without gold data
}

# =============================================================================
# Setting up a run: Config, loading a pair through from_pretrained, the data
# =============================================================================

@dataclass
class Config:
    """One run's settings. The command line is generated from it, from LossSettings and from
    Study: --help prints each field's reason."""
    # --- OPD
    steps: int = _f(300, "OPD updates per run: a learning phase, then room for the collapse")
    batch_size: int = _f(128, "prompts per step, one rollout each")
    lr: float = _f(1.5e-3, "AdamW peak lr, large for a small model and a short run")
    warmup: int = _f(150, "linear lr warm-up steps: the student learns while the lr is small, "
                     "and the feedback of the loops builds up once it is large")
    decay: float = _f(0.1, "share of the steps, at the end, with the lr falling linearly to 0 "
                      "(warmup-stable-decay): the final accuracy is a settled student's")
    grad_clip: float = _f(1.0, "global grad-norm clip, as in most RL fine-tuning recipes")
    temperature: float = _f(1.0, "sampling AND loss temperature: equal, or samples are off-policy")
    max_new_tokens: int = _f(48, "length budget: the longest correct answer and as much again, "
                             "so a run-on answer shows before it is cut")
    loss: LossSettings = field(default_factory=LossSettings, metadata={"neutral": False})
    # --- stabilizers outside the loss
    rep_penalty: float = _f(1.0, "CTRL repetition penalty while sampling; above 1 the rollouts "
                            "are off-policy")
    seq_kd_samples: int = _f(0, "sequence-level KD: the teacher answers a step's first N prompts; "
                             "0: all")
    seq_kd_temperature: float = _f(1.0, "temperature of the teacher's samples (sequence-level KD)")
    guard: bool = _f(False, "on a monitor alert, restore the last quiet student and switch on "
                     "--guard-fix")
    guard_fix: str = _f("auto", "what the guard switches on: stable-opd needs reference "
                        "solutions, seq-kd none; auto: stable-opd when the data has them")
    # --- monitor
    rep_window: int = _f(24, "tokens of the tail the compression test reads: half the budget")
    rep_tau: float = _f(3.0, "CompRatio above which a tail is repetitive (is_repetitive)")
    alert_max_len: int = _f(0, "alert when a rollout is longer than this; 0: off")
    alert_trunc: float = _f(0.2, "alert when the truncation rate exceeds this")
    alert_rep: float = _f(0.02, "alert when the repetition rate exceeds this: a few loops a batch")
    alert_growth: float = _f(0.4, "alert when mean length exceeds its moving average by this share")
    alert_patience: int = _f(2, "steps in a row a condition must hold: one noisy batch is no alarm")
    # --- models and data: the shipped pair and the synthetic task unless given
    teacher: str = _f("", "teacher: a save_pretrained folder or a hub id in the local cache")
    student: str = _f("", "student: a save_pretrained folder or a hub id in the local cache")
    prompts: str = _f("", "JSON lines of prompts (read_prompts); empty: the synthetic task")
    gold_size: int = _f(256, "reference solutions in the fixed gold set (--sft-coef), scarce "
                        "where OPD is used; 0: each step's own answers")
    eval_every: int = _f(20, "held-out evaluation, greedy and sampled, every N steps")
    eval_size: int = _f(256, "held-out prompts: enough for a small standard error")
    # --- the run
    seed: int = _f(0, "the one source of randomness (torch and the prompt sampler)")
    device: str = _f("cpu", "cpu, cuda or cuda:N; the shipped pair is small enough for a CPU")
    threads: int = _f(1, "torch threads per process: the count changes the last bits")
    chunk_size: int = _f(0, "positions per chunk of the loss, to bound its memory; 0: all at once")
    length_groups: int = _f(4, "forwards on this many length-sorted slices of a batch, each cut "
                            "to its longest response")
    out_dir: str = _f("runs", "each run writes out_dir/<run_name>/metrics.jsonl", neutral=True)
    run_name: str = _f("", "the folder of a command's one run; empty: <method>-s<seed>")
    log_every: int = _f(10, "a console line every N steps, and at every evaluation, alert and "
                        "guard action", neutral=True)
    log_samples_every: int = _f(100, "print two decoded rollouts every N steps; 0: none",
                                neutral=True)
    save_every: int = _f(10, "write checkpoint.pt every N steps and at the end; 0: off (it "
                         "holds AdamW's moments: raise N for real models)", neutral=True)
    resume: bool = _f(False, "go on from each run's checkpoint.pt (same flags; --steps may grow)",
                      neutral=True)
    save_student: bool = _f(False, "save the final student with save_pretrained", neutral=True)

# What validate_config() allows: every number finite and >= 0, and more where listed here
CHOICES = {"objective": ("sampled", "full", "topk"), "loss_agg": LOSS_AGG,
           "adv_regulation": ("none", "log", "clip"),
           "guard_fix": ("auto", *GUARD_FIXES)}         # argparse's choices too
POSITIVE = {"lr", "grad_clip", "temperature", "adv_clip", "rep_penalty", "seq_kd_temperature",
            "rep_tau", "alert_growth"}
AT_LEAST_ONE = {"steps", "batch_size", "max_new_tokens", "top_k", "rep_window", "alert_patience",
                "eval_every", "eval_size", "threads", "length_groups", "log_every", "seeds"}
SHARES = {"decay", "trunc_weight", "alert_trunc", "alert_rep"}
LOSS_FIELDS = {f.name for f in dataclasses.fields(LossSettings)}

def run_fields() -> list:
    """Config's fields with the loss settings in their place: every flag of a run."""
    out = []
    for f in dataclasses.fields(Config):
        out += list(dataclasses.fields(LossSettings)) if f.name == "loss" else [f]
    return out

def flat_config(cfg: Config) -> dict:
    """Every flag's value by its name: what config.json and a checkpoint record."""
    return {f.name: getattr(cfg.loss if f.name in LOSS_FIELDS else cfg, f.name)
            for f in run_fields()}

def with_settings(cfg: Config, **settings) -> Config:
    """A copy of `cfg` with some flags changed, the loss settings among them by their names."""
    loss = {k: v for k, v in settings.items() if k in LOSS_FIELDS}
    rest = {k: v for k, v in settings.items() if k not in LOSS_FIELDS}
    return dataclasses.replace(cfg, **rest, loss=dataclasses.replace(cfg.loss, **loss))

def fail(message: str):
    """Bad input: one line on stderr and exit code 2 (argparse's for a usage error)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)

def check_values(values: dict) -> None:
    """Stop at the first value its flag does not allow (CHOICES, POSITIVE, AT_LEAST_ONE, SHARES,
    and >= 0 for every other number)."""
    for name, x in values.items():
        if name in CHOICES:
            ok, what = x in CHOICES[name], "one of " + ", ".join(CHOICES[name])
        elif isinstance(x, bool) or not isinstance(x, (int, float)):
            continue                                        # a switch or a path: nothing to check
        elif name in POSITIVE:
            ok, what = x > 0, "> 0"
        elif name in AT_LEAST_ONE:
            ok, what = x >= 1, ">= 1"
        elif name in SHARES:
            ok, what = 0 <= x <= 1, "between 0 and 1"
        else:
            ok, what = x >= 0, ">= 0"
        if isinstance(x, float) and not math.isfinite(x):
            ok, what = False, "a finite number"
        if not ok:
            fail(f"--{name.replace('_', '-')} must be {what} (got {x!r})")

def validate_config(cfg: Config) -> None:
    """Every flag's value and the combinations that cannot work, checked before anything is
    loaded: a bad one is a line naming the flag, and exit code 2."""
    v = flat_config(cfg)
    check_values(v)
    for name, holds, what in [     # (flag, holds, what it must be)
            ("teacher" if v["teacher"] else "student", bool(v["teacher"]) == bool(v["student"]),
             f"given with --{'student' if v['teacher'] else 'teacher'}, or neither"),
            ("opd_coef", v["opd_coef"] > 0 or v["sft_coef"] > 0 or v["seq_kd_coef"] > 0,
             "> 0 unless --sft-coef or --seq-kd-coef is (else nothing is trained)"),
            ("seq_kd_samples", v["seq_kd_samples"] <= v["batch_size"], "at most --batch-size"),
            ("overlong_buffer", v["overlong_buffer"] <= v["max_new_tokens"],
             "at most --max-new-tokens"),
            ("prefix_len", v["prefix_len"] <= v["max_new_tokens"], "at most --max-new-tokens"),
            ("device", re.fullmatch(r"cpu|cuda(:\d+)?", v["device"]) and (
                v["device"] == "cpu" or torch.cuda.is_available()), "cpu, or cuda if one is seen")]:
        if not holds:
            fail(f"--{name.replace('_', '-')} must be {what} (got {v[name]!r})")
    if v["objective"] != "sampled" and (v["overlong_buffer"] or v["adv_regulation"] != "none"
                                        or v["eos_mask"] or v["iw_gamma"]):
        print("[check] warning: --overlong-buffer, --adv-regulation, --eos-mask and --iw-gamma "
              "shape the sampled-token advantage: with --objective full or topk they do nothing")

# The shipped pair, trained by pair/build.py. A build's weights depend on the CPU and the
# thread count, so the pair ships as files, and every machine loads the same ones.
PAIR = Path(__file__).resolve().parent / "pair"

def default_pair() -> tuple[str, str]:
    """Folders of the shipped teacher and student, every file checked against pair/SHA256SUMS:
    a missing or damaged one stops the run with one line, not a loader's traceback."""
    sums = PAIR / "SHA256SUMS"
    if not sums.is_file():
        fail(f"no model pair at {PAIR}: copy the repository's pair/ folder next to opd.py, or "
             "build one (python pair/build.py OUT) and pass --teacher OUT/teacher --student "
             "OUT/student")
    for digest, name in (line.split(maxsplit=1) for line in sums.read_text().splitlines()):
        if not (PAIR / name).is_file() or \
                hashlib.sha256((PAIR / name).read_bytes()).hexdigest() != digest:
            fail(f"the shipped pair file {PAIR / name} is missing or damaged (it does not match "
                 "pair/SHA256SUMS): restore it with `git checkout pair/`")
    return str(PAIR / "teacher"), str(PAIR / "student")

def load_pretrained(path: str, device, dtype=None):
    """Tokenizer and causal LM through from_pretrained: a save_pretrained folder or a hub id in
    the local cache (nothing is downloaded here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if (path.startswith(("/", ".")) or os.path.exists(path)) and not os.path.isdir(path):
        fail(f"model folder {path!r} does not exist; give a folder written by save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        fail(f"could not load a model from {path!r}: {str(e).splitlines()[0]}")
    # A shipped top_p=0.95 once silently truncated a trainer's "on-policy" samples (TRL PR
    # #6337); sample_rollouts never reads generation_config, so say that it is ignored.
    g = model.generation_config
    if (g.top_p or 1.0) < 1.0 or g.top_k or g.min_p or (g.repetition_penalty or 1.0) != 1.0:
        print(f"[check] {path}: generation_config's top_p={g.top_p}, top_k={g.top_k}, min_p="
              f"{g.min_p}, repetition_penalty={g.repetition_penalty} are ignored: rollouts "
              "sample the full distribution at --temperature", flush=True)
    return tok, model.to(device)

def check_pair(tok_s, tok_t, model_s, model_t, prompts, max_new_tokens) -> bool:
    """The checks that catch the commonest real-world OPD failures before the first step.
    Returns True when the teacher renders prompts differently (another chat template, or none):
    it then reads each prompt in its own rendering."""
    probe = "The quick brown fox 123 =+ \u00e9"
    if tok_s.get_vocab() != tok_t.get_vocab() or tok_s(probe).input_ids != tok_t(probe).input_ids:
        fail("student and teacher tokenizers differ (vocabularies or encodings); OPD scores the "
             "student's token ids with the teacher, so both must share one tokenizer")
    vs, vt = (m.get_output_embeddings().weight.shape[0] for m in (model_s, model_t))
    if vs != vt:
        fail(f"output vocabulary sizes differ (student {vs}, teacher {vt}): padded embedding "
             "rows would be scored as real tokens")
    if tok_s.eos_token_id != tok_t.eos_token_id:       # that alone inflates (ms-swift #9526)
        fail(f"EOS ids differ (student {tok_s.eos_token_id}, teacher {tok_t.eos_token_id}): the "
             "teacher would grade the student's stop as an ordinary token and push it down; give "
             "both tokenizers the eos_token the teacher ends its turns with")
    if tok_s.pad_token_id is None:
        print("[check] the student tokenizer has no pad token: EOS pads (masks end at the first "
              "EOS)", flush=True)
        tok_s.pad_token = tok_s.eos_token
    # The response ids mean the same to both (one vocabulary), but a teacher that scored the
    # student's rendering of a prompt would grade answers to a format it never saw.
    probe_s, probe_t = (prompt_token_ids(tok, ["What is 2 + 2?"])[0] for tok in (tok_s, tok_t))
    if probe_s != probe_t:
        print(f"[check] chat formats differ: the student renders a prompt as "
              f"{tok_s.decode(probe_s)!r}, the teacher as {tok_t.decode(probe_t)!r}; the teacher "
              "scores each response after its own rendering", flush=True)
    if bool(tok_s.chat_template) != bool(tok_t.chat_template):
        print("[check] warning: one side has a chat template and the other reads plain text, so "
              "the teacher grades answers to a prompt it read another way: such a pair inflates "
              "(tinker-cookbook #796, ms-swift #9526; tutorial, real models). Give both the same "
              "template, or warm the teacher up with SFT on the student's format", flush=True)
    for tok, model, role in ((tok_s, model_s, "student"), (tok_t, model_t, "teacher")):
        ctx = getattr(model.config, "max_position_embeddings", None)
        longest = max(map(len, prompt_token_ids(tok, [p["prompt"] for p in prompts])))
        if ctx and longest + max_new_tokens > ctx:
            fail(f"the longest prompt ({longest} tokens) plus --max-new-tokens ({max_new_tokens}) "
                 f"exceeds the {role}'s context ({ctx})")
    return probe_s != probe_t

def read_prompts(path: str) -> list[dict]:
    """A --prompts file: JSON lines of {"prompt": str, "answer": str, "accept": regex, "split":
    "eval" | "train"}, all but the prompt optional. "answer" is the reference for exact match
    and --sft-coef; "accept", a regex a correct response matches, is then the grader; "split":
    "eval" holds the row out. One clear line on anything else."""
    if not Path(path).is_file():
        fail(f"prompt file {path!r} does not exist")
    rows, form = [], 'each line must be {"prompt": "...", "answer": "..." (optional)}'
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
            re.compile(row.get("accept") or "") if isinstance(row, dict) else None
        except (json.JSONDecodeError, re.error, TypeError) as e:
            fail(f"{path}:{n} is not a JSON object with a valid \"accept\" regex ({e}); {form}")
        if row is not None and (not isinstance(row, dict) or not isinstance(row.get("prompt"), str)
                                or row.get("split", "train") not in ("train", "eval")):
            fail(f'{path}:{n} needs a string "prompt" and a "split" of train or eval; {form}')
        rows += [{"answer": None, "accept": None, "split": "train", **row}] if row else []
    if not rows:
        fail(f"prompt file {path!r} holds no prompts")
    return rows

@dataclass
class Data:
    """What a run trains and evaluates on; load_models_and_data() fills it in."""
    eval_set: list[dict]               # held-out examples
    sample: object                     # sample(n, rng): a step's training examples
    gold: list[dict] | None            # fixed reference solutions; None: each step's own answers
    has_references: bool               # any reference solution at all: Stable-OPD can run
    teacher_tokenizer: object = None   # None: the teacher reads the student's prompt ids

    def teacher_prompts(self, batch, p_ids, p_attn, pad: int, device):
        """The teacher's prompt ids (B, P_t) and mask: the student's, or its own rendering."""
        if self.teacher_tokenizer is None:
            return p_ids, p_attn
        return encode_batch(self.teacher_tokenizer, [e["prompt"] for e in batch], device, pad=pad)

def load_models_and_data(cfg: Config, device):
    """Student, frozen teacher, tokenizer and the data, the models through from_pretrained."""
    rows = read_prompts(cfg.prompts) if cfg.prompts else None    # a bad file stops before loading
    t_path, s_path = (cfg.teacher, cfg.student) if cfg.teacher else default_pair()
    # The student keeps float32 master weights: bf16 weights would round away updates of
    # lr ~1e-6. The frozen teacher needs no updates, so bf16 halves its memory on a GPU.
    tok_s, student = load_pretrained(s_path, device, torch.float32)
    tok_t, teacher = load_pretrained(t_path, device, torch.bfloat16 if device.type == "cuda"
                                     else torch.float32)
    teacher.eval().requires_grad_(False)
    if rows is not None:
        held = [r for r in rows if r["split"] == "eval"][:cfg.eval_size]
        train = [r for r in rows if r["split"] == "train"]
        if not held:                               # none held out by the file: the first eighth
            n = min(cfg.eval_size, max(1, len(rows) // 8)) if len(rows) > 1 else 0
            held, train = rows[:n], rows[n:]
        train = train or rows
        answered = [r for r in train if r["answer"] is not None]
        if cfg.loss.sft_coef > 0 and not answered:
            fail(f'--sft-coef needs reference answers, and no training prompt in {cfg.prompts} '
                 'has an "answer": add answers or set --sft-coef 0')
        data = Data(held, lambda n, rng: [rng.choice(train) for _ in range(n)],
                    answered[:cfg.gold_size] if cfg.gold_size else None, bool(answered))
    else:
        task = MotifTask(eval_size=cfg.eval_size)
        data = Data(task.eval_set, task.sample, task.gold_set(cfg.gold_size) if cfg.gold_size
                    else None, True)
    if check_pair(tok_s, tok_t, student, teacher, data.eval_set or data.sample(
            1, random.Random(0)), cfg.max_new_tokens):
        data.teacher_tokenizer = tok_t
    return student, teacher, tok_s, data

# =============================================================================
# The loop: evaluation, per-step metrics, checkpoints, run_opd()
# =============================================================================

def lr_factor(step: int, steps: int, warmup: int, decay: float, floor: float = 0.0) -> float:
    """Warmup-stable-decay: linear warm-up over `warmup` steps, constant, then a linear decay to
    `floor` over the last `decay` share of the steps (OPD: the last 10% to 0; the pair's build:
    the whole run, to 5%)."""
    up = min(1.0, (step + 1) / max(warmup, 1))
    return up * max(floor, min(1.0, (steps - step) / max(round(decay * steps), 1)))

@torch.no_grad()
def evaluate(model, tokenizer, examples, max_new_tokens: int, device="cpu", batch_size: int = 128,
             window: int = 24, tau: float = 3.0, temperature: float = 1.0, generator=None,
             context=()) -> dict:
    """Held-out accuracy (is_correct) of greedy decoding, with its length, truncation and
    repetition figures; with a `generator`, also `accuracy_sampled`: the accuracy of samples at
    `temperature`, the policy OPD trains (drawn from that generator alone, so evaluating
    changes no draw of training). `context`: chat messages before each prompt."""
    was_training = model.training
    model.eval()
    out = {}
    for greedy in ([True, False] if generator is not None else [True]):
        seqs, correct = [], 0
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            ids, attn = encode_batch(tokenizer, [e["prompt"] for e in batch], device, context)
            toks = sample_rollouts(model, ids, attn, max_new_tokens, tokenizer.eos_token_id,
                                   tokenizer.pad_token_id, temperature, greedy=greedy,
                                   generator=generator)                            # (b, T)
            _, lengths, _ = response_mask(toks, tokenizer.eos_token_id)
            for j, e in enumerate(batch):
                seqs.append(toks[j, :lengths[j]].tolist())
                correct += graded(e) and is_correct(tokenizer, seqs[-1], e)
        accuracy = correct / max(sum(map(graded, examples)), 1)
        if greedy:
            out = dict(length_stats(seqs, tokenizer.eos_token_id, max_new_tokens, window, tau),
                       accuracy=accuracy)
        else:
            out["accuracy_sampled"] = accuracy
    model.train(was_training)
    return out

def rollout_metrics(terms: TokenTerms, mask, lengths, truncated, seqs, eos_id: int,
                    objective: str = "sampled", window: int = 24, tau: float = 3.0) -> dict:
    """The paper's per-step figures from tensors the step already has (no extra forward):
    log-probs, advantage by token kind, EOS probabilities where the rollouts stopped."""
    n = mask.sum().clamp(min=1)
    B, T = mask.shape
    # tokens in the repetitive tail of a rollout judged repetitive (paper Sec. 3.5, Fig. 4)
    rep_tok = torch.zeros_like(mask)                             # (B, T)
    for i, s in enumerate(seqs):
        body = strip_eos(s, eos_id)
        if is_repetitive(body, window, tau):
            rep_tok[i, max(0, len(body) - window):len(body)] = 1
    rep_tok = rep_tok * mask
    reg_tok = mask - rep_tok
    stopped = ~truncated
    last = (lengths - 1).clamp(min=0)                            # where a stopped rollout's EOS is
    idx = torch.arange(B, device=mask.device)

    def avg(x, m):
        return (x * m).sum().item() / m.sum().item() if m.sum() > 0 else float("nan")

    def over_stops(x):
        return x[stopped].float().mean().item() if stopped.any() else float("nan")

    with torch.no_grad():
        lp_s, lp_t = terms.logp_student.detach(), terms.logp_teacher
        adv = sampled_token_advantage(lp_t, lp_s)                # (B, T) before any stabilizer
        kl_tok = terms.kl.detach() if objective == "full" else -adv   # per-token reverse KL
        p_s, p_t = terms.p_eos_student[idx, last], terms.p_eos_teacher[idx, last]   # (B,)
        out = {
            "kl/reverse": avg(kl_tok, mask),
            "logp/student": avg(lp_s, mask), "logp/teacher": avg(lp_t, mask),
            "adv/mean": avg(adv, mask),
            "adv/repetitive": avg(adv, rep_tok), "adv/regular": avg(adv, reg_tok),
            "adv/repetitive_frac": (rep_tok.sum() / n).item(),
            "eos/p_student": over_stops(p_s), "eos/p_teacher": over_stops(p_t),
            "eos/teacher_lower_frac": over_stops(p_t < p_s),
        }
        if terms.kl_ref is not None:
            out["kl/ref"] = avg(terms.kl_ref.detach(), mask)
        return out

POSITION_BINS = (0, 4, 8, 16, 32, 64)      # response positions [0, 4), [4, 8), ..., [64, end)

def position_profile(terms: TokenTerms, mask) -> dict:
    """Where in the response the teacher agrees: per bin of token positions (POSITION_BINS), the
    mean advantage A_t, the share of tokens with A_t > 0, and the teacher's mean log-prob of the
    student's tokens. Lists, one value per bin (NaN where no rollout reaches the bin)."""
    T = mask.shape[1]
    adv = sampled_token_advantage(terms.logp_teacher, terms.logp_student.detach())   # (B, T)
    out = {"pos/adv": [], "pos/adv_positive": [], "pos/logp_teacher": []}
    for lo, hi in zip(POSITION_BINS, POSITION_BINS[1:] + (T,)):
        m = mask[:, lo:hi]                                                         # (B, t)
        n = m.sum().item()
        for key, x in (("pos/adv", adv), ("pos/adv_positive", (adv > 0).float()),
                       ("pos/logp_teacher", terms.logp_teacher)):
            out[key].append((x[:, lo:hi] * m).sum().item() / n if n else math.nan)
    return out

def step_metrics(loss, parts, terms, mask, lengths, truncated, seqs, batch, stats, lap, tokenizer,
                 cfg: Config) -> dict:
    """One training step's line of metrics.jsonl (the held-out figures are added on evaluation
    steps): the loss and its parts, the rollouts' accuracy, the paper's figures, the monitor's
    and the time of each phase."""
    marked = [(x, e) for x, e in zip(seqs, batch) if graded(e)]
    right = sum(is_correct(tokenizer, x, e) for x, e in marked)
    accuracy = right / len(marked) if marked else math.nan
    return {"loss/total": loss.item(), "loss/opd": parts["opd"].item(),
            **{f"loss/{k}": v.item() for k, v in parts.items() if k != "opd"},
            "rollout/accuracy": accuracy,
            **rollout_metrics(terms, mask, lengths, truncated, seqs, tokenizer.eos_token_id,
                              cfg.loss.objective, cfg.rep_window, cfg.rep_tau),
            **position_profile(terms, mask),
            **{k if k.startswith("alert/") else f"rollout/{k}": v for k, v in stats.items()},
            **{f"time/{k}_s": v for k, v in lap.times.items()},
            "time/tokens_per_s": float(mask.sum()) / max(lap.times["rollout"], 1e-9)}

@dataclass
class TrainState:
    """Everything a run needs to go on as if it had never stopped; a checkpoint saves and
    loads it as one. The loss settings live here because the guard replaces them."""
    student: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    rng: random.Random                   # the training prompts
    gold_rng: random.Random              # the rollout mixture's draws from the gold set
    eval_gen: torch.Generator            # sampled evaluation: its own stream
    teacher_gen: torch.Generator         # the teacher's samples for sequence-level KD
    monitor: LengthMonitor
    guard: Guard | None
    loss: LossSettings

def new_state(cfg: Config, student, data, eos: int, device) -> TrainState:
    """The training state at step 0: AdamW with the warmup-stable-decay schedule, a random stream
    for each use, the monitor with the alert thresholds of `cfg`, and the guard if asked."""
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup, cfg.decay))
    monitor = LengthMonitor(eos, cfg.max_new_tokens, cfg.alert_max_len, cfg.alert_trunc,
                            cfg.alert_rep, cfg.alert_growth, window=cfg.rep_window,
                            tau=cfg.rep_tau, patience=cfg.alert_patience)
    guard = Guard(fix=guard_fix(cfg.guard_fix, data.has_references)) if cfg.guard else None
    return TrainState(student, opt, sched, rng=random.Random(cfg.seed),
                      gold_rng=random.Random(f"gold-{cfg.seed}"),
                      eval_gen=torch.Generator(device).manual_seed(cfg.seed),
                      teacher_gen=torch.Generator(device).manual_seed(cfg.seed + 1_000_003),
                      monitor=monitor, guard=guard, loss=cfg.loss)

def check_finite(loss, step: int, log):
    """Stop on a NaN or infinite loss before it reaches the weights, saying what to try."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss at step {step} ({loss.item()}). Lower --lr, check the models' dtype "
            "(bf16 logits are upcast here), or try --adv-regulation clip. "
            f"{log} holds every step logged so far; the student was not updated with this loss.")

class Laps:
    """Seconds per phase of one step: lap(name) books the time since the last lap to `name`.
    CUDA runs asynchronously: without the wait for its queued work, a phase's time would go to
    whichever later phase first waits for it."""

    def __init__(self, device):
        self.device, self.times = device, {}
        self.last = self.now()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.time()

    def __call__(self, name: str):
        now = self.now()
        self.times[name], self.last = now - self.last, now

def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

def clock_text(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"

class RunLog:
    """A run's folder: config.json, and metrics.jsonl, one JSON line per step written as it goes
    (an earlier run's file is kept as metrics.prev.jsonl; a resumed run keeps the steps before
    `start`). Console lines start with the run's name."""

    def __init__(self, folder: Path, cfg: Config, method: str, start: int = 0):
        self.cfg, self.tag, self.start, self.t0 = cfg, f"[{method} s{cfg.seed}]", start, time.time()
        self.folder, self.metrics = folder, folder / "metrics.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.metrics) if r["step"] < start] \
            if start and self.metrics.exists() else []
        if self.metrics.exists():                                # never lose an earlier run's log
            self.metrics.replace(folder / "metrics.prev.jsonl")
        (folder / "config.json").write_text(json.dumps(dict(flat_config(cfg), method=method)))
        self.file = open(self.metrics, "w", buffering=1)    # line-buffered: a crash keeps each step
        self.file.writelines(json.dumps(r) + "\n" for r in kept)

    def say(self, text: str):
        print(f"{self.tag} {text}", flush=True)

    def log(self, m: dict, samples=()):
        """Write a step's metrics, or the final evaluation; print a line every --log-every steps
        (with the time left), at each evaluation and at the end."""
        self.file.write(json.dumps(m) + "\n")
        step, cfg, acc = m["step"], self.cfg, m.get("eval/accuracy")
        if "loss/total" not in m:
            self.say(f"step {step:4d} final: held-out acc {acc:.3f} (sampled "
                     f"{m['eval/accuracy_sampled']:.3f})")
        elif step % cfg.log_every == 0 or acc is not None or step + 1 == cfg.steps:
            left = (time.time() - self.t0) / (step + 1 - self.start) * (cfg.steps - step - 1)
            self.say(f"step {step:4d}/{cfg.steps} loss {m['loss/total']:+.4f} kl "
                     f"{m['kl/reverse']:.3f} len {m['rollout/len_mean']:5.1f} trunc "
                     f"{m['rollout/trunc_rate']:.2f} rep {m['rollout/rep_rate']:.2f}"
                     f"{'' if acc is None else f' | held-out acc {acc:.3f}'} "
                     f"({clock_text(left)} left)")
        if cfg.log_samples_every and step % cfg.log_samples_every == 0:
            for prompt, text in samples:
                print(f"    {prompt!r} -> {text!r}", flush=True)

    def close(self, student, tokenizer) -> list[dict]:
        """Close the log, say where the time went, save the student if asked; returns every
        step's metrics."""
        self.file.close()
        rows = read_metrics(self.metrics)
        spent = {k: sum(r.get(f"time/{k}_s", 0.0) for r in rows)
                 for k in ("rollout", "teacher", "update", "eval")}
        total = max(sum(spent.values()), 1e-9)
        self.say("time: " + ", ".join(f"{k} {v:.1f}s ({v / total:.0%})" for k, v in spent.items()))
        if self.cfg.device.startswith("cuda"):
            self.say(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        if self.cfg.save_student:
            student.save_pretrained(self.folder / "student")
            tokenizer.save_pretrained(self.folder / "student")
        return rows

def save_checkpoint(path: Path, step: int, cfg: Config, state: TrainState):
    """Everything in `state` and the global random state, so that the loop goes on as if it had
    never stopped at `step`, the next step to run. Written to a temporary file and renamed over
    the last checkpoint, so a kill mid-write leaves the previous one usable."""
    ck = {"step": step, "config": flat_config(cfg), "torch_rng": torch.get_rng_state(),
          "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
          **{k: getattr(state, k).state_dict() for k in ("student", "opt", "sched")},
          "streams": [state.rng.getstate(), state.gold_rng.getstate(),
                      state.eval_gen.get_state(), state.teacher_gen.get_state()],
          "monitor": vars(state.monitor), "guard": vars(state.guard) if state.guard else None,
          "loss": dataclasses.asdict(state.loss)}
    torch.save(ck, path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)

def load_checkpoint(path: Path, cfg: Config, state: TrainState) -> int:
    """Restore what save_checkpoint wrote into `state`; returns the next step (0 without a
    checkpoint). Refuses one written with other settings: it would splice two runs together.
    The neutral flags, --steps, --run-name, --threads and --device may change."""
    if not path.exists():
        print(f"[resume] no checkpoint at {path}: starting at step 0", flush=True)
        return 0
    ck = torch.load(path, map_location=cfg.device, weights_only=False)   # RNG and monitor state
    free = {"steps", "run_name", "threads", "device"}
    changed = [f"--{f.name.replace('_', '-')} {ck['config'][f.name]}" for f in run_fields()
               if not f.metadata["neutral"] and f.name not in free and
               ck["config"].get(f.name, flat_config(cfg)[f.name]) != flat_config(cfg)[f.name]]
    if changed:
        fail(f"{path} was written with {', '.join(changed)}: resume with the same flags, or "
             "drop --resume to start over")
    if ck["step"] > cfg.steps:
        fail(f"{path} is at step {ck['step']}, past --steps {cfg.steps}")
    for k in ("student", "opt", "sched"):
        getattr(state, k).load_state_dict(ck[k])
    torch.set_rng_state(ck["torch_rng"].cpu())
    if ck["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ck["cuda_rng"]])
    rng, gold, ev, teach = ck["streams"]           # a torch generator's state is a CPU tensor
    state.rng.setstate(rng)
    state.gold_rng.setstate(gold)
    state.eval_gen.set_state(ev.cpu())
    state.teacher_gen.set_state(teach.cpu())
    state.monitor.__dict__.update(ck["monitor"])
    if state.guard and ck["guard"]:
        state.guard.__dict__.update(ck["guard"])
    state.loss = LossSettings(**ck["loss"])
    print(f"[resume] {path}: going on at step {ck['step']}", flush=True)
    return ck["step"]

def run_opd(cfg: Config, method: str = "opd") -> list[dict]:
    """One OPD run: sample, score, update, monitor. Writes out_dir/<run>/metrics.jsonl and its
    checkpoints; returns every step's metrics."""
    torch.manual_seed(cfg.seed)                                  # the one seed
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    student, teacher, tokenizer, data = load_models_and_data(cfg, device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ref = copy.deepcopy(student).eval().requires_grad_(False) \
        if cfg.loss.ref_kl > 0 or cfg.guard else None           # p_ref: the initial student
    state = new_state(cfg, student, data, eos, device)            # the step-0 training state
    opt = state.opt
    folder = Path(cfg.out_dir) / (cfg.run_name or f"{method}-s{cfg.seed}")
    start = load_checkpoint(folder / "checkpoint.pt", cfg, state) if cfg.resume else 0
    run = RunLog(folder, cfg, method, start)                     # keeps the steps before `start`

    def held_out():
        return {f"eval/{k}": v for k, v in evaluate(
            student, tokenizer, data.eval_set, cfg.max_new_tokens, device, window=cfg.rep_window,
            tau=cfg.rep_tau, temperature=cfg.temperature, generator=state.eval_gen).items()}

    for step in range(start, cfg.steps):
        lap, m, s = Laps(device), {"step": step}, state.loss
        if step % cfg.eval_every == 0:                           # before this step's update
            m.update(held_out())
            lap("eval")
        # --- 1. the student samples one response per prompt, at the loss temperature
        batch = data.sample(cfg.batch_size, state.rng)
        p_ids, p_attn = encode_batch(tokenizer, [e["prompt"] for e in batch], device)   # (B, P)
        resp = sample_rollouts(student.eval(), p_ids, p_attn, cfg.max_new_tokens, eos, pad,
                               cfg.temperature, rep_penalty=cfg.rep_penalty)           # (B, T)
        student.train()
        mask, lengths, truncated = response_mask(resp, eos)                    # (B, T), (B,), (B,)
        P, seq = p_ids.shape[1], torch.cat([p_ids, resp], 1)                  # (B, P+T)
        attn = torch.cat([p_attn, mask.long()], 1)                            # (B, P+T)
        lap("rollout")
        # --- 2. the teacher scores the same tokens, after its own rendering of the prompt when
        # that differs (check_pair); the reference model too; for sequence-level KD it answers
        t_ids, t_attn = data.teacher_prompts(batch, p_ids, p_attn, pad, device)     # (B, P_t)
        with torch.no_grad():
            h_t = response_hidden_states(teacher, torch.cat([t_ids, resp], 1),
                                         torch.cat([t_attn, mask.long()], 1), t_ids.shape[1],
                                         cfg.length_groups)                         # (B, T, H_t)
            h_ref = response_hidden_states(ref, seq, attn, P, cfg.length_groups) \
                if s.ref_kl > 0 else None                                               # (B, T, H)
        if s.seq_kd_coef > 0:
            n = cfg.seq_kd_samples or len(batch)
            t_resp, kept = teacher_samples(teacher, t_ids[:n], t_attn[:n], cfg.max_new_tokens,
                                           eos, pad, cfg.seq_kd_temperature, state.teacher_gen)
        lap("teacher")
        # --- 3. the student's one forward: loss and metrics both come from it (metrics alone,
        # with no graph, when no loss term needs it: the sft-only control)
        with torch.set_grad_enabled(s.opd_coef > 0 or s.ref_kl > 0):
            h_s = response_hidden_states(student, seq, attn, P, cfg.length_groups)   # (B, T, H_s)
            terms = token_terms(h_s, student.get_output_embeddings(), h_t,
                                teacher.get_output_embeddings(), resp, eos, cfg.temperature,
                                cfg.chunk_size, s.objective, s.top_k, h_ref,
                                ref.get_output_embeddings() if ref is not None else None)
        # --- 4. the loss: the objective with every stabilizer that is on
        gold = mixture_batch(data.gold, batch, state.gold_rng) if s.sft_coef > 0 else []
        sft = sft_nll(student, tokenizer, gold, device) if gold else torch.zeros((), device=device)
        seq_kd = sequence_nll(student, p_ids[:n][kept], p_attn[:n][kept], t_resp[kept], eos,
                              cfg.length_groups) if s.seq_kd_coef > 0 and kept.any() \
            else torch.zeros((), device=device)
        loss, parts = opd_loss(terms.logp_student, terms.logp_teacher, resp, eos, s, kl=terms.kl,
                               kl_ref=terms.kl_ref, sft=sft, seq_kd=seq_kd,
                               max_len=cfg.max_new_tokens)
        check_finite(loss, step, run.metrics)
        # --- 5. one AdamW step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        state.sched.step()
        lap("update")
        # --- 6. the monitor reads the rollouts; the guard acts on its first alert
        seqs = [resp[i, :lengths[i]].tolist() for i in range(resp.shape[0])]
        stats = state.monitor.update(seqs, step)
        m.update(step_metrics(loss, parts, terms, mask, lengths, truncated, seqs, batch, stats,
                              lap, tokenizer, cfg))
        for name, value, limit in state.monitor.new_alerts:
            run.say(f"step {step}: alert, {name} = {value:.3f} crossed {limit}")
        if state.guard and (new := state.guard.step(state.monitor, step, student, opt, s)):
            state.loss = new
            m["guard/acted"] = 1
            run.say(f"step {step}: guard restored the student of step {state.guard.saved['step']}"
                    f", now {({k: getattr(new, k) for k in state.guard.fix})}")
        run.log(m, [(e["prompt"], tokenizer.decode(x)) for e, x in zip(batch[:2], seqs)])
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(folder / "checkpoint.pt", step + 1, cfg, state)
    run.log({"step": cfg.steps, **held_out()})                   # the final evaluation
    return run.close(student, tokenizer)

# #############################################################################
#   OPD ends here. Below: only what `python opd.py` needs around it.
# #############################################################################

# =============================================================================
# The study: presets on seeds in parallel processes, its table and figure, the command line
# =============================================================================

@dataclass
class Study:
    """Which runs `python opd.py` makes: run_opd() for every preset of --methods on each seed."""
    methods: str = _f("opd,stable-opd,sft-only,opd+guard", "comma-separated presets (METHODS), "
                      "each run on every seed; all: every preset")
    seeds: int = _f(3, "how many seeds each method runs: --seed and the next ones")
    workers: int = _f(0, "parallel processes; 0: one per CPU core (one with --teacher: a real "
                      "model fills a device)")
    plots_dir: str = _f("", "for the table and figure; empty: plots/ for the default study, "
                        "<out_dir>/plots for any other")

def study_runs(study: Study, cfg: Config) -> list[tuple[str, int]]:
    """(method, seed) of every run of the study, once --methods and --run-name are checked."""
    methods = list(METHODS) if study.methods == "all" else study.methods.split(",")
    if not all(m in METHODS for m in methods):
        fail(f"--methods must be all or a comma-separated list of {', '.join(METHODS)} (got "
             f"{study.methods!r})")
    runs = [(m, cfg.seed + i) for i in range(study.seeds) for m in methods]
    if cfg.run_name and len(runs) > 1:
        fail(f"--run-name names one run, and this command makes {len(runs)} (--methods x --seeds)")
    return runs

def config_for(base: Config, method: str, seed: int, given=frozenset()) -> Config:
    """One run's config: `base` with the preset's settings, except for the flags in `given` (set
    on the command line), which win: --methods stable-opd --sft-coef 1.0."""
    cfg = with_settings(base, seed=seed, **{k: v for k, v in METHODS[method].items()
                                            if k not in given})
    validate_config(cfg)                     # a preset combined with the flags must be valid too
    return cfg

def _run_job(job):
    """One run in a worker process, where a SystemExit would hang the pool."""
    cfg, method = job
    try:
        return method, cfg.seed, run_opd(cfg, method)
    except SystemExit as e:
        raise RuntimeError(f"{method} s{cfg.seed} stopped: exit code {e.code}") from None

def run_all(base: Config, study: Study, given=frozenset()) -> list[tuple[str, int, list]]:
    """Every run of the study, in --workers processes, with a progress line as each ends;
    returns (method, seed, metrics rows) of each."""
    runs = study_runs(study, base)
    jobs = [(config_for(base, m, s, given), m) for m, s in runs]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(study.workers or (1 if base.teacher else cores // base.threads), len(jobs))
    if workers > 1:                     # check the pair and the data once, before the processes
        load_models_and_data(base, torch.device(base.device))
    elif not base.teacher:
        default_pair()                  # a missing pair: one line before anything else
    print(f"[study] {len(jobs)} runs in {workers} process(es) of {base.threads} thread(s) each",
          flush=True)
    t0, results = time.time(), {}
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for n, (m, s, rows) in enumerate(pool.imap_unordered(_run_job, jobs) if pool else
                                         ((m, c.seed, run_opd(c, m)) for c, m in jobs), 1):
            results[m, s], spent = rows, time.time() - t0
            print(f"[study] {n}/{len(jobs)} runs done ({m} s{s}), {clock_text(spent)} elapsed, "
                  f"about {clock_text(spent / n * (len(jobs) - n))} left", flush=True)
    finally:
        if pool:
            pool.terminate()
    return [(m, s, results[m, s]) for m, s in runs]

def first_step(rows, key, above: float):
    """The first step whose `key` exceeds `above` ('' if none)."""
    return next((r["step"] for r in rows if r.get(key, -math.inf) > above), "")

TAKEOFF = 0.3           # a run has taken off once its rollouts' truncation rate exceeds this

def summarize(method, seed, rows) -> dict:
    """One results.csv row: a run's accuracy (greedy and sampled) at step 0, at its peak and at
    the end, its rollouts' worst figures, its take-off and the guard's step."""
    tr = [r for r in rows if "rollout/trunc_rate" in r]
    ev = [r for r in rows if "eval/accuracy" in r]
    acc, acc_s = [r["eval/accuracy"] for r in ev], [r["eval/accuracy_sampled"] for r in ev]
    return {"method": method, "seed": seed, "steps": len(tr),
            "finished": "no" if "rollout/trunc_rate" in rows[-1] else "yes",   # final evaluation
            "acc_step0": acc[0], "acc_peak": max(acc),
            "acc_peak_step": ev[acc.index(max(acc))]["step"], "acc_final": acc[-1],
            "acc_sampled_step0": acc_s[0], "acc_sampled_peak": max(acc_s),
            "acc_sampled_final": acc_s[-1],
            "trunc_rate_max": max(r["rollout/trunc_rate"] for r in tr),
            "rep_rate_max": max(r["rollout/rep_rate"] for r in tr),
            "len_mean_max": max(r["rollout/len_mean"] for r in tr),
            "takeoff_step": first_step(tr, "rollout/trunc_rate", TAKEOFF),
            "guard_step": next((r["step"] for r in tr if r.get("guard/acted")), "")}

def mean(x):
    return sum(x) / len(x) if x else math.nan

def std(x):
    """The sample standard deviation (0 for one value)."""
    return (sum((v - mean(x)) ** 2 for v in x) / max(len(x) - 1, 1)) ** 0.5

def markdown(header, lines) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *["| " + " | ".join(str(c) for c in line) + " |" for line in lines]])

TABLE_COLS = ["acc_step0", "acc_peak", "acc_final", "acc_sampled_step0", "acc_sampled_peak",
              "acc_sampled_final", "trunc_rate_max", "rep_rate_max", "len_mean_max"]

def summary_table(rows, group=lambda r: r["method"]) -> str:
    """Mean ± standard deviation over seeds of each method's (or each `group`'s) figures."""
    lines = []
    for m in dict.fromkeys(map(group, rows)):
        cols = [[r[c] for r in rows if group(r) == m] for c in TABLE_COLS]
        lines.append([m, len(cols[0]), *[f"{mean(x):.2f} ± {std(x):.2f}" for x in cols]])
    return markdown(["method", "seeds", *TABLE_COLS], lines)

def write_results(rows, out: Path, parts: dict, source: str):
    """results.csv (one row per run) and results.md (its named tables, each under '### name':
    the docs quote them, and a test checks that they match)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = f"Written by {source}. The docs quote these tables; do not edit them by hand.\n"
    (out / "results.md").write_text(text + "".join(f"\n### {k}\n\n{t}\n" for k, t in parts.items()))
    print(next(iter(parts.values())), flush=True)

# Okabe and Ito's colour-blind-safe palette: one colour per method, the same in every figure
COLORS = {"opd": "#D55E00", "stable-opd": "#0072B2", "sft-only": "#999999",
          "opd+guard": "#CC79A7", "seq-kd": "#009E73", "iw-opd": "#E69F00", "control": "#000000"}

def plot_runs(results, path: Path, smooth: int = 1, title: str = "", colors=None):
    """The study's figure: a row per method, held-out accuracy (left) and the share of rollouts
    truncated (right; the mean of the last `smooth` steps) against the step, a line per seed, so
    each seed's collapse shows where it happens; a triangle where the guard acted."""
    colors = {**COLORS, **(colors or {})}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(m for m, _, _ in results))
    fig, axes = plt.subplots(len(methods), 2, figsize=(8, 1.45 * len(methods) + 0.9),
                             sharex=True, sharey=True, squeeze=False)
    for (left, right), m in zip(axes, methods):
        for rows in [rows for mm, _, rows in results if mm == m]:
            ev = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
            tr = [(r["step"], r["rollout/trunc_rate"]) for r in rows if "rollout/trunc_rate" in r]
            smoothed = [mean([v for _, v in tr[max(0, i + 1 - smooth):i + 1]])
                        for i in range(len(tr))]
            color = colors.get(m, "#56B4E9")
            left.plot(*zip(*ev), color=color, lw=1.3, alpha=0.8)
            right.plot([s for s, _ in tr], smoothed, color=color, lw=1.3, alpha=0.8)
            right.plot([r["step"] for r in rows if r.get("guard/acted")],
                       [1.0 for r in rows if r.get("guard/acted")], "v", color="black", ms=6)
        left.set_ylabel(m, color=colors.get(m, "#56B4E9"), fontsize=11, fontweight="bold")
    axes[0, 0].set_title("held-out accuracy (greedy), a line per seed", fontsize=10)
    axes[0, 1].set_title("share of rollouts truncated" + (f", mean of {smooth} steps" if smooth > 1
                                                          else "; \u25bc the guard acted"),
                         fontsize=10)
    for ax in axes.ravel():
        ax.set(ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("OPD step")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

def plots_dir(cfg: Config, study: Study) -> Path:
    """--plots-dir; else plots/ for the default study and <out_dir>/plots for any other, so that
    `--methods opd --seeds 1` leaves the committed table and figure alone."""
    now, default = flat_config(cfg), flat_config(Config())
    same = all(f.metadata["neutral"] or now[f.name] == default[f.name] for f in run_fields())
    same = same and (study.methods, study.seeds) == (Study.methods, Study.seeds)
    return Path(study.plots_dir or ("plots" if same else f"{cfg.out_dir}/plots"))

def run_study(base: Config, study: Study, given=frozenset()) -> list[dict]:
    """Every run of the study, then its table and figure in plots_dir()."""
    results = run_all(base, study, given)
    rows = [summarize(m, s, r) for m, s, r in results]
    out = plots_dir(base, study)
    command = " ".join(["python opd.py", *(f"--{k} {getattr(study, k)}" for k in
                                           ("methods", "seeds") if k in given)])
    write_results(rows, out, {"summary": summary_table(rows)}, f"`{command}`")
    plot_runs(results, out / "fig1_accuracy_length.png")
    print(f"[study] table and figure in {out}/", flush=True)
    return rows

def parse_config(argv=None) -> tuple[Config, Study, frozenset]:
    """The command line, generated from Config, LossSettings and Study (--help is the
    documentation). Returns them and the names of the flags given, which win over a preset."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS)
    for f in [*run_fields(), *dataclasses.fields(Study)]:
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        why = f"{f.metadata['help']} (default: {f.default!r})"
        p.add_argument("--" + f.name.replace("_", "-"), help=why, choices=CHOICES.get(f.name),
                       **{"action": argparse.BooleanOptionalAction} if kind == "bool" else
                       {"type": {"int": int, "float": float, "str": str}[kind]})
    p.error = lambda message: p.exit(
        2, f"error: {message} (python opd.py --help lists every flag)\n")       # one line
    given = vars(p.parse_args(argv))                # only the flags on the command line (SUPPRESS)
    study = {f.name for f in dataclasses.fields(Study)}
    cfg = with_settings(Config(), **{k: v for k, v in given.items() if k not in study})
    validate_config(cfg)
    check_values({k: v for k, v in given.items() if k in study})
    study = Study(**{k: v for k, v in given.items() if k in study})
    study_runs(study, cfg)                              # --methods and --run-name, checked now
    return cfg, study, frozenset(given)

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, study, given = parse_config(argv)
    try:
        run_study(cfg, study, given)
    except KeyboardInterrupt:
        again = " ".join(map(shlex.quote, [sys.executable, sys.argv[0], *argv, "--resume"]))
        how = f"each run keeps a checkpoint every {cfg.save_every} steps: go on with\n  {again}" \
            if cfg.save_every else "with --save-every 0 there is no checkpoint: start over"
        raise SystemExit(f"\ninterrupted: every completed step is in {cfg.out_dir}/<run>/"
                         f"metrics.jsonl, and the model pair is intact; {how}")

if __name__ == "__main__":
    main()
