"""The real-model study's data and models: "What is the plural of "X"?" for a chat model
(tutorial, real models).

    python real/plurals.py files real/data              # prompts.jsonl (128 nouns held out), context.json
    python real/plurals.py models GGUF real/smollm2     # real/smollm2/chat and real/smollm2/plain
    python real/plurals.py preflight STUDENT TEACHER real/data     # the teacher's grades, both renderings
    python real/plurals.py check MODEL[,MODEL] real/data [OUT]     # bare and after the worked examples

`models` dequantizes a .gguf file (llama.cpp's format; needs gguf and accelerate, see
requirements-test.txt) into two save_pretrained folders with the same weights: chat/, the model as
shipped, and plain/, its tokenizer without a chat template, so a teacher loaded from it reads each
prompt as plain text, the prompt and a newline: the format mismatch of the study. A response is
correct when it stops and the first word after " is " is the plural asked for ("accept" regex per
row); the "answer" field, the reference sentence in the context's style, serves Stable-OPD's SFT
term. context.json holds worked examples, for `check` (how much they help the model).
"""
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import opd  # noqa: E402

# worked examples the teacher reads before every prompt (as earlier chat turns); never asked
CONTEXT_NOUNS = {"fox": "foxes", "city": "cities", "knife": "knives", "lamp": "lamps"}
IRREGULAR = dict(child="children", man="men", woman="women", mouse="mice", tooth="teeth", foot="feet", goose="geese",
                 person="people", leaf="leaves", wife="wives", wolf="wolves", shelf="shelves", half="halves",
                 calf="calves", loaf="loaves", thief="thieves", life="lives", elf="elves", potato="potatoes",
                 tomato="tomatoes", hero="heroes", echo="echoes", sheep="sheep", ox="oxen", crisis="crises")
NOUNS = """cat dog house car tree book apple bird chair table door window river bed clock phone road bridge ship
boat train plane horse cow duck frog snake lion tiger bear rabbit flower garden school teacher student doctor farmer
king queen friend sister brother mother father girl egg star moon cloud hill lake island bottle plate spoon fork bell
ring coin map card letter song game ball kite drum wall floor room kitchen desk pencil paper page word name idea
question answer problem number line circle square shirt coat skirt glove boot cake cookie orange banana lemon grape
pear onion carrot bean nut seed farm field forest mountain ocean wave shore stone rock shell tent camp village town
street park market shop bank office machine engine wheel tire truck bike rocket planet lesson test grade prize gift
doll puzzle candle mirror picture frame curtain pillow blanket towel bucket basket ladder hammer nail tool rope chain
button pocket wallet ticket envelope stamp parcel cup mug kettle oven sink shower fence gate path hole pond root worm
bee ant spider eagle owl parrot whale shark dolphin crab turtle camel zebra giraffe elephant goat pig chicken kitten
airport apron arm artist baker balloon band barn beard belt blade board bone bowl brick broom bubble bug building
cabin cable camera canal cap captain carpet castle cave chip cliff coast collar comb cook corner cousin crown cushion
dancer diamond dragon drawer driver eye feather finger flag garage ghost goal guitar hand head helmet hook horn hotel
insect jacket jar jewel kid knee label lamb leg lid lip lock magnet meal melon minute monster motor mouth nest needle
net nose note nurse painter pan parent pearl pen pet pilot pin pipe pirate pizza player poem pot pump rat ribbon robot
rug ruler sail sailor sandal saucer seat shadow sheet shoe shoulder signal singer skate slipper snail sock soldier
squirrel statue stick stool storm stove string swan sweater sword tail tank thumb toe tower track trumpet tunnel uncle
umbrella vase violin wagon wing wizard yard photo zoo radio video kangaroo piano
box bus dish church glass watch brush class wish beach peach bench lunch match kiss dress witch torch sandwich inch
branch coach tax bush boss address princess
baby lady story party country cherry berry puppy pony family library army body butterfly dictionary diary fairy
factory fly hobby lily penny spy strawberry enemy memory battery bakery candy daisy
boy toy day key monkey donkey valley turkey tray journey chimney holiday birthday highway kidney trolley
""".split() + list(IRREGULAR)


def plural(word: str) -> str:
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "es" if word.endswith(("s", "x", "z", "ch", "sh")) else word + "s"


def row(word: str, split: str) -> dict:
    """A prompt, its reference sentence in the context's style, and the grader: the first word
    after " is " (quotes allowed) must be the plural."""
    p = plural(word)
    return {"prompt": f'What is the plural of "{word}"?', "answer": f'The plural of "{word}" is "{p}".',
            "accept": rf'(?s)^(?:(?! is ).)* is "?{re.escape(p)}(?![A-Za-z])', "split": split}


def context() -> list[dict]:
    msgs = []
    for w, p in CONTEXT_NOUNS.items():
        msgs += [{"role": "user", "content": f'What is the plural of "{w}"?'},
                 {"role": "assistant", "content": f'The plural of "{w}" is "{p}".'}]
    return msgs


