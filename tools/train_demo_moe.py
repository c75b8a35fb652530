"""Train the embedded demo MoE (qwen3moe layout) on the tokenized demo corpus (issue 6).

Runs on one GPU inside a 10-minute call: it stops at --minutes, evaluates held-out loss per domain every
--eval-every steps, and writes the checkpoint with the lowest mean held-out loss as bf16 shards of at most
15 MiB (the device returns files of 16 MiB at most). --resume continues from such a checkpoint (weights and
step; the optimizer restarts, its moments would not fit the return limit).

Requirements: torch, numpy; input from tools/demo_tokenizer.py.

    PYTHONUNBUFFERED=1 python tools/train_demo_moe.py --data .carry/demo --out $OUT --minutes 7
    python tools/train_demo_moe.py --data .carry/demo --out /tmp/ck --tiny --steps 20 --device cpu --no-compile
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_moe_model import DemoConfig, DemoMoE  # noqa: E402

SHARD_BYTES = 15 * 2**20
AUX_LOSS_COEF = 0.01
TINY = DemoConfig(n_layer=2, d_model=64, n_head=2, n_kv_head=1, head_dim=32, n_expert=4, n_ff_expert=64,
                  context_length=64)


def load_tokens(data: Path, split: str, device) -> dict[str, torch.Tensor]:
    """{domain: token ids} from <data>/tokens/<domain>.<split>.npy, domains in name order."""
    paths = sorted((data / "tokens").glob(f"*.{split}.npy"))
    return {p.name.split(".")[0]: torch.from_numpy(np.load(p).astype(np.int64)).to(device) for p in paths}


class Sampler:
    """Random windows of T+1 tokens; a row's domain is drawn with probability proportional to sqrt(tokens)."""

    def __init__(self, tokens: dict[str, torch.Tensor], seq: int, seed: int):
        self.flat = torch.cat(list(tokens.values()))
        lens = torch.tensor([t.numel() for t in tokens.values()])
        self.starts = (torch.cumsum(lens, 0) - lens).to(self.flat.device)
        self.spans = (lens - seq - 1).to(self.flat.device)
        weights = lens.double().sqrt()
        self.probs = (weights / weights.sum()).to(self.flat.device)
        self.seq = seq
        self.gen = torch.Generator(device=self.flat.device).manual_seed(seed)

    def batch(self, rows: int):
        dom = torch.multinomial(self.probs, rows, replacement=True, generator=self.gen)
        u = torch.rand(rows, generator=self.gen, device=self.flat.device)
        offs = self.starts[dom] + (u * self.spans[dom]).long()
        win = self.flat[offs[:, None] + torch.arange(self.seq + 1, device=self.flat.device)]   # [B, T+1]
        return win[:, :-1], win[:, 1:]


@torch.no_grad()
def evaluate(model, tokens: dict[str, torch.Tensor], seq: int, rows: int, autocast) -> dict:
    """Mean next-token loss over non-overlapping windows of each domain, and each layer's expert shares."""
    model.eval()
    out = {}
    for d, t in tokens.items():
        n = (t.numel() - 1) // seq
        x = t[: n * seq].view(n, seq)
        y = t[1: n * seq + 1].view(n, seq)
        loss_sum, counts = 0.0, None
        for i in range(0, n, rows):
            with autocast():
                logits, _, chosen = model(x[i:i + rows])
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y[i:i + rows].flatten(), reduction="sum").item()
            c = torch.stack([torch.bincount(ci.flatten(), minlength=model.c.n_expert) for ci in chosen])
            counts = c if counts is None else counts + c
        shares = (counts.float() / counts.sum(1, keepdim=True)).cpu().numpy().round(3).tolist()
        out[d] = {"loss": loss_sum / (n * seq), "tokens": n * seq, "expert_share": shares}
    model.train()
    return out


