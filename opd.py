"""On-policy distillation (OPD) and its length inflation, in one file.

The student samples responses to prompts, the frozen teacher scores the very tokens the
student sampled, and the student is trained to lower the reverse KL KL(p_S || p_T) on the
states it visits itself (GKD, Agarwal et al. 2024, arXiv 2306.13649). Luo et al. 2026
(arXiv 2604.08527) showed that this can fail abruptly: the rollouts grow until they fill
the length budget, turn repetitive, and accuracy falls ("length inflation"). This file
runs OPD on a small model pair on which it first teaches the student and then collapses,
measures both with the paper's metrics, warns before the collapse, and compares the
stabilizers proposed for it against a supervised control on the same seeds.

    python opd.py                                   # the study: opd, stable-opd, sft-only, opd+guard
    python opd.py --methods all                     # every stabilizer preset (plots/all/)
    python opd.py --methods opd --seeds 1           # one plain OPD run
    python opd.py --methods opd --seeds 1 --ref-kl 0.1 --sft-coef 0.5   # your own mix
    python opd.py --teacher PATH --student PATH --prompts FILE --device cuda  # real models
    python opd.py --replot                          # redraw the table and figures from runs/
    python opd.py --help                            # every option, with its reason

Deliberately left out, compared with the paper's setup: no PPO/GRPO ratio or clipping
(one update per batch of rollouts, so the ratio is 1 and clipping is inert); one rollout
per prompt instead of a group (OPD's advantage needs no group baseline); a synthetic task
and a two-layer model pair instead of math problems and 1.5B/7B models; and zlib's
compression test is scaled down from a 10,000-character tail to a 24-token one.

Sections (tutorial.md has the same headings, in the same order). 1-5 are OPD itself;
below the banner that follows them is the machinery a real run needs.
  1. OPD in one page            objectives, masks, loss aggregation
  2. Task and model pair        synthetic task, tokenizer, the teacher and student and how they are built
  3. Monitor                    length, truncation and repetition metrics; alerts
  4. Length inflation reproduced rollouts, per-token terms, the training loop
  5. Stabilizers                one small function per fix, opd_loss() that composes them, the guard
  ---- OPD ends here ----
  6. Real models                any Hugging Face pair or GGUF file, the checks before step 0
  7. Scaling up                 timing, memory of the chunked loss, run folders, checkpoint and resume
  8. Study and exercises        presets, flag validation, the study, its table, signals and plots, the CLI
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


def _f(default, why, neutral=False):
    """A config field with its one-line reason (shown by --help). neutral: the flag changes no
    number a run computes (where files go, how often to save, how many processes)."""
    return field(default=default, metadata={"help": why, "neutral": neutral})


@dataclass
class Config:
    # --- what to run
    methods: str = _f("opd,stable-opd,sft-only,opd+guard", "comma-separated presets (section 5, METHODS in section 8), "
                      "each run on every seed; 'all': every preset")
    seeds: int = _f(3, "number of seeds per method (seed, seed+1, ...)")
    seed: int = _f(0, "first seed; the only source of randomness (torch and the task sampler)")
    run_name: str = _f("", "run folder name under out_dir, for a command that makes one run; empty: '<method>-s<seed>'")
    out_dir: str = _f("runs", "each run writes out_dir/<run_name>/metrics.jsonl", neutral=True)
    plots_dir: str = _f("", "study figures, results.csv, results.md; empty: plots/ for the default study, "
                            "<out_dir>/plots for any other, so a one-off run leaves the committed figures alone",
                        neutral=True)
    replot: bool = _f(False, "train nothing: redraw the table and figures from the run folders in --out-dir", neutral=True)
    device: str = _f("cpu", "'cpu' or 'cuda'; the default pair is small enough for a CPU")
    workers: int = _f(0, "parallel processes for the study; 0: one per CPU core, at most one per run, each with "
                         "--threads 1 (small models use one core well); with --teacher, 0 means one process", neutral=True)
    threads: int = _f(1, "torch threads per process (set on purpose: the thread count changes the last bits)")
    # --- model pair (empty paths: the default pair of section 2)
    teacher: str = _f("", "teacher folder, .gguf file (needs gguf + accelerate) or hub id; empty: the default teacher")
    student: str = _f("", "student folder, .gguf file (needs gguf + accelerate) or hub id; empty: the default student")
    prompts: str = _f("", "JSON-lines file of {'prompt': ..., 'answer': optional, 'accept': optional regex}; "
                          "empty: the synthetic task")
    teacher_context: str = _f("", "JSON file: a list of chat messages the teacher reads before every prompt "
                                  "(privileged-context distillation, section 6); the student sees the prompt alone")
    cache_dir: str = _f(".cache", "a default pair built with other settings is saved here, in a folder keyed by them",
                        neutral=True)
    teacher_layers: int = _f(2, "two layers: enough to count motif repeats reliably")
    teacher_width: int = _f(128, "hidden size of the teacher")
    teacher_steps: int = _f(2400, "supervised steps of the teacher's build: long enough for its stop and loop habits "
                                  "to settle, so that independent builds agree")
    teacher_free_frac: float = _f(0.5, "share of the teacher's training that is free repetition text (no count, no "
                                       "EOS): the habit of continuing a pattern that a pretrained LM has")
    teacher_overrun_frac: float = _f(0.15, "share of over-run text: counted prompts whose text runs on past k repeats "
                                           "(no loss on the first 2 extra), so deep loops become absorbing")
    student_layers: int = _f(2, "same depth as the teacher but half the width: can learn, starts weaker")
    student_width: int = _f(64, "hidden size of the student")
    student_steps: int = _f(400, "SFT warm-up steps on the gold set: the student is an SFT checkpoint, as in the paper")
    student_free_frac: float = _f(0.0, "free text in the student's warm-up (see --teacher-free-frac)")
    gold_size: int = _f(256, "reference solutions in the fixed gold set (the student's warm-up, --sft-coef): complete "
                             "solutions are scarce where OPD is used; 0: each step's own prompts' answers")
    pretrain_lr: float = _f(3e-3, "AdamW lr for building the pair (small models, short schedules)")
    pair_seed: int = _f(0, "seed of the default pair's build (initial weights and data order); 0 with the default "
                           "settings is the shipped pair (pair/), any other builds an independent pair into --cache-dir")
    # --- OPD
    steps: int = _f(300, "OPD updates per run: a learning phase, then room for the collapse (tutorial, section 4)")
    batch_size: int = _f(128, "prompts per step, one rollout each")
    lr: float = _f(1.5e-3, "AdamW peak lr for OPD, large for a small model and a short run")
    temperature: float = _f(1.0, "sampling AND loss temperature; they must match for on-policy samples")
    max_new_tokens: int = _f(48, "length budget: 2.4x the longest correct answer (20 tokens)")
    objective: str = _f("sampled", "'sampled': A_t = log p_T(y_t) - log p_S(y_t), loss -A_t log p_S(y_t); "
                                   "'full': KL(p_S||p_T) over the vocabulary")
    loss_agg: str = _f("token-mean", "verl's names: token-mean | seq-mean-token-mean | seq-mean-token-sum | "
                                     "seq-mean-token-sum-norm")
    warmup: int = _f(150, "linear lr warm-up steps: the student learns while the lr is small, and the feedback of the "
                          "loops builds up once it is large")
    decay: float = _f(0.1, "share of the steps, at the end, with the lr decaying linearly to 0 (warmup-stable-decay), "
                           "so a run's final accuracy is read on a settled student, not on one noisy step")
    grad_clip: float = _f(1.0, "global grad-norm clip, as in most RL fine-tuning recipes")
    chunk_size: int = _f(0, "positions per chunk of the loss (section 7); 0: all at once")
    length_groups: int = _f(4, "teacher/student forwards run on this many length-sorted slices of the batch, "
                               "each cut to its longest response (section 7); 1: one forward padded to the longest")
    opd_coef: float = _f(1.0, "weight of the OPD term; 0 with --sft-coef is the sft-only control")
    # --- stabilizers (section 5); all off by default: plain OPD
    ref_kl: float = _f(0.0, "beta of beta*KL(p_S || p_ref), p_ref = frozen initial student (Stable-OPD)")
    sft_coef: float = _f(0.0, "lambda of the NLL on reference solutions from the gold set (rollout mixture)")
    trunc_weight: float = _f(1.0, "loss weight of truncated rollouts: 0 drops them (DAPO overlong filtering)")
    overlong_buffer: int = _f(0, "DAPO soft overlong penalty over the last B tokens of the budget; 0: off")
    adv_regulation: str = _f("none", "'none' | 'log': sign(A)log(1+|A|) | 'clip': A clipped to +-adv_clip")
    adv_clip: float = _f(1.0, "bound for adv_regulation='clip'")
    eos_mask: bool = _f(False, "zero the advantage on EOS tokens: the teacher cannot train stopping away")
    rep_penalty: float = _f(1.0, "CTRL repetition penalty while sampling (>1 on); rollouts are then off-policy")
    guard: bool = _f(False, "on a monitor alert: restore the last healthy student and switch on Stable-OPD")
    # --- monitor (section 3)
    rep_window: int = _f(24, "tokens of the tail the compression test looks at: half the budget")
    rep_tau: float = _f(3.0, "CompRatio above which a tail is repetitive: 24-token loops score 3.4-4.8, random "
                             "tails 1.0-2.1 (zlib's overhead on 96 bytes)")
    alert_max_len: int = _f(0, "alert when a rollout is longer than this (the starter's check); 0: off, one long "
                               "rollout is noise")
    alert_trunc: float = _f(0.2, "alert when the truncation rate exceeds this")
    alert_rep: float = _f(0.02, "alert when the repetition rate exceeds this: 3 or more looping rollouts in 128")
    alert_growth: float = _f(0.4, "alert when mean length exceeds its EMA by this fraction")
    alert_patience: int = _f(2, "an alert fires once its condition held this many consecutive steps: one noisy "
                                "batch is not an alarm")
    # --- evaluation and logging
    eval_every: int = _f(20, "held-out evaluation (greedy and sampled) every N steps")
    eval_size: int = _f(256, "held-out prompts: standard error of the accuracy ~0.03")
    log_samples_every: int = _f(50, "print a few decoded rollouts every N steps", neutral=True)
    save_student: bool = _f(False, "save the final student with save_pretrained in the run folder", neutral=True)
    save_every: int = _f(10, "write <run folder>/checkpoint.pt every N steps and at the end; 0: off. A checkpoint "
                             "holds the student and AdamW's two moments: raise N for real models", neutral=True)
    resume: bool = _f(False, "continue each run from its checkpoint.pt (same flags; --steps may grow); "
                             "a run without one starts at step 0", neutral=True)
    self_distill: bool = _f(False, "sanity mode: the teacher is the student itself; the loss must be 0")


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


LOSS_AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")   # verl's names


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
    raise ValueError(f"unknown loss_agg {mode!r}; use " + ", ".join(LOSS_AGG))


# =============================================================================
# 2. Task and model pair
# =============================================================================
# Task "repeat the motif k times": prompt "c a f x 3 =", answer "c a f c a f c a f <eos>".
# Why this task: the answer is checkable, and its LENGTH is the hard part. Copying the
# motif is easy; knowing when to stop requires counting, which a 2-layer width-128 teacher
# learns and a width-64 student after a short warm-up only half learns. A student unsure
# where to stop is exactly where length inflation starts. (A task whose answer length is
# fixed by the prompt, e.g. reversal, did not inflate at all: see the tutorial.)
# build_default_pair() records each model's held-out accuracy with evaluate() (section 4).

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


def prompt_token_ids(tokenizer, texts: list[str], context=()) -> list[list[int]]:
    """Token ids of each prompt, unpadded; through the chat template if the tokenizer has one,
    after the `context` messages if any (a teacher with privileged context, section 6)."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([*context, {"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(texts)["input_ids"]                        # BOS added as the tokenizer does


