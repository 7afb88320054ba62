"""On-policy distillation (OPD) and its length inflation, in one file.

The student samples responses to prompts, the frozen teacher scores the very tokens the
student sampled, and the student is trained to lower the reverse KL KL(p_S || p_T) on the
states it visits itself (GKD, Agarwal et al. 2024, arXiv 2306.13649). Luo et al. 2026
(arXiv 2604.08527) showed that this can fail abruptly: the rollouts grow until they fill
the length budget, turn repetitive, and accuracy falls ("length inflation"). This file
builds a model pair on which OPD first teaches the student and then collapses, measures
both with the paper's metrics, warns before the collapse, and compares the stabilizers
proposed for it against a supervised control on the same seeds.

    python opd.py                                   # the study: opd, stable-opd, sft-only, opd+guard
    python opd.py --methods all                     # every stabilizer preset (plots/all/)
    python opd.py --methods opd --seeds 1           # one plain OPD run
    python opd.py --methods opd --seeds 1 --ref-kl 0.1 --sft-coef 0.5   # your own mix
    python opd.py --teacher PATH --student PATH --prompts FILE --device cuda  # real models
    python opd.py --teacher FILE.gguf --student DIR --prompts FILE  # GGUF (tutorial, section 6)
    python opd.py --help                            # every option, with its reason

Deliberately left out, compared with the paper's setup: no PPO/GRPO ratio or clipping
(one update per batch of rollouts, so the ratio is 1 and clipping is inert); one rollout
per prompt instead of a group (OPD's advantage needs no group baseline); a synthetic task
and a two-layer model pair instead of math problems and 1.5B/7B models; and zlib's
compression test is scaled down from a 10,000-character tail to a 24-token one.

Sections (the tutorial has the same headings, in the same order):
  1. OPD in one page            objectives, masks, loss aggregation
  2. Task and model pair        synthetic task, tokenizer, teacher/student build and cache
  3. Monitor                    length, truncation and repetition metrics; alerts; which warns first
  4. Length inflation reproduced rollouts, the training loop, the guard
  5. Stabilizers                one small function per fix
  6. Real models                any Hugging Face pair or GGUF file, the checks before step 0
  7. Scaling up                 chunked loss so memory does not grow with T x V
  8. Study and exercises        the study over methods and seeds, table and plots
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
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.utils.checkpoint import checkpoint

transformers.utils.logging.disable_progress_bar()       # one line per step is the log; no bars


def _f(default, why):
    """A config field with its one-line reason (shown by --help)."""
    return field(default=default, metadata={"help": why})


@dataclass
class Config:
    # --- what to run
    methods: str = _f("opd,stable-opd,sft-only,opd+guard", "comma-separated presets from METHODS, each run on every "
                      "seed; 'all': every preset (the whole comparison, sections 5 and 8)")
    seeds: int = _f(3, "number of seeds per method (seed, seed+1, ...)")
    seed: int = _f(0, "first seed; the only source of randomness (torch and the task sampler)")
    run_name: str = _f("", "run folder name under out_dir; empty: '<method>-s<seed>'")
    out_dir: str = _f("runs", "each run writes out_dir/<run_name>/metrics.jsonl")
    plots_dir: str = _f("", "study figures, results.csv, results.md; empty: plots/ for the default study, "
                            "<out_dir>/plots for any other, so a one-off run never overwrites the committed figures")
    device: str = _f("cpu", "'cpu' or 'cuda'; the default pair is small enough for a CPU")
    workers: int = _f(0, "parallel processes for the study; 0: one per CPU core, at most one per run (each with "
                         "--threads 1: on 2 cores, 2 single-threaded runs beat 1 two-threaded)")
    # --- model pair (empty paths: build the default pair of section 2)
    teacher: str = _f("", "teacher folder, .gguf file (needs gguf + accelerate) or hub id; empty: the self-built default teacher")
    student: str = _f("", "student folder, .gguf file (needs gguf + accelerate) or hub id; empty: the self-built default student")
    prompts: str = _f("", "JSON-lines file of {'prompt': ..., 'answer': optional}; empty: the synthetic task")
    cache_dir: str = _f(".cache", "the default pair is saved here, in a folder keyed by its configuration")
    teacher_layers: int = _f(2, "two layers: enough to count motif repeats reliably")
    teacher_width: int = _f(128, "hidden size of the teacher")
    teacher_steps: int = _f(800, "supervised steps: held-out exact match 0.84 greedy, 0.82 sampled")
    teacher_free_frac: float = _f(0.5, "share of the teacher's training that is free repetition text (no count, no EOS); 0 never inflated")
    teacher_overrun_frac: float = _f(0.15, "share of over-run text: counted prompts whose text runs on past k repeats "
                                           "(no loss on the first 2 extra), so deep loops become absorbing; 0.3 forgot to stop")
    student_layers: int = _f(2, "same depth as the teacher but half the width: can learn, starts weaker")
    student_width: int = _f(64, "hidden size of the student")
    student_steps: int = _f(400, "SFT warm-up on the gold set: held-out accuracy 0.54; more SFT on the same set adds little")
    student_free_frac: float = _f(0.0, "free text in the student's warm-up; 0.5 with 250 steps gives a student OPD improves "
                                       "without inflating (tutorial, section 4)")
    gold_size: int = _f(256, "reference solutions in the fixed gold set (the student's warm-up, --sft-coef); "
                             "0: each step's own prompts' answers. 512 took the student past the teacher")
    pretrain_lr: float = _f(3e-3, "AdamW lr for building the pair (small models, short schedules)")
    # --- OPD
    steps: int = _f(400, "OPD updates per run: learning by ~150, inflation between ~270 and ~350 (tutorial, section 4)")
    batch_size: int = _f(128, "prompts per step, one rollout each; 64 made the onset step seed-dependent")
    lr: float = _f(1e-3, "AdamW lr for OPD; 2e-3 and 1.5e-3 collapsed before learning (tutorial, section 4)")
    temperature: float = _f(1.0, "sampling AND loss temperature; they must match for on-policy samples")
    max_new_tokens: int = _f(48, "length budget: 2.4x the longest correct answer (20 tokens)")
    objective: str = _f("sampled", "'sampled': A_t = log p_T(y_t) - log p_S(y_t), loss -A_t log p_S(y_t); 'full': KL(p_S||p_T) over the vocabulary")
    loss_agg: str = _f("token-mean", "verl's names: token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm")
    warmup: int = _f(50, "linear lr warm-up steps; 20 let one seed in four collapse before it learned")
    decay: float = _f(0.1, "share of the steps, at the end, with the lr decaying linearly to 0 (warmup-stable-decay), "
                           "so a run's final accuracy is read on a settled student, not on one noisy step")
    grad_clip: float = _f(1.0, "global grad-norm clip, as in most RL fine-tuning recipes")
    chunk_size: int = _f(0, "positions per chunk of the loss (section 7); 0: all at once")
    length_groups: int = _f(4, "teacher/student forwards run on this many length-sorted slices of the batch, "
                               "each cut to its longest response (section 7); 1: one forward padded to the longest")
    opd_coef: float = _f(1.0, "weight of the OPD term; 0 with --sft-coef is the sft-only control")
    # --- stabilizers (section 5); all off by default: plain OPD
    ref_kl: float = _f(0.0, "beta of beta*KL(p_S || p_ref), p_ref = frozen initial student (Stable-OPD)")
    sft_coef: float = _f(0.0, "lambda of the NLL on clean reference answers of the step's prompts (rollout mixture)")
    trunc_weight: float = _f(1.0, "loss weight of truncated rollouts: 0 drops them (DAPO overlong filtering)")
    overlong_buffer: int = _f(0, "DAPO soft overlong penalty over the last B tokens of the budget; 0: off")
    adv_regulation: str = _f("none", "'none' | 'log': sign(A)log(1+|A|) | 'clip': A clipped to +-adv_clip")
    adv_clip: float = _f(1.0, "bound for adv_regulation='clip'")
    eos_mask: bool = _f(False, "zero the advantage on EOS tokens: the teacher cannot train stopping away")
    rep_penalty: float = _f(1.0, "CTRL repetition penalty while sampling (>1 on); rollouts are then off-policy")
    guard: bool = _f(False, "on a monitor alert: restore the last healthy student and switch on Stable-OPD")
    # --- monitor (section 3)
    rep_window: int = _f(24, "tokens of the tail the compression test looks at: half the budget")
    rep_tau: float = _f(3.0, "CompRatio above which a tail is repetitive: 24-token loops score 3.4-4.8, random tails 1.0-2.1")
    alert_max_len: int = _f(0, "alert when a rollout is longer than this (the starter's check); 0: off, one long rollout is noise")
    alert_trunc: float = _f(0.2, "alert when the truncation rate exceeds this")
    alert_rep: float = _f(0.01, "alert when the repetition rate exceeds this: the earliest warning measured, 8-58 "
                                "steps before the take-off, no false alarm (tutorial, section 3)")
    alert_growth: float = _f(0.4, "alert when mean length exceeds its EMA by this fraction (0.25 fired on healthy runs)")
    alert_patience: int = _f(2, "an alert fires once its condition held this many consecutive steps (1 step: "
                                "a stable-opd seed's single batch at repetition 0.11 was an alarm)")
    # --- evaluation and logging
    eval_every: int = _f(20, "held-out evaluation (greedy and sampled) every N steps")
    eval_size: int = _f(256, "held-out prompts: standard error of the accuracy ~0.03")
    log_samples_every: int = _f(50, "print a few decoded rollouts every N steps")
    threads: int = _f(1, "torch threads per process (set on purpose; see --workers)")
    save_student: bool = _f(False, "save the final student with save_pretrained in the run folder")
    save_every: int = _f(10, "write <run folder>/checkpoint.pt every N steps and at the end; 0: off. ~2 MB for the "
                             "default pair; a 1.5B student with AdamW's moments is ~18 GB, so raise N for real models")
    resume: bool = _f(False, "continue each run from its checkpoint.pt (same flags; --steps may grow); "
                             "a run without one starts at step 0")
    self_distill: bool = _f(False, "sanity mode: the teacher is the student itself; the loss must be 0")


LOSS_AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")   # verl's names


def validate_config(cfg: Config) -> None:
    """Every flag's allowed values and combinations, in one place, checked before anything is
    built or loaded. A bad value prints one line naming the flag, the value and what is
    allowed, and exits with code 2 (argparse's code for a usage error); warnings go on."""
    methods = list(METHODS) if cfg.methods == "all" else [m.strip() for m in cfg.methods.split(",") if m.strip()]
    floats = [f.name for f in dataclasses.fields(Config) if f.type in ("float", float)]
    rules = [  # (field, holds, what is allowed)
        *[(name, math.isfinite(getattr(cfg, name)), "a finite number") for name in floats],
        ("methods", bool(methods) and all(m in METHODS for m in methods), "'all' or a comma-separated list of " + ", ".join(METHODS)),
        ("seeds", cfg.seeds >= 1, ">= 1"),
        ("seed", cfg.seed >= 0, ">= 0"),
        ("device", re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device) is not None, "'cpu', 'cuda' or 'cuda:N'"),
        ("device", cfg.device == "cpu" or torch.cuda.is_available(), "'cpu' on this machine: no CUDA device is visible"),
        ("workers", cfg.workers >= 0, ">= 0 (0: one per CPU core)"),
        ("threads", cfg.threads >= 1, ">= 1"),
        ("teacher" if cfg.teacher else "student", bool(cfg.teacher) == bool(cfg.student),
         f"given together with --{'student' if cfg.teacher else 'teacher'}, or neither (the default pair)"),
        *[(f"{role}_{k}", getattr(cfg, f"{role}_{k}") >= 1, ">= 1") for role in ("teacher", "student") for k in ("layers", "steps")],
        *[(f"{role}_width", getattr(cfg, f"{role}_width") >= 4 and getattr(cfg, f"{role}_width") % 4 == 0,
           "a positive multiple of 4 (the default pair has 4 attention heads)") for role in ("teacher", "student")],
        *[(f"{role}_free_frac", 0 <= getattr(cfg, f"{role}_free_frac") <= 1, "between 0 and 1") for role in ("teacher", "student")],
        ("teacher_overrun_frac", 0 <= cfg.teacher_overrun_frac <= 1 - cfg.teacher_free_frac,
         f"between 0 and 1 - --teacher-free-frac ({1 - cfg.teacher_free_frac:g})"),
        ("gold_size", cfg.gold_size >= 0, ">= 0 (0: every prompt's own answer)"),
        ("pretrain_lr", cfg.pretrain_lr > 0, "> 0"),
        ("steps", cfg.steps >= 1, ">= 1"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("lr", cfg.lr > 0, "> 0"),
        ("temperature", cfg.temperature > 0, "> 0 (sampling divides the logits by it)"),
        ("max_new_tokens", cfg.max_new_tokens >= 1, "at least 1"),
        ("objective", cfg.objective in ("sampled", "full"), "'sampled' or 'full'"),
        ("loss_agg", cfg.loss_agg in LOSS_AGG, "one of " + ", ".join(LOSS_AGG)),
        ("warmup", cfg.warmup >= 0, ">= 0"),
        ("decay", 0 <= cfg.decay <= 1, "between 0 and 1"),
        ("grad_clip", cfg.grad_clip > 0, "> 0"),
        ("chunk_size", cfg.chunk_size >= 0, ">= 0 (0: all positions at once)"),
        ("length_groups", cfg.length_groups >= 1, ">= 1"),
        ("opd_coef", cfg.opd_coef >= 0, ">= 0"),
        ("opd_coef", cfg.opd_coef > 0 or cfg.sft_coef > 0, "> 0 unless --sft-coef is (otherwise nothing is trained)"),
        ("ref_kl", cfg.ref_kl >= 0, ">= 0"),
        ("sft_coef", cfg.sft_coef >= 0, ">= 0"),
        ("trunc_weight", 0 <= cfg.trunc_weight <= 1, "between 0 and 1"),
        ("overlong_buffer", 0 <= cfg.overlong_buffer <= cfg.max_new_tokens, f"between 0 and --max-new-tokens ({cfg.max_new_tokens})"),
        ("adv_regulation", cfg.adv_regulation in ("none", "log", "clip"), "'none', 'log' or 'clip'"),
        ("adv_clip", cfg.adv_clip > 0, "> 0"),
        ("rep_penalty", cfg.rep_penalty > 0, "> 0 (1: off)"),
        ("rep_window", cfg.rep_window >= 1, ">= 1"),
        ("rep_tau", cfg.rep_tau > 0, "> 0"),
        ("alert_max_len", cfg.alert_max_len >= 0, ">= 0 (0: off)"),
        ("alert_trunc", 0 <= cfg.alert_trunc <= 1, "between 0 and 1"),
        ("alert_rep", 0 <= cfg.alert_rep <= 1, "between 0 and 1"),
        ("alert_growth", cfg.alert_growth > 0, "> 0"),
        ("alert_patience", cfg.alert_patience >= 1, ">= 1"),
        ("eval_every", cfg.eval_every >= 1, ">= 1"),
        ("eval_size", cfg.eval_size >= 1, ">= 1"),
        ("log_samples_every", cfg.log_samples_every >= 0, ">= 0 (0: off)"),
        ("save_every", cfg.save_every >= 0, ">= 0 (0: off)"),
    ]
    for name, holds, allowed in rules:
        if not holds:
            print(f"error: --{name.replace('_', '-')} must be {allowed} (got {getattr(cfg, name)!r})", file=sys.stderr)
            sys.exit(2)
    if cfg.objective == "full" and (cfg.overlong_buffer or cfg.adv_regulation != "none" or cfg.eos_mask):
        print("[check] warning: --overlong-buffer, --adv-regulation and --eos-mask shape the sampled-token "
              "advantage; with --objective full they have no effect", flush=True)


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


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None):
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
        return seq[mask.sum(-1) > 0].mean() if (mask.sum(-1) > 0).any() else masked.sum() * 0
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).mean()
    if mode == "seq-mean-token-sum-norm":
        return masked.sum(-1).mean() / (max_len or per_token.shape[-1])
    raise ValueError(f"unknown loss_agg {mode!r}; use token-mean, seq-mean-token-mean, "
                     "seq-mean-token-sum or seq-mean-token-sum-norm")


