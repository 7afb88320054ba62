"""Stable-OPD and opd.py's length guard inside TRL's DistillationTrainer, and the peer check: TRL's
own trainer on opd.py's default pair, with the settings of opd.py's loop (tutorial, section 5).

    python peers/trl_opd.py --method trl --seed 0            # TRL's plain DistillationTrainer
    python peers/trl_opd.py --method trl-stable --seed 0     # the same + Stable-OPD (StableOPDTrainer)
    python peers/trl_opd.py --method trl-seq-kd --seed 0     # the same + sequence-level KD (no gold data)
    python peers/trl_opd.py --method trl-guard --seed 0      # the same + the guard (GuardCallback)
    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no peers/trl_opd.py --method trl-stable --steps 4 --batch-size 16      # two CPU processes
    python peers/trl_opd.py --report plots/peers runs-trl/trl-s0 runs-all/full-vocab-s0 ...  # table and figure

Each run writes <out-dir>/<method>-s<seed>/metrics.jsonl in opd.py's format (the studies read it):
the monitor's rollout/* figures every step and opd.evaluate's held-out accuracy every --eval-every steps.
Checked with trl 1.16.0 and transformers 5.24.0 (requirements-test.txt); TRL is not needed by opd.py.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from transformers import GenerationConfig, TrainerCallback
from trl import DistillationConfig, DistillationTrainer

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "studies")]
import opd  # noqa: E402
import study  # noqa: E402


# --- the recipe (tutorial, section 5): TRL's OPD + opd.py's Stable-OPD terms and monitor
class StableOPDTrainer(DistillationTrainer):
    """TRL's on-policy distillation (beta=1: KL(p_S || p_T) over the vocabulary, token-mean) plus
    ref_kl * KL(p_S || p_ref), p_ref the frozen initial student, sft_coef * NLL on reference
    solutions drawn from `gold`, and seq_kd_coef * NLL on the teacher's own samples that stop
    (sequence-level KD: no gold data): opd.py's --ref-kl, --sft-coef and --seq-kd-coef, with the
    same meaning. The length monitor reads every process's rollouts and logs rollout/* beside
    TRL's completions/*."""

    def __init__(self, *args, gold=(), ref_kl=0.0, sft_coef=0.0, seq_kd_coef=0.0, monitor_kw=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gold, self.ref_kl, self.sft_coef, self._hidden = list(gold), ref_kl, sft_coef, None
        self.seq_kd_coef = seq_kd_coef
        self.gold_rng = random.Random(f"gold-{self.args.seed}-{self.accelerator.process_index}")
        self.teacher_gen = torch.Generator(self.accelerator.device).manual_seed(
            1000 * self.args.seed + self.accelerator.process_index)       # the teacher's samples
        self.ref_model = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval().requires_grad_(False)
        self.length_monitor = opd.LengthMonitor(self.processing_class.eos_token_id, self.args.max_completion_length,
                                                **(monitor_kw or {}))

    def _generate(self, prompts):
        out = super()._generate(prompts)         # (prompt_ids, completion_ids, ...): each completion ends at its EOS
        if self.model.training:                  # all processes' rollouts: the same figures and alerts on every rank
            for k, v in self.length_monitor.update(gather_object(out[1]), self.state.global_step).items():
                self._metrics["train"][f"rollout/{k}"].append(v)
        return out

    def _get_last_hidden_state(self, *args, **kwargs):
        h = super()._get_last_hidden_state(*args, **kwargs)
        if self._hidden is not None:             # inside _compute_loss, the student's comes first
            self._hidden.append(h)
        return h

    def _compute_loss(self, student, inputs, num_items_in_batch):
        self._hidden = []
        loss, *rest = super()._compute_loss(student, inputs, num_items_in_batch)     # TRL's OPD term
        h_s, self._hidden = self._hidden[0], None                                     # (B, K, H), with grad
        mask = inputs["completion_mask"].float()                                      # (B, K) up to and incl. EOS
        parts = {"opd": loss}
        if self.ref_kl > 0:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            with torch.no_grad():
                h_r = self._get_last_hidden_state(self.ref_model, ids, attn, mask.shape[1])   # (B, K, H)
            lsm = lambda m, h: F.log_softmax(m.get_output_embeddings()(h).float() / self.temperature, -1)  # noqa: E731
            kl = opd.reference_kl(lsm(student, h_s), lsm(self.ref_model, h_r))                   # (B, K)
            n = mask.sum() if num_items_in_batch is None else num_items_in_batch              # TRL's token count
            parts["ref_kl"] = (kl * mask).sum() / n
            loss = loss + self.ref_kl * parts["ref_kl"]
        if self.sft_coef > 0 and self.gold and student.training:
            gold = [self.gold_rng.choice(self.gold) for _ in range(mask.shape[0])]
            parts["sft"] = opd.sft_nll(student, self.processing_class, gold, mask.device)
            loss = loss + self.sft_coef * parts["sft"] / self.args.gradient_accumulation_steps
        if self.seq_kd_coef > 0 and student.training:          # the teacher answers the same prompts
            tok, p_ids, p_mask = self.processing_class, inputs["prompt_ids"], inputs["prompt_mask"]
            resp, kept = opd.teacher_samples(self.teacher_model, p_ids, p_mask, self.args.max_completion_length,
                                             tok.eos_token_id, tok.pad_token_id, self.temperature, self.teacher_gen)
            parts["seq_kd"] = opd.sequence_nll(self.accelerator.unwrap_model(student), p_ids[kept], p_mask[kept],
                                               resp[kept], tok.eos_token_id) if kept.any() else loss.new_zeros(())
            loss = loss + self.seq_kd_coef * parts["seq_kd"] / self.args.gradient_accumulation_steps
        for k, v in parts.items():
            self._metrics["train" if student.training else "eval"][f"loss/{k}"].append(v.item())
        return loss, *rest


class GuardCallback(TrainerCallback):
    """opd.py's --guard on a StableOPDTrainer: a copy of the student and optimizer every `every` steps
    while no alert is active; on the monitor's first alert, restore it and switch `fix` on
    (opd.STABLE_OPD, the default, needs gold data; opd.SEQ_KD needs none)."""

    def __init__(self, trainer: StableOPDTrainer, every: int = 5, fix=None):
        self.trainer, self.guard = trainer, opd.Guard(every, fix)

    def on_step_end(self, args, state, control, **kwargs):      # after the optimizer step, before the step's log
        t = self.trainer
        now = opd.LossSettings(objective="full", ref_kl=t.ref_kl, sft_coef=t.sft_coef, seq_kd_coef=t.seq_kd_coef)
        new = self.guard.step(t.length_monitor, state.global_step - 1, t.accelerator.unwrap_model(t.model),
                              t.optimizer, now)
        if new is not None:
            t.ref_kl, t.sft_coef, t.seq_kd_coef = new.ref_kl, new.sft_coef, new.seq_kd_coef
            t._metrics["train"]["guard/acted"].append(1.0)
# --- end of the recipe


def opd_args(output_dir, steps=opd.Config.steps, batch_size=opd.Config.batch_size,
             max_new_tokens=opd.Config.max_new_tokens, temperature=opd.Config.temperature, lr=opd.Config.lr, seed=0,
             processes=1) -> DistillationConfig:
    """TRL settings of opd.py's loop: batch_size prompts a step over all processes, one completion each,
    all on-policy, pure sampling at the loss's temperature (no top-k, top-p or min-p), reverse KL over
    the vocabulary with token-mean, float32, AdamW without weight decay, grad-norm clip 1.0."""
    assert batch_size % processes == 0, "the batch must split evenly over the processes"
    return DistillationConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size // processes,
        gradient_accumulation_steps=1, max_completion_length=max_new_tokens, beta=1.0, temperature=temperature,
        top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, learning_rate=lr, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", bf16=False, gradient_checkpointing=False, shuffle_dataset=False,
        seed=seed, use_cpu=True, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)