def left_pad(seqs: list[list[int]], pad: int, device="cpu"):
    """(B, T) ids left-padded with `pad` and the (B, T) attention mask: generation appends on the right."""
    T = max(len(x) for x in seqs)
    ids = torch.tensor([[pad] * (T - len(x)) + x for x in seqs], device=device)                 # (B, T)
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in seqs], device=device)       # (B, T)
    return ids, mask


def position_ids(attn: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that start at 0 on each row's first real token: left padding takes none."""
    return (attn.cumsum(-1) - 1).clamp(min=0)


def encode_batch(tokenizer, texts: list[str], device="cpu", context=()):
    """Left-padded prompt ids (B, P) and attention mask (B, P)."""
    return left_pad(prompt_token_ids(tokenizer, texts, context), tokenizer.pad_token_id, device)


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
    """Mean NLL of the reference answers (the pair's build and the rollout mixture of section 5)."""
    input_ids, attn, labels = supervised_batch(tokenizer, examples, device)
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids(attn)).logits.float()  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def lr_factor(step: int, steps: int, warmup: int, decay: float, floor: float = 0.0) -> float:
    """Warmup-stable-decay: linear warm-up over `warmup` steps, constant, then a linear decay to
    `floor` over the last `decay` share of the steps (OPD: the last 10% to 0; the pair's build:
    the whole run, to 5%)."""
    return min(1.0, (step + 1) / max(warmup, 1)) * max(floor, min(1.0, (steps - step) / max(round(decay * steps), 1)))


