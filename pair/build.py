"""How the shipped pair in pair/ was built: a teacher with a real LM's habit of continuing a
pattern, and a student that is an SFT checkpoint on the gold set. A build is just another pair:
it writes OUT/teacher and OUT/student with save_pretrained, and a run on it passes them.

    python pair/build.py OUT                     # the shipped pair's settings (~9 min, one core)
    python pair/build.py OUT --pair-seed 1       # an independent build: other weights, data order
    python opd.py --teacher OUT/teacher --student OUT/student

The weights depend on the CPU's instruction set and the thread count (builds run on one thread),
so a rebuild of pair/ on another machine gives another pair: that is why it ships as files.
OUT/SHA256SUMS lists every file, as pair/SHA256SUMS does; a role whose build.json records the
same settings is kept, not rebuilt.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import opd  # noqa: E402

SPECIAL = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}


@dataclass
class Build:
    """A pair's build settings; build.json records them beside the model's held-out figures."""
    pair_seed: int = 0             # initial weights and data order; 0 with the rest: pair/
    teacher_layers: int = 2        # enough to count motif repeats reliably
    teacher_width: int = 128
    teacher_steps: int = 2400      # long enough for its stop and loop habits to settle
    teacher_free_frac: float = 0.5      # free repetition text (no count, no EOS): a
    #                                     pretrained LM's habit of continuing a pattern
    teacher_overrun_frac: float = 0.15  # counted prompts whose text runs on: deep loops absorb
    student_layers: int = 2        # the teacher's depth at half the width: learns, starts weaker
    student_width: int = 64
    student_steps: int = 400       # SFT on the gold set: the student is an SFT checkpoint
    student_free_frac: float = 0.0
    gold_size: int = 256           # the student's gold set, the one --sft-coef draws from
    pretrain_lr: float = 3e-3      # small models, short schedules
    threads: int = 1               # the thread count changes the last bits of every weight


def build_tokenizer():
    """A real transformers tokenizer over a word-level vocabulary, with BOS/EOS/PAD."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = [SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"]] + opd.LETTERS \
        + [str(c) for c in opd.COUNTS] + ["x", "="]
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


def free_text(task: opd.MotifTask, rng: random.Random, max_len: int = 48):
    """'Web text' for the teacher: a motif repeated with no count and no end. A language
    model pretrained on such text learns the habit of continuing a pattern."""
    motif = rng.choice(task.train_motifs)
    text = " ".join((list(motif) * max_len)[:rng.randint(8, max_len)])
    return {"prompt": "", "answer": text, "eos": False}


def overrun_text(task: opd.MotifTask, rng: random.Random, max_len: int = 48,
                 free_repeats: int = 2):
    """A counted prompt whose text runs on past k repeats and never ends. No loss on the
    answer and on the first `free_repeats` extra repeats (`skip`), so the teacher still
    stops at k and keeps its doubt one or two repeats later; deeper in, continuing is all
    it saw. Real LMs do this: the longer a loop, the likelier its next repeat (Xu et al.
    2022, "Learning to Break the Loop", arXiv 2206.02369)."""
    motif, k = rng.choice(task.train_motifs), rng.choice(opd.COUNTS)
    n = len(motif) * (k + free_repeats)
    text = " ".join((list(motif) * max_len)[:rng.randint(n + 1, max(n + 1, max_len))])
    return {"prompt": " ".join(motif) + f" x {k} =", "eos": False, "skip": n, "answer": text}


def pretraining_mix(task: opd.MotifTask, b: Build, role: str):
    """What each model is trained on, as draw(n, rng) -> examples. Teacher: the task, free text
    (the pattern-continuing habit) and over-run text (loops that deepen). Student: the fixed gold
    set (--gold-size; 0: fresh task samples), an SFT checkpoint on the reference solutions that
    OPD's stabilizers may also use."""
    free = getattr(b, f"{role}_free_frac")
    overrun = b.teacher_overrun_frac if role == "teacher" else 0.0
    gold = task.gold_set(b.gold_size) if role == "student" and b.gold_size else None

    def draw(n, rng):
        n_free, n_over = round(n * free), round(n * overrun)
        n_main = n - n_free - n_over
        main = [rng.choice(gold) for _ in range(n_main)] if gold else task.sample(n_main, rng)
        return main + [free_text(task, rng) for _ in range(n_free)] + \
            [overrun_text(task, rng) for _ in range(n_over)]
    return draw