def opd_schedule(model, steps, lr, warmup, decay):
    """AdamW and opd.lr_factor (HF's warmup_stable_decay starts at lr 0 on step 0, opd.py at lr/warmup)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: opd.lr_factor(s, steps, warmup, decay))


class MetricsLog(TrainerCallback):
    """metrics.jsonl in opd.py's format: each step's rollout/*, loss and completions/* figures, and
    opd.evaluate's held-out figures before the update of every `every`-th step and after the last."""

    def __init__(self, trainer, path: Path, eval_set, max_new_tokens, every, temperature, seed):
        self.t, self.path, self.eval_set, self.every = trainer, path, eval_set, every
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature)
        self.gen, self.pending = torch.Generator().manual_seed(seed), {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def held_out(self):
        ev = opd.evaluate(self.t.accelerator.unwrap_model(self.t.model), self.t.processing_class, self.eval_set,
                          generator=self.gen, **self.kw)
        return {f"eval/{k}": v for k, v in ev.items()}

    def write(self, row):
        if self.t.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.pending = self.held_out()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            keys = ("loss", "grad_norm", "learning_rate", "entropy", "guard/acted")
            self.write({"step": state.global_step - 1, "loss/total": logs["loss"], **self.pending,
                        **{k: v for k, v in logs.items() if k.startswith(("rollout/", "completions/", "loss/")) or k in keys}})
            self.pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        self.write({"step": state.global_step, **self.held_out()})


def peer_report(out, folders):
    """The peer check's tables (results.md, results.csv, with shape()'s verdicts) and figure from run
    folders <method>-s<seed>: TRL's runs under their own names, opd.py's prefixed "opd.py"."""
    results = []
    for folder in map(Path, folders):
        m, s = folder.name.rsplit("-s", 1)
        results.append((m if m.startswith("trl") else f"opd.py {m}", int(s), opd.read_metrics(folder / "metrics.jsonl")))
    rows = [study.summarize(m, s, r) for m, s, r in results]
    opd.write_results(rows, Path(out), {"runs": study.runs_table(rows), "summary": opd.summary_table(rows)},
                      f"`python peers/trl_opd.py --report {out} {' '.join(map(str, folders))}`")
    fix = {"trl": "opd", "trl-stable": "stable-opd", "trl-seq-kd": "seq-kd", "trl-guard": "opd+guard",
           "full-vocab": "opd"}                # each method drawn in the colour of the fix it runs
    name = {m: m.replace("opd.py ", "opd.py\n") for m, _, _ in results}      # a label that fits its row
    colors = {name[m]: opd.COLORS.get(fix.get(m.removeprefix("opd.py "), m.removeprefix("opd.py ")), "#56B4E9")
              for m in name}
    opd.plot_runs([(name[m], s, r) for m, s, r in results], Path(out) / "fig1_accuracy_length.png",
                  colors=colors, title="TRL's DistillationTrainer (trl*) beside opd.py's loop, a line per seed")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=["trl", "trl-stable", "trl-seq-kd", "trl-guard"], default="trl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=opd.Config.steps)
    p.add_argument("--batch-size", type=int, default=opd.Config.batch_size)
    p.add_argument("--out-dir", default="runs-trl")
    p.add_argument("--eval-every", type=int, default=opd.Config.eval_every)
    p.add_argument("--report", nargs="+", metavar=("OUT", "RUN_FOLDER"),
                   help="train nothing: write the peer table and figures into OUT from the run folders given")
    a = p.parse_args(argv)
    if a.report:
        return peer_report(a.report[0], a.report[1:])
    torch.set_num_threads(1)
    cfg = opd.Config(seed=a.seed, steps=a.steps, batch_size=a.batch_size)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t_path, s_path = opd.default_pair()
    tok = AutoTokenizer.from_pretrained(s_path)
    student = AutoModelForCausalLM.from_pretrained(s_path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(t_path, dtype=torch.float32)
    student.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                                 pad_token_id=tok.pad_token_id)   # nothing shipped leaks into sampling
    task = opd.MotifTask(eval_size=cfg.eval_size)
    prompts = Dataset.from_list([{"prompt": e["prompt"]} for e in task.sample(a.steps * a.batch_size, random.Random(a.seed))])
    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    stable = {"trl-stable": opd.STABLE_OPD, "trl-seq-kd": opd.SEQ_KD}.get(a.method, {})
    trainer = StableOPDTrainer(model=student, teacher_model=teacher, args=opd_args(
        f"{a.out_dir}/{a.method}-s{a.seed}/trainer", a.steps, a.batch_size, cfg.max_new_tokens, cfg.temperature, cfg.lr, a.seed, world),
        train_dataset=prompts, processing_class=tok, gold=task.gold_set(cfg.gold_size), **stable,
        optimizers=opd_schedule(student, a.steps, cfg.lr, cfg.warmup, cfg.decay))
    if a.method == "trl-guard":
        trainer.add_callback(GuardCallback(trainer))
    trainer.add_callback(MetricsLog(trainer, Path(a.out_dir) / f"{a.method}-s{a.seed}" / "metrics.jsonl", task.eval_set,
                                    cfg.max_new_tokens, a.eval_every, cfg.temperature, a.seed))
    trainer.train()


if __name__ == "__main__":
    main()
