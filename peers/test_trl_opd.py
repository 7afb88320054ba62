"""Tests of peers/trl_opd.py, the fixes inside TRL: the recipe against opd.py's loss (values and
gradients), the guard as a callback, two processes against one, and TRL's reverse KL against opd.py's.

    python -m pytest -q peers          # needs requirements-test.txt (TRL)
"""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import opd  # noqa: E402
from test_opd import HERE, logits_pair, real_pairs, tutorial_block  # noqa: E402,F401  (real_pairs: a fixture)

sys.path.insert(0, str(HERE / "peers"))
import trl_opd  # noqa: E402


def test_trl_distillation_trainer_recipe(real_pairs, tmp_path):
    """The tutorial's MonitoredDistillationTrainer, exactly as written there, trains a tiny local
    pair for 3 steps; the monitor's figures match TRL's own completion metrics step by step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DistillationConfig
    ns = {}
    exec(tutorial_block("class MonitoredDistillationTrainer"), ns)
    d, tok = real_pairs
    tok = copy.deepcopy(tok)
    tok.padding_side = "left"                                         # TRL generates from left-padded prompts
    student, teacher = (AutoModelForCausalLM.from_pretrained(d / "llama" / r) for r in ("student", "teacher"))
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in ["bada kelo mi", "zo ruka"] * 6])
    args = DistillationConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, max_completion_length=6,
                              logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                              beta=1.0, temperature=1.0, disable_tqdm=True)
    trainer = ns["MonitoredDistillationTrainer"](model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                                 processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rollout/len_mean" in h]
    assert len(logs) == 3 and len(trainer.length_monitor.history) == 3
    for h in logs:
        assert h["rollout/len_mean"] == pytest.approx(h["completions/mean_length"])
        assert h["rollout/trunc_rate"] == pytest.approx(h["completions/clipped_ratio"])
        assert math.isfinite(h["loss"]) and {"rollout/rep_rate", "rollout/growth"} <= set(h)


def _tiny_trl(real_pairs, tmp_path, steps, batch, new_tokens, temperature=1.0, lr=1e-3, **kw):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    t = trl_opd
    d, tok = real_pairs
    tok = copy.deepcopy(tok)
    tok.padding_side = "left"                                         # TRL generates from left-padded prompts
    student, teacher = (AutoModelForCausalLM.from_pretrained(d / "llama" / r) for r in ("student", "teacher"))
    texts = ["bada kelo mi", "zo ruka", "tipa su nero", "ka"]
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": x}]} for x in texts] * (steps * batch))
    gold = [{"prompt": "bada kelo mi", "answer": "sute"}, {"prompt": "zo ruka", "answer": "ma ne"}]
    trainer = t.StableOPDTrainer(model=student, teacher_model=teacher, args=t.opd_args(
        str(tmp_path), steps, batch, new_tokens, temperature, lr), train_dataset=prompts, processing_class=tok, gold=gold,
        optimizers=t.opd_schedule(student, steps, lr, 2, 0.0), **kw)
    return t, trainer, tok


def test_stable_opd_trainer_loss_equals_opd_loss(real_pairs, tmp_path):
    """StableOPDTrainer's loss on one batch of TRL's own rollouts = opd.opd_loss(objective="full") with
    the same coefficients (reference KL, gold SFT and sequence-level KD on the teacher's samples), on
    full-model forwards with opd.py's masks and positions: values and gradients."""
    threads = torch.get_num_threads()
    t, tr, tok = _tiny_trl(real_pairs, tmp_path, 1, 8, 8, temperature=1.3, ref_kl=0.5, sft_coef=0.7, seq_kd_coef=0.3)
    torch.set_num_threads(threads)
    torch.manual_seed(5)
    with torch.no_grad():                                              # p_ref != p_S, or the KL term is 0
        for p in tr.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eos = tok.eos_token_id
    bump = torch.zeros(len(tok))
    bump[eos] = 9.0                                                    # a random teacher that stops now and then
    hook = tr.teacher_model.get_output_embeddings().register_forward_hook(lambda m, i, o: o + bump)
    tr.model.train()
    inputs = tr._prepare_inputs([tr.train_dataset[i] for i in range(8)])   # TRL's rollouts, padding and mask
    params = [p for p in tr.model.parameters() if p.requires_grad]
    gold_state, teacher_state = tr.gold_rng.getstate(), tr.teacher_gen.get_state()
    loss = tr.compute_loss(tr.model, inputs)
    g_trl = torch.autograd.grad(loss, params)
    tokens = inputs["completion_ids"]
    P, ids = inputs["prompt_ids"].shape[1], torch.cat([inputs["prompt_ids"], tokens], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    assert torch.equal(opd.response_mask(tokens, eos)[0], inputs["completion_mask"].float())

    g = torch.Generator()
    g.set_state(teacher_state)
    p_ids, p_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    resp, kept = opd.teacher_samples(tr.teacher_model, p_ids, p_mask, 8, eos, tok.pad_token_id, 1.3, g)
    assert 0 < kept.sum() < 8                                          # some of the teacher's samples stop
    seq_kd = opd.sequence_nll(tr.model, p_ids[kept], p_mask[kept], resp[kept], eos)
    hook.remove()                        # TRL's KL term projects the teacher's hidden states itself

    def lsm(m):
        logits = m(input_ids=ids, attention_mask=attn, position_ids=opd.position_ids(attn)).logits
        return F.log_softmax(logits[:, P - 1:-1].float() / 1.3, -1)                              # (B, K, V)
    s_lsm = lsm(tr.model)
    with torch.no_grad():
        t_lsm, r_lsm = lsm(tr.teacher_model), lsm(tr.ref_model)
    tr.gold_rng.setstate(gold_state)
    gold = [tr.gold_rng.choice(tr.gold) for _ in range(8)]
    y = tokens[..., None]
    ref, _ = opd.opd_loss(s_lsm.gather(-1, y).squeeze(-1), t_lsm.gather(-1, y).squeeze(-1), tokens, eos,
                          opd.LossSettings(objective="full", ref_kl=0.5, sft_coef=0.7, seq_kd_coef=0.3),
                          kl=opd.full_vocab_reverse_kl(s_lsm, t_lsm), kl_ref=opd.reference_kl(s_lsm, r_lsm),
                          sft=opd.sft_nll(tr.model, tok, gold), seq_kd=seq_kd)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_trl, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_guard_callback_restores_on_the_first_alert(real_pairs, tmp_path):
    """An alert forced on every step (patience 7): the guard acts at step 6, after the copy of step 5,
    restores that student and switches Stable-OPD on, as opd.py's --guard does."""
    from transformers import TrainerCallback
    steps, threads = 9, torch.get_num_threads()
    t, tr, _ = _tiny_trl(real_pairs, tmp_path, steps, 4, 6, lr=1e-2, monitor_kw=dict(rep=-1.0, patience=7))
    torch.set_num_threads(threads)
    after = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            after[state.global_step - 1] = copy.deepcopy(tr.model.state_dict())

    guard = t.GuardCallback(tr)
    tr.add_callback(guard)
    tr.add_callback(Record())
    tr.train()
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    assert guard.guard.acted and guard.guard.saved["step"] == 5
    assert same(after[6], after[5]) and not any(same(after[i], after[5]) for i in range(5))
    assert (tr.ref_kl, tr.sft_coef) == (opd.STABLE_OPD["ref_kl"], opd.STABLE_OPD["sft_coef"])
    logs = {h["step"]: h for h in tr.state.log_history if "loss" in h}
    assert logs[7].get("guard/acted") == 1.0 and "loss/sft" in logs[8] and "loss/sft" not in logs[7]


DDP_DRIVER = """
import json, os, sys, torch
torch.set_num_threads(1)
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "peers")]
import opd, trl_opd
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
d, out = sys.argv[2], sys.argv[3]
tok = AutoTokenizer.from_pretrained(d + "/student", padding_side="left")
student, teacher = (AutoModelForCausalLM.from_pretrained(d + "/" + r) for r in ("student", "teacher"))
world = int(os.environ.get("WORLD_SIZE", 1))
texts = ["bada kelo mi", "zo ruka", "tipa su nero", "ka", "mi zo", "ruka bada", "nero su", "kelo"]
args = trl_opd.opd_args(out + "/t", steps=3, batch_size=8, max_new_tokens=6, processes=world)
args.generation_kwargs = {"do_sample": False}          # greedy: the same completions however the batch is split
tr = trl_opd.StableOPDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                              train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": x}]} for x in texts * 3]),
                              gold=[{"prompt": "zo ruka", "answer": "ma ne"}] * 8, ref_kl=0.05, sft_coef=0.5,
                              optimizers=trl_opd.opd_schedule(student, 3, 1e-2, 1, 0.0))
tr.train()
if tr.accelerator.is_main_process:
    json.dump({"processes": tr.accelerator.num_processes, "loss": [h["loss"] for h in tr.state.log_history if "loss" in h],
               "seen": [h["rollout/len_mean"] for h in tr.state.log_history if "loss" in h],
               "params": [p.detach().double().sum().item() for p in tr.model.parameters()]}, open(out + "/r.json", "w"))
tr.accelerator.wait_for_everyone()
if torch.distributed.is_initialized():      # leave gloo before exit: its threads abort a process that exits mid-teardown
    torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    """A TCP port no process is listening on now, for the launcher's rendezvous."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(os.environ.get("OPD_SKIP_DDP") == "1", reason="OPD_SKIP_DDP=1")
def test_two_processes_train_like_one(real_pairs, tmp_path):
    """The recipe under `accelerate launch --num_processes 2` on CPU (gloo): with greedy rollouts (the
    same completions however the batch of 8 is split), the logged losses, the monitor's figures (it
    reads both processes' rollouts) and the weights after 3 steps equal a one-process run's, to float32
    summation order (rel 1e-5)."""
    d, _ = real_pairs
    (tmp_path / "driver.py").write_text(DDP_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        out.mkdir()
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                  str(_free_port())] if n == 2 else [sys.executable]
        r = subprocess.run([*launch, str(tmp_path / "driver.py"), str(HERE), str(d / "llama"), str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[n] = json.loads((out / "r.json").read_text())
    assert len(runs[1]["loss"]) == 3 and (runs[1]["processes"], runs[2]["processes"]) == (1, 2)
    for k in ("loss", "seen", "params"):
        assert runs[2][k] == pytest.approx(runs[1][k], rel=1e-5, abs=1e-6), k
        rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(runs[2][k], runs[1][k]))
        print(f"two processes vs one, {k}: largest relative difference {rel:.1e}")   # pytest -s shows it


def test_tutorial_names_the_trl_recipe_as_in_the_file():
    """The tutorial describes StableOPDTrainer and GuardCallback rather than copying their 80 lines:
    every function and class it names in "The fixes inside TRL" exists in opd.py or in
    peers/trl_opd.py, and the keywords it names are the trainer's and the callback's."""
    import inspect
    import re
    text = (HERE / "tutorial.md").read_text()
    section = text[text.index("### The fixes inside TRL"):]
    section = section[:section.index("\n## ")]
    names = set(re.findall(r"`(\w+)\(", section)) | set(re.findall(r"`([A-Z][a-z]\w*)`", section))
    assert {"StableOPDTrainer", "GuardCallback", "reference_kl", "sft_nll", "LengthMonitor"} <= names
    src = (HERE / "peers" / "trl_opd.py").read_text()
    known = {n for n in names if hasattr(opd, n) or re.search(rf"^(class|def) {n}\b", src, re.M)}
    assert names - known <= {"DistillationTrainer"}, sorted(names - known)      # TRL's own class
    tests = (HERE / "peers" / "test_trl_opd.py").read_text()
    for name in re.findall(r"`(test_\w+)`", section):
        assert f"def {name}(" in tests, name
    for kw in ("ref_kl", "sft_coef", "seq_kd_coef"):
        assert f"`{kw}`" in section and kw in inspect.signature(trl_opd.StableOPDTrainer.__init__).parameters
    assert "fix" in inspect.signature(trl_opd.GuardCallback.__init__).parameters


@given(logits_pair(max_b=3, max_t=6, max_v=10), st.floats(0.5, 2.0), st.integers(0, 99))
def test_trl_reverse_kl_equals_full_vocab_loss(pair, temperature, seed):
    """opd's full-vocabulary reverse KL with token-mean = TRL's generalized_jsd_loss(beta=1) (the GKD
    trainer's loss) and the chunked loss DistillationTrainer trains with: values and gradients."""
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
    a, b = pair
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(a.shape[:2], generator=g) < 0.7).double()
    mask[0, 0] = 1.0                                                   # at least one real token
    labels = torch.where(mask.bool(), 0, -100)

    def grad_of(loss_fn):
        x = a.clone().requires_grad_(True)
        loss = loss_fn(x)
        return loss.detach(), torch.autograd.grad(loss, x)[0]

    ours = grad_of(lambda x: opd.aggregate_loss(opd.full_vocab_reverse_kl(F.log_softmax(x / temperature, -1),
                                                                           F.log_softmax(b / temperature, -1)), mask, "token-mean"))
    gkd = grad_of(lambda x: GKDTrainer.generalized_jsd_loss(x, b, labels, beta=1.0, temperature=temperature))
    for o, t in zip(ours, gkd):
        torch.testing.assert_close(o, t)
    # DistillationTrainer projects hidden states through the heads itself (identity heads here, so the
    # logits are a and b) and computes in float32
    eye = torch.eye(a.shape[-1], dtype=torch.float64)
    dist = grad_of(lambda x: _chunked_divergence_loss(x, b, eye, eye, mask, beta=1.0, temperature=temperature)[0])
    for o, t in zip(ours, dist):
        torch.testing.assert_close(o, t.double(), rtol=1e-4, atol=1e-5)
