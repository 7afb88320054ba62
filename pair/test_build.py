"""Tests of pair/build.py, the shipped pair's build: its training texts, a tiny build kept and rebuilt
on change, the same bytes from the same settings, and the shipped files against their checksums and
recorded accuracy.

    python -m pytest -q pair
"""
import hashlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import opd  # noqa: E402
from test_opd import build  # noqa: E402  (pair/build.py, loaded once)


@given(st.integers(0, 99))
def test_overrun_text_trains_only_past_the_free_repeats(seed):
    """Over-run text: no loss on the prompt, the k correct repeats and the 2 free ones; loss on
    every token after them; no EOS anywhere (the text never ends)."""
    tok, task = build.build_tokenizer(), opd.MotifTask(eval_size=8)
    ex = build.overrun_text(task, random.Random(seed))
    motif, k = ex["prompt"].split()[:-3], int(ex["prompt"].split()[-2])
    ids, _, labels = opd.supervised_batch(tok, [ex])
    trained = [int(i) for i, l in zip(ids[0], labels[0]) if l != -100]
    answer = tok(ex["answer"], add_special_tokens=False)["input_ids"]
    assert ex["skip"] == len(motif) * (k + 2) and trained == answer[ex["skip"]:] and len(trained) >= 1
    assert tok.eos_token_id not in ids[0].tolist() and ex["answer"].split() == (motif * 48)[:len(answer)]


def test_tokenizer_and_model_roundtrip(tmp_path):
    tok = build.build_tokenizer()
    torch.manual_seed(0)
    model = build.make_model(tok, 1, 16)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2, model2 = opd.load_pretrained(str(tmp_path), "cpu")
    text = "a b c x 3 ="
    assert tok2(text)["input_ids"] == tok(text)["input_ids"] and len(tok(text)["input_ids"]) == 7   # BOS + 6 words
    assert tok2.decode(tok2(text)["input_ids"], skip_special_tokens=True) == text
    ids = torch.tensor([tok(text)["input_ids"]])
    torch.testing.assert_close(model.eval()(ids).logits, model2.eval()(ids).logits)


TINY = build.Build(teacher_width=32, student_width=16, teacher_steps=30, student_steps=5)


def test_a_build_is_kept_rebuilt_on_change_and_the_same_twice(tmp_path, capsys):
    """A tiny build writes teacher/, student/ and SHA256SUMS; built again with the same settings it is
    kept; a changed student setting rebuilds the student only; another folder with the same settings
    gets the same bytes (one thread); and a run on it passes --teacher and --student."""
    paths = build.build_pair(tmp_path / "a", TINY, max_new_tokens=12)
    assert "training the teacher" in capsys.readouterr().out
    listed = dict(reversed(line.split("  ", 1)) for line in (tmp_path / "a" / "SHA256SUMS").read_text().splitlines())
    assert {"teacher/model.safetensors", "student/build.json"} <= set(listed)
    build.build_pair(tmp_path / "a", TINY, max_new_tokens=12)
    assert "training" not in capsys.readouterr().out
    build.build_pair(tmp_path / "a", build.Build(**{**vars(TINY), "student_steps": 6}), max_new_tokens=12)
    out = capsys.readouterr().out
    assert "training the student" in out and "training the teacher" not in out
    build.build_pair(tmp_path / "b", TINY, max_new_tokens=12)
    for role in ("teacher",):
        assert (tmp_path / "a" / role / "model.safetensors").read_bytes() == \
            (tmp_path / "b" / role / "model.safetensors").read_bytes()
    cfg = opd.Config(teacher=paths[0], student=paths[1], steps=1, batch_size=4, eval_size=4, max_new_tokens=8,
                     out_dir=str(tmp_path / "runs"), log_samples_every=0)
    assert len(opd.run_opd(cfg)) == 2


def test_shipped_pair_matches_its_recorded_checksums():
    """pair/SHA256SUMS (sha256sum's format) lists every shipped model file and its SHA-256."""
    d = HERE / "pair"
    listed = dict(reversed(line.split("  ", 1)) for line in (d / "SHA256SUMS").read_text().splitlines())
    files = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.parent.name in ("teacher", "student")}
    assert set(listed) == files and {"teacher/model.safetensors", "student/build.json"} <= files
    for name, digest in listed.items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest, name


def test_the_shipped_pair_records_its_settings_and_accuracy():
    """Each shipped model's build.json holds the settings build.py's defaults give, and the held-out
    greedy accuracy it records, within 3 of MotifTask's 128 prompts: greedy decoding changes only where
    two tokens tie to within rounding."""
    task = opd.MotifTask()
    for path in opd.default_pair():
        info = json.loads((Path(path) / "build.json").read_text())
        assert info["settings"] == build.role_settings(build.Build(), info["role"])
        tok, model = opd.load_pretrained(path, "cpu")
        acc = opd.evaluate(model, tok, task.eval_set, 48)["accuracy"]
        assert abs(acc - info["accuracy"]) <= 3 / 128, (path, acc, info["accuracy"])