def train_supervised(model, tokenizer, draw, steps, lr, rng, name, device="cpu", batch_size=64):
    """Plain SFT on batches from `draw(n, rng)` (a list of examples); progress printed as it goes.
    The lr warms up over 50 steps, then decays linearly over the whole run to 5% (lr_factor)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, 50, 1.0, floor=0.05))
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
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits[:, -1].float()  # (B, V)
        out[d] = round(F.softmax(logits, -1)[:, tokenizer.eos_token_id].mean().item(), 3)
    return out


# A build's weights depend on the thread count (the order of floating-point reductions) and on
# the CPU's instruction set: builds run on one thread, and the default pair ships in pair/, so
# every machine starts from the same weights.
BUILD_THREADS = 1
SHIPPED = Path(__file__).resolve().parent / "pair"


def build_settings(cfg: Config, role: str) -> dict:
    """Every setting one model of the default pair depends on (its cache key is their hash)."""
    build = {k: getattr(cfg, f"{role}_{k}") for k in ("layers", "width", "steps", "free_frac")}
    build.update(role=role, lr=cfg.pretrain_lr, task_version=3, threads=BUILD_THREADS, pair_seed=cfg.pair_seed)
    build.update(overrun_frac=cfg.teacher_overrun_frac) if role == "teacher" else build.update(gold_size=cfg.gold_size)
    return build


def model_key(cfg: Config, role: str) -> str:
    return hashlib.sha1(json.dumps(build_settings(cfg, role), sort_keys=True).encode()).hexdigest()[:10]


def default_pair(cfg: Config) -> tuple[str, str]:
    """Folders of the default teacher and student: the shipped ones (pair/) when the build settings
    are those it was built with, else build_default_pair()'s, in --cache-dir."""
    shipped = [SHIPPED / role for role in ("teacher", "student")]
    if all((d / "build.json").exists() and json.loads((d / "build.json").read_text()).get("key") == model_key(cfg, d.name)
           for d in shipped):
        return str(shipped[0]), str(shipped[1])
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
        print(f"[build] no cached {role} at {d}; training it (teacher ~9 min, student ~30 s on one CPU core)", flush=True)
        t0, threads = time.time(), torch.get_num_threads()
        seed = {"teacher": 0, "student": 1}[role] + 2 * cfg.pair_seed
        torch.manual_seed(seed)
        torch.set_num_threads(BUILD_THREADS)
        tokenizer, task = build_tokenizer(), MotifTask()
        model = make_model(tokenizer, getattr(cfg, f"{role}_layers"), getattr(cfg, f"{role}_width"))
        train_supervised(model, tokenizer, pretraining_mix(task, cfg, role), getattr(cfg, f"{role}_steps"),
                         cfg.pretrain_lr, random.Random(seed), role)
        torch.set_num_threads(threads)
        tmp = d.with_name(f"{d.name}.tmp{os.getpid()}")     # private: parallel builds do not collide
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        ev = evaluate(model, tokenizer, task.eval_set, cfg.max_new_tokens, generator=torch.Generator().manual_seed(0))
        info = {"role": role, "key": model_key(cfg, role), "settings": build_settings(cfg, role),
                "build_s": round(time.time() - t0, 1), "params": sum(p.numel() for p in model.parameters()),
                "accuracy": ev["accuracy"], "accuracy_sampled": ev["accuracy_sampled"],
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

    def __init__(self, eos_id: int, max_len: int, max_len_alert: int = 0, trunc: float = 0.2, rep: float = 0.02,
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


# =============================================================================
# 4. Length inflation reproduced: rollouts, per-token terms, the loop
# =============================================================================
# The loop, run_opd(), is six numbered phases. It calls opd_loss() and the Guard of section 5
# for the loss and its stabilizers; the machinery below the banner loads the models
# (load_models_and_data, section 6), times the phases (Laps) and keeps the run's folder,
# log and checkpoints (RunLog, section 7).

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
    pos = position_ids(attn)                                     # (b, P) left padding aware
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
    loss projects them chunk by chunk (token_terms)."""
    base = getattr(model, model.base_model_prefix)
    return base(input_ids=input_ids, attention_mask=attn, position_ids=position_ids(attn)).last_hidden_state


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


def token_terms(h_s, head_s, h_t, head_t, tokens, eos_id: int, temperature: float = 1.0, chunk: int = 0,
                full_kl: bool = False, h_ref=None, head_ref=None) -> dict:
    """Per-token quantities of the loss and the metrics, from hidden states.

    Returns (B, T) tensors: logp_student (with grad unless full_kl), logp_teacher, p_eos_student,
    p_eos_teacher, and kl_full = KL(p_S || p_T) (with grad) if full_kl, kl_ref =
    KL(p_S || p_ref) (with grad) if h_ref is given. With chunk > 0 the vocabulary
    projection and log-softmax run `chunk` positions at a time and are recomputed in the
    backward pass, so no (B, T, V) tensor is ever alive (section 7).
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


def exact_match(tokenizer, ids, answer) -> bool:
    """A response (token ids, EOS included if it stopped) equals the reference answer as text."""
    return bool(ids) and ids[-1] == tokenizer.eos_token_id and \
        tokenizer.decode(ids[:-1], skip_special_tokens=True).strip() == answer.strip()


def is_correct(tokenizer, ids, example) -> bool:
    """The grader: a response that stopped and matches the example's "accept" regex (the skill,
    whatever the wording), or else equals its "answer" (exact match, the toy task's grader)."""
    if example.get("accept") is not None:
        return bool(ids) and ids[-1] == tokenizer.eos_token_id and \
            re.search(example["accept"], tokenizer.decode(ids[:-1], skip_special_tokens=True)) is not None
    return exact_match(tokenizer, ids, example["answer"])


def graded(example) -> bool:
    """Whether an example says what is correct (prompts without an answer are only trained on)."""
    return example.get("answer") is not None or example.get("accept") is not None


@torch.no_grad()
def evaluate(model, tokenizer, examples, max_new_tokens: int, device="cpu", batch_size: int = 128,
             window: int = 24, tau: float = 3.0, temperature: float = 1.0, generator=None, context=()) -> dict:
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
            toks = sample_rollouts(model, ids, attn, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                   temperature, greedy=greedy, generator=generator)                  # (b, T)
            _, lengths, _ = response_mask(toks, tokenizer.eos_token_id)
            for j, e in enumerate(batch):
                seqs.append(toks[j, :lengths[j]].tolist())
                correct += graded(e) and is_correct(tokenizer, seqs[-1], e)
        accuracy = correct / max(sum(map(graded, examples)), 1)
        if greedy:
            out = dict(length_stats(seqs, tokenizer.eos_token_id, max_new_tokens, window, tau), accuracy=accuracy)
        else:
            out["accuracy_sampled"] = accuracy
    model.train(was_training)
    return out


def rollout_metrics(terms, mask, lengths, truncated, seqs, eos_id, cfg) -> dict:
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
        adv = sampled_token_advantage(lp_t, lp_s)                # (B, T) before any stabilizer
        kl_tok = terms["kl_full"].detach() if cfg.objective == "full" else -adv  # per-token reverse KL (estimate)
        p_s, p_t = terms["p_eos_student"][idx, last], terms["p_eos_teacher"][idx, last]     # (B,) at the stop
        return {
            "kl/reverse": avg(kl_tok, mask),
            "logp/student": avg(lp_s, mask), "logp/teacher": avg(lp_t, mask), "adv/mean": avg(adv, mask),
            "adv/repetitive": avg(adv, rep_tok), "adv/regular": avg(adv, reg_tok),
            "adv/repetitive_frac": (rep_tok.sum() / n).item(),
            "eos/p_student": p_s[stopped].mean().item() if stopped.any() else float("nan"),
            "eos/p_teacher": p_t[stopped].mean().item() if stopped.any() else float("nan"),
            "eos/teacher_lower_frac": (p_t < p_s)[stopped].float().mean().item() if stopped.any() else float("nan"),
            **({"kl/ref": avg(terms["kl_ref"].detach(), mask)} if "kl_ref" in terms else {}),
        }


METRIC_KEYS = [  # documented in the tutorial, section 3; a test checks every run logs them all
    "step", "loss/total", "loss/opd", "kl/reverse", "rollout/len_mean", "rollout/len_max", "rollout/len_p90",
    "rollout/trunc_rate", "rollout/rep_rate", "rollout/ngram_rep", "logp/student", "logp/teacher", "adv/mean",
    "adv/repetitive", "adv/regular", "adv/repetitive_frac", "eos/p_student", "eos/p_teacher", "eos/teacher_lower_frac",
    "eval/accuracy", "eval/len_mean", "eval/len_max", "eval/trunc_rate", "eval/rep_rate", "eval/ngram_rep",
    "eval/accuracy_sampled", "rollout/accuracy", "time/rollout_s", "time/teacher_s", "time/update_s", "time/eval_s",
    "time/tokens_per_s"]


def run_opd(cfg: Config, method: str = "opd"):
    """One OPD run: sample, score, update, monitor; writes out_dir/<run_name>/metrics.jsonl."""
    torch.manual_seed(cfg.seed)                                  # the one seed
    rng, gold_rng = random.Random(cfg.seed), random.Random(f"gold-{cfg.seed}")   # own streams: every method sees the same prompts
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    eval_gen = torch.Generator(device).manual_seed(cfg.seed)     # sampled evaluation draws from this alone
    student, teacher, tokenizer, data = load_models_and_data(cfg, device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ref = copy.deepcopy(student).eval().requires_grad_(False) if cfg.ref_kl > 0 or cfg.guard else None   # p_ref
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup, cfg.decay))
    monitor = LengthMonitor(eos, cfg.max_new_tokens, cfg.alert_max_len, cfg.alert_trunc, cfg.alert_rep,
                            cfg.alert_growth, window=cfg.rep_window, tau=cfg.rep_tau, patience=cfg.alert_patience)
    guard = Guard() if cfg.guard else None
    loss_kw = loss_settings(cfg)                                 # what opd_loss() computes; only the guard changes it
    run = RunLog(cfg, method, student=student, opt=opt, sched=sched, streams=(rng, gold_rng, eval_gen),
                 monitor=monitor, guard=guard, loss_kw=loss_kw)
    held_out = lambda: {f"eval/{k}": v for k, v in evaluate(
        student, tokenizer, data["eval"], cfg.max_new_tokens, device, window=cfg.rep_window, tau=cfg.rep_tau,
        temperature=cfg.temperature, generator=eval_gen).items()}
    for step in range(run.start, cfg.steps):
        lap, m = Laps(device), {"step": step}
        if step % cfg.eval_every == 0:                           # held-out evaluation, before this step's update
            m.update(held_out())
            lap("eval")
        # --- 1. the student samples one response per prompt, at the loss temperature
        batch = data["sample"](cfg.batch_size, rng)
        p_ids, p_attn = encode_batch(tokenizer, [e["prompt"] for e in batch], device)          # (B, P)
        resp = sample_rollouts(student.eval(), p_ids, p_attn, cfg.max_new_tokens, eos, pad, cfg.temperature,
                               rep_penalty=cfg.rep_penalty)                                       # (B, T)
        student.train()
        mask, lengths, truncated = response_mask(resp, eos)                                     # (B, T), (B,), (B,)
        P, seq, attn = p_ids.shape[1], torch.cat([p_ids, resp], 1), torch.cat([p_attn, mask.long()], 1)  # (B, P+T)
        lap("rollout")
        # --- 2. the teacher scores the same tokens, after its own rendering of the prompt when it
        # differs (another chat format or a privileged context, section 6); the reference model too
        t_ids, t_attn = (p_ids, p_attn) if data["teacher_prompts"] is None else \
            left_pad(data["teacher_prompts"]([e["prompt"] for e in batch]), pad, device)          # (B, P_t)
        with torch.no_grad():
            h_t = response_hidden_states(teacher, torch.cat([t_ids, resp], 1), torch.cat([t_attn, mask.long()], 1),
                                         t_ids.shape[1], cfg.length_groups)                       # (B, T, H_t)
            h_ref = response_hidden_states(ref, seq, attn, P, cfg.length_groups) if loss_kw["ref_kl"] > 0 else None
        lap("teacher")
        # --- 3. the student's one forward: loss and metrics both come from it (metrics alone,
        # with no graph, when no loss term needs it: the sft-only control)
        with torch.set_grad_enabled(loss_kw["opd_coef"] > 0 or loss_kw["ref_kl"] > 0):
            h_s = response_hidden_states(student, seq, attn, P, cfg.length_groups)            # (B, T, H_s)
            terms = token_terms(h_s, student.get_output_embeddings(), h_t, teacher.get_output_embeddings(), resp,
                                eos, cfg.temperature, cfg.chunk_size, full_kl=cfg.objective == "full", h_ref=h_ref,
                                head_ref=ref.get_output_embeddings() if h_ref is not None else None)  # (B, T) each
        # --- 4. the loss: the objective with every stabilizer that is on (section 5); the rollout
        # mixture's references come from the fixed gold set, or are the step's own answers
        gold = ([gold_rng.choice(data["gold"]) for _ in batch] if data["gold"] else
                [e for e in batch if e.get("answer") is not None]) if loss_kw["sft_coef"] > 0 else []
        loss, parts = opd_loss(terms["logp_student"], terms["logp_teacher"], resp, eos, kl_full=terms["kl_full"],
                               kl_ref=terms.get("kl_ref"), sft=sft_nll(student, tokenizer, gold, device) if gold else None,
                               **loss_kw)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at step {step} ({loss.item()}). Lower --lr, check the models' dtype (bf16 logits "
                f"are upcast here), or try --adv-regulation clip. {run.dir / 'metrics.jsonl'} holds every step "
                "logged so far; the student was not updated with this loss.")
        # --- 5. one AdamW step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        lap("update")
        # --- 6. the monitor reads the rollouts; the guard acts on its first alert
        seqs = [resp[i, :lengths[i]].tolist() for i in range(resp.shape[0])]
        marked = [(s, e) for s, e in zip(seqs, batch) if graded(e)]
        m.update({"loss/total": loss.item(), "loss/opd": parts["opd"].item(),
                  "rollout/accuracy": sum(is_correct(tokenizer, s, e) for s, e in marked) / len(marked) if marked else math.nan,
                  **rollout_metrics(terms, mask, lengths, truncated, seqs, eos, cfg),
                  **{k if k.startswith("alert/") else f"rollout/{k}": v for k, v in monitor.update(seqs, step).items()},
                  **{f"time/{k}_s": v for k, v in lap.times.items()},
                  "time/tokens_per_s": float(mask.sum()) / max(lap.times["rollout"], 1e-9)})
        if guard and (changes := guard.step(monitor, step, student, opt, loss_kw)):
            loss_kw.update(changes)
            m["guard/acted"] = 1
            print(f"[guard] step {step}: restored the student of step {guard.saved['step']}, now {changes}", flush=True)
        run.log(m, [(e["prompt"], tokenizer.decode(s)) for e, s in zip(batch[:2], seqs)])
    run.log({"step": cfg.steps, **held_out()})                   # the final evaluation
    return run.close(student, tokenizer)