def write_files(out: Path, n_eval: int = 128, seed: int = 0):
    words = [w for w in dict.fromkeys(NOUNS) if w not in CONTEXT_NOUNS]
    random.Random(seed).shuffle(words)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row(w, "eval") for w in words[:n_eval]] + [row(w, "train") for w in words[n_eval:]]
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "context.json").write_text(json.dumps(context(), indent=1) + "\n")
    print(f"{out}/prompts.jsonl: {n_eval} held-out nouns, {len(words) - n_eval} for training; {out}/context.json: "
          f"{len(CONTEXT_NOUNS)} worked examples")


def models(gguf_file: str, out: Path):
    """OUT/chat and OUT/plain from a .gguf file: the same float32 weights, and the tokenizer with
    and without its chat template. transformers dequantizes the file; the model is rebuilt unmarked,
    as save_pretrained refuses one marked "quantized with gguf"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    where, name = str(Path(gguf_file).parent), Path(gguf_file).name
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=opd.torch.float32)
    except (OSError, ValueError, ImportError) as e:
        opd.fail(f"could not load {gguf_file!r}: {str(e).splitlines()[0]} (a .gguf file needs pip install "
                 "gguf==0.19.0 accelerate==1.15.0)")
    del loaded.config.quantization_config
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    for kind in ("chat", "plain"):
        model.save_pretrained(out / kind)
        if kind == "plain":
            tok.chat_template = None
        tok.save_pretrained(out / kind)
    print(f"{out}/chat and {out}/plain: {sum(p.numel() for p in model.parameters()):,} parameters each")


@opd.torch.no_grad()
def rendering_gap(student: str, teacher: str, data: Path, n: int = 8, max_new_tokens: int = 64):
    """Pre-flight: the teacher's mean log-prob per token of the student's greedy answers to the first `n`
    held-out prompts, after the student's rendering of each prompt and after the teacher's own: what a
    format mismatch does to the teacher's grades before any step."""
    torch, F = opd.torch, opd.F
    tok_s, model_s = opd.load_pretrained(student, "cpu")
    tok_t, model_t = opd.load_pretrained(teacher, "cpu")
    texts = [r["prompt"] for r in opd.read_prompts(str(data / "prompts.jsonl")) if r["split"] == "eval"][:n]
    p_ids, p_attn = opd.encode_batch(tok_s, texts)
    resp = opd.sample_rollouts(model_s, p_ids, p_attn, max_new_tokens, tok_s.eos_token_id, tok_s.pad_token_id,
                               greedy=True)                                               # (n, T)
    mask = opd.response_mask(resp, tok_s.eos_token_id)[0]                                 # (n, T)
    out = []
    for ids, attn in ((p_ids, p_attn), opd.encode_batch(tok_t, texts, pad=tok_s.pad_token_id)):
        h = opd.response_hidden_states(model_t, torch.cat([ids, resp], 1), torch.cat([attn, mask.long()], 1),
                                       ids.shape[1])                                      # (n, T, H)
        lp = F.log_softmax(model_t.get_output_embeddings()(h).float(), -1).gather(-1, resp[..., None]).squeeze(-1)
        out.append(((lp * mask).sum() / mask.sum()).item())
    print(f"the teacher's mean log-prob of {n} greedy answers of the student: {out[0]:.3f} per token after "
          f"the student's rendering, {out[1]:.3f} after its own")
    return out


def check(models: str, data: Path, out: Path | None = None, max_new_tokens: int = 64, n: int = 64):
    """Each model (comma-separated paths) on the study's held-out nouns (the first `n`), bare and,
    with a chat template, after the worked examples: greedy and at temperature 1; the greedy answers
    to three nouns printed, to show what a teacher's own answers teach. With OUT, the table goes to
    OUT/results.md (opd.write_results' format)."""
    held = [r for r in opd.read_prompts(str(data / "prompts.jsonl")) if r["split"] == "eval"][:n]
    ctx = json.loads((data / "context.json").read_text())
    rows = []
    for path in models.split(","):
        tok, model = opd.load_pretrained(path, "cpu")
        for name, c in (("bare", ()), ("worked examples first", ctx))[:2 if tok.chat_template else 1]:
            ev = opd.evaluate(model, tok, held, max_new_tokens, batch_size=32, context=c,
                              generator=opd.torch.Generator().manual_seed(0))
            rows.append({"model": path, "prompt": name, "greedy acc": f"{ev['accuracy']:.2f}",
                         "greedy length": f"{ev['len_mean']:.1f}", "greedy trunc": f"{ev['trunc_rate']:.2f}",
                         "T=1 acc": f"{ev['accuracy_sampled']:.2f}"})
        ids, attn = opd.encode_batch(tok, [r["prompt"] for r in held[:3]])
        resp = opd.sample_rollouts(model, ids, attn, max_new_tokens, tok.eos_token_id, tok.pad_token_id, greedy=True)
        for r, x in zip(held[:3], resp):
            print(f"    {path}: {r['prompt']!r} -> {tok.decode(x, skip_special_tokens=True)!r}", flush=True)
    table = opd.markdown(list(rows[0]), [list(r.values()) for r in rows])
    print(table, flush=True)
    if out:
        opd.write_results(rows, out, {"check": table},
                          f"`python real/plurals.py check {models} {data} {out}`")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "files":
        write_files(Path(sys.argv[2]))
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "check":
        check(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]) if len(sys.argv) == 5 else None)
    elif len(sys.argv) == 4 and sys.argv[1] == "models":
        models(sys.argv[2], Path(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "preflight":
        rendering_gap(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