# =============================================================================
# 2. Task and model pair
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
        self.eval_set = [self.example(ev.choice(self.eval_motifs), ev.choice(COUNTS)) for _ in range(eval_size)]

    @staticmethod
    def example(motif, k):
        return {"prompt": " ".join(motif) + f" x {k} =", "answer": " ".join(list(motif) * k)}

    def sample(self, n: int, rng: random.Random):
        return [self.example(rng.choice(self.train_motifs), rng.choice(COUNTS)) for _ in range(n)]

    def free_text(self, rng: random.Random, max_len: int = 48):
        """'Web text' for the teacher: a motif repeated with no count and no end. A language
        model pretrained on such text learns the habit of continuing a pattern."""
        motif = rng.choice(self.train_motifs)
        return {"prompt": "", "answer": " ".join((list(motif) * max_len)[:rng.randint(8, max_len)]), "eos": False}

    def overrun_text(self, rng: random.Random, max_len: int = 48, free_repeats: int = 2):
        """A counted prompt whose text runs on past k repeats and never ends. No loss on the
        answer and on the first `free_repeats` extra repeats (`skip`), so the teacher still
        stops at k and keeps its doubt one or two repeats later; deeper in, continuing is all
        it saw. Real LMs do this: the longer a loop, the likelier its next repeat (Xu et al.
        2022, "Learning to Break the Loop", arXiv 2206.02369)."""
        motif, k = rng.choice(self.train_motifs), rng.choice(COUNTS)
        n = len(motif) * (k + free_repeats)
        return {"prompt": " ".join(motif) + f" x {k} =", "eos": False, "skip": n,
                "answer": " ".join((list(motif) * max_len)[:rng.randint(n + 1, max(n + 1, max_len))])}

    def gold_set(self, n: int, seed: int = 7):
        """The fixed set of n reference solutions: the only gold data the student's warm-up,
        the rollout mixture and `sft-only` see (the teacher grades any prompt)."""
        return self.sample(n, random.Random(seed))


def build_tokenizer():
    """A real transformers tokenizer over a word-level vocabulary, with BOS/EOS/PAD."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = [SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"]] + LETTERS \
        + [str(c) for c in COUNTS] + ["x", "="]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # add_special_tokens=True prepends BOS, like Llama's tokenizer does
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"], padding_side="left")


def make_model(tokenizer, layers: int, width: int, arch: str = "llama"):
    """A small Llama-style causal LM (a Qwen2 config works the same way: see the tests)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    kw = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**kw)
    return AutoModelForCausalLM.from_config(cfg)


def prompt_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, unpadded; through the chat template if the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(texts)["input_ids"]                        # BOS added as the tokenizer does


def left_pad(seqs: list[list[int]], pad: int, device="cpu"):
    """(B, T) ids left-padded with `pad` and the (B, T) attention mask: generation appends on the right."""
    T = max(len(x) for x in seqs)
    ids = torch.tensor([[pad] * (T - len(x)) + x for x in seqs], device=device)                 # (B, T)
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in seqs], device=device)       # (B, T)
    return ids, mask


def encode_batch(tokenizer, texts: list[str], device="cpu"):
    """Left-padded prompt ids (B, P) and attention mask (B, P)."""
    return left_pad(prompt_token_ids(tokenizer, texts), tokenizer.pad_token_id, device)


def supervised_batch(tokenizer, examples, device="cpu"):
    """prompt + answer + EOS, left-padded, with labels only on answer tokens (incl. EOS)."""
    prompts = prompt_token_ids(tokenizer, [ex["prompt"] for ex in examples])
    answers = tokenizer([ex["answer"] for ex in examples], add_special_tokens=False)["input_ids"]
    answers = [a + [tokenizer.eos_token_id] * ex.get("eos", True) for a, ex in zip(answers, examples)]
    input_ids, attn = left_pad([p + a for p, a in zip(prompts, answers)], tokenizer.pad_token_id, device)
    labels, _ = left_pad([[-100] * (len(p) + ex.get("skip", 0)) + a[ex.get("skip", 0):]
                          for p, a, ex in zip(prompts, answers, examples)], -100, device)                # (B, T)
    return input_ids, attn, labels


