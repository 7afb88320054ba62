"""On-policy distillation (OPD) and its length inflation, in one file.

The student samples responses to prompts, the frozen teacher scores the very tokens the
student sampled, and the student is trained to lower the reverse KL KL(p_S || p_T) on the
states it visits itself (GKD, Agarwal et al. 2024, arXiv 2306.13649). Luo et al. 2026
(arXiv 2604.08527) showed that this can fail abruptly: the rollouts grow until they fill
the length budget, turn repetitive, and accuracy falls ("length inflation"). This file
runs OPD on a small model pair on which it first teaches the student and then collapses,
measures both with the paper's metrics, warns before the collapse, and compares the
stabilizers proposed for it against a supervised control on the same seeds.

    python opd.py                                # the study: opd, stable-opd, sft-only, opd+guard
    python opd.py --methods all --seeds 5        # every stabilizer preset on 5 seeds (plots/all/)
    python opd.py --methods opd --seeds 1        # one plain OPD run
    python opd.py --methods opd --seeds 1 --ref-kl 0.1 --sft-coef 0.5         # your own mix
    python opd.py --teacher PATH --student PATH --prompts FILE --device cuda  # real models
    python opd.py --replot                       # redraw the table and figures from runs/
    python opd.py --help                         # every option, with its reason

Deliberately left out, compared with the paper's setup: no PPO/GRPO ratio or clipping
(one update per batch of rollouts, so the ratio is 1 and clipping is inert); one rollout
per prompt instead of a group (OPD's advantage needs no group baseline); a synthetic task
and a two-layer model pair instead of math problems and 1.5B/7B models; and zlib's
compression test is scaled down from a 10,000-character tail to a 24-token one.

Sections. 1-6 are OPD itself, in an order where every name is defined before it is used,
and the loop that uses them all comes last; below the banner that follows them is the
machinery a real run needs. tutorial.md follows a reader's order instead, and each of its
sections names the sections of this file it reads.
  1. OPD in one page        objectives, masks, loss aggregation
  2. Task and model pair    the synthetic task and its grader, tokenizer, models, prompts
  3. Rollouts and scores    sampling, hidden states, the per-token terms of the loss
  4. Monitor                length, truncation and repetition metrics; alerts
  5. Stabilizers            one small function per fix, opd_loss() that composes them, the guard
  6. The loop               evaluation, per-step metrics, the training state, run_opd()
  ---- OPD ends here ----
  7. Real models            any Hugging Face pair or GGUF file, the checks before step 0, the data
  8. Building the pair      how the shipped teacher and student were trained, and their checks
  9. Scaling up             timing, memory, run folders, checkpoint and resume
  10. Study                 presets, flag checks, the study, its tables and figures, the CLI
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import statistics
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


def _f(default, why, neutral=False):
    """A config field: its default and its one-line reason, which --help prints. `neutral` marks
    a flag that changes no number a run computes (where files go, how often to save, how many
    processes): a checkpoint resumes with it changed, and the study's plots folder ignores it."""
    return field(default=default, metadata={"help": why, "neutral": neutral})


@dataclass(frozen=True)
class LossSettings:
    """What opd_loss() computes: the objective and every stabilizer that is a term of the loss or
    a change to the advantage (section 5). The defaults are plain sampled-token OPD. The presets
    (METHODS) and the guard change these settings and nothing else of the loss."""
    objective: str = _f("sampled", "'sampled': A_t = log p_T(y_t) - log p_S(y_t), loss -A_t log "
                        "p_S(y_t); 'full': KL(p_S||p_T) over the vocabulary; 'topk': that KL on "
                        "the student's top-k tokens plus one tail bucket")
    top_k: int = _f(1, "k of --objective topk: how many of the student's likeliest tokens the KL "
                    "keeps apart; the rest of the vocabulary is one bucket")
    loss_agg: str = _f("token-mean", "verl's names: token-mean | seq-mean-token-mean | "
                       "seq-mean-token-sum | seq-mean-token-sum-norm")
    opd_coef: float = _f(1.0, "weight of the OPD term; zero with --sft-coef is the sft-only "
                         "control")
    ref_kl: float = _f(0.0, "beta of beta*KL(p_S || p_ref), p_ref the frozen initial student "
                       "(Stable-OPD)")
    sft_coef: float = _f(0.0, "lambda of the NLL on reference solutions from the gold set (the "
                         "rollout mixture of Stable-OPD)")
    seq_kd_coef: float = _f(0.0, "weight of the NLL on the teacher's own samples that stop "
                            "(sequence-level KD): an SFT term that needs no gold data")
    trunc_weight: float = _f(1.0, "loss weight of truncated rollouts: zero drops them (DAPO's "
                             "overlong filtering)")
    overlong_buffer: int = _f(0, "DAPO's soft overlong penalty over the last B tokens of the "
                              "budget; 0: off")
    adv_regulation: str = _f("none", "'none' | 'log': sign(A) log(one + |A|) | 'clip': A clipped "
                             "to +-adv_clip")
    adv_clip: float = _f(1.0, "bound for --adv-regulation clip")
    eos_mask: bool = _f(False, "zero the advantage on EOS tokens: the teacher cannot train "
                        "stopping away")
    prefix_len: int = _f(0, "train the OPD term on the first N response tokens only (prefix OPD), "
                         "where the teacher's grades are most reliable; 0: every token")
    iw_gamma: float = _f(0.0, "IW-OPD: weight each token's advantage by one plus gamma times the "
                         "share of the rollout's teacher-student discrepancy still ahead of it; "
                         "zero: off")


@dataclass
class Config:
    # --- OPD: what one run does
    steps: int = _f(300, "OPD updates per run: a learning phase, then room for the collapse")
    batch_size: int = _f(128, "prompts per step, one rollout each")
    lr: float = _f(1.5e-3, "AdamW peak lr for OPD, large for a small model and a short run")
    warmup: int = _f(150, "linear lr warm-up steps: the student learns while the lr is small, and "
                     "the feedback of the loops builds up once it is large")
    decay: float = _f(0.1, "share of the steps, at the end, with the lr decaying linearly to zero "
                      "(warmup-stable-decay): a final accuracy read on a settled student")
    grad_clip: float = _f(1.0, "global grad-norm clip, as in most RL fine-tuning recipes")
    temperature: float = _f(1.0, "sampling AND loss temperature; they must match for on-policy "
                            "samples")
    max_new_tokens: int = _f(48, "length budget: room for the longest correct answer and as much "
                             "again, so a run-on answer is visible before it is cut")
    loss: LossSettings = field(default_factory=LossSettings,
                               metadata={"help": "objective and stabilizers", "neutral": False})
    # --- stabilizers outside the loss (section 5)
    rep_penalty: float = _f(1.0, "CTRL repetition penalty while sampling (above one: on); "
                            "rollouts are then off-policy")
    seq_kd_samples: int = _f(0, "sequence-level KD: the teacher answers the first N prompts of "
                             "each step; 0: all of them")
    seq_kd_temperature: float = _f(1.0, "temperature of the teacher's samples for "
                                   "sequence-level KD")
    guard: bool = _f(False, "on a monitor alert: restore the last quiet student and switch on "
                     "--guard-fix")
    guard_fix: str = _f("auto", "what the guard switches on: 'stable-opd' (needs reference "
                        "solutions), 'seq-kd' (needs none), 'none' (restore only); 'auto': "
                        "stable-opd when the data has references, else seq-kd")
    # --- monitor (section 4)
    rep_window: int = _f(24, "tokens of the tail the compression test looks at: half the budget")
    rep_tau: float = _f(3.0, "CompRatio above which a tail is repetitive: zlib's ratio scaled "
                        "down to a short tail (tutorial, the monitor)")
    alert_max_len: int = _f(0, "alert when a rollout is longer than this (the starter's check); "
                            "0: off, one long rollout is noise")
    alert_trunc: float = _f(0.2, "alert when the truncation rate exceeds this")
    alert_rep: float = _f(0.02, "alert when the repetition rate exceeds this: a few looping "
                          "rollouts in a batch of --batch-size")
    alert_growth: float = _f(0.4, "alert when mean length exceeds its moving average by this "
                             "fraction")
    alert_patience: int = _f(2, "an alert fires once its condition held this many consecutive "
                             "steps: one noisy batch is not an alarm")
    # --- models and data (the shipped pair of section 2 unless --teacher and --student)
    teacher: str = _f("", "teacher folder, .gguf file (needs gguf + accelerate) or hub id; "
                      "empty: the default teacher")
    student: str = _f("", "student folder, .gguf file (needs gguf + accelerate) or hub id; "
                      "empty: the default student")
    prompts: str = _f("", "JSON-lines file of {'prompt': ..., 'answer': optional, 'accept': "
                      "optional regex}; empty: the synthetic task")
    teacher_context: str = _f("", "JSON file: a list of chat messages the teacher reads before "
                              "every prompt (privileged context); the student sees the prompt "
                              "alone")
    teacher_format: str = _f("own", "'own': the teacher reads each prompt in its own chat format; "
                             "'plain': as plain text, prompt and newline, to study a format "
                             "mismatch (not a recommendation)")
    gold_size: int = _f(256, "reference solutions in the fixed gold set (the student's warm-up, "
                        "--sft-coef); complete solutions are scarce where OPD is used; zero: "
                        "each step's own prompts' answers")
    self_distill: bool = _f(False, "sanity mode: the teacher is the student itself; the loss must "
                            "be zero")
    eval_every: int = _f(20, "held-out evaluation (greedy and sampled) every N steps")
    eval_size: int = _f(256, "held-out prompts, enough for a small standard error of the accuracy")
    # --- the harness: what to run, where, how fast
    methods: str = _f("opd,stable-opd,sft-only,opd+guard", "comma-separated presets (METHODS, "
                      "the study's section), each run on every seed; 'all': every preset")
    seeds: int = _f(3, "how many seeds each method runs: --seed and the next ones")
    seed: int = _f(0, "the first seed: the only source of randomness (torch and the task sampler)")
    run_name: str = _f("", "run folder name under out_dir, for a command that makes one run; "
                       "empty: '<method>-s<seed>'")
    out_dir: str = _f("runs", "each run writes out_dir/<run_name>/metrics.jsonl", neutral=True)
    plots_dir: str = _f("", "study figures, results.csv, results.md; empty: plots/ for the default "
                        "study, <out_dir>/plots for any other, so a one-off run leaves the "
                        "committed figures alone", neutral=True)
    replot: bool = _f(False, "train nothing: redraw the table and figures from the run folders in "
                      "--out-dir", neutral=True)
    device: str = _f("cpu", "'cpu' or 'cuda'; the default pair is small enough for a CPU")
    workers: int = _f(0, "parallel processes for the study; 0: one per CPU core, at most one per "
                      "run, each with --threads (small models use one core well); with --teacher, "
                      "0 means one process", neutral=True)
    threads: int = _f(1, "torch threads per process (set on purpose: the thread count changes the "
                      "last bits)")
    chunk_size: int = _f(0, "positions per chunk of the loss, to bound its memory; zero: all at "
                      "once")
    length_groups: int = _f(4, "teacher/student forwards run on this many length-sorted slices of "
                            "the batch, each cut to its longest response; one: a single padded "
                            "forward")
    log_every: int = _f(10, "print a run's line every N steps (evaluations, alerts and guard "
                        "actions always); one: every step", neutral=True)
    log_samples_every: int = _f(100, "print a few decoded rollouts every N steps; zero: none",
                                neutral=True)
    save_student: bool = _f(False, "save the final student with save_pretrained in the run folder",
                            neutral=True)
    save_every: int = _f(10, "write <run folder>/checkpoint.pt every N steps and at the end; "
                         "zero: off. It holds the student and AdamW's two moments: raise N for "
                         "real models", neutral=True)
    resume: bool = _f(False, "continue each run from its checkpoint.pt (same flags; --steps may "
                      "grow); a run without one starts from the beginning", neutral=True)
    cache_dir: str = _f(".cache", "a default pair built with other settings is saved here, in a "
                        "folder keyed by them", neutral=True)
    # --- building the default pair (section 8): any change here builds a new pair
    pair_seed: int = _f(0, "seed of the default pair's build (initial weights and data order); "
                        "0 with the default settings is the shipped pair (pair/)")
    teacher_layers: int = _f(2, "two layers: enough to count motif repeats reliably")
    teacher_width: int = _f(128, "hidden size of the teacher")
    teacher_steps: int = _f(2400, "supervised steps of the teacher's build: long enough for its "
                            "stop and loop habits to settle, so that independent builds agree")
    teacher_free_frac: float = _f(0.5, "share of the teacher's training that is free repetition "
                                  "text (no count, no EOS): a pretrained LM's habit of "
                                  "continuing a pattern")
    teacher_overrun_frac: float = _f(0.15, "share of over-run text: counted prompts whose text "
                                     "runs on past the count, so deep loops become absorbing")
    student_layers: int = _f(2, "same depth as the teacher but half the width: can learn, starts "
                             "weaker")
    student_width: int = _f(64, "hidden size of the student")
    student_steps: int = _f(400, "SFT warm-up steps on the gold set: the student is an SFT "
                            "checkpoint, as in the paper")
    student_free_frac: float = _f(0.0, "free text in the student's warm-up (see "
                                  "--teacher-free-frac)")
    pretrain_lr: float = _f(3e-3, "AdamW lr for building the pair (small models, short schedules)")