def lr_at(step: int, args, time_frac: float = 0.0) -> float:
    """Linear warm-up, then cosine to min_lr_frac; progress is steps or time used, whichever is further,
    so a run cut short by --minutes still ends with a decayed learning rate."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, max(time_frac, (step - args.warmup) / max(1, args.steps - args.warmup)))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(model, out: Path, meta: dict) -> None:
    shards, cur, size = [], {}, 0
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu", torch.bfloat16).contiguous()
        if cur and size + t.numel() * 2 > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * 2
    shards.append(cur)
    names = [f"ckpt-{i:02d}.pt" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        torch.save(shard, out / name)
    (out / "ckpt.json").write_text(json.dumps({**meta, "shards": names}, indent=1))


def load_checkpoint(folder: Path) -> tuple[DemoConfig, dict, dict]:
    meta = json.loads((folder / "ckpt.json").read_text())
    state = {}
    for name in meta["shards"]:
        state.update(torch.load(folder / name, map_location="cpu"))
    return DemoConfig(**meta["config"]), state, meta


def eval_and_keep_best(model, held_tok, seq, args, autocast, config, step, ema, tokens_seen, best, history):
    """Evaluate held-out loss; write the checkpoint when the mean over domains is the lowest so far."""
    ev = evaluate(model, held_tok, seq, args.batch, autocast)
    mean = sum(v["loss"] for v in ev.values()) / len(ev)
    history.append({"step": step, "train_loss_ema": ema, "heldout": {d: v["loss"] for d, v in ev.items()}})
    print(f"eval step {step}: " + "  ".join(f"{d} {v['loss']:.3f}" for d, v in ev.items()) + f"  mean {mean:.3f}",
          flush=True)
    if best is None or mean < best["mean"]:
        best = {"mean": mean, "step": step, "eval": ev, "train_loss_ema": ema, "tokens_seen": tokens_seen}
        save_checkpoint(model, args.out, {"step": step, "config": config.to_dict(), "best": best,
                                          "args": {k: str(v) for k, v in vars(args).items()}})
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", type=Path)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--minutes", type=float, default=7.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a very small config, for a CPU smoke test")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    t0 = time.time()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    config, state, start_step, best = (TINY if args.tiny else DemoConfig()), None, 0, None
    if args.resume:   # a new checkpoint is written only if it beats the resumed one on held-out loss
        config, state, meta = load_checkpoint(args.resume)
        start_step, best = meta["step"], meta["best"]
    model = DemoMoE(config).to(dev)
    if state is not None:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config {config.to_dict()}\nparameters {n_params:,d}  start step {start_step}", flush=True)
    seq = config.context_length
    train_tok, held_tok = load_tokens(args.data, "train", dev), load_tokens(args.data, "heldout", dev)
    sampler = Sampler(train_tok, seq, args.seed + start_step)
    decay = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    keep = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": keep, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    fwd = model if args.no_compile else torch.compile(model)
    use_bf16 = dev.type == "cuda"
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    history, ema, step = [], None, start_step
    tokens_seen = start_step * args.batch * seq
    t_train = time.time()
    budget_s = args.minutes * 60 - (time.time() - t0)       # what is left after loading, for training
    while step < args.steps and (time.time() - t0) < args.minutes * 60:
        time_frac = (time.time() - t_train) / budget_s
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args, time_frac)
        x, y = sampler.batch(args.batch)
        with autocast():
            logits, aux, _ = fwd(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss = ce + AUX_LOSS_COEF * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        if step % 25 == 0 or step == args.steps:
            ce_v = ce.item()
            ema = ce_v if ema is None else 0.9 * ema + 0.1 * ce_v
            rate = (step - start_step) * x.numel() / (time.time() - t_train)
            print(f"step {step:5d}  loss {ce_v:.4f}  ema {ema:.4f}  aux {aux.item():.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{rate / 1e3:.0f}k tok/s  {time.time() - t0:.0f}s", flush=True)
        time_up = (time.time() - t0) >= args.minutes * 60
        if step % args.eval_every == 0 or step == args.steps or time_up:
            best = eval_and_keep_best(model, held_tok, seq, args, autocast, config, step, ema, tokens_seen,
                                      best, history)
    (args.out / "history.json").write_text(json.dumps({"last_step": step, "best_step": best and best["step"],
                                                       "history": history}, indent=1))
    print(f"done at step {step}; best held-out mean {best and round(best['mean'], 4)} at step {best and best['step']}; "
          f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