# =============================================================================
# 5. Stabilizers
# =============================================================================
# Each is one term of the loss or one transformation of the advantage, and all compose in
# opd_loss(): the function to copy into another training loop. The Guard switches Stable-OPD
# on mid-run when the monitor raises an alert.

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


def opd_loss(logp_student, logp_teacher, tokens, eos_id: int, *, kl_full=None, kl_ref=None, sft=None,
             objective="sampled", loss_agg="token-mean", max_len=None, opd_coef=1.0, ref_kl=0.0, sft_coef=0.0,
             trunc_weight=1.0, overlong_buffer=0, adv_regulation="none", adv_clip=1.0, eos_mask=False):
    """The whole loss of one batch of rollouts: the OPD objective of section 1 with every
    stabilizer that is on. The defaults are plain sampled-token OPD.

    Inputs, (B, T) over the response tokens: logp_student (with grad) and logp_teacher of the
    sampled `tokens`; the mask is every token up to the first `eos_id` (response_mask).
    kl_full: KL(p_S || p_T) per position, with grad, for objective='full'; kl_ref: KL(p_S || p_ref)
    per position, for ref_kl > 0; sft: the NLL of a batch of reference solutions (a scalar, with
    grad), for sft_coef > 0. max_len: the length budget (overlong penalty, seq-mean-token-sum-norm).
    Returns (loss, parts), parts holding each term before its coefficient.
    """
    mask, lengths, truncated = response_mask(tokens, eos_id)                 # (B, T), (B,), (B,)
    adv = sampled_token_advantage(logp_teacher, logp_student)                # (B, T)
    if overlong_buffer > 0:
        adv = adv + overlong_penalty(lengths, max_len, overlong_buffer)[:, None]
    if adv_regulation != "none":
        adv = regulate_advantage(adv, adv_regulation, adv_clip)
    if eos_mask:
        adv = eos_advantage_mask(adv, tokens, eos_id)
    per_token = kl_full if objective == "full" else sampled_token_loss(adv, logp_student)   # (B, T)
    parts = {"opd": aggregate_loss(per_token, truncation_weights(mask, truncated, trunc_weight), loss_agg, max_len)}
    loss = opd_coef * parts["opd"]
    if ref_kl > 0:                                               # Stable-OPD's divergence constraint
        parts["ref_kl"] = aggregate_loss(kl_ref, mask, loss_agg, max_len)
        loss = loss + ref_kl * parts["ref_kl"]
    if sft_coef > 0 and sft is not None:                         # Stable-OPD's rollout mixture
        parts["sft"] = sft
        loss = loss + sft_coef * sft
    return loss, parts


def loss_settings(cfg: Config) -> dict:
    """opd_loss()'s keyword settings from the flags: the objective and every stabilizer."""
    return dict(objective=cfg.objective, loss_agg=cfg.loss_agg, max_len=cfg.max_new_tokens, opd_coef=cfg.opd_coef,
                ref_kl=cfg.ref_kl, sft_coef=cfg.sft_coef, trunc_weight=cfg.trunc_weight,
                overlong_buffer=cfg.overlong_buffer, adv_regulation=cfg.adv_regulation, adv_clip=cfg.adv_clip,
                eos_mask=cfg.eos_mask)