def sft_nll(model, tokenizer, examples, device="cpu"):
    """Mean NLL of the reference answers (teacher/student warm-up and rollout mixture)."""
    input_ids, attn, labels = supervised_batch(tokenizer, examples, device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits.float()  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def train_supervised(model, tokenizer, draw, steps, lr, rng, name, device="cpu", batch_size=64):
    """Plain SFT on batches from `draw(n, rng)` (a list of examples); progress printed as it goes."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
    t0 = time.time()
    for step in range(steps):
        loss = sft_nll(model, tokenizer, draw(batch_size, rng), device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            print(f"[build] {name} step {step + 1}/{steps} nll {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    return model


def pretraining_mix(task: MotifTask, cfg: Config, role: str):
    """What each model of the default pair is trained on, as draw(n, rng) -> examples.

    Teacher: the task, free text (the pattern-continuing habit) and over-run text (loops
    that deepen). Student: the fixed gold set (--gold-size; 0: fresh task samples), i.e. an
    SFT checkpoint on the reference solutions OPD's stabilizers may also use.
    """
    free, overrun = getattr(cfg, f"{role}_free_frac"), cfg.teacher_overrun_frac if role == "teacher" else 0.0
    gold = task.gold_set(cfg.gold_size) if role == "student" and cfg.gold_size else None

    def draw(n, rng):
        n_free, n_over = round(n * free), round(n * overrun)
        main = [rng.choice(gold) for _ in range(n - n_free - n_over)] if gold else task.sample(n - n_free - n_over, rng)
        return main + [task.free_text(rng) for _ in range(n_free)] + [task.overrun_text(rng) for _ in range(n_over)]
    return draw


@torch.no_grad()
def loop_eos_profile(model, tokenizer, examples, depths=range(-1, 6)) -> dict:
    """Mean p(EOS) after k + d repeats of the motif (d = 0: the correct stop; d > 0: inside a
    loop). A teacher whose p(EOS) falls with d makes loops absorbing (tutorial, section 2)."""
    out = {}
    for d in depths:
        rows = [(e["prompt"], e["prompt"].split()[:-3], int(e["prompt"].split()[-2])) for e in examples]  # motif, k
        rows = [(p, motif * (k + d)) for p, motif, k in rows if k + d > 0]
        prompts = prompt_token_ids(tokenizer, [p for p, _ in rows])
        answers = tokenizer([" ".join(a) for _, a in rows], add_special_tokens=False)["input_ids"]
        ids, attn = left_pad([p + a for p, a in zip(prompts, answers)], tokenizer.pad_token_id)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1].float()   # (B, V)
        out[d] = round(F.softmax(logits, -1)[:, tokenizer.eos_token_id].mean().item(), 3)
    return out


# The weights of a build depend on the thread count (the order of floating-point reductions),
# so it is fixed: these are the counts the default pair was searched and measured with. The
# collapse depends on the exact teacher: one built the same way on 1 thread taught the student
# to 0.82-0.84 and never collapsed it within 400 steps (seeds 0 and 1; tutorial, section 4).
BUILD_THREADS = {"teacher": 2, "student": 1}


def model_key(cfg: Config, role: str) -> str:
    """Cache key of one model of the default pair: every setting its build depends on."""
    build = {k: getattr(cfg, f"{role}_{k}") for k in ("layers", "width", "steps", "free_frac")}
    build.update(role=role, lr=cfg.pretrain_lr, task_version=2, threads=BUILD_THREADS[role])
    build.update(overrun_frac=cfg.teacher_overrun_frac) if role == "teacher" else build.update(gold_size=cfg.gold_size)
    return hashlib.sha1(json.dumps(build, sort_keys=True).encode()).hexdigest()[:10]


def build_default_pair(cfg: Config) -> tuple[str, str]:
    """Train the default teacher and student once each and save them with save_pretrained.

    Each folder is keyed by its build configuration, so a second run reuses it and a changed
    configuration rebuilds only the model it changes. Runs then load them back with
    from_pretrained, the path a user's hub model takes.
    """
    paths = []
    for role in ("teacher", "student"):
        d = Path(cfg.cache_dir) / f"{role}-{model_key(cfg, role)}"
        paths.append(str(d))
        if (d / "DONE").exists():
            continue
        print(f"[build] no cached {role} at {d}; training it (teacher ~2 min, student ~20 s on 2 CPU cores)", flush=True)
        t0, threads = time.time(), torch.get_num_threads()
        seed = {"teacher": 0, "student": 1}[role]
        torch.manual_seed(seed)
        torch.set_num_threads(BUILD_THREADS[role])        # the same weights on every machine
        tokenizer, task = build_tokenizer(), MotifTask()
        model = make_model(tokenizer, getattr(cfg, f"{role}_layers"), getattr(cfg, f"{role}_width"))
        train_supervised(model, tokenizer, pretraining_mix(task, cfg, role), getattr(cfg, f"{role}_steps"),
                         cfg.pretrain_lr, random.Random(seed), role)
        torch.set_num_threads(threads)
        tmp = d.with_name(f"{d.name}.tmp{os.getpid()}")     # private: parallel builds do not collide
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"role": role, "build_s": round(time.time() - t0, 1), "params": sum(p.numel() for p in model.parameters()),
                "accuracy": evaluate(model, tokenizer, task.eval_set, cfg.max_new_tokens)["accuracy"],
                "accuracy_sampled": evaluate(model, tokenizer, task.eval_set, cfg.max_new_tokens, temperature=1.0,
                                             generator=torch.Generator().manual_seed(0))["accuracy"],
                "p_eos_by_depth": loop_eos_profile(model, tokenizer, task.eval_set)}
        (tmp / "build.json").write_text(json.dumps(info, indent=1))
        (tmp / "DONE").write_text("ok")
        if (d / "DONE").exists():                               # another process finished first
            shutil.rmtree(tmp)
            continue
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)                                            # atomic: a half-built model is never used
        print(f"[build] saved {d}: {info}", flush=True)
    return paths[0], paths[1]


# =============================================================================
# 3. Monitor: length, truncation and repetition, with alerts
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
    """The response without its final EOS (a stopped rollout's last token); repetition looks at the text."""
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
    return {
        "len_mean": sum(lengths) / n,
        "len_max": lengths[-1] if lengths else 0,
        "len_p90": lengths[min(len(lengths) - 1, math.ceil(0.9 * len(lengths)) - 1)] if lengths else 0,
        "trunc_rate": sum(trunc) / n,
        "rep_rate": sum(is_repetitive(b, window, tau) for b in body) / n,
        "ngram_rep": sum(ngram_repetition(b) for b in body) / n,
    }


class LengthMonitor:
    """Keeps the history of length_stats and raises each alert once, at onset.

    Alerts: max length over a threshold (the starter's check), truncation rate, repetition
    rate, and growth: mean length above its EMA by `growth` (so inflation is caught before
    it fills the budget). A condition must hold `patience` consecutive steps to fire, so one
    noisy batch is not an alarm. `update` returns the stats plus 'alert/<name>' = 1 for new alerts.
    """

    def __init__(self, eos_id: int, max_len: int, max_len_alert: int = 0, trunc: float = 0.2, rep: float = 0.01,
                 growth: float = 0.4, ema: float = 0.9, warmup: int = 3, window: int = 24, tau: float = 3.0,
                 patience: int = 2):
        self.eos_id, self.max_len, self.window, self.tau = eos_id, max_len, window, tau
        self.thresholds = {"max_len": max_len_alert or math.inf, "trunc_rate": trunc, "rep_rate": rep, "growth": growth}
        self.ema_beta, self.warmup, self.patience = ema, warmup, patience
        self.ema, self.n, self.active, self.history = None, 0, set(), []
        self.streak = dict.fromkeys(self.thresholds, 0)         # consecutive steps each condition held

    def update(self, seqs, step: int) -> dict:
        s = length_stats(seqs, self.eos_id, self.max_len, self.window, self.tau)
        self.n += 1
        growth = 0.0 if self.ema is None else s["len_mean"] / max(self.ema, 1e-8) - 1.0
        checks = {"max_len": s["len_max"] > self.thresholds["max_len"],
                  "trunc_rate": s["trunc_rate"] > self.thresholds["trunc_rate"],
                  "rep_rate": s["rep_rate"] > self.thresholds["rep_rate"],
                  "growth": self.n > self.warmup and growth > self.thresholds["growth"]}
        values = {"max_len": s["len_max"], "trunc_rate": s["trunc_rate"], "rep_rate": s["rep_rate"], "growth": growth}
        out = dict(s, growth=growth)
        for name, held in checks.items():
            self.streak[name] = self.streak[name] + 1 if held else 0
            fired = self.streak[name] >= self.patience
            if fired and name not in self.active:
                out[f"alert/{name}"] = 1
                print(f"[alert] step {step}: {name} = {values[name]:.3f} crossed {self.thresholds[name]}", flush=True)
            (self.active.add if fired else self.active.discard)(name)
        self.ema = s["len_mean"] if self.ema is None else self.ema_beta * self.ema + (1 - self.ema_beta) * s["len_mean"]
        self.history.append(out)
        return out


# Which signal warns first? Each candidate is one number per training step, computed from a
# run's logged metrics; signal_table() scores them against the take-off (tutorial, section 3).

def _slope(xs, i, n=10):
    """Least-squares slope per step of the last n values up to xs[i] (0 before there are n)."""
    if i + 1 < n or any(x != x for x in xs[i + 1 - n:i + 1]):
        return 0.0
    w, mid = xs[i + 1 - n:i + 1], (n - 1) / 2
    return sum((j - mid) * (x - sum(w) / n) for j, x in enumerate(w)) / sum((j - mid) ** 2 for j in range(n))


def warning_signals(rows) -> dict:
    """Candidate early warnings of the collapse, each a list with one value per training step."""
    rows = [r for r in rows if "rollout/trunc_rate" in r]
    col = lambda k: [float(r.get(k, math.nan)) for r in rows]
    ngram, ema = col("rollout/ngram_rep"), []
    for x in ngram:
        ema.append(x if not ema else 0.9 * ema[-1] + 0.1 * x)
    frac, logp_t = col("adv/repetitive_frac"), col("logp/teacher")
    return {"steps": [r["step"] for r in rows],
            "repetition rate": col("rollout/rep_rate"),
            "3-gram repetition over its EMA": [x - e for x, e in zip(ngram, [ngram[0]] + ema[:-1])],
            "repetitive-token share, slope": [_slope(frac, i) for i in range(len(rows))],
            "advantage gap, repetitive - regular": [a - b if a == a else -math.inf for a, b in
                                                    zip(col("adv/repetitive"), col("adv/regular"))],
            "share of stops with p_T(EOS) < p_S(EOS)": col("eos/teacher_lower_frac"),
            "length over its EMA": col("rollout/growth"),
            "p90 length": col("rollout/len_p90"),
            "teacher log-prob, falling slope": [-_slope(logp_t, i) for i in range(len(rows))]}


def fire_step(steps, values, threshold: float, patience: int = 2, start: int = 10):
    """First step at which `values` exceeded `threshold` `patience` steps in a row ('' if never)."""
    held = 0
    for step, v in zip(steps, values):
        held = held + 1 if step >= start and v > threshold else 0
        if held >= patience:
            return step
    return ""


def signal_table(*folders, fit_seeds=(0, 1, 2), horizon: int = 50) -> str:
    """Lead time and false alarms of every candidate signal, as a markdown table.

    Runs: the opd, stable-opd and sft-only runs in `folders`; a run collapses if its truncation
    rate exceeds 0.3 (the take-off). A lead is the take-off step minus the alert's step; a false
    alarm, an alert on a run that never takes off. Each signal's threshold is chosen on the
    seeds in `fit_seeds` alone, among those with no false alarm and no alert more than
    `horizon` steps ahead of a take-off (such an alert says nothing about the collapse): the
    largest whose smallest lead is at least 10 steps (twice the 5 an alarm needs to be acted
    on), else the one with the largest smallest lead. The other seeds are only scored.
    """
    runs = []
    for d in sorted(p for f in folders for p in Path(f).glob("*-s*")):
        method, seed = d.name.rsplit("-s", 1)
        if method in ("opd", "stable-opd", "sft-only") and (d / "metrics.jsonl").exists():
            rows = read_metrics(d / "metrics.jsonl")
            tr = [r for r in rows if "rollout/trunc_rate" in r]
            runs.append((int(seed) in fit_seeds, first_step(tr, "rollout/trunc_rate", 0.3), warning_signals(rows)))

    def score(name, thr, fit):    # leads on collapsing runs (None: never fired), false alarms on quiet ones
        leads, false = [], 0
        for is_fit, takeoff, sig in runs:
            if is_fit == fit:
                fired = fire_step(sig["steps"], sig[name], thr)
                if takeoff == "":
                    false += fired != ""
                else:
                    leads.append(takeoff - fired if fired != "" else None)
        return leads, false

    lines = ["| signal | threshold (chosen on the fit seeds) | lead, fit seeds | false alarms, fit | lead, held-out seeds "
             "| false alarms, held-out |", "|---|---|---|---|---|---|"]
    n_quiet = {fit: sum(t == "" for f, t, _ in runs if f == fit) for fit in (True, False)}
    for name in [k for k in runs[0][2] if k != "steps"]:
        seen = sorted({v for f, _, sig in runs if f for v in sig[name] if math.isfinite(v)})
        ok = []                             # (threshold, smallest lead on the fit seeds)
        for thr in [(a + b) / 2 for a, b in zip(seen, seen[1:])][::max(1, len(seen) // 400)]:   # between values seen
            leads, false = score(name, thr, True)
            if false == 0 and all(x is None or x <= horizon for x in leads):
                ok.append((thr, min((x if x is not None else -math.inf for x in leads), default=-math.inf)))
        enough = [x for x in ok if x[1] >= 10]
        best = enough[-1] if enough else max(ok, key=lambda x: x[1], default=None)
        if best is None:
            lines.append(f"| {name} | none without a false alarm | | | | |")
            continue
        fmt = lambda leads: ", ".join("missed" if x is None else str(x) for x in leads)
        (lf, ff), (lh, fh) = score(name, best[0], True), score(name, best[0], False)
        lines.append(f"| {name} | {best[0]:.3g} | {fmt(lf)} | {ff} of {n_quiet[True]} quiet | {fmt(lh)} | "
                     f"{fh} of {n_quiet[False]} quiet |")
    return "\n".join(lines)


# =============================================================================
# 4. Length inflation reproduced: rollouts, the loop, the guard
# =============================================================================

# transformers renamed the KV cache's argument and output field from `past_key_values` to
# `cache` during 5.x; reading the name off the output class runs on releases on either side
CACHE = "cache" if "cache" in transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@torch.no_grad()
def sample_rollouts(model, prompt_ids, prompt_mask, max_new_tokens: int, eos_id: int, pad_id: int,
                    temperature: float = 1.0, greedy: bool = False, rep_penalty: float = 1.0, generator=None):
    """Sample responses with a KV cache: pure sampling at `temperature` (no top-k/top-p, so
    the samples come from the distribution the loss assumes). Returns (B, T<=max_new_tokens)
    tokens, padded with pad_id after EOS. `rep_penalty` > 1 is the CTRL penalty (off-policy).
    A row that has emitted EOS leaves the batch (and its KV cache): only live rows are computed."""
    B = prompt_ids.shape[0]
    attn = prompt_mask.clone()                                   # (b, P) b = live rows
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                     # (b, P) left padding aware
    out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    cache, logits = getattr(out, CACHE), out.logits[:, -1].float()   # (b, V)
    live = torch.arange(B, device=prompt_ids.device)             # (b,) batch index of each live row
    penalize = rep_penalty != 1.0
    seen = torch.zeros_like(logits, dtype=torch.bool) if penalize else None   # (b, V) tokens already generated
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
    t = -1
    for t in range(max_new_tokens):
        if penalize:
            logits = torch.where(seen, torch.where(logits > 0, logits / rep_penalty, logits * rep_penalty), logits)
        if greedy:
            nxt = logits.argmax(-1)                              # (b,)
        else:
            nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)  # (b,)
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
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **{CACHE: cache})
        cache, logits = getattr(out, CACHE), out.logits[:, -1].float()
    return tokens[:, :t + 1]                                     # (B, T)


def hidden_states(model, input_ids, attn):
    """Last hidden states (B, T, H) of a causal LM, without its vocabulary projection: the
    loss projects them chunk by chunk (section 7)."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    base = getattr(model, model.base_model_prefix)
    return base(input_ids=input_ids, attention_mask=attn, position_ids=pos).last_hidden_state


def response_hidden_states(model, seq, attn, P: int, groups: int = 1):
    """Hidden states (B, T, H) that predict the T response tokens of seq = prompt (P) + response.

    The rows are sorted by response length and the model runs on `groups` slices, each cut
    to its own longest response, so the padding after short responses is not computed
    (section 7). Rows come back in their order, zeros where a row has ended.
    """
    T = seq.shape[1] - P
    lengths = attn[:, P:].sum(-1)                                                       # (B,)
    order = lengths.argsort()
    parts = []
    for rows in order.chunk(groups):
        t = int(lengths[rows].max())
        h = hidden_states(model, seq[rows, :P + t], attn[rows, :P + t])[:, P - 1:P + t - 1]  # (b, t, H)
        parts.append(F.pad(h, (0, 0, 0, T - t)))                                        # (b, T, H)
    return torch.cat(parts)[order.argsort()]                                            # (B, T, H)


def exact_match(tokenizer, ids, answer) -> bool:
    """A response (token ids, EOS included if it stopped) equals the reference answer as text."""
    return bool(ids) and ids[-1] == tokenizer.eos_token_id and \
        tokenizer.decode(ids[:-1], skip_special_tokens=True).strip() == answer.strip()


@torch.no_grad()
def evaluate(model, tokenizer, examples, max_new_tokens: int, device="cpu", batch_size: int = 128,
             window: int = 24, tau: float = 3.0, temperature: float = 0.0, generator=None):
    """Held-out exact match, with the rollouts' length/truncation/repetition figures.
    temperature 0: greedy decoding; > 0: samples at that temperature (the policy OPD trains)."""
    was_training = model.training
    model.eval()
    seqs, correct = [], 0
    eos = tokenizer.eos_token_id
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        ids, attn = encode_batch(tokenizer, [e["prompt"] for e in batch], device)
        toks = sample_rollouts(model, ids, attn, max_new_tokens, eos, tokenizer.pad_token_id, temperature or 1.0,
                               greedy=temperature == 0, generator=generator)
        _, lengths, _ = response_mask(toks, eos)
        for j, e in enumerate(batch):
            seqs.append(toks[j, :lengths[j]].tolist())
            correct += e.get("answer") is not None and exact_match(tokenizer, seqs[-1], e["answer"])
    model.train(was_training)
    stats = length_stats(seqs, eos, max_new_tokens, window, tau)
    n_ref = sum(e.get("answer") is not None for e in examples)
    return dict(stats, accuracy=correct / max(n_ref, 1))


METRIC_KEYS = [  # documented in the tutorial, section 3; a test checks every run logs them all
    "step", "loss/total", "loss/opd", "kl/reverse", "rollout/len_mean", "rollout/len_max", "rollout/len_p90",
    "rollout/trunc_rate", "rollout/rep_rate", "rollout/ngram_rep", "logp/student", "logp/teacher", "adv/mean",
    "adv/repetitive", "adv/regular", "adv/repetitive_frac", "eos/p_student", "eos/p_teacher", "eos/teacher_lower_frac", "eval/accuracy",
    "eval/len_mean", "eval/len_max", "eval/trunc_rate", "eval/rep_rate", "eval/ngram_rep", "eval/accuracy_sampled",
    "rollout/accuracy", "time/rollout_s",
    "time/teacher_s", "time/update_s", "time/eval_s", "time/tokens_per_s"]


def lr_factor(step: int, steps: int, warmup: int, decay: int) -> float:
    """Warmup-stable-decay: linear warm-up over `warmup` steps, constant, linear decay to 0 over the last `decay`."""
    return min(1.0, (step + 1) / max(warmup, 1), (steps - step) / max(decay, 1))


def run_opd(cfg: Config, method: str = "opd"):
    """One OPD run: sample, score, update, monitor; writes out_dir/<run_name>/metrics.jsonl."""
    torch.manual_seed(cfg.seed)                                  # the one seed
    rng = random.Random(cfg.seed)
    gold_rng = random.Random(f"gold-{cfg.seed}")                  # own streams: every method sees the same prompts
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    eval_gen = torch.Generator(device).manual_seed(cfg.seed)
    streams = (rng, gold_rng, eval_gen)                          # the random streams a checkpoint restores
    student, teacher, tokenizer, data = load_models_and_data(cfg, device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ref = copy.deepcopy(student).eval().requires_grad_(False) if cfg.ref_kl > 0 or cfg.guard else None
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup, round(cfg.decay * cfg.steps)))
    monitor = LengthMonitor(eos, cfg.max_new_tokens, cfg.alert_max_len, cfg.alert_trunc, cfg.alert_rep,
                            cfg.alert_growth, window=cfg.rep_window, tau=cfg.rep_tau, patience=cfg.alert_patience)
    run_dir = Path(cfg.out_dir) / (cfg.run_name or f"{method}-s{cfg.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, ckpt_path = run_dir / "metrics.jsonl", run_dir / "checkpoint.pt"
    start, healthy, kept = 0, None, []                           # healthy: guard's last healthy student + optimizer
    if cfg.resume and ckpt_path.exists():
        start, healthy = load_checkpoint(ckpt_path, cfg, student, opt, sched, streams, monitor, device)
        kept = [r for r in read_metrics(metrics_path) if r["step"] < start] if metrics_path.exists() else []
        print(f"[{method} s{cfg.seed}] resumed at step {start} from {ckpt_path}", flush=True)
    elif cfg.resume:
        print(f"[{method} s{cfg.seed}] no checkpoint at {ckpt_path}: starting at step 0", flush=True)
    if metrics_path.exists():                                    # never lose an earlier run's log
        metrics_path.replace(run_dir / "metrics.prev.jsonl")
    (run_dir / "config.json").write_text(json.dumps(dict(dataclasses.asdict(cfg), method=method), indent=1))
    log = open(metrics_path, "w")
    log.writelines(json.dumps(r) + "\n" for r in kept)           # the steps before the checkpoint
    eval_m, t_eval = {}, 0.0
    try:
        for step in range(start, cfg.steps + 1):
            # --- held-out evaluation, greedy and sampled, before the update of this step
            if step % cfg.eval_every == 0 or step == cfg.steps:
                t = clock(device)
                ev = evaluate(student, tokenizer, data["eval"], cfg.max_new_tokens, device, window=cfg.rep_window, tau=cfg.rep_tau)
                ev["accuracy_sampled"] = evaluate(student, tokenizer, data["eval"], cfg.max_new_tokens, device,
                                                  temperature=cfg.temperature, generator=eval_gen)["accuracy"]
                eval_m, t_eval = {f"eval/{k}": v for k, v in ev.items()}, clock(device) - t
            if step == cfg.steps:
                m = {"step": step, **eval_m}
                log.write(json.dumps(m) + "\n")
                break
            # --- 1. the student samples
            t0 = clock(device)
            batch = data["sample"](cfg.batch_size, rng)
            p_ids, p_attn = encode_batch(tokenizer, [e["prompt"] for e in batch], device)
            student.eval()
            resp = sample_rollouts(student, p_ids, p_attn, cfg.max_new_tokens, eos, pad, cfg.temperature,
                                   rep_penalty=cfg.rep_penalty)                              # (B, T)
            student.train()
            mask, lengths, truncated = response_mask(resp, eos)                              # (B, T)
            seq = torch.cat([p_ids, resp], 1)                                                # (B, P+T)
            attn = torch.cat([p_attn, mask.long()], 1)                                       # (B, P+T)
            P = p_ids.shape[1]
            t1 = clock(device)
            # --- 2. the teacher scores the same tokens: one no-grad forward, after the prompt in its
            # own chat format when the two differ (section 6); the response ids are shared
            t_ids, t_attn = (p_ids, p_attn) if data["teacher_tok"] is None else \
                left_pad(prompt_token_ids(data["teacher_tok"], [e["prompt"] for e in batch]), pad, device)  # (B, P_t)
            with torch.no_grad():
                h_t = response_hidden_states(teacher, torch.cat([t_ids, resp], 1), torch.cat([t_attn, mask.long()], 1),
                                             t_ids.shape[1], cfg.length_groups)                    # (B, T, H_t)
                h_ref = response_hidden_states(ref, seq, attn, P, cfg.length_groups) if cfg.ref_kl > 0 else None
            t2 = clock(device)
            # --- 3. the student's one forward: loss and metrics both come from it (metrics alone,
            # with no graph, when no term of the loss needs it: the sft-only control)
            with torch.set_grad_enabled(cfg.opd_coef > 0 or cfg.ref_kl > 0):
                h_s = response_hidden_states(student, seq, attn, P, cfg.length_groups)        # (B, T, H_s)
                terms = token_terms(h_s, student.get_output_embeddings(), h_t, teacher.get_output_embeddings(),
                                    resp, eos, cfg.temperature, cfg.chunk_size, full_kl=cfg.objective == "full",
                                    h_ref=h_ref, head_ref=ref.get_output_embeddings() if h_ref is not None else None)
            lp_s, lp_t = terms["logp_student"], terms["logp_teacher"]                        # (B, T)
            adv = sampled_token_advantage(lp_t, lp_s)                                        # (B, T)
            # --- 4. stabilizers that shape the advantage or the weights (section 5)
            adv_used = adv
            if cfg.overlong_buffer > 0:
                adv_used = adv_used + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer)[:, None]
            if cfg.adv_regulation != "none":
                adv_used = regulate_advantage(adv_used, cfg.adv_regulation, cfg.adv_clip)
            if cfg.eos_mask:
                adv_used = eos_advantage_mask(adv_used, resp, eos)
            weights = truncation_weights(mask, truncated, cfg.trunc_weight)                 # (B, T)
            if cfg.objective == "full":
                per_token = terms["kl_full"]                                                 # (B, T)
            else:
                per_token = sampled_token_loss(adv_used, lp_s)                               # (B, T)
            loss_opd = aggregate_loss(per_token, weights, cfg.loss_agg, cfg.max_new_tokens)
            loss = cfg.opd_coef * loss_opd
            if cfg.ref_kl > 0:
                loss = loss + cfg.ref_kl * aggregate_loss(terms["kl_ref"], mask, cfg.loss_agg, cfg.max_new_tokens)
            if cfg.sft_coef > 0:   # rollout mixture: B reference solutions from the fixed gold set, or the step's own
                gold = [gold_rng.choice(data["gold"]) for _ in batch] if data["gold"] else \
                    [e for e in batch if e.get("answer") is not None]
                loss = loss + cfg.sft_coef * sft_nll(student, tokenizer, gold, device) if gold else loss
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss at step {step} ({loss.item()}). Lower --lr, check the models' "
                    f"dtype (bf16 logits are upcast here), or try --adv-regulation clip. {metrics_path} "
                    "holds every step logged so far; the student was not updated with this loss.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            t3 = clock(device)
            # --- 5. monitor
            seqs = [resp[i, :lengths[i]].tolist() for i in range(resp.shape[0])]
            mon = monitor.update(seqs, step)
            graded = [(s, e["answer"]) for s, e in zip(seqs, batch) if e.get("answer") is not None]
            m = {"step": step, "loss/total": loss.item(), "loss/opd": loss_opd.item(),
                 "rollout/accuracy": sum(exact_match(tokenizer, s, a) for s, a in graded) / len(graded) if graded else float("nan"),
                 **rollout_metrics(terms, adv, mask, lengths, truncated, seqs, eos, cfg),
                 **{f"rollout/{k}": v for k, v in mon.items() if not k.startswith("alert/") and k != "growth"},
                 "rollout/growth": mon["growth"], **{k: v for k, v in mon.items() if k.startswith("alert/")},
                 **eval_m, "time/rollout_s": t1 - t0, "time/teacher_s": t2 - t1, "time/update_s": t3 - t2,
                 "time/eval_s": t_eval, "time/tokens_per_s": float(mask.sum()) / max(t1 - t0, 1e-9)}
            eval_m, t_eval = {}, 0.0
            # --- 6. guard: act on an alert (restore the last healthy student, switch on Stable-OPD)
            if cfg.guard:
                healthy, acted = guard_step(cfg, monitor, step, student, opt, healthy)
                if acted:
                    m["guard/acted"] = 1
                    print(f"[guard] step {step}: restored the student of step {healthy['step']}, "
                          f"now ref_kl={cfg.ref_kl} sft_coef={cfg.sft_coef}", flush=True)
            log.write(json.dumps(m) + "\n")
            log.flush()
            if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(ckpt_path, step + 1, student, opt, sched, streams, monitor, healthy, cfg)
            print(f"[{method} s{cfg.seed}] step {step:4d} loss {m['loss/total']:+.4f} kl {m['kl/reverse']:.3f} "
                  f"len {m['rollout/len_mean']:5.1f} trunc {m['rollout/trunc_rate']:.2f} rep {m['rollout/rep_rate']:.2f} "
                  f"adv {m['adv/mean']:+.3f}" + (f" acc {m['eval/accuracy']:.3f}" if "eval/accuracy" in m else ""), flush=True)
            if cfg.log_samples_every and step % cfg.log_samples_every == 0:
                for i in range(2):
                    print(f"    {batch[i]['prompt']!r} -> {tokenizer.decode(seqs[i])!r}", flush=True)
    finally:
        log.close()
    rows = read_metrics(metrics_path)
    spent = {k: sum(r.get(f"time/{k}_s", 0.0) for r in rows) for k in ("rollout", "teacher", "update", "eval")}
    total = sum(spent.values())
    print(f"[{method} s{cfg.seed}] time: " + ", ".join(f"{k} {v:.1f}s ({v / max(total, 1e-9):.0%})" for k, v in spent.items()),
          flush=True)
    if device.type == "cuda":
        print(f"[{method} s{cfg.seed}] peak CUDA memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB", flush=True)
    if cfg.save_student:
        student.save_pretrained(run_dir / "student")
        tokenizer.save_pretrained(run_dir / "student")
    return rows


def clock(device) -> float:
    """time.time() once the device has finished its queued work: CUDA runs asynchronously, so
    without the wait a phase's time is booked to whichever later call first waits for it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def token_terms(h_s, head_s, h_t, head_t, tokens, eos_id: int, temperature: float = 1.0, chunk: int = 0,
                full_kl: bool = False, h_ref=None, head_ref=None) -> dict:
    """Per-token quantities of the loss and the metrics, from hidden states (section 7).

    Returns (B, T) tensors: logp_student (with grad unless full_kl), logp_teacher, p_eos_student,
    p_eos_teacher, and kl_full = KL(p_S || p_T) (with grad) if full_kl, kl_ref =
    KL(p_S || p_ref) (with grad) if h_ref is given. With chunk > 0 the vocabulary
    projection and log-softmax run `chunk` positions at a time and are recomputed in the
    backward pass, so no (B, T, V) tensor is ever alive.
    """
    def terms(hs, ht, hr, y):
        lsm_s = F.log_softmax(head_s(hs).float() / temperature, -1)                     # (B, c, V)
        lsm_t = F.log_softmax(head_t(ht).float() / temperature, -1)                     # (B, c, V)
        # gather keeps its whole input for backward: give it a detached one unless this
        # output is in the loss, or checkpointing keeps every chunk's (B, c, V) alive
        lsm_y = lsm_s.detach() if full_kl else lsm_s
        out = [lsm_y.gather(-1, y[..., None]).squeeze(-1), lsm_t.gather(-1, y[..., None]).squeeze(-1),
               lsm_s[..., eos_id].exp().detach(), lsm_t[..., eos_id].exp()]
        out.append(full_vocab_reverse_kl(lsm_s, lsm_t) if full_kl else torch.zeros_like(out[0]))
        if hr is not None:
            out.append(reference_kl(lsm_s, F.log_softmax(head_ref(hr).float() / temperature, -1)))
        return tuple(out)

    T = tokens.shape[1]
    step = chunk if chunk > 0 else T
    parts = []
    for s in range(0, T, step):
        args = (h_s[:, s:s + step], h_t[:, s:s + step], None if h_ref is None else h_ref[:, s:s + step], tokens[:, s:s + step])
        if chunk > 0 and torch.is_grad_enabled() and h_s.requires_grad:
            parts.append(checkpoint(terms, *args, use_reentrant=False))
        else:
            parts.append(terms(*args))
    cols = [torch.cat(c, 1) for c in zip(*parts)]
    names = ["logp_student", "logp_teacher", "p_eos_student", "p_eos_teacher", "kl_full", "kl_ref"]
    out = dict(zip(names, cols))
    out["logp_teacher"], out["p_eos_teacher"] = out["logp_teacher"].detach(), out["p_eos_teacher"].detach()
    return out


def rollout_metrics(terms, adv, mask, lengths, truncated, seqs, eos_id, cfg) -> dict:
    """The paper's per-step figures from tensors the step already has (no extra forward)."""
    n = mask.sum().clamp(min=1)
    B, T = mask.shape
    # tokens in the repetitive tail of a rollout judged repetitive (paper Sec. 3.5, Fig. 4)
    rep_tok = torch.zeros_like(mask)
    for i, s in enumerate(seqs):
        body = strip_eos(s, eos_id)
        if is_repetitive(body, cfg.rep_window, cfg.rep_tau):
            rep_tok[i, max(0, len(body) - cfg.rep_window):len(body)] = 1
    rep_tok = rep_tok * mask
    reg_tok = mask - rep_tok
    stopped = ~truncated
    last = (lengths - 1).clamp(min=0)                            # position of EOS where the rollout stopped
    idx = torch.arange(B, device=mask.device)
    avg = lambda x, m: (x * m).sum().item() / m.sum().item() if m.sum() > 0 else float("nan")
    with torch.no_grad():
        lp_s, lp_t = terms["logp_student"].detach(), terms["logp_teacher"]
        kl_tok = terms["kl_full"].detach() if cfg.objective == "full" else -adv  # per-token reverse KL (estimate)
        return {
            "kl/reverse": avg(kl_tok, mask),
            "logp/student": avg(lp_s, mask), "logp/teacher": avg(lp_t, mask), "adv/mean": avg(adv, mask),
            "adv/repetitive": avg(adv, rep_tok), "adv/regular": avg(adv, reg_tok),
            "adv/repetitive_frac": (rep_tok.sum() / n).item(),
            "eos/p_student": terms["p_eos_student"][idx, last][stopped].mean().item() if stopped.any() else float("nan"),
            "eos/p_teacher": terms["p_eos_teacher"][idx, last][stopped].mean().item() if stopped.any() else float("nan"),
            "eos/teacher_lower_frac": (terms["p_eos_teacher"][idx, last] < terms["p_eos_student"][idx, last])[stopped]
                                      .float().mean().item() if stopped.any() else float("nan"),
            **({"kl/ref": avg(terms["kl_ref"].detach(), mask)} if "kl_ref" in terms else {}),
        }


def guard_step(cfg, monitor, step, student, opt, healthy):
    """Keep a copy of the student every 5 steps while no alert is active; at the first alert,
    restore the last quiet copy and switch on Stable-OPD (reference KL + rollout mixture).
    Acts once: after that Stable-OPD is on and the alerts are only reported."""
    if not monitor.active:
        if step % 5 == 0 and not (healthy or {}).get("acted"):
            healthy = {"step": step, "model": copy.deepcopy(student.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
        return healthy, False
    if healthy is None or healthy.get("acted"):
        return healthy, False
    student.load_state_dict(healthy["model"])
    opt.load_state_dict(healthy["opt"])
    cfg.ref_kl = max(cfg.ref_kl, STABLE_OPD["ref_kl"])
    cfg.sft_coef = max(cfg.sft_coef, STABLE_OPD["sft_coef"])
    healthy["acted"] = True
    return healthy, True


def save_checkpoint(path: Path, step: int, student, opt, sched, streams, monitor, healthy, cfg: Config):
    """Everything the loop needs to go on as if it had never stopped: `step` is the next step to
    run. Written to a temporary file and renamed over the last checkpoint (an atomic replace),
    so a kill mid-write leaves the previous one usable."""
    state = {"step": step, "config": dataclasses.asdict(cfg), "student": student.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "streams": [r.getstate() if isinstance(r, random.Random) else r.get_state() for r in streams],
             "monitor": vars(monitor), "guard": healthy}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


RESUME_MAY_CHANGE = {"steps", "resume", "save_every", "workers", "threads", "device", "log_samples_every", "methods",
                     "seeds", "out_dir", "plots_dir", "cache_dir", "run_name", "save_student"}


def load_checkpoint(path: Path, cfg: Config, student, opt, sched, streams, monitor, device) -> tuple[int, dict | None]:
    """Restore what save_checkpoint wrote, in place; returns (next step, guard state). Refuses a
    checkpoint written with other settings, which would splice two different runs together."""
    ck = torch.load(path, map_location=device, weights_only=False)     # this file's own pickle: RNG and monitor state
    free = RESUME_MAY_CHANGE | ({"ref_kl", "sft_coef"} if cfg.guard else set())    # the guard raises them mid-run
    changed = [f"--{k.replace('_', '-')} {v}" for k, v in ck["config"].items() if k not in free and getattr(cfg, k, v) != v]
    if changed:
        raise SystemExit(f"error: {path} was written with {', '.join(changed)}; resume with the same flags, or drop --resume "
                         "to start over")
    if ck["step"] > cfg.steps:
        raise SystemExit(f"error: {path} is at step {ck['step']}, past --steps {cfg.steps}")
    student.load_state_dict(ck["student"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    torch.set_rng_state(ck["torch_rng"].cpu())
    if ck["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ck["cuda_rng"]])
    for r, state in zip(streams, ck["streams"]):                 # a torch generator's state is a CPU tensor, CUDA too
        r.setstate(state) if isinstance(r, random.Random) else r.set_state(state.cpu())
    monitor.__dict__.update(ck["monitor"])
    cfg.ref_kl, cfg.sft_coef = ck["config"]["ref_kl"], ck["config"]["sft_coef"]
    return ck["step"], ck["guard"]


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# =============================================================================
# 5. Stabilizers
# =============================================================================
# Each is one term or one transformation of the advantage; all compose. Coefficients in
# STABLE_OPD and METHODS were chosen by measurement (see the tutorial, section 5).

def reference_kl(logp_student, logp_ref):
    """KL(p_S || p_ref) per position, p_ref the frozen initial student (Stable-OPD's
    divergence constraint, Luo et al. 2026 Sec. 4). Same formula as the full-vocab loss."""
    return full_vocab_reverse_kl(logp_student, logp_ref)


def overlong_penalty(lengths, max_len: int, buffer: int):
    """DAPO's soft overlong penalty (Yu et al. 2025, arXiv 2503.14476, Eq. 13), added to
    every token's advantage: 0 up to max_len - buffer, then falling linearly to -1 at max_len."""
    return torch.clamp(-(lengths.float() - (max_len - buffer)) / buffer, max=0.0)


def regulate_advantage(adv, mode: str, bound: float = 1.0):
    """'log': sign(A) log(1 + |A|); 'clip': A clipped to [-bound, bound]
    ("Demystifying On-Policy Distillation: Roles, Pathologies, and Regulations", arXiv 2607.13399)."""
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
    """Loss weights: truncated rollouts' tokens times `weight` (0 drops them, DAPO's overlong filtering)."""
    return mask * torch.where(truncated, weight, 1.0)[:, None]


# Stable-OPD = reference KL + rollout mixture distillation (Luo et al. 2026, Sec. 4). The
# paper gives no coefficients. sft_coef 2.0 was the smallest that held every seed of an earlier
# pair (0.5 let 1 of 3 inflate); ref_kl 0.01 as third-party Stable-OPD adapters use: at 0.1 the
# KL to the weak initial student held the final accuracy back (0.82 against 0.89, seed 1).
STABLE_OPD = {"ref_kl": 0.01, "sft_coef": 2.0}

METHODS = {                       # preset -> Config overrides, applied on top of the flags
    "opd": {},
    "sft-only": {"opd_coef": 0.0, "sft_coef": STABLE_OPD["sft_coef"]},   # the control: the mixture's NLL alone
    "stable-opd": dict(STABLE_OPD),
    "ref-kl": {"ref_kl": STABLE_OPD["ref_kl"]},
    "mixture": {"sft_coef": STABLE_OPD["sft_coef"]},
    "drop-trunc": {"trunc_weight": 0.0},
    "overlong": {"overlong_buffer": 12},          # last quarter of the 48-token budget
    "adv-log": {"adv_regulation": "log"},
    "adv-clip": {"adv_regulation": "clip"},
    "eos-mask": {"eos_mask": True},
    "rep-penalty": {"rep_penalty": 1.3},          # CTRL's 1.2-1.3 range
    "opd+guard": {"guard": True},
    "full-vocab": {"objective": "full"},
}


# =============================================================================
# 6. Real models: any Hugging Face causal LM pair, checked before step 0
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
        raise SystemExit(f"error: model {'file' if gguf else 'folder'} {path!r} does not exist. Give a folder written by "
                         "save_pretrained, a .gguf file, or a hub id such as Qwen/Qwen2.5-0.5B-Instruct.")
    if gguf:
        try:
            import accelerate, gguf as _  # noqa: F401  transformers' GGUF loader needs both
        except ImportError:
            raise SystemExit(f"error: {path!r} is a GGUF file; loading it needs the optional packages gguf and "
                             f"accelerate: {GGUF_INSTALL}") from None
    where, kw = (os.path.dirname(path) or ".", {"gguf_file": os.path.basename(path)}) if gguf else (path, {})
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: could not load a model from {path!r}: {e}\n"
                         "Give a folder written by save_pretrained or a hub id available offline "
                         "(HF_HUB_OFFLINE=1 uses the local cache only).") from None
    if gguf:       # save_pretrained refuses a model marked "quantized with gguf": same weights, unmarked
        del model.config.quantization_config
        plain = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
        plain.load_state_dict(model.state_dict())
        plain.generation_config, model = model.generation_config, plain
    # A shipped top_p=0.95 once silently truncated a trainer's "on-policy" samples (TRL PR #6337):
    # sample_rollouts never reads generation_config, so say that it is ignored.
    shipped = {k: getattr(model.generation_config, k, None) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    if any(v is not None and v != {"top_k": 0, "min_p": 0}.get(k, 1.0) for k, v in shipped.items()):
        print(f"[check] {path}: generation_config sets {', '.join(f'{k}={v}' for k, v in shipped.items() if v is not None)}; "
              "ignored: rollouts sample the full distribution at --temperature", flush=True)
    return tok, model.to(device)


def layer_dropped(model, keep):
    """A student made of the layers `keep` (indices) of `model`, with its embeddings, final
    norm and head: the layer-dropped initialisation of DistilBERT (Sanh et al. 2019,
    arXiv 1910.01108), which shares the teacher's tokenizer by construction."""
    student = copy.deepcopy(model)
    base = getattr(student, student.base_model_prefix)
    base.layers = torch.nn.ModuleList(base.layers[i] for i in keep)
    for i, layer in enumerate(base.layers):                    # the KV cache is indexed by layer_idx
        layer.self_attn.layer_idx = i
    student.config.num_hidden_layers = len(base.layers)
    if getattr(student.config, "layer_types", None):          # Qwen2: one attention type per layer
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def check_pair(tok_s, tok_t, model_s, model_t, prompts, max_new_tokens) -> bool:
    """The checks that catch the most common real-world OPD failures before the first step.
    Returns True when the two chat formats differ: the teacher then reads each prompt in its own."""
    vs, vt = model_s.get_output_embeddings().weight.shape[0], model_t.get_output_embeddings().weight.shape[0]
    probe = "The quick brown fox 123 =+ \u00e9"
    if tok_s.get_vocab() != tok_t.get_vocab() or tok_s(probe)["input_ids"] != tok_t(probe)["input_ids"]:
        raise SystemExit("error: student and teacher tokenizers differ (vocabularies or encodings). OPD scores the "
                         "student's token ids with the teacher, so both must share one tokenizer. Use a pair from "
                         "the same model family.")
    if vs != vt:
        raise SystemExit(f"error: output vocabulary sizes differ (student {vs}, teacher {vt}) although the tokenizers "
                         "match; the padded embedding rows would be scored as real tokens. Use a pair with equal sizes.")
    if tok_s.eos_token_id != tok_t.eos_token_id:
        raise SystemExit(f"error: EOS ids differ (student {tok_s.eos_token_id}, teacher {tok_t.eos_token_id}). The teacher "
                         "would score the student's stop token as an ordinary token and push it down: that alone causes "
                         "length inflation. Set both tokenizers' eos_token to the token the teacher ends its turns with.")
    if tok_s.pad_token_id is None:
        print("[check] warning: the student tokenizer has no pad token; using EOS as pad (masks use the first EOS).")
        tok_s.pad_token = tok_s.eos_token
    # Chat format: one probe conversation through each tokenizer's template. Rendered differently, a
    # teacher scoring the student's rendering would grade answers to a prompt format it never saw
    # (one report: +0.29 nats/token on the teacher's log-probs, tinker-cookbook #796). The response
    # ids mean the same to both (same vocabulary), so the teacher reads its own rendering instead.
    probe_s, probe_t = prompt_token_ids(tok_s, ["What is 2 + 2?"])[0], prompt_token_ids(tok_t, ["What is 2 + 2?"])[0]
    own_format = probe_s != probe_t
    if own_format:
        print(f"[check] chat formats differ: the student renders a prompt as {tok_s.decode(probe_s)!r}, the teacher as "
              f"{tok_t.decode(probe_t)!r}; the teacher scores each response after its own rendering of the prompt.", flush=True)
    for tok, model, role in ((tok_s, model_s, "student"), (tok_t, model_t, "teacher")):
        ctx = getattr(model.config, "max_position_embeddings", None)
        longest = max(len(ids) for ids in prompt_token_ids(tok, [p["prompt"] for p in prompts]))
        if ctx and longest + max_new_tokens > ctx:
            raise SystemExit(f"error: the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                             f"the {role}'s context ({ctx}). Shorten the prompts or lower --max-new-tokens.")
    return own_format


def read_prompts(path: str) -> list[dict]:
    """JSON lines of {"prompt": str, "answer": str (optional)}; a clear error on anything else."""
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
        rows.append({"prompt": row["prompt"], "answer": row.get("answer")})
    if not rows:
        raise SystemExit(f"error: prompt file {path!r} holds no prompts")
    return rows


def load_models_and_data(cfg: Config, device):
    """Student, frozen teacher, tokenizer and the prompt source, all through from_pretrained."""
    t_path, s_path = (cfg.teacher, cfg.student) if cfg.teacher else build_default_pair(cfg)
    # The student keeps float32 master weights: bf16 weights would round away updates of
    # lr ~1e-6. The frozen teacher needs no updates, so bf16 halves its memory on a GPU.
    tok_s, student = load_pretrained(s_path, device, torch.float32)
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok_t, teacher = (tok_s, copy.deepcopy(student)) if cfg.self_distill else load_pretrained(t_path, device, teacher_dtype)
    teacher.eval().requires_grad_(False)
    if cfg.prompts:
        rows = read_prompts(cfg.prompts)
        n_eval = min(cfg.eval_size, max(1, len(rows) // 8)) if len(rows) > 1 else 0
        eval_rows, train_rows = rows[:n_eval], rows[n_eval:] or rows
        answered = [r for r in train_rows if r["answer"] is not None]
        gold = answered[:cfg.gold_size] if cfg.gold_size else None       # None: each step's own answered prompts
        if cfg.sft_coef > 0 and not answered:
            raise SystemExit(f"error: --sft-coef needs reference answers, and no training prompt in {cfg.prompts} has an "
                             '"answer" field. Add answers or set --sft-coef 0.')
        data = {"eval": eval_rows, "sample": lambda n, rng: [rng.choice(train_rows) for _ in range(n)], "gold": gold}
    else:
        task = MotifTask(eval_size=cfg.eval_size)
        data = {"eval": task.eval_set, "sample": task.sample, "gold": task.gold_set(cfg.gold_size) if cfg.gold_size else None}
    own_format = check_pair(tok_s, tok_t, student, teacher, data["eval"] or [data["sample"](1, random.Random(0))[0]],
                            cfg.max_new_tokens)
    data["teacher_tok"] = tok_t if own_format else None         # the teacher reads prompts in its own chat format
    return student, teacher, tok_s, data


# =============================================================================
# 7. Scaling up: memory that does not grow with T x V
# =============================================================================
# token_terms (section 4) projects hidden states to the vocabulary `chunk_size` positions at
# a time under activation checkpointing: peak memory O(B * chunk * V) instead of O(B * T * V).
# With a 152k vocabulary, B=4 and T=1024 the unchunked float32 log-softmax alone is 2.5 GB.

def loss_peak_memory(vocab=152_000, batch=4, length=1024, hidden=256, chunk=0, full_kl=True) -> dict:
    """Peak CPU memory (MB) of one loss + backward on random hidden states (tutorial, section 7)."""
    import subprocess
    code = (f"import torch, resource, opd; torch.manual_seed(0);"
            f"hs=torch.randn({batch},{length},{hidden},requires_grad=True); ht=torch.randn({batch},{length},{hidden});"
            f"Ws=torch.nn.Linear({hidden},{vocab},bias=False); Wt=torch.nn.Linear({hidden},{vocab},bias=False).requires_grad_(False);"
            f"y=torch.randint(0,{vocab},({batch},{length})); base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            f"t=opd.token_terms(hs,Ws,ht,Wt,y,0,1.0,{chunk},full_kl={full_kl});"
            f"l=(t['kl_full'] if {full_kl} else -t['logp_student']).mean(); l.backward();"
            f"print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, float(l))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent).stdout.split()
    return {"base_mb": int(out[0]) / 1024, "peak_mb": int(out[1]) / 1024, "loss_mb": (int(out[1]) - int(out[0])) / 1024,
            "loss": float(out[2])}


# =============================================================================
# 8. Study and exercises: methods x seeds, the table and the plots
# =============================================================================

def config_for(base: Config, method: str, seed: int) -> Config:
    cfg = dataclasses.replace(base, seed=seed, run_name=base.run_name if base.seeds == 1 and base.run_name else "")
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for k, v in METHODS[method].items():          # a flag the user set wins over the preset
        if getattr(base, k) == defaults[k]:
            setattr(cfg, k, v)
    validate_config(cfg)                          # a preset combined with the flags must be valid too
    return cfg


def _run_job(args):
    cfg, method = args
    try:
        return method, cfg.seed, run_opd(cfg, method)
    except SystemExit as e:                 # a worker's SystemExit would hang the pool: re-raise as an error
        raise RuntimeError(str(e)) from None


def first_step(rows, key, above: float):
    """The first step whose `key` exceeds `above` ('' if none): e.g. the take-off, truncation > 0.3."""
    return next((r["step"] for r in rows if r.get(key, -math.inf) > above), "")


def summarize(method, seed, rows) -> dict:
    """One results.csv row: per-seed figures of the learning phase, the collapse and the alerts."""
    tr = [r for r in rows if "rollout/trunc_rate" in r]
    ev = [r for r in rows if "eval/accuracy" in r]
    acc, acc_s = [r["eval/accuracy"] for r in ev], [r["eval/accuracy_sampled"] for r in ev]
    takeoff = first_step(tr, "rollout/trunc_rate", 0.3)
    alert = next((r["step"] for r in tr if any(k.startswith("alert/") for k in r)), "")
    guard = next((r["step"] for r in tr if r.get("guard/acted")), "")
    return {"method": method, "seed": seed,
            "acc_step0": acc[0], "acc_peak": max(acc), "acc_peak_step": ev[acc.index(max(acc))]["step"], "acc_final": acc[-1],
            "acc_sampled_step0": acc_s[0], "acc_sampled_peak": max(acc_s), "acc_sampled_final": acc_s[-1],
            "trunc_rate_step0": tr[0]["rollout/trunc_rate"], "trunc_rate_max": max(r["rollout/trunc_rate"] for r in tr),
            "trunc_rate_final": tr[-1]["rollout/trunc_rate"],
            "quiet_steps": first_step(tr, "rollout/trunc_rate", 0.05) or len(tr),    # steps before truncation > 0.05
            "takeoff_step": takeoff,                                                  # truncation first > 0.3
            "len_mean_step0": tr[0]["rollout/len_mean"], "len_mean_max": max(r["rollout/len_mean"] for r in tr),
            "len_mean_final": tr[-1]["rollout/len_mean"],
            "rep_rate_step0": tr[0]["rollout/rep_rate"], "rep_rate_max": max(r["rollout/rep_rate"] for r in tr),
            "rep_rate_final": tr[-1]["rollout/rep_rate"],
            "first_alert_step": alert, "alert_lead": takeoff - alert if takeoff != "" and alert != "" else "",
            "guard_step": guard,
            "trunc_after_guard": max((r["rollout/trunc_rate"] for r in tr if r["step"] > guard), default="") if guard != "" else ""}


def study_plots_dir(cfg: Config) -> Path:
    """--plots-dir if given; plots/ for the default study and plots/all/ for `--methods all` (the
    committed figures); for any other setting <out_dir>/plots, so `--methods opd --seeds 1` does
    not overwrite them."""
    if cfg.plots_dir:
        return Path(cfg.plots_dir)
    neutral = {"workers", "threads", "device", "out_dir", "cache_dir", "plots_dir", "log_samples_every", "save_every", "resume"}
    changed = [f.name for f in dataclasses.fields(Config) if f.name not in neutral and getattr(cfg, f.name) != f.default]
    return Path("plots/all") if changed == ["methods"] and cfg.methods == "all" else \
        Path(cfg.out_dir) / "plots" if changed else Path("plots")


def study_workers(base: Config, n_jobs: int) -> int:
    """--workers, or by default one process per CPU core this process may use (each with
    --threads threads), never more than there are runs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(base.workers or cores // base.threads, n_jobs))


def run_study(base: Config):
    methods = list(METHODS) if base.methods == "all" else [m.strip() for m in base.methods.split(",") if m.strip()]
    jobs = [(config_for(base, m, base.seed + i), m) for i in range(base.seeds) for m in methods]
    load_models_and_data(base, torch.device(base.device))      # build or check the pair once, before any worker
    t0 = time.time()
    workers = study_workers(base, len(jobs))
    if workers > 1 and not base.teacher:                          # real models: one process, they fill the device
        import multiprocessing as mp
        print(f"[study] {len(jobs)} runs in {workers} processes of {base.threads} thread(s) each", flush=True)
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_run_job, jobs, chunksize=1)
    else:
        results = [_run_job(j) for j in jobs]
    print(f"[study] {len(jobs)} runs in {time.time() - t0:.0f}s", flush=True)
    rows = [summarize(m, s, r) for m, s, r in results]
    out = study_plots_dir(base)
    write_results(rows, out)
    plot_study(results, out)
    print(f"[study] table and figures in {out}/", flush=True)
    return rows


TABLE_COLS = ["acc_step0", "acc_peak", "acc_final", "acc_sampled_step0", "acc_sampled_peak", "acc_sampled_final",
              "trunc_rate_max", "rep_rate_max", "len_mean_max"]


def write_results(rows, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| method | seeds | " + " | ".join(TABLE_COLS) + " |", "|" + "---|" * (len(TABLE_COLS) + 2)]
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        cell = lambda c: f"{sum(r[c] for r in rs) / len(rs):.2f} ± {_std([r[c] for r in rs]):.2f}"
        lines.append(f"| {m} | {len(rs)} | " + " | ".join(cell(c) for c in TABLE_COLS) + " |")
    (out / "results.md").write_text("Mean ± standard deviation over seeds (`python opd.py`).\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _std(x):
    mu = sum(x) / len(x)
    return (sum((v - mu) ** 2 for v in x) / max(len(x) - 1, 1)) ** 0.5


def plot_study(results, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
        return [p[0] for p in pts], [p[1] for p in pts]

    def band(ax, runs, key, color, label):
        """Mean over seeds at the steps every seed logged, with the min-max band of the seeds."""
        pts = [dict(zip(*series(rows, key))) for rows in runs]
        steps = sorted(set.intersection(*(set(p) for p in pts)))
        vals = [[p[s] for p in pts] for s in steps]
        ax.plot(steps, [sum(v) / len(v) for v in vals], color=color, lw=1.6, label=label)
        if len(runs) > 1:
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.2, lw=0)

    def lines(ax, runs, key, color, label):
        for i, rows in enumerate(runs):
            ax.plot(*series(rows, key), color=color, lw=1.1, alpha=0.8, label=label if i == 0 else None)

    by_method = {}
    for m, s, rows in results:
        by_method.setdefault(m, []).append(rows)
    palette = iter(c for c in plt.cm.tab10.colors + plt.cm.Dark2.colors if c not in plt.cm.tab10.colors[:5])
    colors = {m: {"opd": "C3", "stable-opd": "C2", "sft-only": "C0", "opd+guard": "C4"}.get(m) or next(palette) for m in by_method}
    takeoffs = [first_step(rows, "rollout/trunc_rate", 0.3) for rows in by_method.get("opd", [])]
    out.mkdir(parents=True, exist_ok=True)
    # the headline: plain OPD against Stable-OPD and the SFT control, mean over seeds with the seeds' range
    head = [m for m in ("opd", "stable-opd", "sft-only") if m in by_method] or list(by_method)[:3]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2), sharex=True)
    for ax, (key, title) in zip(axes, [("eval/accuracy", "held-out accuracy, greedy"),
                                       ("eval/accuracy_sampled", "held-out accuracy, sampled (T of the loss)"),
                                       ("rollout/trunc_rate", "truncation rate (rollouts)"), ("rollout/rep_rate", "repetition rate (rollouts)")]):
        for m in head:
            band(ax, by_method[m], key, colors[m], m)
        for i, t in enumerate(x for x in takeoffs if x != ""):
            ax.axvline(t, color="C3", ls=":", lw=0.9, label="opd take-off (truncation > 0.3), per seed" if i == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("OPD step")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(" vs ".join(head) + ": accuracy, truncation and repetition (mean over seeds, band: range of the seeds)")
    fig.tight_layout()
    fig.savefig(out / "fig1_inflation.png", dpi=110)
    plt.close(fig)
    # every method: one panel each (accuracy and truncation), then final accuracy per method
    n = len(by_method) + 1
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.2 * ((n + cols - 1) // cols)), squeeze=False)
    axes = axes.ravel()
    for ax, (m, runs) in zip(axes, by_method.items()):
        band(ax, runs, "eval/accuracy", "C0", "accuracy (greedy)")
        band(ax, runs, "rollout/trunc_rate", "C3", "truncation rate")
        ax.set_title(m)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("OPD step")
    axes[0].legend(fontsize=8)
    bar = axes[len(by_method)]
    for i, (m, runs) in enumerate(by_method.items()):
        finals = [series(rows, "eval/accuracy")[1][-1] for rows in runs]
        bar.bar(i, sum(finals) / len(finals), color=colors[m], alpha=0.7)
        bar.plot([i] * len(finals), finals, "k.", ms=5)
    start = series(next(iter(by_method.values()))[0], "eval/accuracy")[1][0]
    bar.axhline(start, color="gray", ls="--", lw=1, label="step 0")
    bar.set_xticks(range(len(by_method)), list(by_method), rotation=60, ha="right", fontsize=8)
    bar.set_title("final accuracy (bar: mean, dots: seeds)")
    bar.legend(fontsize=8)
    for ax in axes[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "stabilizers.png", dpi=110)
    plt.close(fig)
    if "opd" not in by_method:
        return
    runs = by_method["opd"]

    def row(fname, panels):          # one figure, a panel per (title, [(key, color, label), ...]); dotted: take-offs
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
        for ax, (title, curves) in zip(axes, panels):
            for key, color, label in curves:
                lines(ax, runs, key, color, label)
            for t in (x for x in takeoffs if x != ""):
                ax.axvline(t, color="gray", ls=":", lw=0.8)
            ax.set_title(title)
            ax.set_xlabel("OPD step (dotted: take-off, per seed)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
    row("fig3_logprobs.png", [   # paper Fig. 3: log-probs, advantage, length
        ("log-prob of sampled tokens", [("logp/student", "C0", "log p_S(y_t)"), ("logp/teacher", "C1", "log p_T(y_t)")]),
        ("mean advantage", [("adv/mean", "C4", "mean advantage")]),
        ("mean rollout length", [("rollout/len_mean", "C3", "mean length")])])
    row("fig4_advantage.png", [  # paper Fig. 4: advantage on repetitive vs regular tokens; EOS probabilities
        ("advantage by token kind", [("adv/repetitive", "C3", "repetitive tokens"), ("adv/regular", "C0", "regular tokens")]),
        ("share of repetitive tokens", [("adv/repetitive_frac", "C3", "repetitive fraction")]),
        ("EOS probability at the stop", [("eos/p_student", "C0", "p_S(EOS) where it stopped"),
                                         ("eos/p_teacher", "C1", "p_T(EOS) where it stopped")])])
    if "opd+guard" in by_method:
        # the guard, seed by seed: plain OPD and opd+guard, with the alert, the action and OPD's take-off
        guarded, seeds = by_method["opd+guard"], [s for m, s, _ in results if m == "opd+guard"]
        fig, axes = plt.subplots(2, len(guarded), figsize=(4.5 * len(guarded), 6), squeeze=False, sharex=True)
        for j, (plain, g) in enumerate(zip(runs, guarded)):
            alert = next((r["step"] for r in g if any(k.startswith("alert/") for k in r)), None)
            acted = next((r["step"] for r in g if r.get("guard/acted")), None)
            for ax, key in zip(axes[:, j], ["rollout/trunc_rate", "eval/accuracy"]):
                ax.plot(*series(plain, key), color="C3", lw=1.2, label="opd")
                ax.plot(*series(g, key), color="C4", lw=1.2, label="opd+guard")
                for x, c, ls, lab in [(alert, "C1", "--", "first alert"), (acted, "C4", ":", "guard acted"),
                                      (takeoffs[j] if j < len(takeoffs) else "", "C3", ":", "opd take-off")]:
                    if x not in (None, ""):
                        ax.axvline(x, color=c, ls=ls, lw=1.2, label=lab)
                ax.set_ylim(-0.02, 1.02)
                ax.set_title(f"seed {seeds[j]}: {key}", fontsize=9)
            axes[1, j].set_xlabel("OPD step")
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "guard.png", dpi=110)
        plt.close(fig)


def parse_config(argv=None) -> Config:
    """The command line, generated from Config: --help is the documentation."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=f.default, help=f.metadata["help"])
    p.error = lambda message: p.exit(2, f"error: {message} (python opd.py --help lists every flag)\n")  # one line
    cfg = Config(**vars(p.parse_args(argv)))
    validate_config(cfg)
    return cfg


if __name__ == "__main__":
    cfg = parse_config()
    try:
        run_study(cfg)
    except KeyboardInterrupt:
        again = " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0], *sys.argv[1:]] if a != "--resume")
        raise SystemExit(f"\ninterrupted: every completed step is in {cfg.out_dir}/<run>/metrics.jsonl; the cached model "
                         "pair is intact. " + (f"Each run keeps a checkpoint every {cfg.save_every} steps; continue with:\n"
                                               f"  {again} --resume" if cfg.save_every else
                                               "Without --save-every there is no checkpoint: rerun the same command to start over."))