# =============================================================================
# 1. OPD in one page: objectives, masks, loss aggregation
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
    constraint (Luo et al. 2026, Sec. 4; section 5). The formula of full_vocab_reverse_kl."""
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
# 2. Task and model pair: the task and its grader, tokenizer, models, prompts
# =============================================================================
# Task "repeat the motif k times": prompt "c a f x 3 =", answer "c a f c a f c a f <eos>".
# Why this task: the answer is checkable, and its LENGTH is the hard part. Copying the
# motif is easy; knowing when to stop requires counting, which a 2-layer width-128 teacher
# learns and a width-64 student after a short warm-up only half learns. A student unsure
# where to stop is exactly where length inflation starts. (A task whose answer length is
# fixed by the prompt, e.g. reversal, did not inflate at all: see the tutorial.)

LETTERS = list("abcdefgh")          # 8 motif symbols
COUNTS = [1, 2, 3, 4, 5]            # repeats; longest answer 4 * 5 = 20 tokens
MOTIF_LENS = [2, 3, 4]
SPECIAL = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}


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

    def free_text(self, rng: random.Random, max_len: int = 48):
        """'Web text' for the teacher: a motif repeated with no count and no end. A language
        model pretrained on such text learns the habit of continuing a pattern."""
        motif = rng.choice(self.train_motifs)
        text = " ".join((list(motif) * max_len)[:rng.randint(8, max_len)])
        return {"prompt": "", "answer": text, "eos": False}

    def overrun_text(self, rng: random.Random, max_len: int = 48, free_repeats: int = 2):
        """A counted prompt whose text runs on past k repeats and never ends. No loss on the
        answer and on the first `free_repeats` extra repeats (`skip`), so the teacher still
        stops at k and keeps its doubt one or two repeats later; deeper in, continuing is all
        it saw. Real LMs do this: the longer a loop, the likelier its next repeat (Xu et al.
        2022, "Learning to Break the Loop", arXiv 2206.02369)."""
        motif, k = rng.choice(self.train_motifs), rng.choice(COUNTS)
        n = len(motif) * (k + free_repeats)
        text = " ".join((list(motif) * max_len)[:rng.randint(n + 1, max(n + 1, max_len))])
        return {"prompt": " ".join(motif) + f" x {k} =", "eos": False, "skip": n, "answer": text}

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


def build_tokenizer():
    """A real transformers tokenizer over a word-level vocabulary, with BOS/EOS/PAD."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = [SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"]] + LETTERS \
        + [str(c) for c in COUNTS] + ["x", "="]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # add_special_tokens=True prepends BOS, like Llama's tokenizer does
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL['bos']} $A",
                                                       special_tokens=[(SPECIAL["bos"], 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"],
                                   eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
                                   unk_token=SPECIAL["unk"], padding_side="left")


def make_model(tokenizer, layers: int, width: int, arch: str = "llama"):
    """A small Llama-style causal LM (a Qwen2 config works the same way: see the tests)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    kw = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
              tie_word_embeddings=False)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**kw)
    return AutoModelForCausalLM.from_config(cfg)


# The default pair ships in pair/ (section 8 says how it was built and checks its files): a
# build's weights depend on the CPU and thread count, so every machine loads the same ones.
SHIPPED = Path(__file__).resolve().parent / "pair"


def default_pair() -> tuple[str, str]:
    """Folders of the shipped teacher and student: load them with from_pretrained."""
    return str(SHIPPED / "teacher"), str(SHIPPED / "student")


def prompt_token_ids(tokenizer, texts: list[str], context=(), chat=True) -> list[list[int]]:
    """Token ids of each prompt, unpadded: through the chat template if the tokenizer has one,
    after the `context` messages if any (a teacher with privileged context, section 7);
    chat=False reads each prompt as plain text, the prompt and a newline."""
    if not chat:
        return tokenizer([t + "\n" for t in texts])["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([*context, {"role": "user", "content": t}],
                                               tokenize=False, add_generation_prompt=True)
                 for t in texts]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(texts)["input_ids"]                        # BOS added as the tokenizer does


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


def encode_batch(tokenizer, texts: list[str], device="cpu", context=(), chat=True, pad=None):
    """Left-padded prompt ids (B, P) and attention mask (B, P); `pad` defaults to the
    tokenizer's own."""
    ids = prompt_token_ids(tokenizer, texts, context, chat)
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
    """Mean NLL of the reference answers (the pair's build and the rollout mixture of section 5)."""
    input_ids, attn, labels = supervised_batch(tokenizer, examples, device)
    logits = model(input_ids=input_ids, attention_mask=attn,
                   position_ids=position_ids(attn)).logits.float()                     # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


# =============================================================================
# 3. Rollouts and scores: sampling, hidden states, per-token terms
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
    (section 9). Rows come back in their order, zeros where a row has ended.
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


def token_terms(h_s, head_s, h_t, head_t, tokens, eos_id: int, temperature: float = 1.0,
                chunk: int = 0, objective: str = "sampled", top_k: int = 1, h_ref=None,
                head_ref=None) -> TokenTerms:
    """Per-token quantities of the loss and the metrics, from hidden states and vocabulary heads.

    With chunk > 0 the vocabulary projection and log-softmax run `chunk` positions at a time
    and are recomputed in the backward pass, so no (B, T, V) tensor is ever alive (section 9).
    """
    def terms(hs, ht, hr, y):
        lsm_s = F.log_softmax(head_s(hs).float() / temperature, -1)                 # (B, c, V)
        lsm_t = F.log_softmax(head_t(ht).float() / temperature, -1)                 # (B, c, V)
        # gather keeps its whole input for backward: give it a detached one unless this
        # output is in the loss, or checkpointing keeps every chunk's (B, c, V) alive
        lsm_y = lsm_s if objective == "sampled" else lsm_s.detach()
        # (the order of the uses of lsm_s below is the order its gradients are summed in)
        out = [lsm_y.gather(-1, y[..., None]).squeeze(-1),                         # (B, c)
               lsm_t.gather(-1, y[..., None]).squeeze(-1),                         # (B, c)
               lsm_s[..., eos_id].exp().detach(), lsm_t[..., eos_id].exp()]
        if objective == "full":
            out.append(full_vocab_reverse_kl(lsm_s, lsm_t))
        elif objective == "topk":
            out.append(topk_reverse_kl(lsm_s, lsm_t, top_k))
        if hr is not None:
            out.append(reference_kl(lsm_s, F.log_softmax(head_ref(hr).float() / temperature, -1)))
        return tuple(out)                                  # the teacher's are detached below

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
    cols = [torch.cat(c, 1) for c in zip(*parts)]                                  # (B, T) each
    kl = cols[4] if objective != "sampled" else None
    kl_ref = cols[-1] if h_ref is not None else None
    return TokenTerms(cols[0], cols[1].detach(), cols[2], cols[3].detach(), kl, kl_ref)


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
# 4. Monitor: length, truncation and repetition, with alerts
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
# 5. Stabilizers
# =============================================================================
# Each is one term of the loss or one change to the advantage, and all compose in
# opd_loss(): the function to copy into another training loop. The Guard switches a fix on
# mid-run when the monitor raises an alert. Which to use is measured in the tutorial.

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
             *, kl=None, kl_ref=None, sft=None, seq_kd=None, max_len=None):
    """The whole loss of one batch of rollouts: the objective of section 1 with every
    stabilizer that `s` switches on. The default settings are plain sampled-token OPD.

    Inputs, (B, T) over the response tokens: logp_student (with grad) and logp_teacher of the
    sampled `tokens`; the mask is every token up to the first `eos_id` (response_mask).
    kl: the objective's KL per position, with grad, for objective 'full' or 'topk'; kl_ref:
    KL(p_S || p_ref) per position, for ref_kl > 0; sft, seq_kd: the NLL of reference
    solutions and of the teacher's samples (scalars, with grad), for sft_coef and seq_kd_coef
    > 0. max_len: the length budget (overlong penalty, seq-mean-token-sum-norm).
    Returns (loss, parts), parts holding each term before its coefficient.
    """
    needed = {"kl": (s.objective != "sampled", kl), "kl_ref": (s.ref_kl > 0, kl_ref),
              "sft": (s.sft_coef > 0, sft), "seq_kd": (s.seq_kd_coef > 0, seq_kd)}
    missing = [name for name, (on, given) in needed.items() if on and given is None]
    if missing:                                   # a term switched on but not given: never a 0
        raise ValueError(f"these loss settings need {', '.join(missing)}: pass it to opd_loss")
    mask, lengths, truncated = response_mask(tokens, eos_id)                 # (B, T), (B,), (B,)
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


# Stable-OPD = reference KL + rollout mixture distillation (Luo et al. 2026, Sec. 4). The
# paper gives no coefficients; ref_kl 0.01 is what third-party Stable-OPD adapters use, and
# sft_coef was chosen by measurement (tutorial, the fixes).
STABLE_OPD = {"ref_kl": 0.01, "sft_coef": 2.0}
# Sequence-level KD as a fix that needs no gold data: the NLL of the teacher's own samples that
# stop, at the weight Stable-OPD gives its SFT term (chosen by the search in the tutorial).
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


# =============================================================================
# 6. The loop: evaluation, per-step metrics, the training state, run_opd()
# =============================================================================
# run_opd() is the last function of OPD itself. It names the machinery below the banner where
# it uses it: load_models_and_data (section 7), Laps, RunLog and the checkpoint (section 9).

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


METRIC_KEYS = [  # documented in the tutorial; a test checks every run logs them all
    "step", "loss/total", "loss/opd", "kl/reverse", "rollout/len_mean", "rollout/len_max",
    "rollout/len_p90", "rollout/trunc_rate", "rollout/rep_rate", "rollout/ngram_rep",
    "logp/student", "logp/teacher", "adv/mean", "adv/repetitive", "adv/regular",
    "adv/repetitive_frac", "eos/p_student", "eos/p_teacher", "eos/teacher_lower_frac",
    "eval/accuracy", "eval/len_mean", "eval/len_max", "eval/trunc_rate", "eval/rep_rate",
    "eval/ngram_rep", "eval/accuracy_sampled", "rollout/accuracy", "time/rollout_s",
    "time/teacher_s", "time/update_s", "time/eval_s", "time/tokens_per_s", "pos/adv",
    "pos/adv_positive", "pos/logp_teacher"]


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
    loads it as one (section 9). The loss settings live here because the guard replaces them."""
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


def run_opd(cfg: Config, method: str = "opd") -> list[dict]:
    """One OPD run: sample, score, update, monitor. Writes out_dir/<run>/metrics.jsonl and its
    checkpoints (section 9); returns every step's metrics."""
    torch.manual_seed(cfg.seed)                                  # the one seed
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    student, teacher, tokenizer, data = load_models_and_data(cfg, device)    # section 7
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ref = copy.deepcopy(student).eval().requires_grad_(False) \
        if cfg.loss.ref_kl > 0 or cfg.guard else None           # p_ref: the initial student
    state = new_state(cfg, student, data, eos, device)            # the step-0 training state
    opt = state.opt
    folder = run_folder(cfg, method)                             # section 9
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
        batch = data.train.sample(cfg.batch_size, state.rng)
        p_ids, p_attn = encode_batch(tokenizer, [e["prompt"] for e in batch], device)   # (B, P)
        resp = sample_rollouts(student.eval(), p_ids, p_attn, cfg.max_new_tokens, eos, pad,
                               cfg.temperature, rep_penalty=cfg.rep_penalty)           # (B, T)
        student.train()
        mask, lengths, truncated = response_mask(resp, eos)                    # (B, T), (B,), (B,)
        P, seq = p_ids.shape[1], torch.cat([p_ids, resp], 1)                  # (B, P+T)
        attn = torch.cat([p_attn, mask.long()], 1)                            # (B, P+T)
        lap("rollout")
        # --- 2. the teacher scores the same tokens, after its own rendering of the prompt when
        # that differs (section 7); the reference model too; for sequence-level KD it answers
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
        # --- 4. the loss: the objective with every stabilizer that is on (section 5)
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
            save_checkpoint(folder / "checkpoint.pt", step + 1, cfg, state)     # section 9
    run.final({"step": cfg.steps, **held_out()})                 # the final evaluation
    return run.close(student, tokenizer)


# #############################################################################
#   OPD ends here. Below: the machinery around it. Real models and the checks
#   before step 0, how the shipped pair was built, timing, run folders,
#   checkpoint and resume, the study with its presets, tables, warning signals
#   and figures, and the command line. The loop above names the pieces it uses
#   where it uses them: load_models_and_data, Laps, run_folder, RunLog and the
#   checkpoint's two functions.
# #############################################################################


# =============================================================================
# 7. Real models: any Hugging Face causal LM pair, checked before step 0, and the data
# =============================================================================

GGUF_INSTALL = "pip install gguf==0.19.0 accelerate==1.15.0"   # the pins of requirements-test.txt


def load_pretrained(path: str, device, dtype=None):
    """Tokenizer and causal LM through from_pretrained, with a clear error for a bad path.

    A `.gguf` file (llama.cpp's format) is dequantized by transformers' GGUF loader and
    rebuilt as a plain model, so it trains, saves and reloads like any other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = os.path.expanduser(path)
    gguf = path.endswith(".gguf")
    local = gguf or path.startswith(("/", "./", "../")) or os.path.exists(path)
    if local and not (os.path.isfile(path) if gguf else os.path.isdir(path)):
        raise SystemExit(f"error: model {'file' if gguf else 'folder'} {path!r} does not exist. "
                         "Give a folder written by save_pretrained, a .gguf file, or a hub id "
                         "such as Qwen/Qwen2.5-0.5B-Instruct.")
    if gguf:
        try:
            import accelerate, gguf as _  # noqa: F401  transformers' GGUF loader needs both
        except ImportError:
            raise SystemExit(f"error: {path!r} is a GGUF file; loading it needs the optional "
                             f"packages gguf and accelerate: {GGUF_INSTALL}") from None
    where, kw = (os.path.dirname(path) or ".", {"gguf_file": os.path.basename(path)}) if gguf \
        else (path, {})
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: could not load a model from {path!r}: {e}\n"
                         "Give a folder written by save_pretrained or a hub id available offline "
                         "(HF_HUB_OFFLINE=1 uses the local cache only).") from None
    if gguf:   # save_pretrained refuses a model marked "quantized with gguf": the same, unmarked
        del model.config.quantization_config
        plain = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
        plain.load_state_dict(model.state_dict())
        plain.generation_config, model = model.generation_config, plain
    # A shipped top_p=0.95 once silently truncated a trainer's "on-policy" samples (TRL PR
    # #6337): sample_rollouts never reads generation_config, so say that it is ignored.
    names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    shipped = {k: getattr(model.generation_config, k, None) for k in names}
    neutral = {"top_k": 0, "min_p": 0}
    set_ = {k: v for k, v in shipped.items() if v is not None and v != neutral.get(k, 1.0)}
    if set_:
        print(f"[check] {path}: generation_config sets "
              f"{', '.join(f'{k}={v}' for k, v in shipped.items() if v is not None)}; ignored: "
              "rollouts sample the full distribution at --temperature", flush=True)
    return tok, model.to(device)


@torch.no_grad()
def rendering_gap(tok_s, tok_t, model_s, model_t, prompts, max_new_tokens: int, plain: bool,
                  n: int = 8) -> tuple[float, float]:
    """The teacher's mean log-prob per token of the student's greedy answers to `n` prompts,
    after the student's rendering of each prompt and after the teacher's own: a pre-flight
    measure of what a format mismatch does to the teacher's grades."""
    texts = [p["prompt"] for p in prompts[:n]]
    dev = next(model_s.parameters()).device
    p_ids, p_attn = encode_batch(tok_s, texts, dev)
    resp = sample_rollouts(model_s, p_ids, p_attn, max_new_tokens, tok_s.eos_token_id,
                           tok_s.pad_token_id, greedy=True)                            # (n, T)
    mask = response_mask(resp, tok_s.eos_token_id)[0]                                  # (n, T)
    out = []
    for ids, attn in ((p_ids, p_attn), encode_batch(tok_t, texts, dev, chat=not plain,
                                                    pad=tok_s.pad_token_id)):
        h = response_hidden_states(model_t, torch.cat([ids, resp], 1),
                                   torch.cat([attn, mask.long()], 1), ids.shape[1])    # (n, T, H)
        logp = F.log_softmax(model_t.get_output_embeddings()(h).float(), -1)
        lp = logp.gather(-1, resp[..., None]).squeeze(-1)                              # (n, T)
        out.append(((lp * mask).sum() / mask.sum()).item())
    return out[0], out[1]