# Stable-OPD = reference KL + rollout mixture distillation (Luo et al. 2026, Sec. 4). The
# paper gives no coefficients; ref_kl 0.01 is what third-party Stable-OPD adapters use, and
# sft_coef was chosen by measurement (tutorial, section 5).
STABLE_OPD = {"ref_kl": 0.01, "sft_coef": 2.0}


class Guard:
    """Acts once, on the monitor's first alert: restores the last quiet student (a copy of the
    student and optimizer every `every` steps while no alert is active) and returns the
    opd_loss() settings that switch Stable-OPD on. After that the alerts are only reported."""

    def __init__(self, every: int = 5):
        self.every, self.saved, self.acted = every, None, False

    def step(self, monitor: LengthMonitor, step: int, student, opt, loss_kw: dict) -> dict:
        """The settings to change in loss_kw: {} until the guard acts."""
        if self.acted:
            return {}
        if not monitor.active:
            if step % self.every == 0:
                self.saved = {"step": step, "model": copy.deepcopy(student.state_dict()),
                              "opt": copy.deepcopy(opt.state_dict())}
            return {}
        if self.saved is None:
            return {}
        student.load_state_dict(self.saved["model"])
        opt.load_state_dict(self.saved["opt"])
        self.acted = True
        return {k: max(loss_kw[k], v) for k, v in STABLE_OPD.items()}


# #############################################################################
#   OPD ends here. Below: the machinery around it. Real models and the checks
#   before step 0, timing, run folders, checkpoint and resume, the study with
#   its presets, table, warning signals and figures, and the command line.
#   The loop above uses three of its pieces: load_models_and_data, Laps, RunLog.
# #############################################################################


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


def check_pair(tok_s, tok_t, model_s, model_t, prompts, max_new_tokens, context=()) -> bool:
    """The checks that catch the most common real-world OPD failures before the first step.
    Returns True when the teacher must read each prompt in a rendering of its own: its chat
    format differs from the student's, or it reads a privileged `context` first."""
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
    if context and not getattr(tok_t, "chat_template", None):
        raise SystemExit("error: --teacher-context needs a teacher tokenizer with a chat template, to render the "
                         "context messages before each prompt")
    for tok, model, role, ctx_msgs in ((tok_s, model_s, "student", ()), (tok_t, model_t, "teacher", context)):
        ctx = getattr(model.config, "max_position_embeddings", None)
        longest = max(len(ids) for ids in prompt_token_ids(tok, [p["prompt"] for p in prompts], ctx_msgs))
        if ctx and longest + max_new_tokens > ctx:
            raise SystemExit(f"error: the longest prompt ({longest} tokens{', context included' if ctx_msgs else ''}) plus "
                             f"max_new_tokens ({max_new_tokens}) exceeds the {role}'s context ({ctx}). Shorten the prompts "
                             "or lower --max-new-tokens.")
    return own_format or bool(context)