def train_supervised(model, tokenizer, draw, steps, lr, rng, name, device="cpu", batch_size=64):
    """Plain SFT on batches from `draw(n, rng)` (a list of examples); progress printed as it
    goes. The lr warms up over 50 steps, then decays linearly over the whole run to 5%."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: opd.lr_factor(s, steps, 50, 1.0, floor=0.05))
    t0 = time.time()
    for step in range(steps):
        loss = opd.sft_nll(model, tokenizer, draw(batch_size, rng), device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            print(f"[build] {name} step {step + 1}/{steps} nll {loss.item():.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    return model


@torch.no_grad()
def loop_eos_profile(model, tokenizer, examples, depths=range(-1, 6)) -> dict:
    """Mean p(EOS) after k + d repeats of the motif (d = 0: the correct stop; d > 0: inside a
    loop). A teacher whose p(EOS) falls with d makes loops absorbing (tutorial, the collapse)."""
    out = {}
    for d in depths:
        rows = [(e["prompt"], e["prompt"].split()[:-3], int(e["prompt"].split()[-2]))
                for e in examples]                                            # motif, k
        rows = [(p, motif * (k + d)) for p, motif, k in rows if k + d > 0]
        prompts = opd.prompt_token_ids(tokenizer, [p for p, _ in rows])
        answers = tokenizer([" ".join(a) for _, a in rows], add_special_tokens=False)["input_ids"]
        ids, attn = opd.left_pad([p + a for p, a in zip(prompts, answers)], tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attn,
                       position_ids=opd.position_ids(attn)).logits[:, -1].float()     # (B, V)
        out[d] = round(F.softmax(logits, -1)[:, tokenizer.eos_token_id].mean().item(), 3)
    return out


def role_settings(b: Build, role: str) -> dict:
    """Every setting one model depends on, as build.json records it (the shipped pair's keys)."""
    out = {k: getattr(b, f"{role}_{k}") for k in ("layers", "width", "steps", "free_frac")}
    out.update(role=role, lr=b.pretrain_lr, task_version=3, threads=b.threads,
               pair_seed=b.pair_seed)
    if role == "teacher":
        out.update(overrun_frac=b.teacher_overrun_frac)
    else:
        out.update(gold_size=b.gold_size)
    return out


def build_pair(out: Path, b: Build = Build(), max_new_tokens: int = 48) -> tuple[str, str]:
    """Train the teacher and the student (each skipped when OUT/<role>/build.json already records
    its settings) and save them with save_pretrained, with build.json and OUT/SHA256SUMS."""
    for role in ("teacher", "student"):
        d, settings = out / role, role_settings(b, role)
        if (d / "build.json").exists() and json.loads((d / "build.json").read_text())[
                "settings"] == settings:
            continue
        print(f"[build] training the {role} into {d} (the teacher takes ~9 min on one core)",
              flush=True)
        t0, threads = time.time(), torch.get_num_threads()
        seed = {"teacher": 0, "student": 1}[role] + 2 * b.pair_seed
        torch.manual_seed(seed)
        torch.set_num_threads(b.threads)
        tokenizer, task = build_tokenizer(), opd.MotifTask()
        model = make_model(tokenizer, getattr(b, f"{role}_layers"), getattr(b, f"{role}_width"))
        train_supervised(model, tokenizer, pretraining_mix(task, b, role),
                         getattr(b, f"{role}_steps"), b.pretrain_lr, random.Random(seed), role)
        torch.set_num_threads(threads)
        tmp = d.with_name(f"{d.name}.tmp")
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        ev = opd.evaluate(model, tokenizer, task.eval_set, max_new_tokens,
                          generator=torch.Generator().manual_seed(0))
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        info = {"role": role, "key": key, "settings": settings,
                "build_s": round(time.time() - t0, 1),
                "params": sum(p.numel() for p in model.parameters()),
                "accuracy": ev["accuracy"], "accuracy_sampled": ev["accuracy_sampled"],
                "p_eos_by_depth": loop_eos_profile(model, tokenizer, task.eval_set)}
        (tmp / "build.json").write_text(json.dumps(info, indent=1))
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)                             # a half-built model is never left in OUT
        print(f"[build] saved {d}: {info}", flush=True)
    files = sorted(p for role in ("student", "teacher") for p in (out / role).iterdir())
    (out / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(out)}\n" for p in files))
    return str(out / "teacher"), str(out / "student")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for teacher/, student/ and SHA256SUMS")
    for f in fields(Build):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = vars(p.parse_args(argv))
    b = Build(**{f.name: a[f.name] for f in fields(Build)})
    if min(asdict(b).values()) < 0 or b.threads < 1 or b.teacher_width % 4 or b.student_width % 4:
        p.error("every setting must be >= 0, --threads >= 1, and each width a multiple of 4 "
                "(4 attention heads)")
    build_pair(a["out"], b)


if __name__ == "__main__":
    main()