def check_pair(tok_s, tok_t, model_s, model_t, prompts, max_new_tokens, context=(),
               plain=False) -> bool:
    """The checks that catch the most common real-world OPD failures before the first step.
    Returns True when the teacher must read each prompt in a rendering of its own: its chat
    format differs from the student's, it reads a privileged `context` first, or `plain`
    (--teacher-format plain) makes it read plain text."""
    vs = model_s.get_output_embeddings().weight.shape[0]
    vt = model_t.get_output_embeddings().weight.shape[0]
    probe = "The quick brown fox 123 =+ \u00e9"
    same = tok_s.get_vocab() == tok_t.get_vocab() and \
        tok_s(probe)["input_ids"] == tok_t(probe)["input_ids"]
    if not same:
        raise SystemExit("error: student and teacher tokenizers differ (vocabularies or "
                         "encodings). OPD scores the student's token ids with the teacher, so both "
                         "must share one tokenizer. Use a pair from the same model family.")
    if vs != vt:
        raise SystemExit(f"error: output vocabulary sizes differ (student {vs}, teacher {vt}) "
                         "although the tokenizers match; the padded embedding rows would be scored "
                         "as real tokens. Use a pair with equal sizes.")
    if tok_s.eos_token_id != tok_t.eos_token_id:
        raise SystemExit(f"error: EOS ids differ (student {tok_s.eos_token_id}, teacher "
                         f"{tok_t.eos_token_id}). The teacher would score the student's stop token "
                         "as an ordinary token and push it down: that alone causes length "
                         "inflation. Set both tokenizers' eos_token to the token the teacher ends "
                         "its turns with.")
    if tok_s.pad_token_id is None:
        print("[check] warning: the student tokenizer has no pad token; using EOS as pad (masks "
              "use the first EOS).")
        tok_s.pad_token = tok_s.eos_token
    if context and (plain or not getattr(tok_t, "chat_template", None)):
        raise SystemExit("error: --teacher-context needs a teacher that reads a chat template, to "
                         "render the context messages before each prompt (a tokenizer with a chat "
                         "template, and --teacher-format own)")
    # Chat format: one probe conversation through each rendering. Rendered differently, a
    # teacher scoring the student's rendering would grade answers to a prompt format it never
    # saw; the response ids mean the same to both (same vocabulary), so the teacher reads its own.
    question = "What is 2 + 2?"
    probe_s = prompt_token_ids(tok_s, [question])[0]
    probe_t = prompt_token_ids(tok_t, [question], chat=not plain)[0]
    own_format = probe_s != probe_t
    if own_format:
        print(f"[check] chat formats differ: the student renders a prompt as "
              f"{tok_s.decode(probe_s)!r}, the teacher as {tok_t.decode(probe_t)!r}; the teacher "
              "scores each response after its own rendering of the prompt.", flush=True)
    chat_s = bool(getattr(tok_s, "chat_template", None))
    chat_t = bool(getattr(tok_t, "chat_template", None)) and not plain
    if chat_s != chat_t:
        lp_s, lp_t = rendering_gap(tok_s, tok_t, model_s, model_t, prompts, max_new_tokens, plain)
        print(f"[check] warning: the {'student' if chat_s else 'teacher'} reads prompts through a "
              f"chat template and the {'teacher' if chat_s else 'student'} as plain text. The "
              "teacher then grades chat-style answers to a prompt it read another way: such a "
              "pair inflated within a few steps in tutorial section 6 (tinker-cookbook #796 and "
              "ms-swift #9526 report the same). Pre-flight: the teacher's mean log-prob of 8 of "
              f"the student's greedy answers is {lp_s:.3f} per token after the student's "
              f"rendering and {lp_t:.3f} after its own. Fix: give the teacher the student's chat "
              "template when both share a tokenizer (--teacher-format own), or warm the teacher "
              "up with SFT on the student's format first.", flush=True)
    for tok, model, role, ctx_msgs, chat in ((tok_s, model_s, "student", (), True),
                                             (tok_t, model_t, "teacher", context, not plain)):
        ctx = getattr(model.config, "max_position_embeddings", None)
        ids = prompt_token_ids(tok, [p["prompt"] for p in prompts], ctx_msgs, chat)
        longest = max(len(x) for x in ids)
        if ctx and longest + max_new_tokens > ctx:
            raise SystemExit(f"error: the longest prompt ({longest} tokens"
                             f"{', context included' if ctx_msgs else ''}) plus max_new_tokens "
                             f"({max_new_tokens}) exceeds the {role}'s context ({ctx}). Shorten "
                             "the prompts or lower --max-new-tokens.")
    return own_format or bool(context)


def read_context(path: str) -> list[dict]:
    """--teacher-context: a JSON list of chat messages {"role": "user"|"assistant"|"system",
    "content": str}."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: teacher context file {path!r} does not exist")
    try:
        msgs = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path} is not valid JSON ({e.msg}); it must be a list of chat "
                         "messages") from None
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str) for m in msgs)
    if not ok:
        raise SystemExit(f'error: {path} must be a non-empty JSON list of {{"role": '
                         '"system"|"user"|"assistant", "content": "..."}} messages')
    return msgs


def read_prompts(path: str) -> list[dict]:
    """JSON lines of {"prompt": str, "answer": str, "accept": regex, "split": "eval" | "train"},
    all but the prompt optional ("answer": the reference for exact match and --sft-coef;
    "accept": a regex that a correct response matches, the grader then; "split": "eval" holds
    the row out); a clear error on anything else."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: prompt file {path!r} does not exist")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{n} is not valid JSON ({e.msg}); each line must be "
                             '{"prompt": "...", "answer": "..."}') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise SystemExit(f'error: {path}:{n} has no string "prompt" field; each line must be '
                             '{"prompt": "...", "answer": "..." (optional)}')
        if row.get("accept") is not None:
            try:
                re.compile(row["accept"])
            except (re.error, TypeError) as e:
                raise SystemExit(f'error: {path}:{n} has an "accept" field that is not a regular '
                                 f'expression ({e})') from None
        if row.get("split", "train") not in ("train", "eval"):
            raise SystemExit(f'error: {path}:{n} has "split": {row["split"]!r}; use "train" or '
                             '"eval"')
        rows.append({"prompt": row["prompt"], "answer": row.get("answer"),
                     "accept": row.get("accept"), "split": row.get("split", "train")})
    if not rows:
        raise SystemExit(f"error: prompt file {path!r} holds no prompts")
    return rows


