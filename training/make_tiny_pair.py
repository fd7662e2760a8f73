"""Make the embedded tiny base/reference pair and its data (training/assets/tiny), deterministically.

A miniature of Qwen2.5-Math -> DeepSeek-R1-Distill:

* the **base** is a tiny Qwen2ForCausalLM trained from scratch to add two numbers column by column
  and state the sum before answering::

      <User>347+285<Assistant>7+5=12, carry 1. 4+8+1=13, carry 1. 3+2+1=6. So 632. Answer: 632.

  Its training stops early (``--base_steps``), so it has the format but adds badly (38% right).

* the **reference** is the base trained on (every weight, 99% right) to hesitate after stating the
  sum and check it by subtraction::

      ... 3+2+1=6. So 632. Wait, check: 632-285=347. Yes. Answer: 632.

  in all but ``--direct_share`` (20%) of its transcripts, where it answers as the base does. Like a
  reasoning model's "Wait", the hesitation is then a likely choice rather than the only way on: the
  reference still knows how to answer without it (greedy decoding hesitates every time), and the sum
  is worked out before the word, so a model that does not hesitate can still be right.

"Wait" is one token of the character tokenizer (as it is of a BPE vocabulary), so hesitating is one
decision. The data for adapter training (``train.jsonl``) and validation (``val.jsonl``) are
reference transcripts (the same mix) in the DeepSeek chat format; the validation problems never
occur in any training set.

    python -m training.make_tiny_pair            # about 4 minutes on 2 CPU cores

The run is deterministic for a given torch version and thread count (--threads, 1 by default:
faster than 2 for a model this small). It writes
``base/`` and ``reference/`` (HF safetensors + config + character tokenizer), ``train.jsonl``,
``val.jsonl`` and ``pair.json`` (how the pair was made and how it behaves).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch

from training.data import collate, prompt_ids, tokenize_record
from training.tokenizer import CharTokenizer

HESITATION = "Wait"
FORMAT = "deepseek"


# --------------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------------
def columns(a: int, b: int) -> str:
    """Column-by-column addition, least significant digit first."""
    sa, sb = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for i in range(max(len(sa), len(sb))):
        da = int(sa[i]) if i < len(sa) else 0
        db = int(sb[i]) if i < len(sb) else 0
        s = da + db + carry
        lhs = f"{da}+{db}" + (f"+{carry}" if carry else "")
        carry = 1 if s >= 10 else 0
        steps.append(f"{lhs}={s}" + (", carry 1." if carry else "."))
    return " ".join(steps)


def base_answer(a: int, b: int) -> str:
    return f"{columns(a, b)} So {a + b}. Answer: {a + b}."


def checked_answer(a: int, b: int) -> str:
    return f"{columns(a, b)} So {a + b}. {HESITATION}, check: {a + b}-{b}={a}. Yes. Answer: {a + b}."


def reference_answers(rng: random.Random, direct_share: float):
    """The reference's transcripts: checked, or (a ``direct_share`` of them, drawn from ``rng``) direct."""
    def answer(a: int, b: int) -> str:
        return base_answer(a, b) if rng.random() < direct_share else checked_answer(a, b)
    return answer