def read_context(path: str) -> list[dict]:
    """--teacher-context: a JSON list of chat messages {"role": "user"|"assistant"|"system", "content": str}."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: teacher context file {path!r} does not exist")
    try:
        msgs = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path} is not valid JSON ({e.msg}); it must be a list of chat messages") from None
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in msgs):
        raise SystemExit(f'error: {path} must be a non-empty JSON list of {{"role": "system"|"user"|"assistant", '
                         '"content": "..."}} messages')
    return msgs


def read_prompts(path: str) -> list[dict]:
    """JSON lines of {"prompt": str, "answer": str, "accept": regex, "split": "eval" | "train"}, all
    but the prompt optional ("answer": the reference for exact match and --sft-coef; "accept": a regex
    that a correct response matches, the grader then; "split": "eval" holds the row out); a clear
    error on anything else."""
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
                raise SystemExit(f'error: {path}:{n} has an "accept" field that is not a regular expression ({e})') from None
        if row.get("split", "train") not in ("train", "eval"):
            raise SystemExit(f'error: {path}:{n} has "split": {row["split"]!r}; use "train" or "eval"')
        rows.append({"prompt": row["prompt"], "answer": row.get("answer"), "accept": row.get("accept"),
                     "split": row.get("split", "train")})
    if not rows:
        raise SystemExit(f"error: prompt file {path!r} holds no prompts")
    return rows


def load_models_and_data(cfg: Config, device):
    """Student, frozen teacher, tokenizer and the prompt source, all through from_pretrained."""
    t_path, s_path = (cfg.teacher, cfg.student) if cfg.teacher else default_pair(cfg)
    # The student keeps float32 master weights: bf16 weights would round away updates of
    # lr ~1e-6. The frozen teacher needs no updates, so bf16 halves its memory on a GPU.
    tok_s, student = load_pretrained(s_path, device, torch.float32)
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok_t, teacher = (tok_s, copy.deepcopy(student)) if cfg.self_distill else load_pretrained(t_path, device, teacher_dtype)
    teacher.eval().requires_grad_(False)
    if cfg.prompts:
        rows = read_prompts(cfg.prompts)
        if any(r["split"] == "eval" for r in rows):                    # held out as the file says
            eval_rows, train_rows = [r for r in rows if r["split"] == "eval"][:cfg.eval_size], [r for r in rows if r["split"] == "train"]
        else:                                                           # else the first eighth (at most --eval-size)
            n_eval = min(cfg.eval_size, max(1, len(rows) // 8)) if len(rows) > 1 else 0
            eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
        train_rows = train_rows or rows
        answered = [r for r in train_rows if r["answer"] is not None]
        gold = answered[:cfg.gold_size] if cfg.gold_size else None       # None: each step's own answered prompts
        if cfg.sft_coef > 0 and not answered:
            raise SystemExit(f"error: --sft-coef needs reference answers, and no training prompt in {cfg.prompts} has an "
                             '"answer" field. Add answers or set --sft-coef 0.')
        data = {"eval": eval_rows, "sample": lambda n, rng: [rng.choice(train_rows) for _ in range(n)], "gold": gold}
    else:
        task = MotifTask(eval_size=cfg.eval_size)
        data = {"eval": task.eval_set, "sample": task.sample, "gold": task.gold_set(cfg.gold_size) if cfg.gold_size else None}
    context = read_context(cfg.teacher_context) if cfg.teacher_context else []
    own = check_pair(tok_s, tok_t, student, teacher, data["eval"] or [data["sample"](1, random.Random(0))[0]],
                     cfg.max_new_tokens, context)
    # None: the teacher reads the student's prompt ids; else its own rendering, context first
    data["teacher_prompts"] = (lambda texts: prompt_token_ids(tok_t, texts, context)) if own else None
    return student, teacher, tok_s, data


# =============================================================================
# 7. Scaling up: timing, memory, run folders, checkpoint and resume
# =============================================================================
# token_terms (section 4) projects hidden states to the vocabulary `chunk_size` positions at
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


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLog:
    """A run's folder, out_dir/<run_name>: config.json, metrics.jsonl (one JSON object per step,
    written as it goes) and checkpoint.pt (every --save-every steps). An earlier run's log is
    kept as metrics.prev.jsonl. With --resume, `state` (the objects a checkpoint holds: student,
    opt, sched, streams, monitor, guard, loss_kw) is restored in place, the steps before the
    checkpoint are kept, and `start` is the step to go on from."""

    def __init__(self, cfg: Config, method: str, **state):
        self.cfg, self.state, self.tag = cfg, state, f"[{method} s{cfg.seed}]"
        self.dir = Path(cfg.out_dir) / (cfg.run_name or f"{method}-s{cfg.seed}")
        self.dir.mkdir(parents=True, exist_ok=True)
        metrics, self.ckpt = self.dir / "metrics.jsonl", self.dir / "checkpoint.pt"
        self.start, kept = 0, []
        if cfg.resume and self.ckpt.exists():
            self.start = load_checkpoint(self.ckpt, cfg, **state)
            kept = [r for r in read_metrics(metrics) if r["step"] < self.start] if metrics.exists() else []
            print(f"{self.tag} resumed at step {self.start} from {self.ckpt}", flush=True)
        elif cfg.resume:
            print(f"{self.tag} no checkpoint at {self.ckpt}: starting at step 0", flush=True)
        if metrics.exists():                                     # never lose an earlier run's log
            metrics.replace(self.dir / "metrics.prev.jsonl")
        (self.dir / "config.json").write_text(json.dumps(dict(dataclasses.asdict(cfg), method=method), indent=1))
        self.file = open(metrics, "w", buffering=1)              # line-buffered: a crash keeps every logged step
        self.file.writelines(json.dumps(r) + "\n" for r in kept)

    def log(self, m: dict, samples=()):
        """Write one step's metrics, checkpoint when due, print the step's line (and `samples`)."""
        self.file.write(json.dumps(m) + "\n")
        step, cfg = m["step"], self.cfg
        if "loss/total" not in m:                                # the final evaluation
            print(f"{self.tag} step {step:4d} final: acc {m['eval/accuracy']:.3f} (sampled {m['eval/accuracy_sampled']:.3f})",
                  flush=True)
            return
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(self.ckpt, step + 1, cfg, **self.state)
        print(f"{self.tag} step {step:4d} loss {m['loss/total']:+.4f} kl {m['kl/reverse']:.3f} "
              f"len {m['rollout/len_mean']:5.1f} trunc {m['rollout/trunc_rate']:.2f} rep {m['rollout/rep_rate']:.2f} "
              f"adv {m['adv/mean']:+.3f}" + (f" acc {m['eval/accuracy']:.3f}" if "eval/accuracy" in m else ""), flush=True)
        if cfg.log_samples_every and step % cfg.log_samples_every == 0:
            for prompt, text in samples:
                print(f"    {prompt!r} -> {text!r}", flush=True)

    def close(self, student, tokenizer) -> list[dict]:
        """Close the log, print where the time went, save the student if asked; returns every step's metrics."""
        self.file.close()
        rows = read_metrics(self.dir / "metrics.jsonl")
        spent = {k: sum(r.get(f"time/{k}_s", 0.0) for r in rows) for k in ("rollout", "teacher", "update", "eval")}
        total = max(sum(spent.values()), 1e-9)
        print(f"{self.tag} time: " + ", ".join(f"{k} {v:.1f}s ({v / total:.0%})" for k, v in spent.items()), flush=True)
        if self.cfg.device.startswith("cuda"):
            print(f"{self.tag} peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
        if self.cfg.save_student:
            student.save_pretrained(self.dir / "student")
            tokenizer.save_pretrained(self.dir / "student")
        return rows


def save_checkpoint(path: Path, step: int, cfg: Config, student, opt, sched, streams, monitor, guard, loss_kw):
    """Everything the loop needs to go on as if it had never stopped: `step` is the next step to
    run. Written to a temporary file and renamed over the last checkpoint (an atomic replace),
    so a kill mid-write leaves the previous one usable."""
    state = {"step": step, "config": dataclasses.asdict(cfg), "student": student.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "streams": [r.getstate() if isinstance(r, random.Random) else r.get_state() for r in streams],
             "monitor": vars(monitor), "guard": vars(guard) if guard else None, "loss_kw": dict(loss_kw)}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# flags that may differ between a checkpoint and the command that resumes it: those that change
# no number, and those that say where and how long a run goes on
RESUME_MAY_CHANGE = {"steps", "methods", "seeds", "run_name", "threads", "device"}


def load_checkpoint(path: Path, cfg: Config, student, opt, sched, streams, monitor, guard, loss_kw) -> int:
    """Restore what save_checkpoint wrote, in place; returns the next step. Refuses a checkpoint
    written with other settings, which would splice two different runs together."""
    ck = torch.load(path, map_location=cfg.device, weights_only=False)   # this file's own pickle: RNG, monitor state
    free = RESUME_MAY_CHANGE | {f.name for f in dataclasses.fields(Config) if f.metadata["neutral"]}
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
    if guard and ck["guard"]:
        guard.__dict__.update(ck["guard"])
    loss_kw.update(ck["loss_kw"])
    return ck["step"]


# =============================================================================
# 8. Study and exercises: presets, flags, the study, its table, signals and figures
# =============================================================================

METHODS = {                       # preset -> Config overrides; a flag given on the command line wins
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


def parse_methods(methods: str) -> list[str]:
    """--methods as a list of preset names ('all': every preset)."""
    return list(METHODS) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]


def validate_config(cfg: Config) -> None:
    """Every flag's allowed values and combinations, in one place, checked before anything is
    built or loaded. A bad value prints one line naming the flag, the value and what is
    allowed, and exits with code 2 (argparse's code for a usage error); warnings go on."""
    methods = parse_methods(cfg.methods)
    floats = [f.name for f in dataclasses.fields(Config) if f.type in ("float", float)]
    rules = [  # (field, holds, what is allowed)
        *[(name, math.isfinite(getattr(cfg, name)), "a finite number") for name in floats],
        ("methods", bool(methods) and all(m in METHODS for m in methods), "'all' or a comma-separated list of " + ", ".join(METHODS)),
        ("seeds", cfg.seeds >= 1, ">= 1"),
        ("seed", cfg.seed >= 0, ">= 0"),
        ("pair_seed", cfg.pair_seed >= 0, ">= 0"),
        ("run_name", not cfg.run_name or len(methods) * cfg.seeds == 1,
         f"empty for a command that makes {len(methods) * cfg.seeds} runs (--methods x --seeds): each run needs a folder of its own"),
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


def config_for(base: Config, method: str, seed: int, given=frozenset()) -> Config:
    """The config of one run: `base` with the preset's settings, except for the flags in `given`
    (those set on the command line), which win: --methods stable-opd --sft-coef 1.0."""
    cfg = dataclasses.replace(base, seed=seed)
    for k, v in METHODS[method].items():
        if k not in given:
            setattr(cfg, k, v)
    validate_config(cfg)                          # a preset combined with the flags must be valid too
    return cfg


def _run_job(args):
    cfg, method = args
    try:
        return run_opd(cfg, method)
    except SystemExit as e:                 # a worker's SystemExit would hang the pool: re-raise as an error
        raise RuntimeError(str(e)) from None


def study_workers(base: Config, n_jobs: int) -> int:
    """--workers, or by default one process per CPU core this process may use (each with
    --threads threads), never more than there are runs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(base.workers or cores // base.threads, n_jobs))


def run_study(base: Config, given=frozenset()):
    """Every method of --methods on --seeds seeds, then the table and figures from the run folders."""
    runs = [(m, base.seed + i) for i in range(base.seeds) for m in parse_methods(base.methods)]
    if not base.replot:
        jobs = [(config_for(base, m, s, given), m) for m, s in runs]
        load_models_and_data(base, torch.device(base.device))      # build or check the pair once, before any worker
        t0 = time.time()        # real models fill a device: one process unless --workers asks for more
        workers = study_workers(base, len(jobs)) if base.workers or not base.teacher else 1
        if workers > 1:
            import multiprocessing as mp
            print(f"[study] {len(jobs)} runs in {workers} processes of {base.threads} thread(s) each", flush=True)
            with mp.get_context("spawn").Pool(workers) as pool:
                pool.map(_run_job, jobs, chunksize=1)
        else:
            for job in jobs:
                _run_job(job)
        print(f"[study] {len(jobs)} runs in {time.time() - t0:.0f}s", flush=True)
    results = []
    for m, s in runs:
        path = Path(base.out_dir) / (base.run_name or f"{m}-s{s}") / "metrics.jsonl"
        if not path.exists():
            raise SystemExit(f"error: no run at {path}; run the study first, or drop --replot")
        results.append((m, s, read_metrics(path)))
    out = study_plots_dir(base)
    rows = [summarize(m, s, r) for m, s, r in results]
    write_results(rows, out)
    plot_study(results, out)
    print(f"[study] table and figures in {out}/", flush=True)
    return rows


def study_plots_dir(cfg: Config) -> Path:
    """--plots-dir if given; plots/ for the default study and plots/all/ for `--methods all` (the
    committed figures); for any other setting <out_dir>/plots, so `--methods opd --seeds 1` does
    not overwrite them."""
    if cfg.plots_dir:
        return Path(cfg.plots_dir)
    changed = [f.name for f in dataclasses.fields(Config) if not f.metadata["neutral"] and getattr(cfg, f.name) != f.default]
    return Path("plots/all") if changed == ["methods"] and cfg.methods == "all" else \
        Path(cfg.out_dir) / "plots" if changed else Path("plots")


TAKEOFF = 0.3                     # a run has taken off once its rollouts' truncation rate exceeds this


def first_step(rows, key, above: float):
    """The first step whose `key` exceeds `above` ('' if none): e.g. the take-off, truncation > TAKEOFF."""
    return next((r["step"] for r in rows if r.get(key, -math.inf) > above), "")


def summarize(method, seed, rows) -> dict:
    """One results.csv row: per-seed figures of the learning phase, the collapse and the alerts."""
    tr = [r for r in rows if "rollout/trunc_rate" in r]
    ev = [r for r in rows if "eval/accuracy" in r]
    acc, acc_s = [r["eval/accuracy"] for r in ev], [r["eval/accuracy_sampled"] for r in ev]
    takeoff = first_step(tr, "rollout/trunc_rate", TAKEOFF)
    alert = next((r["step"] for r in tr if any(k.startswith("alert/") for k in r)), "")
    guard = next((r["step"] for r in tr if r.get("guard/acted")), "")
    return {"method": method, "seed": seed,
            "acc_step0": acc[0], "acc_peak": max(acc), "acc_peak_step": ev[acc.index(max(acc))]["step"], "acc_final": acc[-1],
            "acc_sampled_step0": acc_s[0], "acc_sampled_peak": max(acc_s), "acc_sampled_final": acc_s[-1],
            "trunc_rate_step0": tr[0]["rollout/trunc_rate"], "trunc_rate_max": max(r["rollout/trunc_rate"] for r in tr),
            "trunc_rate_final": tr[-1]["rollout/trunc_rate"],
            "quiet_steps": first_step(tr, "rollout/trunc_rate", 0.05) or len(tr),    # steps before truncation > 0.05
            "takeoff_step": takeoff,
            "len_mean_step0": tr[0]["rollout/len_mean"], "len_mean_max": max(r["rollout/len_mean"] for r in tr),
            "len_mean_final": tr[-1]["rollout/len_mean"],
            "rep_rate_step0": tr[0]["rollout/rep_rate"], "rep_rate_max": max(r["rollout/rep_rate"] for r in tr),
            "rep_rate_final": tr[-1]["rollout/rep_rate"],
            "first_alert_step": alert, "alert_lead": takeoff - alert if takeoff != "" and alert != "" else "",
            "guard_step": guard,
            "trunc_after_guard": max((r["rollout/trunc_rate"] for r in tr if r["step"] > guard), default="") if guard != "" else ""}


TABLE_COLS = ["acc_step0", "acc_peak", "acc_final", "acc_sampled_step0", "acc_sampled_peak", "acc_sampled_final",
              "trunc_rate_max", "rep_rate_max", "len_mean_max"]


def write_results(rows, out: Path, source: str = "`python opd.py`"):
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
    (out / "results.md").write_text(f"Mean ± standard deviation over seeds ({source}).\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _std(x):
    mu = sum(x) / len(x)
    return (sum((v - mu) ** 2 for v in x) / max(len(x) - 1, 1)) ** 0.5


# Which signal warns first? Each candidate is one number per training step, computed from a
# run's logged metrics; signal_table() scores them against the take-off (tutorial, section 4).

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
            runs.append((int(seed) in fit_seeds, first_step(tr, "rollout/trunc_rate", TAKEOFF), warning_signals(rows)))

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


# One colour per method, the same in every figure; seeds of one method are told apart by a
# sequential colour map instead, so a seed is never mistaken for a method.
METHOD_COLORS = {"opd": "#d62728", "stable-opd": "#2ca02c", "sft-only": "#1f77b4", "opd+guard": "#9467bd",
                 "ref-kl": "#ff7f0e", "mixture": "#bcbd22", "drop-trunc": "#8c564b", "overlong": "#e377c2",
                 "adv-log": "#7f7f7f", "adv-clip": "#17becf", "eos-mask": "#393b79", "rep-penalty": "#000000",
                 "full-vocab": "#e6ab02"}
PANELS = {"eval/accuracy": ("held-out accuracy, greedy", "exact match"),
          "eval/accuracy_sampled": ("held-out accuracy, sampled at the loss temperature", "exact match"),
          "rollout/trunc_rate": ("truncation rate of the rollouts", "share of rollouts"),
          "rollout/rep_rate": ("repetition rate of the rollouts", "share of rollouts")}


def plot_study(results, out: Path, head=None, colors=None):
    """The study's figures from [(method, seed, rows)], rows as read from each run's metrics.jsonl;
    `head`: the methods of Fig. 1 (default: opd, stable-opd, sft-only); `colors`: extra method colours."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows, key, gaps=False):
        """(steps, values) of `key`; with gaps, NaN on training steps without a value (a break in the line)."""
        pts = [(r["step"], r.get(key, math.nan)) for r in rows if key in r or (gaps and "rollout/trunc_rate" in r)]
        pts = [(s, v) for s, v in pts if gaps or v == v]
        return [s for s, _ in pts], [v for _, v in pts]

    def seeds_and_mean(ax, runs, key, color, label, ls="-"):
        """Each seed as a thin line, their mean (at the steps every seed logged) as a thick one."""
        pts = [dict(zip(*series(rows, key))) for rows in runs]
        for p in pts:
            ax.plot(list(p), list(p.values()), color=color, lw=0.7, alpha=0.35, ls=ls)
        steps = sorted(set.intersection(*(set(p) for p in pts)))
        ax.plot(steps, [sum(p[s] for p in pts) / len(pts) for s in steps], color=color, lw=2.0, ls=ls, label=label)

    def seed_colors(n):
        return [plt.cm.viridis(x) for x in ([0.45] if n == 1 else [0.05 + 0.8 * i / (n - 1) for i in range(n)])]

    def robust_ylim(ax, values, lo_q=0.02, hi_q=0.98):
        """A y range that one spike cannot flatten: the 2nd to 98th percentile of the values, padded."""
        v = sorted(x for x in values if math.isfinite(x))
        if len(v) > 10:
            lo, hi = v[int(lo_q * (len(v) - 1))], v[int(hi_q * (len(v) - 1))]
            pad = 0.15 * (hi - lo or 1.0)
            ax.set_ylim(lo - pad, hi + pad)

    by_method = {}
    for m, s, rows in results:
        by_method.setdefault(m, []).append((s, rows))
    palette = {**METHOD_COLORS, **(colors or {})}
    color = lambda m: palette.get(m, "#555555")
    takeoffs = {m: [first_step(rows, "rollout/trunc_rate", TAKEOFF) for _, rows in runs] for m, runs in by_method.items()}
    out.mkdir(parents=True, exist_ok=True)
    n_seeds = max(len(r) for r in by_method.values())

    # Fig. 1, the headline: plain OPD against Stable-OPD and the SFT control
    head = head or [m for m in ("opd", "stable-opd", "sft-only") if m in by_method] or list(by_method)[:3]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (key, (title, ylabel)) in zip(axes.ravel(), PANELS.items()):
        for m in head:
            seeds_and_mean(ax, [rows for _, rows in by_method[m]], key, color(m), m)
        for i, (m, t) in enumerate((m, t) for m in head for t in takeoffs[m] if t != ""):
            ax.axvline(t, color=color(m), ls=":", lw=1.0, label="take-off of one seed (truncation > 0.3)" if i == 0 else None)
        ax.set(title=title, ylabel=ylabel, ylim=(-0.02, 1.02))
    for ax in axes[1]:
        ax.set_xlabel("OPD step")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{', '.join(head)}: thick = mean of {n_seeds} seeds, thin = each seed")
    fig.tight_layout()
    fig.savefig(out / "fig1_inflation.png", dpi=110)
    plt.close(fig)

    # every method: accuracy and truncation, one panel each, then the final accuracy of each
    n = len(by_method) + 1
    cols = min(n, 4)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.0 * rows_n), squeeze=False)
    axes = axes.ravel()
    for ax, (m, runs) in zip(axes, by_method.items()):
        seeds_and_mean(ax, [rows for _, rows in runs], "eval/accuracy", color(m), "held-out accuracy (greedy)")
        seeds_and_mean(ax, [rows for _, rows in runs], "rollout/trunc_rate", color(m), "truncation rate", ls="--")
        ax.set(title=m, ylim=(-0.02, 1.02), xlabel="OPD step")
    axes[0].legend(fontsize=7, loc="center left")
    bar = axes[len(by_method)]
    for i, (m, runs) in enumerate(by_method.items()):
        finals = [series(rows, "eval/accuracy")[1][-1] for _, rows in runs]
        bar.bar(i, sum(finals) / len(finals), color=color(m), alpha=0.75)
        bar.plot([i] * len(finals), finals, "k.", ms=5)
    start = series(next(iter(by_method.values()))[0][1], "eval/accuracy")[1][0]
    bar.axhline(start, color="gray", ls="--", lw=1, label="step 0")
    bar.set_xticks(range(len(by_method)), list(by_method), rotation=60, ha="right", fontsize=8)
    bar.set(title="final held-out accuracy (bar: mean, dots: seeds)", ylabel="exact match", ylim=(0, 1))
    bar.legend(fontsize=8)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle("each method: held-out accuracy (solid) and truncation rate (dashed); thick = mean, thin = seeds")
    fig.tight_layout()
    fig.savefig(out / "stabilizers.png", dpi=110)
    plt.close(fig)
    if "opd" not in by_method:
        return
    runs, shades = by_method["opd"], seed_colors(len(by_method["opd"]))
    labels = [f"seed {s}" + (f" (take-off {t})" if t != "" else "") for (s, _), t in zip(runs, takeoffs["opd"])]

    def per_seed(ax, key, title, ylabel, ls="-", label=True):
        for (s, rows), c, lab, t in zip(runs, shades, labels, takeoffs["opd"]):
            ax.plot(*series(rows, key), color=c, lw=1.1, ls=ls, label=lab if label else None)
            if t != "":
                ax.axvline(t, color=c, ls=":", lw=0.9)
        ax.set(title=title, ylabel=ylabel, xlabel="OPD step (dotted: each seed's take-off)")

    # Fig. 3 (the paper's Fig. 3): log-probs of the sampled tokens, advantage, length; plain OPD
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    per_seed(axes[0, 0], "logp/student", "student log-prob of its sampled tokens", "mean log p_S(y_t)")
    per_seed(axes[0, 1], "logp/teacher", "teacher log-prob of the same tokens", "mean log p_T(y_t)")
    per_seed(axes[1, 0], "adv/mean", "mean advantage (minus the per-token reverse KL)", "mean A_t")
    per_seed(axes[1, 1], "rollout/len_mean", "mean rollout length", "tokens")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("plain OPD, one line per seed")
    fig.tight_layout()
    fig.savefig(out / "fig3_logprobs.png", dpi=110)
    plt.close(fig)

    # Fig. 4 (the paper's Fig. 4): advantage of repetitive and regular tokens, per seed; then the
    # share of repetitive tokens and the EOS probabilities where the rollouts stopped
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * max(len(runs), 2), 7), squeeze=False)
    for ax, (s, rows), t in zip(axes[0], runs, takeoffs["opd"]):
        x, rep = series(rows, "adv/repetitive", gaps=True)
        ax.plot(x, rep, color="#e6550d", lw=1.0, marker=".", ms=3, label="tokens in a repetitive tail")
        ax.plot(*series(rows, "adv/regular", gaps=True), color="#636363", lw=1.0, label="all other tokens")
        if t != "":
            ax.axvline(t, color="k", ls=":", lw=0.9, label="take-off")
        robust_ylim(ax, rep + series(rows, "adv/regular")[1])
        ax.set(title=f"seed {s}: mean advantage by token kind", ylabel="mean A_t (gaps: no repetitive token)",
               xlabel="OPD step")
    axes[0, 0].legend(fontsize=7)
    per_seed(axes[1, 0], "adv/repetitive_frac", "share of tokens in a repetitive tail", "share of response tokens")
    axes[1, 0].legend(fontsize=7)
    if len(runs) > 1:
        per_seed(axes[1, 1], "eos/p_student", "p(EOS) where a rollout stopped", "p(EOS)", label=False)
        per_seed(axes[1, 1], "eos/p_teacher", "p(EOS) where a rollout stopped", "p(EOS)", ls="--", label=False)
        axes[1, 1].legend(handles=[matplotlib.lines.Line2D([], [], color="k", ls=ls, label=lab) for ls, lab in
                                   (("-", "student"), ("--", "teacher"))], fontsize=7)
    for ax in axes[1, 2:]:
        per_seed(ax, "kl/reverse", "per-token reverse KL (sampled estimate)", "nats per token", label=False)
    fig.suptitle("plain OPD: the paper's mechanism, repetitive tokens against the rest")
    fig.tight_layout()
    fig.savefig(out / "fig4_advantage.png", dpi=110)
    plt.close(fig)

    if "opd+guard" not in by_method:
        return
    # the guard, seed by seed: plain OPD and opd+guard, with the alert, the action and OPD's take-off
    guarded = by_method["opd+guard"]
    fig, axes = plt.subplots(2, len(guarded), figsize=(4.2 * len(guarded), 6), squeeze=False, sharex=True)
    for j, ((s, g), t) in enumerate(zip(guarded, takeoffs["opd"])):
        plain = dict(runs).get(s, [])
        alert = next((r["step"] for r in g if any(k.startswith("alert/") for k in r)), None)
        acted = next((r["step"] for r in g if r.get("guard/acted")), None)
        for ax, key in zip(axes[:, j], ["rollout/trunc_rate", "eval/accuracy"]):
            ax.plot(*series(plain, key), color=color("opd"), lw=1.2, label="opd")
            ax.plot(*series(g, key), color=color("opd+guard"), lw=1.2, label="opd+guard")
            for x, c, ls, lab in [(alert, "#ff7f0e", "--", "first alert"), (acted, color("opd+guard"), ":", "guard acted"),
                                  (t, color("opd"), ":", "opd take-off")]:
                if x not in (None, ""):
                    ax.axvline(x, color=c, ls=ls, lw=1.2, label=lab)
            ax.set(ylim=(-0.02, 1.02), title=f"seed {s}: {PANELS[key][0]}", ylabel=PANELS[key][1])
            ax.title.set_fontsize(9)
        axes[1, j].set_xlabel("OPD step")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "guard.png", dpi=110)
    plt.close(fig)


def parse_config(argv=None) -> tuple[Config, frozenset]:
    """The command line, generated from Config (--help is the documentation). Returns the config
    and the names of the flags given, which win over a method preset's settings."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        flag, why = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default: {f.default!r})"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=why)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, help=why)
    p.error = lambda message: p.exit(2, f"error: {message} (python opd.py --help lists every flag)\n")  # one line
    given = vars(p.parse_args(argv))                 # only the flags on the command line (SUPPRESS)
    cfg = Config(**given)
    validate_config(cfg)
    return cfg, frozenset(given)


if __name__ == "__main__":
    cfg, given = parse_config()
    try:
        run_study(cfg, given)
    except KeyboardInterrupt:
        again = " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0], *sys.argv[1:]] if a != "--resume")
        raise SystemExit(f"\ninterrupted: every completed step is in {cfg.out_dir}/<run>/metrics.jsonl; the model "
                         "pair is intact. " + (f"Each run keeps a checkpoint every {cfg.save_every} steps; continue with:\n"
                                               f"  {again} --resume" if cfg.save_every else
                                               "Without --save-every there is no checkpoint: rerun the same command to start over."))