class PromptRows:
    """Training prompts from a file; sample(n, rng) draws n with replacement, as MotifTask does."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def sample(self, n: int, rng: random.Random):
        return [rng.choice(self.rows) for _ in range(n)]


@dataclass
class Data:
    """What a run trains and evaluates on; load_models_and_data() fills it in."""
    eval_set: list[dict]               # held-out examples
    train: MotifTask | PromptRows      # .sample(n, rng): a step's training examples
    gold: list[dict] | None            # fixed reference solutions; None: each step's own answers
    has_references: bool               # any reference solution at all: Stable-OPD can run
    teacher_tokenizer: object = None   # None: the teacher reads the student's prompt ids
    teacher_context: tuple = ()        # chat messages the teacher reads before each prompt
    teacher_chat: bool = True          # False: the teacher reads plain text (--teacher-format)

    def teacher_prompts(self, batch, p_ids, p_attn, pad: int, device):
        """The teacher's prompt ids (B, P_t) and mask: the student's, or its own rendering."""
        if self.teacher_tokenizer is None:
            return p_ids, p_attn
        return encode_batch(self.teacher_tokenizer, [e["prompt"] for e in batch], device,
                            self.teacher_context, self.teacher_chat, pad=pad)


def load_models_and_data(cfg: Config, device):
    """Student, frozen teacher, tokenizer and the data, all through from_pretrained."""
    t_path, s_path = (cfg.teacher, cfg.student) if cfg.teacher else pair_folders(cfg)
    # The student keeps float32 master weights: bf16 weights would round away updates of
    # lr ~1e-6. The frozen teacher needs no updates, so bf16 halves its memory on a GPU.
    tok_s, student = load_pretrained(s_path, device, torch.float32)
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok_t, teacher = (tok_s, copy.deepcopy(student)) if cfg.self_distill \
        else load_pretrained(t_path, device, teacher_dtype)
    teacher.eval().requires_grad_(False)
    if cfg.prompts:
        rows = read_prompts(cfg.prompts)
        if any(r["split"] == "eval" for r in rows):                # held out as the file says
            eval_rows = [r for r in rows if r["split"] == "eval"][:cfg.eval_size]
            train_rows = [r for r in rows if r["split"] == "train"]
        else:                                                       # else the first eighth
            n_eval = min(cfg.eval_size, max(1, len(rows) // 8)) if len(rows) > 1 else 0
            eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
        train_rows = train_rows or rows
        answered = [r for r in train_rows if r["answer"] is not None]
        if cfg.loss.sft_coef > 0 and not answered:
            raise SystemExit(f"error: --sft-coef needs reference answers, and no training prompt "
                             f'in {cfg.prompts} has an "answer" field. Add answers or set '
                             "--sft-coef 0.")
        data = Data(eval_rows, PromptRows(train_rows), answered[:cfg.gold_size] if cfg.gold_size
                    else None, bool(answered))
    else:
        task = MotifTask(eval_size=cfg.eval_size)
        data = Data(task.eval_set, task, task.gold_set(cfg.gold_size) if cfg.gold_size else None,
                    True)
    context = read_context(cfg.teacher_context) if cfg.teacher_context else []
    plain = cfg.teacher_format == "plain"
    own = check_pair(tok_s, tok_t, student, teacher, data.eval_set or data.train.sample(
        1, random.Random(0)), cfg.max_new_tokens, context, plain)
    if own:                          # the teacher reads its own rendering, context first
        data.teacher_tokenizer = tok_t
        data.teacher_context = tuple(context)
        data.teacher_chat = not plain
    return student, teacher, tok_s, data


# =============================================================================
# 8. Building the pair: how the shipped teacher and student were trained
# =============================================================================

def train_supervised(model, tokenizer, draw, steps, lr, rng, name, device="cpu", batch_size=64):
    """Plain SFT on batches from `draw(n, rng)` (a list of examples); progress printed as it
    goes. The lr warms up over 50 steps, then decays linearly over the whole run to 5%."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps, 50, 1.0, floor=0.05))
    t0 = time.time()
    for step in range(steps):
        loss = sft_nll(model, tokenizer, draw(batch_size, rng), device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            print(f"[build] {name} step {step + 1}/{steps} nll {loss.item():.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    return model


def pretraining_mix(task: MotifTask, cfg: Config, role: str):
    """What each model of the default pair is trained on, as draw(n, rng) -> examples.

    Teacher: the task, free text (the pattern-continuing habit) and over-run text (loops
    that deepen). Student: the fixed gold set (--gold-size; 0: fresh task samples), i.e. an
    SFT checkpoint on the reference solutions OPD's stabilizers may also use.
    """
    free = getattr(cfg, f"{role}_free_frac")
    overrun = cfg.teacher_overrun_frac if role == "teacher" else 0.0
    gold = task.gold_set(cfg.gold_size) if role == "student" and cfg.gold_size else None

    def draw(n, rng):
        n_free, n_over = round(n * free), round(n * overrun)
        n_main = n - n_free - n_over
        main = [rng.choice(gold) for _ in range(n_main)] if gold else task.sample(n_main, rng)
        return main + [task.free_text(rng) for _ in range(n_free)] + \
            [task.overrun_text(rng) for _ in range(n_over)]
    return draw


@torch.no_grad()
def loop_eos_profile(model, tokenizer, examples, depths=range(-1, 6)) -> dict:
    """Mean p(EOS) after k + d repeats of the motif (d = 0: the correct stop; d > 0: inside a
    loop). A teacher whose p(EOS) falls with d makes loops absorbing (tutorial, the pair)."""
    out = {}
    for d in depths:
        rows = [(e["prompt"], e["prompt"].split()[:-3], int(e["prompt"].split()[-2]))
                for e in examples]                                            # motif, k
        rows = [(p, motif * (k + d)) for p, motif, k in rows if k + d > 0]
        prompts = prompt_token_ids(tokenizer, [p for p, _ in rows])
        answers = tokenizer([" ".join(a) for _, a in rows], add_special_tokens=False)["input_ids"]
        ids, attn = left_pad([p + a for p, a in zip(prompts, answers)], tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attn,
                       position_ids=position_ids(attn)).logits[:, -1].float()        # (B, V)
        out[d] = round(F.softmax(logits, -1)[:, tokenizer.eos_token_id].mean().item(), 3)
    return out


# A build's weights depend on the thread count (the order of floating-point reductions) and on
# the CPU's instruction set: builds run on one thread, and the default pair ships in pair/.
BUILD_THREADS = 1


def build_settings(cfg: Config, role: str) -> dict:
    """Every setting one model of the default pair depends on (its cache key is their hash)."""
    build = {k: getattr(cfg, f"{role}_{k}") for k in ("layers", "width", "steps", "free_frac")}
    build.update(role=role, lr=cfg.pretrain_lr, task_version=3, threads=BUILD_THREADS,
                 pair_seed=cfg.pair_seed)
    if role == "teacher":
        build.update(overrun_frac=cfg.teacher_overrun_frac)
    else:
        build.update(gold_size=cfg.gold_size)
    return build


def model_key(cfg: Config, role: str) -> str:
    text = json.dumps(build_settings(cfg, role), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def check_shipped() -> None:
    """Check every file of pair/ against pair/SHA256SUMS before loading it: a damaged or missing
    file stops the run with one line (exit code 2) instead of a loader's traceback."""
    sums = SHIPPED / "SHA256SUMS"
    restore = "restore it with `git checkout pair/` (or rebuild the pair: tutorial, section 8)"
    if not sums.is_file():
        print(f"error: {sums} is missing; {restore}", file=sys.stderr)
        raise SystemExit(2)
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = SHIPPED / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            what = "is missing" if not path.is_file() else "does not match pair/SHA256SUMS"
            print(f"error: the shipped pair file {path} {what}: it is damaged; {restore}",
                  file=sys.stderr)
            raise SystemExit(2)


def pair_folders(cfg: Config) -> tuple[str, str]:
    """The default pair's folders: the shipped pair (checked) when the build settings are the
    ones it was built with, else build_default_pair()'s, in --cache-dir."""
    if all(model_key(cfg, r) == model_key(Config(), r) for r in ("teacher", "student")):
        check_shipped()
        return default_pair()
    return build_default_pair(cfg)


def build_default_pair(cfg: Config) -> tuple[str, str]:
    """Train the default teacher and student once each and save them with save_pretrained.

    Each folder is keyed by its build settings, so a second run reuses it and a changed setting
    rebuilds only the model it changes. Runs then load them back with from_pretrained, the path a
    user's hub model takes. build.json records the settings and the model's held-out figures.
    """
    paths = []
    for role in ("teacher", "student"):
        d = Path(cfg.cache_dir) / f"{role}-{model_key(cfg, role)}"
        paths.append(str(d))
        if (d / "DONE").exists():
            continue
        print(f"[build] no cached {role} at {d}; training it (teacher ~9 min, student ~30 s on "
              "one CPU core)", flush=True)
        t0, threads = time.time(), torch.get_num_threads()
        seed = {"teacher": 0, "student": 1}[role] + 2 * cfg.pair_seed
        torch.manual_seed(seed)
        torch.set_num_threads(BUILD_THREADS)
        tokenizer, task = build_tokenizer(), MotifTask()
        model = make_model(tokenizer, getattr(cfg, f"{role}_layers"), getattr(cfg, f"{role}_width"))
        train_supervised(model, tokenizer, pretraining_mix(task, cfg, role),
                         getattr(cfg, f"{role}_steps"), cfg.pretrain_lr, random.Random(seed), role)
        torch.set_num_threads(threads)
        tmp = d.with_name(f"{d.name}.tmp{os.getpid()}")     # private: parallel builds never collide
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        ev = evaluate(model, tokenizer, task.eval_set, cfg.max_new_tokens,
                      generator=torch.Generator().manual_seed(0))
        info = {"role": role, "key": model_key(cfg, role), "settings": build_settings(cfg, role),
                "build_s": round(time.time() - t0, 1),
                "params": sum(p.numel() for p in model.parameters()),
                "accuracy": ev["accuracy"], "accuracy_sampled": ev["accuracy_sampled"],
                "p_eos_by_depth": loop_eos_profile(model, tokenizer, task.eval_set)}
        (tmp / "build.json").write_text(json.dumps(info, indent=1))
        (tmp / "DONE").write_text("ok")
        if (d / "DONE").exists():                               # another process finished first
            shutil.rmtree(tmp)
            continue
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)                                 # atomic: a half-built model is never used
        print(f"[build] saved {d}: {info}", flush=True)
    return paths[0], paths[1]


# =============================================================================
# 9. Scaling up: timing, memory, run folders, checkpoint and resume
# =============================================================================
# token_terms (section 3) projects hidden states to the vocabulary `chunk_size` positions at
# a time under activation checkpointing: peak memory O(B * chunk * V) instead of O(B * T * V).
# With a 152k vocabulary, B=4 and T=1024 the unchunked float32 log-softmax alone is 2.5 GB.

def clock(device) -> float:
    """time.time() once the device has finished its queued work: CUDA runs asynchronously, so
    without the wait a phase's time is booked to whichever later call first waits for it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


class Laps:
    """Seconds per phase of one step: lap(name) books the time since the previous lap to `name`."""

    def __init__(self, device):
        self.device, self.times, self.last = device, {}, clock(device)

    def __call__(self, name: str):
        now = clock(self.device)
        self.times[name], self.last = now - self.last, now


def _peak_rss_mb(reset: bool = False) -> float:
    """This process's peak resident memory in MB (Linux's VmHWM); reset=True starts it afresh
    from the memory in use now, so a peak reached before (by imports, say) does not hide one."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def _loss_memory(vocab, batch, length, hidden, chunk, objective):
    """loss_peak_memory()'s measurement; it runs in a process of its own and prints its result."""
    torch.manual_seed(0)
    hs = torch.randn(batch, length, hidden, requires_grad=True)                # (B, T, H)
    ht = torch.randn(batch, length, hidden)                                    # (B, T, H)
    head_s = torch.nn.Linear(hidden, vocab, bias=False)
    head_t = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    y = torch.randint(0, vocab, (batch, length))                               # (B, T)
    base = _peak_rss_mb(reset=True)
    t = token_terms(hs, head_s, ht, head_t, y, 0, 1.0, chunk, objective)
    loss = (t.kl if objective != "sampled" else -t.logp_student).mean()
    loss.backward()
    print(json.dumps({"loss_mb": _peak_rss_mb() - base, "loss": float(loss)}))


def loss_peak_memory(vocab=152_000, batch=4, length=1024, hidden=256, chunk=0,
                     objective="full") -> dict:
    """Peak resident memory (MB) of one loss and its backward on random hidden states, above the
    inputs and the two vocabulary heads, measured in a fresh process (Linux: VmHWM)."""
    import subprocess
    args = json.dumps([vocab, batch, length, hidden, chunk, objective])
    # glibc keeps freed blocks below its mmap threshold for reuse, so the peak would count
    # chunks already freed; a low threshold returns each tensor's memory as it is freed
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    code = "import json, sys, opd; opd._loss_memory(*json.loads(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent, env=env)
    return json.loads(out.stdout.splitlines()[-1])


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_folder(cfg: Config, method: str) -> Path:
    """out_dir/<run_name>, by default out_dir/<method>-s<seed>."""
    return Path(cfg.out_dir) / (cfg.run_name or f"{method}-s{cfg.seed}")


def _clock_text(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class RunLog:
    """A run's log in its folder: config.json and metrics.jsonl (one JSON object per step,
    written as it goes; an earlier run's file is kept as metrics.prev.jsonl, and a resumed run
    keeps the steps before `start`). Console lines start with the run's name: one every
    --log-every steps with the time left, every evaluation, and every alert and guard action."""

    def __init__(self, folder: Path, cfg: Config, method: str, start: int = 0):
        self.cfg, self.tag, self.start, self.t0 = cfg, f"[{method} s{cfg.seed}]", start, time.time()
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.metrics = folder, folder / "metrics.jsonl"
        kept = [r for r in read_metrics(self.metrics) if r["step"] < start] \
            if start and self.metrics.exists() else []
        if self.metrics.exists():                                # never lose an earlier run's log
            self.metrics.replace(folder / "metrics.prev.jsonl")
        config = dict(flat_config(cfg), method=method)
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        self.file = open(self.metrics, "w", buffering=1)    # line-buffered: a crash keeps each step
        self.file.writelines(json.dumps(r) + "\n" for r in kept)

    def say(self, text: str):
        print(f"{self.tag} {text}", flush=True)

    def log(self, m: dict, samples=()):
        """Write one training step's metrics; print its line when due, and `samples` when due."""
        self.file.write(json.dumps(m) + "\n")
        step, cfg = m["step"], self.cfg
        if step % cfg.log_every == 0 or "eval/accuracy" in m or step + 1 == cfg.steps:
            done = step + 1 - self.start
            left = (time.time() - self.t0) / done * (cfg.steps - step - 1)
            acc = f" | held-out acc {m['eval/accuracy']:.3f}" if "eval/accuracy" in m else ""
            self.say(f"step {step:4d}/{cfg.steps} loss {m['loss/total']:+.4f} kl "
                     f"{m['kl/reverse']:.3f} len {m['rollout/len_mean']:5.1f} trunc "
                     f"{m['rollout/trunc_rate']:.2f} rep {m['rollout/rep_rate']:.2f}{acc} "
                     f"({_clock_text(left)} left)")
        if cfg.log_samples_every and step % cfg.log_samples_every == 0:
            for prompt, text in samples:
                print(f"    {prompt!r} -> {text!r}", flush=True)

    def final(self, m: dict):
        """Write the final evaluation, after the last update."""
        self.file.write(json.dumps(m) + "\n")
        self.say(f"step {m['step']:4d} final: held-out acc {m['eval/accuracy']:.3f} (sampled "
                 f"{m['eval/accuracy_sampled']:.3f})")

    def close(self, student, tokenizer) -> list[dict]:
        """Close the log, print where the time went, save the student if asked; returns every
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


def _streams(state: TrainState) -> dict:
    return {"rng": state.rng, "gold_rng": state.gold_rng, "eval_gen": state.eval_gen,
            "teacher_gen": state.teacher_gen}


def save_checkpoint(path: Path, step: int, cfg: Config, state: TrainState):
    """Everything in `state`, and the global random state, so that the loop goes on as if it had
    never stopped: `step` is the next step to run. Written to a temporary file and renamed over
    the last checkpoint (an atomic replace), so a kill mid-write leaves the previous one usable."""
    ck = {"step": step, "config": flat_config(cfg), "student": state.student.state_dict(),
          "opt": state.opt.state_dict(), "sched": state.sched.state_dict(),
          "torch_rng": torch.get_rng_state(),
          "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
          "streams": {k: r.getstate() if isinstance(r, random.Random) else r.get_state()
                      for k, r in _streams(state).items()},
          "monitor": vars(state.monitor), "guard": vars(state.guard) if state.guard else None,
          "loss": dataclasses.asdict(state.loss)}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ck, tmp)
    os.replace(tmp, path)


# flags that may differ between a checkpoint and the command that resumes it: those that change
# no number, and those that say where and how long a run goes on
RESUME_MAY_CHANGE = {"steps", "methods", "seeds", "run_name", "threads", "device"}


def load_checkpoint(path: Path, cfg: Config, state: TrainState) -> int:
    """Restore what save_checkpoint wrote into `state`; returns the next step (0 with no
    checkpoint). Refuses a checkpoint written with other settings, which would splice two
    different runs together."""
    if not path.exists():
        print(f"[resume] no checkpoint at {path}: starting at step 0", flush=True)
        return 0
    ck = torch.load(path, map_location=cfg.device, weights_only=False)   # RNG and monitor state
    neutral = {f.name for f in flag_fields() if f.metadata["neutral"]}
    now = flat_config(cfg)
    changed = [f"--{k.replace('_', '-')} {v}" for k, v in ck["config"].items()
               if k not in RESUME_MAY_CHANGE | neutral and now.get(k, v) != v]
    if changed:
        raise SystemExit(f"error: {path} was written with {', '.join(changed)}; resume with the "
                         "same flags, or drop --resume to start over")
    if ck["step"] > cfg.steps:
        raise SystemExit(f"error: {path} is at step {ck['step']}, past --steps {cfg.steps}")
    state.student.load_state_dict(ck["student"])
    state.opt.load_state_dict(ck["opt"])
    state.sched.load_state_dict(ck["sched"])
    torch.set_rng_state(ck["torch_rng"].cpu())
    if ck["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ck["cuda_rng"]])
    for name, r in _streams(state).items():      # a torch generator's state is a CPU tensor
        saved = ck["streams"][name]
        if isinstance(r, random.Random):
            r.setstate(saved)
        else:
            r.set_state(saved.cpu())
    state.monitor.__dict__.update(ck["monitor"])
    if state.guard and ck["guard"]:
        state.guard.__dict__.update(ck["guard"])
    state.loss = LossSettings(**ck["loss"])
    print(f"[resume] {path}: going on at step {ck['step']}", flush=True)
    return ck["step"]


# =============================================================================
# 10. Study: presets, flags, the study, its tables, signals and figures, the command line
# =============================================================================

METHODS = {                       # preset -> settings; a flag given on the command line wins
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
    "opd+guard": {"guard": True},                # the guard's fix: Stable-OPD (gold data)
    "full-vocab": {"objective": "full"},
    # fixes that need no gold data; settings chosen by the search in the tutorial
    "seq-kd": dict(SEQ_KD),
    "prefix-opd": {"prefix_len": 16},
    "iw-opd": {"iw_gamma": 5.0},
    "topk": {"objective": "topk", "top_k": 1},
    "guard-seq-kd": {"guard": True, "guard_fix": "seq-kd"},   # the guard without gold data
}
LOSS_FIELDS = {f.name for f in dataclasses.fields(LossSettings)}


def needs_gold(method: str) -> bool:
    """Whether a preset trains on reference solutions: an SFT term, or the guard's Stable-OPD."""
    preset = METHODS[method]
    fix = preset.get("guard_fix", "auto")          # 'auto' is Stable-OPD on the toy task's data
    return preset.get("sft_coef", 0) > 0 or (preset.get("guard", False) and fix != "seq-kd")


def flag_fields() -> list:
    """Every flag's field, in --help's order: Config's, with the loss settings in its place."""
    out = []
    for f in dataclasses.fields(Config):
        out += list(dataclasses.fields(LossSettings)) if f.name == "loss" else [f]
    return out


def flat_config(cfg: Config) -> dict:
    """Every flag's value by its name: Config's fields with the loss settings spread out."""
    return {f.name: getattr(cfg.loss if f.name in LOSS_FIELDS else cfg, f.name)
            for f in flag_fields()}


def with_settings(cfg: Config, **settings) -> Config:
    """A copy of `cfg` with some flags changed, the loss settings among them by their names."""
    loss = {k: v for k, v in settings.items() if k in LOSS_FIELDS}
    rest = {k: v for k, v in settings.items() if k not in LOSS_FIELDS}
    return dataclasses.replace(cfg, **rest, loss=dataclasses.replace(cfg.loss, **loss))


def parse_methods(methods: str) -> list[str]:
    """--methods as a list of preset names ('all': every preset)."""
    if methods == "all":
        return list(METHODS)
    return [m.strip() for m in methods.split(",") if m.strip()]


def validate_config(cfg: Config) -> None:
    """Every flag's allowed values and combinations, in one place, checked before anything is
    built or loaded. A bad value prints one line naming the flag, the value and what is
    allowed, and exits with code 2 (argparse's code for a usage error); warnings go on."""
    v = flat_config(cfg)
    methods = parse_methods(cfg.methods)
    floats = [f.name for f in flag_fields() if f.type in ("float", float)]
    roles = ("teacher", "student")
    rules = [  # (flag, holds, what is allowed)
        *[(name, math.isfinite(v[name]), "a finite number") for name in floats],
        ("methods", bool(methods) and all(m in METHODS for m in methods),
         "'all' or a comma-separated list of " + ", ".join(METHODS)),
        ("seeds", v["seeds"] >= 1, ">= 1"),
        ("seed", v["seed"] >= 0, ">= 0"),
        ("pair_seed", v["pair_seed"] >= 0, ">= 0"),
        ("run_name", not v["run_name"] or len(methods) * v["seeds"] == 1,
         f"empty for a command that makes {len(methods) * v['seeds']} runs (--methods x "
         "--seeds): each run needs a folder of its own"),
        ("device", re.fullmatch(r"cpu|cuda(:\d+)?", v["device"]) is not None,
         "'cpu', 'cuda' or 'cuda:N'"),
        ("device", v["device"] == "cpu" or torch.cuda.is_available(),
         "'cpu' on this machine: no CUDA device is visible"),
        ("workers", v["workers"] >= 0, ">= 0 (0: one per CPU core)"),
        ("threads", v["threads"] >= 1, ">= 1"),
        ("teacher" if v["teacher"] else "student", bool(v["teacher"]) == bool(v["student"]),
         f"given together with --{'student' if v['teacher'] else 'teacher'}, or neither (the "
         "default pair)"),
        *[(f"{r}_{k}", v[f"{r}_{k}"] >= 1, ">= 1") for r in roles for k in ("layers", "steps")],
        *[(f"{r}_width", v[f"{r}_width"] >= 4 and v[f"{r}_width"] % 4 == 0,
           "a positive multiple of 4 (the default pair has 4 attention heads)") for r in roles],
        *[(f"{r}_free_frac", 0 <= v[f"{r}_free_frac"] <= 1, "between 0 and 1") for r in roles],
        ("teacher_overrun_frac", 0 <= v["teacher_overrun_frac"] <= 1 - v["teacher_free_frac"],
         f"between 0 and 1 - --teacher-free-frac ({1 - v['teacher_free_frac']:g})"),
        ("gold_size", v["gold_size"] >= 0, ">= 0 (0: every prompt's own answer)"),
        ("pretrain_lr", v["pretrain_lr"] > 0, "> 0"),
        ("steps", v["steps"] >= 1, ">= 1"),
        ("batch_size", v["batch_size"] >= 1, ">= 1"),
        ("lr", v["lr"] > 0, "> 0"),
        ("temperature", v["temperature"] > 0, "> 0 (sampling divides the logits by it)"),
        ("max_new_tokens", v["max_new_tokens"] >= 1, "at least 1"),
        ("objective", v["objective"] in ("sampled", "full", "topk"), "'sampled', 'full' or 'topk'"),
        ("top_k", v["top_k"] >= 1, ">= 1"),
        ("loss_agg", v["loss_agg"] in LOSS_AGG, "one of " + ", ".join(LOSS_AGG)),
        ("warmup", v["warmup"] >= 0, ">= 0"),
        ("decay", 0 <= v["decay"] <= 1, "between 0 and 1"),
        ("grad_clip", v["grad_clip"] > 0, "> 0"),
        ("chunk_size", v["chunk_size"] >= 0, ">= 0 (0: all positions at once)"),
        ("length_groups", v["length_groups"] >= 1, ">= 1"),
        ("opd_coef", v["opd_coef"] >= 0, ">= 0"),
        ("opd_coef", v["opd_coef"] > 0 or v["sft_coef"] > 0 or v["seq_kd_coef"] > 0,
         "> 0 unless --sft-coef or --seq-kd-coef is (otherwise nothing is trained)"),
        ("ref_kl", v["ref_kl"] >= 0, ">= 0"),
        ("sft_coef", v["sft_coef"] >= 0, ">= 0"),
        ("seq_kd_coef", v["seq_kd_coef"] >= 0, ">= 0"),
        ("seq_kd_samples", 0 <= v["seq_kd_samples"] <= v["batch_size"],
         f"between 0 and --batch-size ({v['batch_size']}) (0: every prompt)"),
        ("seq_kd_temperature", v["seq_kd_temperature"] > 0, "> 0"),
        ("trunc_weight", 0 <= v["trunc_weight"] <= 1, "between 0 and 1"),
        ("overlong_buffer", 0 <= v["overlong_buffer"] <= v["max_new_tokens"],
         f"between 0 and --max-new-tokens ({v['max_new_tokens']})"),
        ("adv_regulation", v["adv_regulation"] in ("none", "log", "clip"),
         "'none', 'log' or 'clip'"),
        ("adv_clip", v["adv_clip"] > 0, "> 0"),
        ("prefix_len", 0 <= v["prefix_len"] <= v["max_new_tokens"],
         f"between 0 and --max-new-tokens ({v['max_new_tokens']}) (0: every token)"),
        ("iw_gamma", v["iw_gamma"] >= 0, ">= 0 (0: off)"),
        ("rep_penalty", v["rep_penalty"] > 0, "> 0 (1: off)"),
        ("teacher_format", v["teacher_format"] in ("own", "plain"), "'own' or 'plain'"),
        ("guard_fix", v["guard_fix"] in ("auto", *GUARD_FIXES), "'auto', " + ", ".join(
            f"'{k}'" for k in GUARD_FIXES)),
        ("teacher_format", v["teacher_format"] == "own" or not v["teacher_context"],
         "'own' with --teacher-context (the context is rendered with the teacher's chat template)"),
        ("rep_window", v["rep_window"] >= 1, ">= 1"),
        ("rep_tau", v["rep_tau"] > 0, "> 0"),
        ("alert_max_len", v["alert_max_len"] >= 0, ">= 0 (0: off)"),
        ("alert_trunc", 0 <= v["alert_trunc"] <= 1, "between 0 and 1"),
        ("alert_rep", 0 <= v["alert_rep"] <= 1, "between 0 and 1"),
        ("alert_growth", v["alert_growth"] > 0, "> 0"),
        ("alert_patience", v["alert_patience"] >= 1, ">= 1"),
        ("eval_every", v["eval_every"] >= 1, ">= 1"),
        ("eval_size", v["eval_size"] >= 1, ">= 1"),
        ("log_every", v["log_every"] >= 1, ">= 1"),
        ("log_samples_every", v["log_samples_every"] >= 0, ">= 0 (0: off)"),
        ("save_every", v["save_every"] >= 0, ">= 0 (0: off)"),
    ]
    for name, holds, allowed in rules:
        if not holds:
            print(f"error: --{name.replace('_', '-')} must be {allowed} (got {v[name]!r})",
                  file=sys.stderr)
            sys.exit(2)
    shaping = v["overlong_buffer"] or v["adv_regulation"] != "none" or v["eos_mask"] \
        or v["iw_gamma"]
    if v["objective"] != "sampled" and shaping:
        print("[check] warning: --overlong-buffer, --adv-regulation, --eos-mask and --iw-gamma "
              "shape the sampled-token advantage; with --objective full or topk they have no "
              "effect", flush=True)


def config_for(base: Config, method: str, seed: int, given=frozenset()) -> Config:
    """The config of one run: `base` with the preset's settings, except for the flags in `given`
    (those set on the command line), which win: --methods stable-opd --sft-coef 1.0."""
    preset = {k: v for k, v in METHODS[method].items() if k not in given}
    cfg = with_settings(base, seed=seed, **preset)
    validate_config(cfg)                     # a preset combined with the flags must be valid too
    return cfg


def _run_job(args):
    cfg, method = args
    try:
        run_opd(cfg, method)
    except SystemExit as e:                 # a worker's SystemExit would hang the pool: re-raise
        raise RuntimeError(str(e)) from None
    return method, cfg.seed


def study_workers(base: Config, n_jobs: int) -> int:
    """--workers, or by default one process per CPU core this process may use (each with
    --threads threads), never more than there are runs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    return max(1, min(base.workers or cores // base.threads, n_jobs))


def run_study(base: Config, given=frozenset()):
    """Every method of --methods on --seeds seeds, then the tables and figures from the run
    folders. Prints a progress line with the time left as each run ends."""
    runs = [(m, base.seed + i) for i in range(base.seeds) for m in parse_methods(base.methods)]
    if not base.replot:
        jobs = [(config_for(base, m, s, given), m) for m, s in runs]
        load_models_and_data(base, torch.device(base.device))   # build or check the pair once
        t0 = time.time()        # real models fill a device: one process unless --workers asks
        workers = study_workers(base, len(jobs)) if base.workers or not base.teacher else 1
        print(f"[study] {len(jobs)} runs in {workers} process(es) of {base.threads} thread(s) "
              "each; a line per run every --log-every steps", flush=True)
        pool = None
        if workers > 1:
            import multiprocessing as mp
            pool = mp.get_context("spawn").Pool(workers)
        try:
            finished = pool.imap_unordered(_run_job, jobs) if pool else map(_run_job, jobs)
            for done, (m, s) in enumerate(finished, 1):
                spent = time.time() - t0
                print(f"[study] {done}/{len(jobs)} runs done ({m} s{s}), {_clock_text(spent)} "
                      f"elapsed, about {_clock_text(spent / done * (len(jobs) - done))} left",
                      flush=True)
        finally:
            if pool:
                pool.terminate()
    results = []
    for m, s in runs:
        path = Path(base.out_dir) / (base.run_name or f"{m}-s{s}") / "metrics.jsonl"
        if not path.exists():
            raise SystemExit(f"error: no run at {path}; run the study first, or drop --replot")
        results.append((m, s, read_metrics(path)))
    out = study_plots_dir(base)
    rows = [summarize(m, s, r) for m, s, r in results]
    parts = {"summary": summary_table(rows), "runs": runs_table(rows)}
    if len({m for m, _ in runs}) > 4:                  # a comparison of fixes: rank them
        costs = out / "cost.json"                        # measured once, after the runs
        if not costs.exists() or not base.replot:
            out.mkdir(parents=True, exist_ok=True)
            methods = list(dict.fromkeys(m for m, _ in runs))
            costs.write_text(json.dumps(measure_cost(base, methods), indent=1))
        parts["ranking"] = ranking_table(rows, results, json.loads(costs.read_text()))
        parts["late-fixes"] = divergence_table(results)
        plot_ranking(rows, out)
    else:
        parts["time"] = time_table(results)
        if any(m == "opd" and r["takeoff_step"] != "" for r in rows for m in [r["method"]]):
            parts["phases"] = phase_table(results)
            parts["mechanism"] = mechanism_table(results)
    command = "python opd.py" + "".join(f" --{k} {getattr(base, k)}" for k in ("methods", "seeds")
                                        if k in given)
    write_results(rows, out, parts, f"`{command}`")
    plot_study(results, out)
    print(f"[study] tables and figures in {out}/", flush=True)
    return rows


def study_plots_dir(cfg: Config) -> Path:
    """--plots-dir if given; plots/ for the default study and plots/all/ for `--methods all`
    (the committed figures, with any --seeds); for any other setting <out_dir>/plots, so
    `--methods opd --seeds 1` does not overwrite them."""
    if cfg.plots_dir:
        return Path(cfg.plots_dir)
    default = flat_config(Config())
    changed = [f.name for f in flag_fields() if not f.metadata["neutral"]
               and flat_config(cfg)[f.name] != default[f.name]]
    if cfg.methods == "all" and set(changed) <= {"methods", "seeds"}:
        return Path("plots/all")
    return Path(cfg.out_dir) / "plots" if changed else Path("plots")


TAKEOFF = 0.3           # a run has taken off once its rollouts' truncation rate exceeds this
LEARNED = 0.10          # shape(): held-out accuracy gained by the peak over step 0
QUIET = 0.05            # shape(): truncation allowed on the steps before that peak
COLLAPSE_TRUNC = 0.5    # shape(): truncation a collapse reaches
COLLAPSE_DROP = 0.15    # shape(): accuracy a collapse loses from the peak by the end


def first_step(rows, key, above: float):
    """The first step whose `key` exceeds `above` ('' if none): the take-off is truncation >
    TAKEOFF."""
    return next((r["step"] for r in rows if r.get(key, -math.inf) > above), "")


def shape(rows) -> dict:
    """The verdict on one run, from its metrics.jsonl rows (tutorial, the collapse):

    learned    the held-out accuracy reached at least LEARNED above step 0 at an evaluation
               before which the rollouts' truncation had stayed at most QUIET on every step;
    collapsed  the run took off (truncation > TAKEOFF), truncation reached COLLAPSE_TRUNC, and
               the final accuracy is at least COLLAPSE_DROP under the peak;
    persisted  after the take-off, truncation stayed at or above TAKEOFF on most steps.
    """
    tr = [r for r in rows if "rollout/trunc_rate" in r]
    ev = [r for r in rows if "eval/accuracy" in r]
    acc = [r["eval/accuracy"] for r in ev]
    peak = max(acc)
    takeoff = first_step(tr, "rollout/trunc_rate", TAKEOFF)
    quiet_until = first_step(tr, "rollout/trunc_rate", QUIET)
    quiet_until = math.inf if quiet_until == "" else quiet_until        # the first loud step
    learned = any(a - acc[0] >= LEARNED - 1e-9 and r["step"] <= quiet_until
                  for a, r in zip(acc, ev))
    collapsed = takeoff != "" and max(r["rollout/trunc_rate"] for r in tr) >= COLLAPSE_TRUNC \
        and peak - acc[-1] >= COLLAPSE_DROP - 1e-9
    after = [r["rollout/trunc_rate"] >= TAKEOFF for r in tr
             if takeoff != "" and r["step"] >= takeoff]
    persisted = bool(after) and sum(after) > len(after) / 2
    if collapsed:
        verdict = ("learned, then collapsed" if learned else "collapsed before learning") + \
            ("" if persisted else ", partly recovered")
    elif takeoff != "":
        verdict = "learned, inflated, kept its accuracy" if learned else "inflated, did not learn"
    else:
        verdict = "learned, no collapse" if learned else "did not learn, no collapse"
    return {"learned": learned, "collapsed": collapsed, "persisted": persisted, "verdict": verdict}


def summarize(method, seed, rows) -> dict:
    """One results.csv row: per-seed figures of the learning phase, the collapse and the alerts."""
    tr = [r for r in rows if "rollout/trunc_rate" in r]
    ev = [r for r in rows if "eval/accuracy" in r]
    acc, acc_s = [r["eval/accuracy"] for r in ev], [r["eval/accuracy_sampled"] for r in ev]
    takeoff = first_step(tr, "rollout/trunc_rate", TAKEOFF)
    alert = next((r["step"] for r in tr if any(k.startswith("alert/") for k in r)), "")
    guard = next((r["step"] for r in tr if r.get("guard/acted")), "")
    trunc = [r["rollout/trunc_rate"] for r in tr]
    quiet = first_step(tr, "rollout/trunc_rate", QUIET)          # steps before truncation > 0.05
    return {"method": method, "seed": seed, "steps": len(tr),
            "finished": "no" if "rollout/trunc_rate" in rows[-1] else "yes",   # a final evaluation
            "acc_step0": acc[0], "acc_peak": max(acc),
            "acc_peak_step": ev[acc.index(max(acc))]["step"], "acc_final": acc[-1],
            "acc_sampled_step0": acc_s[0], "acc_sampled_peak": max(acc_s),
            "acc_sampled_final": acc_s[-1],
            "trunc_rate_step0": trunc[0], "trunc_rate_max": max(trunc),
            "trunc_rate_final": trunc[-1],
            "quiet_steps": quiet if quiet != "" else len(tr),
            "takeoff_step": takeoff,
            "len_mean_step0": tr[0]["rollout/len_mean"],
            "len_mean_max": max(r["rollout/len_mean"] for r in tr),
            "len_mean_final": tr[-1]["rollout/len_mean"],
            "rep_rate_step0": tr[0]["rollout/rep_rate"],
            "rep_rate_max": max(r["rollout/rep_rate"] for r in tr),
            "rep_rate_final": tr[-1]["rollout/rep_rate"],
            "first_alert_step": alert,
            "alert_lead": takeoff - alert if takeoff != "" and alert != "" else "",
            "guard_step": guard,
            "trunc_after_guard": max((r["rollout/trunc_rate"] for r in tr if r["step"] > guard),
                                     default="") if guard != "" else "",
            **{k: {True: "yes", False: "no"}.get(v, v) for k, v in shape(rows).items()}}


TABLE_COLS = ["acc_step0", "acc_peak", "acc_final", "acc_sampled_step0", "acc_sampled_peak",
              "acc_sampled_final", "trunc_rate_max", "rep_rate_max", "len_mean_max"]


def _std(x):
    mu = sum(x) / len(x)
    return (sum((v - mu) ** 2 for v in x) / max(len(x) - 1, 1)) ** 0.5


def markdown(header, lines) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *["| " + " | ".join(str(c) for c in line) + " |" for line in lines]])


def summary_table(rows, group=lambda r: r["method"]) -> str:
    """Mean ± standard deviation over seeds of each method's (or each `group`'s) figures."""
    lines = []
    for m in dict.fromkeys(map(group, rows)):
        rs = [r for r in rows if group(r) == m]
        lines.append([m, len(rs), *[f"{sum(r[c] for r in rs) / len(rs):.2f} ± "
                                     f"{_std([r[c] for r in rs]):.2f}" for c in TABLE_COLS]])
    return markdown(["method", "seeds", *TABLE_COLS], lines)


def runs_table(rows, label=None) -> str:
    """One line per run: the learning phase, the collapse, and shape()'s verdict. A run cut
    before its final evaluation says so; its final accuracy is then its last evaluation's."""
    label = label or (lambda r: f"{r['method']}, seed {r['seed']}")
    return markdown(["run", "steps", "steps with truncation <= 0.05",
                     "accuracy step 0 -> peak (step)", "take-off", "worst truncation",
                     "repetition step 0 -> worst", "final accuracy", "verdict"],
                    [[label(r), r["steps"] if r["finished"] == "yes" else f"{r['steps']} (cut)",
                      r["quiet_steps"],
                      f"{r['acc_step0']:.2f} -> {r['acc_peak']:.2f} ({r['acc_peak_step']})",
                      r["takeoff_step"] if r["takeoff_step"] != "" else "none",
                      f"{r['trunc_rate_max']:.2f}",
                      f"{r['rep_rate_step0']:.2f} -> {r['rep_rate_max']:.2f}",
                      f"{r['acc_final']:.2f}", r["verdict"]] for r in rows])


def time_table(results) -> str:
    """Where each run's time went: seconds in each phase, summed over its steps (time/*)."""
    phases = ("rollout", "teacher", "update", "eval")
    lines = []
    for m, seed, rows in results:
        spent = [sum(r.get(f"time/{k}_s", 0.0) for r in rows) for k in phases]
        lines.append([f"{m}, seed {seed}", *[f"{x:.0f} s" for x in spent], f"{sum(spent):.0f} s"])
    return markdown(["run", "rollout", "teacher forward", "student forward, loss, backward",
                     "held-out evaluation", "sum"], lines)


def _window(rows, key, lo, hi):
    """The finite values of `key` on training steps lo <= step < hi."""
    return [r[key] for r in rows if "rollout/trunc_rate" in r and lo <= r["step"] < hi
            and key in r and r[key] == r[key]]


def _mean(x):
    return sum(x) / len(x) if x else math.nan


def phase_table(results) -> str:
    """The monitor's figures on plain OPD before and after its collapse: per key, the range over
    seeds of each seed's mean over the healthy steps (60 up to 10 before the take-off) and over
    the collapsed ones (from 10 after the take-off to the end)."""
    runs = [(s, rows, first_step(rows, "rollout/trunc_rate", TAKEOFF)) for m, s, rows in results
            if m == "opd"]
    runs = [(s, rows, t) for s, rows, t in runs if t != ""]
    keys = ["rollout/len_mean", "rollout/trunc_rate", "rollout/rep_rate", "rollout/ngram_rep",
            "rollout/accuracy", "logp/student", "logp/teacher", "kl/reverse", "adv/repetitive_frac",
            "eos/p_student", "eos/p_teacher", "eos/teacher_lower_frac"]

    def span(key, lo, hi):
        means = [_mean(_window(rows, key, lo(t), hi(t, rows))) for _, rows, t in runs]
        means = [x for x in means if x == x]
        return f"{min(means):.2f} to {max(means):.2f}" if means else "no value"
    end = (lambda t, rows: rows[-1]["step"] + 1)
    lines = [[f"`{k}`", span(k, lambda t: 60, lambda t, rows: t - 10),
              span(k, lambda t: t + 10, end)] for k in keys]
    return markdown(["key", "healthy: steps 60 to 10 before the take-off",
                     "collapsed: 10 steps after the take-off to the end"], lines)


def mechanism_table(results) -> str:
    """Plain OPD, per seed: the KL and the teacher's log-prob before the drift and just before
    the take-off, the advantage of tokens in a repetitive tail against the others once the
    loops set in, and when the repetitive ones first get the larger advantage."""
    lines = []
    for m, seed, rows in results:
        t = first_step(rows, "rollout/trunc_rate", TAKEOFF)
        if m != "opd" or t == "":
            continue
        end = rows[-1]["step"] + 1
        tr = [r for r in rows if "rollout/trunc_rate" in r]
        above = [r["step"] for r in tr if r.get("adv/repetitive", math.nan) > r["adv/regular"]]
        good = next((s for s in above if all(x in above for x in range(s, min(s + 20, end)))), "")
        lines.append([seed, t, f"{_mean(_window(rows, 'kl/reverse', 60, t - 10)):.2f}",
                      f"{_mean(_window(rows, 'kl/reverse', t - 10, t)):.2f}",
                      f"{_mean(_window(rows, 'logp/teacher', 60, t - 10)):.2f}",
                      f"{_mean(_window(rows, 'logp/teacher', t - 10, t)):.2f}",
                      f"{_mean(_window(rows, 'adv/repetitive', end - 40, end)):.2f} against "
                      f"{_mean(_window(rows, 'adv/regular', end - 40, end)):.2f}",
                      sum(r["rollout/rep_rate"] > 0 for r in tr if r["step"] < t),
                      above[0] if above else "never", good or "never",
                      f"{_mean(_window(rows, 'eos/teacher_lower_frac', 60, t)):.2f}"])
    return markdown(["seed", "take-off", "KL, steps 60 to take-off - 10", "KL, the 10 steps before",
                     "teacher log-prob, steps 60 to take-off - 10", "the 10 steps before",
                     "advantage, repetitive tail against the rest, last 40 steps",
                     "steps with a looping rollout before the take-off",
                     "repetitive first above the rest", "above for 20 steps in a row from",
                     "stops with p_T(EOS) < p_S(EOS), step 60 to take-off"], lines)


def position_table(results, lo: int = 0, hi: int = 10) -> str:
    """Where in the response the teacher agrees, per method: the mean over its runs and over the
    training steps lo <= step < hi of each position bin's advantage, share of positive advantage
    and teacher log-prob (position_profile(), logged as pos/*)."""
    bins = [f"{a}-{b - 1}" for a, b in zip(POSITION_BINS, POSITION_BINS[1:])] + \
        [f"{POSITION_BINS[-1]}+"]
    names = {"pos/adv": "mean A_t", "pos/adv_positive": "share of tokens with A_t > 0",
             "pos/logp_teacher": "teacher log-prob"}
    lines = []
    for m in dict.fromkeys(m for m, _, _ in results):
        steps = [r for mm, _, rows in results if mm == m for r in rows
                 if "pos/adv" in r and lo <= r["step"] < hi]
        for key, name in names.items():
            cols = [[r[key][i] for r in steps if r[key][i] == r[key][i]] for i in range(len(bins))]
            lines.append([m, name, *[f"{_mean(c):.2f}" if c else "" for c in cols]])
    return markdown(["run", "figure", *[f"tokens {b}" for b in bins]], lines)


def divergence_table(results, methods=("drop-trunc", "overlong")) -> str:
    """Fixes that act only on rollouts near the budget, against plain OPD on the same seed: the
    first step whose loss differs from plain OPD's (until then the two runs are one run), the
    first step with a truncated rollout, and each run's take-off."""
    plain = {s: rows for m, s, rows in results if m == "opd"}
    lines = []
    for m, seed, rows in results:
        if m not in methods or seed not in plain:
            continue
        a = {r["step"]: r["loss/total"] for r in plain[seed] if "loss/total" in r}
        b = [r for r in rows if "loss/total" in r]
        split = next((r["step"] for r in b if a.get(r["step"]) != r["loss/total"]), "never")
        steps = [first_step(b, "rollout/trunc_rate", 0),                   # '' where none
                 first_step(b, "rollout/trunc_rate", TAKEOFF),
                 first_step(plain[seed], "rollout/trunc_rate", TAKEOFF)]
        lines.append([f"{m}, seed {seed}", split, *[x if x != "" else "none" for x in steps]])
    return markdown(["run", "first step whose loss differs from plain OPD's",
                     "first truncated rollout", "take-off", "plain OPD's take-off"], lines)


def evals_table(runs) -> str:
    """Short runs, one line each: the held-out accuracy (greedy, then sampled) and greedy length
    at every evaluation, and the training rollouts' mean length and truncation over the first 5
    steps and the last 10."""
    lines = []
    for label, _, _, rows in runs:
        ev = [r for r in rows if "eval/accuracy" in r]
        tr = [r for r in rows if "rollout/trunc_rate" in r]

        def change(key, digits):
            first, last = _mean([r[key] for r in tr[:5]]), _mean([r[key] for r in tr[-10:]])
            return f"{first:.{digits}f} -> {last:.{digits}f}"
        lines.append([label, ", ".join(str(r["step"]) for r in ev),
                      ", ".join(f"{r['eval/accuracy']:.2f}" for r in ev),
                      ", ".join(f"{r['eval/accuracy_sampled']:.2f}" for r in ev),
                      ", ".join(f"{r['eval/len_mean']:.0f}" for r in ev),
                      change("rollout/len_mean", 1), change("rollout/trunc_rate", 2)])
    return markdown(["run", "evaluated at steps", "held-out accuracy, greedy",
                     "held-out accuracy, sampled", "held-out greedy length",
                     "rollout length, first 5 steps -> last 10",
                     "truncation, first 5 steps -> last 10"], lines)


def stops_table(results, lo: int = 0, hi: int = 10) -> str:
    """Per method, the mean over its runs and the training steps lo <= step < hi of the
    rollouts' length and truncation, the EOS probabilities where they stopped, and the
    advantage: does the teacher push against stopping?"""
    keys = ["rollout/len_mean", "rollout/trunc_rate", "eos/p_student", "eos/p_teacher",
            "eos/teacher_lower_frac", "adv/mean"]
    lines = []
    for m in dict.fromkeys(m for m, _, _ in results):
        steps = [r for mm, _, rows in results if mm == m for r in rows
                 if "rollout/trunc_rate" in r and lo <= r["step"] < hi]
        lines.append([m, *[f"{_mean([r[k] for r in steps if r.get(k) == r.get(k)]):.2f}"
                           for k in keys]])
    return markdown(["run", "rollout length", "truncation", "p_S(EOS) at the stops",
                     "p_T(EOS) at the stops", "stops with p_T < p_S", "mean A_t"], lines)


def held(rows, results) -> dict:
    """Per run (method, seed): whether the fix held, as tutorial section 5 asks of a fix: the
    rollouts' truncation at most 0.1 on every step and a final accuracy at or above plain OPD's
    mean peak (None without plain OPD runs)."""
    opd_peaks = [r["acc_peak"] for r in rows if r["method"] == "opd"]
    bar = sum(opd_peaks) / len(opd_peaks) if opd_peaks else None
    by_run = {(m, s): rs for m, s, rs in results}
    out = {}
    for r in rows:
        trunc = max(x["rollout/trunc_rate"] for x in by_run[(r["method"], r["seed"])]
                    if "rollout/trunc_rate" in x)
        ok = None if bar is None else trunc <= 0.1 and r["acc_final"] >= bar - 1e-9
        out[(r["method"], r["seed"])] = ok
    return out


def measure_cost(base: Config, methods, steps: int = 25) -> dict:
    """Seconds per training step of each method, one after the other in this process on seed 0
    (median of steps 5 to `steps` - 1, before any run inflates): what each method's extra
    terms cost, measured under the same conditions, without the noise of parallel runs."""
    out = {}
    for m in [methods[0], *methods]:      # the first run warms the process up and is measured again
        cfg = with_settings(config_for(base, m, base.seed), steps=steps, eval_every=10**6,
                            save_every=0, out_dir=str(Path(base.out_dir) / "cost"), log_every=10**6,
                            log_samples_every=0, run_name=m)
        rows = [r for r in run_opd(cfg, m) if "time/update_s" in r and r["step"] >= 5]
        out[m] = statistics.median(sum(r[f"time/{k}_s"] for k in ("rollout", "teacher", "update"))
                                   for r in rows)
    return out


def ranking_table(rows, results, cost: dict) -> str:
    """Every method, worst seed first: what it needs, what it costs, how it ended."""
    ok = held(rows, results)
    lines = []
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        finals = [r["acc_final"] for r in rs]
        cost_ratio = cost[m] / cost["opd"]
        n_held = sum(bool(ok[(m, r["seed"])]) for r in rs)
        lines.append((min(finals), [m, "yes" if m in METHODS and needs_gold(m) else "no",
                                    f"{cost_ratio:.2f}", f"{sum(finals) / len(finals):.2f}",
                                    f"{min(finals):.2f}", f"{max(finals):.2f}",
                                    f"{sum(r['takeoff_step'] != '' for r in rs)}/{len(rs)}",
                                    f"{max(r['trunc_rate_max'] for r in rs):.2f}",
                                    f"{n_held}/{len(rs)}"]))
    lines = [x for _, x in sorted(lines, key=lambda t: -t[0])]
    return markdown(["method", "needs gold data", "cost per step (plain OPD = 1)",
                     "final accuracy, mean", "worst seed", "best seed", "seeds that took off",
                     "worst truncation", "seeds that held"], lines)


def write_results(rows, out: Path, parts: dict, source: str):
    """results.csv (one row per run) and results.md (its named tables, each under '### name':
    the docs quote them, and a test checks that they match)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = f"Written by {source}. The docs quote these tables; do not edit them by hand.\n"
    text += "".join(f"\n### {name}\n\n{table}\n" for name, table in parts.items())
    (out / "results.md").write_text(text)
    print(next(iter(parts.values())), flush=True)


def table_part(path, name: str) -> str:
    """The table named `name` in a results.md (write_results' format)."""
    text = Path(path).read_text()
    at = text.index(f"\n### {name}\n")
    block = text[at:].split("\n\n")[1]
    return block.strip("\n")


# Which signal warns first? Each candidate is one number per training step, computed from a
# run's logged metrics; signal_table() scores them against the take-off (tutorial, the monitor).

def _slope(xs, i, n=10):
    """Least-squares slope per step of the last n values up to xs[i] (0 before there are n)."""
    if i + 1 < n or any(x != x for x in xs[i + 1 - n:i + 1]):
        return 0.0
    w, mid = xs[i + 1 - n:i + 1], (n - 1) / 2
    return sum((j - mid) * (x - sum(w) / n) for j, x in enumerate(w)) / \
        sum((j - mid) ** 2 for j in range(n))


def warning_signals(rows) -> dict:
    """Candidate early warnings of the collapse, each a list with one value per training step."""
    rows = [r for r in rows if "rollout/trunc_rate" in r]

    def col(k):
        return [float(r.get(k, math.nan)) for r in rows]

    ngram, ema = col("rollout/ngram_rep"), []
    for x in ngram:
        ema.append(x if not ema else 0.9 * ema[-1] + 0.1 * x)
    frac, logp_t = col("adv/repetitive_frac"), col("logp/teacher")
    gap = [a - b if a == a else -math.inf
           for a, b in zip(col("adv/repetitive"), col("adv/regular"))]
    return {"steps": [r["step"] for r in rows],
            "repetition rate": col("rollout/rep_rate"),
            "3-gram repetition over its EMA": [x - e for x, e in zip(ngram, [ngram[0]] + ema[:-1])],
            "repetitive-token share, slope": [_slope(frac, i) for i in range(len(rows))],
            "advantage gap, repetitive - regular": gap,
            "share of stops with p_T(EOS) < p_S(EOS)": col("eos/teacher_lower_frac"),
            "length over its EMA": col("rollout/growth"),
            "p90 length": col("rollout/len_p90"),
            "teacher log-prob, falling slope": [-_slope(logp_t, i) for i in range(len(rows))]}


def fire_step(steps, values, threshold: float, patience: int = 2, start: int = 10):
    """First step at which `values` exceeded `threshold` `patience` steps in a row ('' if never)."""
    run = 0
    for step, v in zip(steps, values):
        run = run + 1 if step >= start and v > threshold else 0
        if run >= patience:
            return step
    return ""


def signal_table(*folders, fit_seeds=(0, 1, 2), horizon: int = 50) -> str:
    """Lead time and false alarms of every candidate signal, as a markdown table.

    Runs: the opd, stable-opd and sft-only runs in `folders`; a run collapses if its truncation
    rate exceeds TAKEOFF. A lead is the take-off step minus the alert's step; a false alarm, an
    alert on a run that never takes off. Each signal's threshold is chosen on the seeds in
    `fit_seeds` alone, among those with no false alarm and no alert more than `horizon` steps
    ahead of a take-off (such an alert says nothing about the collapse): the largest whose
    smallest lead is at least 10 steps (twice the 5 an alarm needs to be acted on), else the one
    with the largest smallest lead. The other seeds are only scored.
    """
    runs = []
    for d in sorted(p for f in folders for p in Path(f).glob("*-s*")):
        method, seed = d.name.rsplit("-s", 1)
        if method in ("opd", "stable-opd", "sft-only") and (d / "metrics.jsonl").exists():
            rows = read_metrics(d / "metrics.jsonl")
            tr = [r for r in rows if "rollout/trunc_rate" in r]
            runs.append((int(seed) in fit_seeds, first_step(tr, "rollout/trunc_rate", TAKEOFF),
                         warning_signals(rows)))

    def score(name, thr, fit):    # leads on collapsing runs (None: never fired), false alarms
        leads, false = [], 0
        for is_fit, takeoff, sig in runs:
            if is_fit == fit:
                fired = fire_step(sig["steps"], sig[name], thr)
                if takeoff == "":
                    false += fired != ""
                else:
                    leads.append(takeoff - fired if fired != "" else None)
        return leads, false

    def fmt(leads):
        return ", ".join("missed" if x is None else str(x) for x in leads)

    lines = []
    n_quiet = {fit: sum(t == "" for f, t, _ in runs if f == fit) for fit in (True, False)}
    for name in [k for k in runs[0][2] if k != "steps"]:
        seen = sorted({v for f, _, sig in runs if f for v in sig[name] if math.isfinite(v)})
        ok = []                             # (threshold, smallest lead on the fit seeds)
        between = [(a + b) / 2 for a, b in zip(seen, seen[1:])]
        for thr in between[::max(1, len(seen) // 400)]:
            leads, false = score(name, thr, True)
            if false == 0 and all(x is None or x <= horizon for x in leads):
                worst = min((x if x is not None else -math.inf for x in leads), default=-math.inf)
                ok.append((thr, worst))
        enough = [x for x in ok if x[1] >= 10]
        best = enough[-1] if enough else max(ok, key=lambda x: x[1], default=None)
        if best is None:
            lines.append([name, "none without a false alarm", "", "", "", ""])
            continue
        (lf, ff), (lh, fh) = score(name, best[0], True), score(name, best[0], False)
        lines.append([name, f"{best[0]:.3g}", fmt(lf), f"{ff} of {n_quiet[True]} quiet", fmt(lh),
                      f"{fh} of {n_quiet[False]} quiet"])
    return markdown(["signal", "threshold (chosen on the fit seeds)", "lead, fit seeds",
                     "false alarms, fit", "lead, held-out seeds", "false alarms, held-out"], lines)


# Reports: tables over run folders made by other commands, written like the study's
# (`python opd.py report KIND OUT FOLDER...`; the tutorial shows each command beside its table).

def _runs_in(folders):
    """(label, method, seed, rows) of each run folder given (a folder of run folders is opened)."""
    out = []
    for f in map(Path, folders):
        for d in ([f] if (f / "metrics.jsonl").exists() else sorted(f.glob("*-s*"))):
            if (d / "metrics.jsonl").exists():
                method, seed = d.name.rsplit("-s", 1)
                out.append((str(d), method, int(seed), read_metrics(d / "metrics.jsonl")))
    if not out:
        raise SystemExit(f"error: no run folder (with a metrics.jsonl) in {', '.join(folders)}")
    return out


def report_runs(out, *folders):
    """One table line per run folder, labelled by its path, and the mean over runs per method;
    with figures when every run has a colour: a method found in one folder keeps its name, and
    plain OPD found in several is named by its folder (real/mismatch/plain: 'plain')."""
    runs = _runs_in(folders)
    parents = {}
    for label, m, _, _ in runs:
        parents.setdefault(m, set()).add(str(Path(label).parent))
    names = [m if len(parents[m]) == 1 else Path(label).parent.name for label, m, _, _ in runs]
    if all(n in METHOD_COLORS for n in names):
        plot_study([(n, s, r) for n, (_, _, s, r) in zip(names, runs)], Path(out),
                   head=list(dict.fromkeys(names))[:4])
    rows = [dict(summarize(m, s, r), run=label) for label, m, s, r in runs]
    parts = {"runs": runs_table(rows, label=lambda r: r["run"]),
             "summary": summary_table(rows, group=lambda r: r["run"].rsplit("-s", 1)[0])}
    if max(sum("eval/accuracy" in x for x in r) for *_, r in runs) <= 6:      # short runs
        parts["evals"] = evals_table(runs)
    if all(any("pos/adv" in x for x in r) for *_, r in runs):
        labelled = [(label.rsplit("-s", 1)[0], s, r) for label, _, s, r in runs]
        last = min(max(x["step"] for x in r if "rollout/trunc_rate" in x) for *_, r in runs)
        parts["positions"] = position_table(labelled)                     # the first 10 steps
        parts["positions-late"] = position_table(labelled, last - 9, last + 1)
        parts["stops"] = stops_table(labelled)
        parts["stops-late"] = stops_table(labelled, last - 9, last + 1)
    write_results(rows, Path(out), parts, f"`python opd.py report runs {out} {' '.join(folders)}`")


def report_signals(out, *folders):
    """signal_table() over the run folders given, into OUT/results.md."""
    table = signal_table(*folders)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "results.md").write_text(
        f"Written by `python opd.py report signals {out} {' '.join(folders)}`. The docs quote "
        f"these tables; do not edit them by hand.\n\n### signals\n\n{table}\n")
    print(table, flush=True)


WEAK_ACCURACY = 0.85     # report_builds: a teacher below this held-out accuracy is weak,
WEAK_LOOP_EOS = 0.02     # and so is one whose p(EOS) two repeats into a loop is above this


def report_builds(out, *folders):
    """One line per independent build of the pair: its teacher and student (from build.json) and
    the runs on it. Each folder holds one build's runs (opd-s0, opd-s1, stable-opd-s0); the build
    and the cache it was saved in are read from their config.json (the shipped pair: pair/)."""
    lines, rows = [], []
    for f in map(Path, folders):
        runs = {d.name: read_metrics(d / "metrics.jsonl") for d in sorted(f.glob("*-s*"))
                if (d / "metrics.jsonl").exists()}
        cfg = json.loads(next(f.glob("*-s*/config.json")).read_text())
        build = with_settings(Config(), pair_seed=cfg["pair_seed"])
        info = {}
        for role in ("teacher", "student"):
            shipped = model_key(build, role) == model_key(Config(), role)
            key = f"{role}-{model_key(build, role)}"
            d = SHIPPED / role if shipped else Path(cfg["cache_dir"]) / key
            info[role] = json.loads((d / "build.json").read_text())
        t, p = info["teacher"], info["teacher"]["p_eos_by_depth"]
        cells = []
        for name in ("opd-s0", "opd-s1"):
            r = summarize("opd", int(name[-1]), runs[name])
            rows.append(dict(r, pair_seed=cfg["pair_seed"]))
            cells.append(f"{r['acc_step0']:.2f} -> {r['acc_peak']:.2f}, "
                         f"{r['takeoff_step'] if r['takeoff_step'] != '' else 'none'}, "
                         f"{r['acc_final']:.2f}: {r['verdict']}")
        st = summarize("stable-opd", 0, runs["stable-opd-s0"])
        rows.append(dict(st, pair_seed=cfg["pair_seed"]))
        lines.append([cfg["pair_seed"], f"{t['accuracy']:.2f}, {p['0']:.2f}, {p['1']:.2f}, "
                      f"{p['2']:.2f}", f"{info['student']['accuracy']:.2f}", *cells,
                      f"{st['trunc_rate_max']:.2f}, {st['acc_final']:.2f}"])
    table = markdown(["build (`--pair-seed`)", "teacher: accuracy, p(EOS) at d = 0, 1, 2",
                      "student accuracy", "plain OPD seed 0: step 0 -> peak, take-off, final: "
                      "verdict", "seed 1", "`stable-opd` seed 0: worst truncation, final"], lines)
    teachers = [r[1].split(", ") for r in lines]                          # accuracy, d = 0, 1, 2
    weak = sum(float(a) < WEAK_ACCURACY or float(d2) > WEAK_LOOP_EOS for a, _, _, d2 in teachers)
    plain = [r for r in rows if r["method"] == "opd"]
    stable = [r for r in rows if r["method"] == "stable-opd"]
    peak = {r["pair_seed"]: max(x["acc_peak"] for x in plain if x["pair_seed"] == r["pair_seed"])
            for r in stable}
    verdicts = dict.fromkeys(r["verdict"] for r in plain)
    held_ = (sum(r["trunc_rate_max"] <= 0.1 for r in stable),
             sum(r["acc_final"] > peak[r["pair_seed"]] for r in stable))
    rate = markdown(["builds", f"weak teachers (accuracy < {WEAK_ACCURACY}, or p(EOS) two repeats "
                     f"deep > {WEAK_LOOP_EOS})", "plain OPD runs, by verdict",
                     "`stable-opd`: truncation at most 0.1; final above the build's plain peak"],
                    [[len(lines), f"{weak} of {len(lines)}",
                      "; ".join(f"{v}: {sum(r['verdict'] == v for r in plain)} of {len(plain)}"
                                for v in verdicts),
                      f"{held_[0]} of {len(stable)}; {held_[1]} of {len(stable)}"]])
    depths = range(-1, 6)
    shipped = {role: json.loads((SHIPPED / role / "build.json").read_text())["p_eos_by_depth"]
               for role in ("teacher", "student")}
    profile = markdown(["`d`, repeats past the asked count", *[str(d) for d in depths]],
                       [[f"{role} `p(EOS)`", *[f"{p[str(d)]:.3f}" for d in depths]]
                        for role, p in shipped.items()])
    write_results(rows, Path(out), {"builds": table, "rate": rate, "shipped-pair": profile},
                  f"`python opd.py report builds {out} {' '.join(folders)}`")


# One colour per method, the same in every figure (the TRL peers of peers/trl_opd.py included);
# seeds of one method are told apart by a sequential colour map instead.
METHOD_COLORS = {"opd": "#d62728", "stable-opd": "#2ca02c", "sft-only": "#1f77b4",
                 "opd+guard": "#9467bd", "ref-kl": "#ff7f0e", "mixture": "#bcbd22",
                 "drop-trunc": "#8c564b", "overlong": "#e377c2", "adv-log": "#7f7f7f",
                 "adv-clip": "#17becf", "eos-mask": "#393b79", "rep-penalty": "#000000",
                 "full-vocab": "#e6ab02", "seq-kd": "#1b9e77", "prefix-opd": "#7570b3",
                 "iw-opd": "#d95f02", "topk": "#66a61e", "guard-seq-kd": "#e7298a",
                 "trl": "#a50f15", "trl-stable": "#00441b", "trl-seq-kd": "#005a5b",
                 "trl-guard": "#54278f",
                 # the real-model study: plain OPD under the format mismatch, and its controls
                 "plain": "#d62728", "control": "#525252", "context": "#6baed6"}
PANELS = {"eval/accuracy": ("held-out accuracy, greedy", "exact match"),
          "eval/accuracy_sampled": ("held-out accuracy, sampled", "exact match"),
          "rollout/trunc_rate": ("truncation rate of the rollouts", "share of rollouts"),
          "rollout/rep_rate": ("repetition rate of the rollouts", "share of rollouts")}
WIDTH = 8.0                       # inches at 100 dpi: figures are drawn for an 800-pixel page


def method_color(m: str) -> str:
    return METHOD_COLORS.get(m.removeprefix("opd.py "), "#555555")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7})
    return plt


def series(rows, key, gaps=False):
    """(steps, values) of `key`; with gaps, NaN on training steps without a value (a break)."""
    pts = [(r["step"], r.get(key, math.nan)) for r in rows
           if key in r or (gaps and "rollout/trunc_rate" in r)]
    pts = [(s, v) for s, v in pts if gaps or v == v]
    return [s for s, _ in pts], [v for _, v in pts]


def _seeds_and_mean(ax, runs, key, color, label, ls="-"):
    """Each seed as a thin line, their mean (at the steps every seed logged) as a thick one."""
    pts = [dict(zip(*series(rows, key))) for rows in runs]
    for p in pts:
        ax.plot(list(p), list(p.values()), color=color, lw=0.6, alpha=0.35, ls=ls)
    steps = sorted(set.intersection(*(set(p) for p in pts)))
    ax.plot(steps, [sum(p[s] for p in pts) / len(pts) for s in steps], color=color, lw=1.8, ls=ls,
            label=label)


def plot_study(results, out: Path, head=None):
    """The study's figures from [(method, seed, rows)], rows as read from each run's
    metrics.jsonl; `head`: the methods of Fig. 1 (default: opd, stable-opd, sft-only)."""
    plt = _plt()
    by_method = {}
    for m, s, rows in results:
        by_method.setdefault(m, []).append((s, rows))
    takeoffs = {m: [first_step(rows, "rollout/trunc_rate", TAKEOFF) for _, rows in runs]
                for m, runs in by_method.items()}
    out.mkdir(parents=True, exist_ok=True)
    n_seeds = max(len(r) for r in by_method.values())
    seeds_text = "one seed" if n_seeds == 1 else f"thick: mean of {n_seeds} seeds, thin: each seed"

    # Fig. 1, the headline: accuracy and the rollouts' length figures of a few methods
    head = head or [m for m in ("opd", "stable-opd", "sft-only") if m in by_method] \
        or list(by_method)[:3]
    fig, axes = plt.subplots(2, 2, figsize=(WIDTH, 6.2), sharex=True)
    for ax, (key, (title, ylabel)) in zip(axes.ravel(), PANELS.items()):
        for m in head:
            _seeds_and_mean(ax, [rows for _, rows in by_method[m]], key, method_color(m), m)
        marks = [(m, t) for m in head for t in takeoffs[m] if t != ""]
        for i, (m, t) in enumerate(marks):
            ax.axvline(t, color=method_color(m), ls=":", lw=0.9,
                       label="a seed's take-off (truncation > 0.3)" if i == 0 else None)
        ax.set(title=title, ylabel=ylabel, ylim=(-0.02, 1.02))
    for ax in axes[1]:
        ax.set_xlabel("OPD step")
    axes[0, 0].legend(loc="lower left")
    fig.suptitle(f"{', '.join(head)}: {seeds_text}")
    fig.tight_layout()
    fig.savefig(out / "fig1_accuracy_length.png", dpi=100)
    plt.close(fig)

    # every method: accuracy and truncation, one panel each
    cols = min(len(by_method), 4)
    n_rows = (len(by_method) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(WIDTH, 1.9 * n_rows + 0.6), squeeze=False,
                             sharex=True, sharey=True)
    for ax, (m, runs) in zip(axes.ravel(), by_method.items()):
        _seeds_and_mean(ax, [rows for _, rows in runs], "eval/accuracy", method_color(m),
                        "accuracy")
        _seeds_and_mean(ax, [rows for _, rows in runs], "rollout/trunc_rate", method_color(m),
                        "truncation", ls="--")
        ax.set_title(m, color=method_color(m))
        ax.set_ylim(-0.02, 1.02)
    for ax in axes.ravel()[len(by_method):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("share")
    for ax in axes[-1]:
        ax.set_xlabel("OPD step")
    axes[0, 0].legend(loc="center left")
    fig.suptitle(f"held-out accuracy, greedy (solid) and truncation rate (dashed); {seeds_text}")
    fig.tight_layout()
    fig.savefig(out / "stabilizers.png", dpi=100)
    plt.close(fig)
    if "opd" not in by_method:
        return
    runs = by_method["opd"]
    n = len(runs)
    spread = [0.45] if n == 1 else [0.05 + 0.8 * i / (n - 1) for i in range(n)]
    shades = [plt.cm.viridis(x) for x in spread]
    labels = [f"seed {s}" + (f" (take-off {t})" if t != "" else "")
              for (s, _), t in zip(runs, takeoffs["opd"])]

    def per_seed(ax, key, title, ylabel, ls="-", label=True):
        for (s, rows), c, lab, t in zip(runs, shades, labels, takeoffs["opd"]):
            ax.plot(*series(rows, key), color=c, lw=1.0, ls=ls, label=lab if label else None)
            if t != "":
                ax.axvline(t, color=c, ls=":", lw=0.8)
        ax.set(title=title, ylabel=ylabel, xlabel="OPD step (dotted: take-off)")

    # Fig. 3 (the paper's Fig. 3): log-probs of the sampled tokens, advantage, length; plain OPD
    fig, axes = plt.subplots(2, 2, figsize=(WIDTH, 6.2))
    per_seed(axes[0, 0], "logp/student", "student log-prob of its sampled tokens",
             "mean log p_S(y_t)")
    per_seed(axes[0, 1], "logp/teacher", "teacher log-prob of the same tokens", "mean log p_T(y_t)")
    per_seed(axes[1, 0], "adv/mean", "mean advantage (minus the per-token reverse KL)", "mean A_t")
    per_seed(axes[1, 1], "rollout/len_mean", "mean rollout length", "tokens")
    axes[0, 0].legend()
    fig.suptitle("plain OPD, one line per seed")
    fig.tight_layout()
    fig.savefig(out / "fig3_logprobs.png", dpi=100)
    plt.close(fig)

    # Fig. 4 (the paper's Fig. 4): the advantage of tokens in a repetitive tail against the rest,
    # one panel per seed (up to three); then their share, and the EOS probabilities where the
    # rollouts stopped, as the mean over seeds
    shown = runs[:3]
    fig, axes = plt.subplots(2, max(len(shown), 2), figsize=(WIDTH, 5.8), squeeze=False)
    for ax, (s, rows), t in zip(axes[0], shown, takeoffs["opd"]):
        x, rep = series(rows, "adv/repetitive", gaps=True)
        reg = series(rows, "adv/regular")[1]
        ax.plot(x, rep, color="#e6550d", lw=0.9, marker=".", ms=2.5, label="repetitive tail")
        ax.plot(*series(rows, "adv/regular", gaps=True), color="#636363", lw=0.9,
                label="other tokens")
        if t != "":
            ax.axvline(t, color="k", ls=":", lw=0.8, label="take-off")
        finite = [v for v in rep + reg if math.isfinite(v)]
        ax.set_ylim(max(min(finite), -6.0) - 0.2, max(finite) + 0.2)   # all of it but a spike
        ax.set(title=f"seed {s}: mean advantage", xlabel="OPD step",
               ylabel="mean A_t" if ax is axes[0, 0] else None)
    axes[0, 0].legend(loc="lower left")
    for ax in axes[0, len(shown):]:
        ax.axis("off")
    per_seed(axes[1, 0], "adv/repetitive_frac", "share of tokens in a repetitive tail", "share")
    axes[1, 0].legend(loc="upper left")
    ax = axes[1, 1]
    for key, ls, who in (("eos/p_student", "-", "student"), ("eos/p_teacher", "--", "teacher")):
        _seeds_and_mean(ax, [rows for _, rows in runs], key, "k", who, ls=ls)
    ax.set(title="p(EOS) where a rollout stopped", ylabel="p(EOS)", xlabel="OPD step",
           ylim=(-0.02, 1.02))
    ax.legend(loc="lower left")
    for ax in axes[1, 2:]:
        _seeds_and_mean(ax, [rows for _, rows in runs], "kl/reverse", method_color("opd"), "mean")
        ax.set(title="per-token reverse KL", ylabel="nats per token", xlabel="OPD step")
    fig.suptitle("plain OPD: the advantage of repetitive tokens against the rest (gaps: no "
                 "repetitive token)")
    fig.tight_layout()
    fig.savefig(out / "fig4_advantage.png", dpi=100)
    plt.close(fig)

    if "opd+guard" not in by_method:
        return
    # the guard, seed by seed: plain OPD and opd+guard; shaded from the guard's action to plain
    # OPD's take-off (the guard acts on the monitor's first alert)
    guarded = by_method["opd+guard"][:3]
    fig, axes = plt.subplots(2, len(guarded), figsize=(WIDTH, 5.0), squeeze=False, sharex=True)
    for j, ((s, g), t) in enumerate(zip(guarded, takeoffs["opd"])):
        plain = dict(runs).get(s, [])
        acted = next((r["step"] for r in g if r.get("guard/acted")), None)
        for ax, key in zip(axes[:, j], ["rollout/trunc_rate", "eval/accuracy"]):
            ax.plot(*series(plain, key), color=method_color("opd"), lw=1.0, label="opd")
            ax.plot(*series(g, key), color=method_color("opd+guard"), lw=1.0, label="opd+guard")
            if acted is not None and t != "":
                ax.axvspan(acted, max(t, acted + 1), color="#ffbf00", alpha=0.5,
                           label="guard acted -> opd took off")
            ax.set(ylim=(-0.02, 1.02), ylabel=PANELS[key][1] if j == 0 else None)
        when = f"guard at {acted}" if acted is not None else "the guard never acted"
        when += f", take-off at {t}" if t != "" else ""
        axes[0, j].set_title(f"seed {s}: truncation\n{when}", fontsize=8)
        axes[1, j].set_title(f"seed {s}: held-out accuracy", fontsize=8)
        axes[1, j].set_xlabel("OPD step")
    axes[1, 0].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "guard.png", dpi=100)
    plt.close(fig)


def plot_ranking(rows, out: Path):
    """Each method's final held-out accuracy, one dot per seed, methods ordered by their worst
    seed; reference lines at step 0 and at plain OPD's mean peak; gold-free methods in open
    circles."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    finals = {m: [r["acc_final"] for r in rows if r["method"] == m] for m in methods}
    methods.sort(key=lambda m: min(finals[m]))                   # best at the top
    fig, ax = plt.subplots(figsize=(WIDTH, 0.32 * len(methods) + 1.4))
    for y, m in enumerate(methods):
        free = not needs_gold(m) if m in METHODS else False
        ax.scatter(finals[m], [y] * len(finals[m]), s=28, zorder=3,
                   facecolors="none" if free else method_color(m), edgecolors=method_color(m))
        ax.plot([min(finals[m]), max(finals[m])], [y, y], color=method_color(m), lw=0.8, zorder=2)
    names = [m + ("" if m in METHODS and needs_gold(m) else "  (no gold data)") for m in methods]
    ax.set_yticks(range(len(methods)), names)
    step0 = sum(r["acc_step0"] for r in rows) / len(rows)
    ax.axvline(step0, color="gray", ls="--", lw=1, label=f"step 0 ({step0:.2f})")
    peaks = [r["acc_peak"] for r in rows if r["method"] == "opd"]
    if peaks:
        p = sum(peaks) / len(peaks)
        ax.axvline(p, color=method_color("opd"), ls=":", lw=1.2,
                   label=f"plain OPD's mean peak ({p:.2f})")
    ax.set(xlim=(-0.02, 1.0), xlabel="final held-out accuracy (greedy), one dot per seed")
    n = max(len(v) for v in finals.values())
    ax.set_title(f"which fix to use: {n} seeds each, ordered by the worst seed "
                 "(open circles: needs no gold data)")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ranking.png", dpi=100)
    plt.close(fig)


def parse_config(argv=None) -> tuple[Config, frozenset]:
    """The command line, generated from Config (--help is the documentation). Returns the config
    and the names of the flags given, which win over a method preset's settings."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS,
                                epilog="python opd.py report runs|signals|builds OUT FOLDER...: "
                                       "tables over run folders made by other commands; python "
                                       "opd.py report memory OUT: the chunked loss's memory")
    for f in flag_fields():
        flag = "--" + f.name.replace("_", "-")
        why = f"{f.metadata['help']} (default: {f.default!r})"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=why)
        else:
            name = f.type if isinstance(f.type, str) else f.type.__name__
            typ = {"int": int, "float": float, "str": str}[name]
            p.add_argument(flag, type=typ, help=why)
    p.error = lambda message: p.exit(
        2, f"error: {message} (python opd.py --help lists every flag)\n")       # one line
    given = vars(p.parse_args(argv))                 # only the flags on the command line (SUPPRESS)
    cfg = with_settings(Config(), **given)
    validate_config(cfg)
    return cfg, frozenset(given)