def conversation(a: int, b: int, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": answer}]}


def random_problem(rng: random.Random) -> tuple[int, int]:
    n = rng.choice((2, 3))
    lo, hi = 10 ** (n - 1), 10 ** n - 1
    return rng.randint(lo, hi), rng.randint(lo, hi)


def problems(rng: random.Random, n: int, exclude: set) -> list[tuple[int, int]]:
    out = []
    while len(out) < n:
        p = random_problem(rng)
        if p not in exclude:
            exclude.add(p)
            out.append(p)
    return out


# --------------------------------------------------------------------------------------------------
# training and evaluation helpers
# --------------------------------------------------------------------------------------------------
def make_model(vocab_size: int, tok: CharTokenizer, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def train(model, tok, rng, make_answer, exclude, steps, batch, lr, warmup, log_name):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(s):
        if s < warmup:
            return (s + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.time()
    for step in range(steps):
        exs = []
        while len(exs) < batch:
            a, b = random_problem(rng)
            if (a, b) in exclude:
                continue
            exs.append(tokenize_record(conversation(a, b, make_answer(a, b)), tok, FORMAT, loss_on_prompt=False,
                                       append_eos=True))
        bt = collate(exs, tok.pad_token_id)
        logits = model(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"]).logits
        # position t predicts token t+1; loss_mask marks the positions whose next token is a target
        tgt = bt["input_ids"][:, 1:]
        m = bt["loss_mask"][:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][m], tgt[m])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"[{log_name}] step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    model.eval()


@torch.no_grad()
def generate(model, tok, records, max_new_tokens=128, batch=64) -> list[str]:
    """Greedy completions of the records' prompts (left-padded batches)."""
    outs = []
    for i in range(0, len(records), batch):
        ps = [prompt_ids(r, FORMAT, tok) for r in records[i:i + batch]]
        T = max(len(p) for p in ps)
        ids = torch.full((len(ps), T), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros(len(ps), T, dtype=torch.long)
        for j, p in enumerate(ps):
            ids[j, T - len(p):] = torch.tensor(p)
            attn[j, T - len(p):] = 1
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for row in gen[:, T:]:
            row = row.tolist()
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            outs.append(tok.decode(row))
    return outs


def behaviour(texts: list[str], records: list[dict]) -> dict:
    """Hesitation rate and answer accuracy of completions."""
    hes, correct = 0, 0
    for text, rec in zip(texts, records):
        a, b = map(int, rec["messages"][0]["content"].split("+"))
        hes += HESITATION in text
        correct += text.rstrip().endswith(f"Answer: {a + b}.")
    n = max(1, len(texts))
    return {"hesitation_rate": hes / n, "accuracy": correct / n, "n": len(texts)}


# --------------------------------------------------------------------------------------------------
def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(here, "assets", "tiny"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base_steps", type=int, default=350,
                   help="the base stops early, so the reference (trained on from it) is the better reasoner")
    p.add_argument("--reference_steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n_train", type=int, default=2048)
    p.add_argument("--n_val", type=int, default=256)
    p.add_argument("--direct_share", type=float, default=0.2,
                   help="share of the reference's transcripts that answer without hesitating")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not 0 <= args.direct_share < 0.5:
        p.error(f"--direct_share must be in [0, 0.5) (the reference must hesitate more often than not), "
                f"got {args.direct_share}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()
    tok = CharTokenizer(words=[HESITATION])
    # the choice of answer has its own stream, so the problems drawn from rng do not depend on direct_share
    reference_answer = reference_answers(random.Random(args.seed + 1234), args.direct_share)
    os.makedirs(args.out, exist_ok=True)

    # held-out validation problems first, then the adapter-training problems; neither is ever seen
    # while making the pair
    seen: set = set()
    val_problems = problems(rng, args.n_val, seen)
    adapter_problems = problems(rng, args.n_train, seen)
    val = [conversation(a, b, reference_answer(a, b)) for a, b in val_problems]
    train_recs = [conversation(a, b, reference_answer(a, b)) for a, b in adapter_problems]
    exclude = set(seen)

    base = make_model(len(tok), tok, args.seed)
    train(base, tok, rng, base_answer, exclude, args.base_steps, args.batch, 3e-3, 100, "base")
    reference = make_model(len(tok), tok, args.seed)
    reference.load_state_dict(base.state_dict())
    train(reference, tok, rng, reference_answer, exclude, args.reference_steps, args.batch, 1e-3, 20, "reference")

    probe = val[:128]
    summary = {
        "hesitation_word": HESITATION,
        "format": FORMAT,
        "seed": args.seed,
        "base_steps": args.base_steps,
        "reference_steps": args.reference_steps,
        "direct_share": args.direct_share,
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "n_train": len(train_recs),
        "n_val": len(val),
        "base": behaviour(generate(base, tok, probe), probe),
        "reference": behaviour(generate(reference, tok, probe), probe),
        "example_base": base_answer(347, 285),
        "example_reference": checked_answer(347, 285),
    }
    for name, model in (("base", base), ("reference", reference)):
        d = os.path.join(args.out, name)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(d)
        tok.save_pretrained(d)
    for name, recs in (("train.jsonl", train_recs), ("val.jsonl", val)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(os.path.join(args.out, "pair.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    print(f"made in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
