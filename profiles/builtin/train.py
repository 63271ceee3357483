"""Train the built-in MoE model on the built-in tasks (reproducible on 2 CPU cores).

The model is a standard transformers `qwen3_moe` architecture (config in `config.json` beside this
file): 8 decoder layers, each with 8 routed experts and top-2 routing, hidden size 128, a character
vocabulary. It follows the recipe measured in REFERENCE section 7 (AdamW 3e-3, one-cycle schedule,
answers least-significant digit first) with subtraction in place of the chained task, a batch of 96
and arithmetic sampled more often than sorting and reversal.

Usage (from the repository root; about an hour on 2 CPU cores):

    python -m profiles.builtin.train --steps 6000 --batch 96 --out profiles/builtin

It writes `config.json`, `model.safetensors` (bf16) and `tokenizer.json` into `--out`, and a
training log `train_log.json` with the loss curve and periodic accuracies on the `profile` split.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from profiles.tasks import TASKS, CharTokenizer, generate, score, split_of

HERE = Path(__file__).resolve().parent
# The arithmetic tasks need far more steps than sorting and reversal (REFERENCE section 7).
TASK_WEIGHTS = {"add": 0.3, "sub": 0.3, "sort": 0.2, "reverse": 0.2}
MAX_LEFT_PAD = 3  # random left padding, so left-padded evaluation batches look familiar


def model_config(tok: CharTokenizer) -> dict:
    """The built-in model's transformers config (qwen3_moe)."""
    return {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": tok.vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "router_aux_loss_coef": 0.01,
        "output_router_logits": False,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def build_model(tok: CharTokenizer, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model_config(tok)
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items()
                                                             if k != "architectures"})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def sample_batch(rng: random.Random, tok: CharTokenizer, batch: int):
    """A training batch: random tasks, operands from the train split, random left padding.

    Returns input_ids, attention_mask and labels, each [batch, width]; labels are -100 except on
    the answer and EOS, so the loss is on what the model must produce.
    """
    names, weights = list(TASK_WEIGHTS), list(TASK_WEIGHTS.values())
    rows = []
    for _ in range(batch):
        task = TASKS[rng.choices(names, weights)[0]]
        while True:
            ops = task.sample_operands(rng)
            if split_of(task.name, ops) == "train":
                break
        ex = task.example(ops)
        p = tok.encode(ex.prompt)
        a = tok.encode(ex.answer, add_bos=False) + [tok.eos_token_id]
        rows.append((p, a, rng.randint(0, MAX_LEFT_PAD)))
    # the batch is as wide as its longest padded row: padding costs compute on 2 cores
    width = max(len(p) + len(a) + pad for p, a, pad in rows)
    ids = torch.full((batch, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    for row, (p, a, pad) in enumerate(rows):
        start = pad  # `pad` left pads before, right padding after (masked, no loss)
        seq = p + a
        ids[row, start:start + len(seq)] = torch.tensor(seq)
        mask[row, start:start + len(seq)] = 1
        labels[row, start + len(p):start + len(seq)] = torch.tensor(a)
    return ids, mask, labels


@torch.no_grad()
def quick_eval(model, tok: CharTokenizer, split: str, n: int) -> dict[str, float]:
    """Greedy content accuracy per task on `n` prompts (a fast check during training)."""
    model.eval()
    out = {}
    for name in TASKS:
        exs = generate(name, split, n, seed=0)
        ids, mask = tok.batch_encode([e.prompt for e in exs])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = [tok.decode(g[ids.shape[1]:]) for g in gen]
        out[name] = sum(score(e, t)[1] for e, t in zip(exs, texts)) / n
    model.train()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is fastest on a shared 2-core machine (no OpenMP spinning)")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tok = CharTokenizer()
    model = build_model(tok, args.seed)
    model.config.output_router_logits = True  # adds the load-balancing loss during training
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.05)
    rng = random.Random(args.seed)
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "loss": [], "evals": []}
    model.train()
    t0 = time.time()
    ema = None
    for step in range(1, args.steps + 1):
        ids, mask, labels = sample_batch(rng, tok, args.batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            log["loss"].append([step, round(ema, 5)])
            print(f"step {step} loss {ema:.4f} {time.time() - t0:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = quick_eval(model, tok, "profile", 100)
            log["evals"].append({"step": step, "content_acc_profile_100": acc})
            print(f"step {step} content accuracy (profile, 100/task): {acc}", flush=True)
            _save(model, tok, args.out, log, time.time() - t0)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


def _save(model, tok: CharTokenizer, out: Path, log: dict, seconds: float) -> None:
    from profiles.fileio import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    tmp = out / ".save_tmp"
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    model.to(torch.float32)
    model.config.output_router_logits = True
    for name in ("config.json", "model.safetensors"):
        (tmp / name).replace(out / name)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    tok.save(out / "tokenizer.json")
    log["train_seconds"] = round(seconds, 1)
    atomic_write_json(out / "train_log.json", log)


if __name__ == "__main__":
    main()