def report_memory(out):
    """The memory of the chunked loss against the unchunked one, at a real vocabulary's size
    (loss_peak_memory, section 9), into OUT/results.md. Needs about 13 GB of memory free."""
    kw = dict(vocab=152_000, batch=4, length=1024, hidden=256)
    lines = []
    names = {"full": "full-vocabulary KL", "sampled": "sampled-token (log-prob of the sampled ids)"}
    for objective, name in names.items():
        whole, chunked = (loss_peak_memory(**kw, chunk=c, objective=objective) for c in (0, 64))
        same = abs(whole["loss"] - chunked["loss"]) <= 1e-5 * abs(whole["loss"])
        lines.append([name, f"{whole['loss_mb']:,.0f} MB", f"{chunked['loss_mb']:,.0f} MB",
                      f"{chunked['loss_mb'] / whole['loss_mb']:.2f}", "yes" if same else "no"])
    header = ["loss", "unchunked (`chunk=0`)", "chunked (`chunk=64`)", "ratio", "same loss"]
    table = markdown(header, lines)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "results.md").write_text(
        f"Written by `python opd.py report memory {out}`: one loss and its backward, vocabulary "
        "152,000, batch 4, 1,024 response tokens, hidden size 256, float32; peak resident memory "
        "above the inputs and the two vocabulary heads. The docs quote these tables; do not edit "
        f"them by hand.\n\n### memory\n\n{table}\n")
    print(table, flush=True)


REPORTS = {"runs": report_runs, "signals": report_signals, "builds": report_builds,
           "memory": report_memory}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        if len(argv) < 3 or argv[1] not in REPORTS or (argv[1] != "memory") != (len(argv) > 3):
            print("error: python opd.py report runs|signals|builds OUT FOLDER..., or report memory "
                  "OUT (the tutorial shows each)", file=sys.stderr)
            raise SystemExit(2)
        return REPORTS[argv[1]](*argv[2:])
    cfg, given = parse_config(argv)
    try:
        run_study(cfg, given)
    except KeyboardInterrupt:
        words = [sys.executable, sys.argv[0], *argv]
        again = " ".join(shlex.quote(a) for a in words if a != "--resume")
        how = f"Each run keeps a checkpoint every {cfg.save_every} steps; continue with:\n" \
              f"  {again} --resume" if cfg.save_every else \
            "Without --save-every there is no checkpoint: rerun the same command to start over."
        raise SystemExit(f"\ninterrupted: every completed step is in {cfg.out_dir}/<run>/"
                         f"metrics.jsonl; the model pair is intact. {how}")


if __name__ == "__main__":
    main()
